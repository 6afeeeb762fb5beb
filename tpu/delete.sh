#!/usr/bin/env bash
# tpu/delete.sh: delete the queued resource and its TPU VM (or the bare VM where there is no
# queued resource), and wait until it is gone. The bucket (run directories) is not touched.
#
# Usage: bash tpu/delete.sh
# Env: TPU, ZONE, PROJECT (required); QR ($TPU-qr), WAIT_TIMEOUT (21600 s), POLL_INTERVAL (60 s).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
tpu_init "$@"

if [[ -n $(tpu_qr_state) ]]; then
  echo "Deleting queued resource $QR and its node $TPU"
  gcloud compute tpus queued-resources delete "$QR" --zone="$ZONE" --project="$PROJECT" \
    --force --quiet
  deadline=$((SECONDS + WAIT_TIMEOUT))
  while [[ -n $(tpu_qr_state) ]]; do
    ((SECONDS < deadline)) || tpu_die "$QR still exists after ${WAIT_TIMEOUT}s"
    sleep "$(( POLL_INTERVAL < 10 ? POLL_INTERVAL : 10 ))"
  done
elif [[ -n $(tpu_node_state) ]]; then
  echo "No queued resource $QR; deleting TPU VM $TPU"
  gcloud compute tpus tpu-vm delete "$TPU" --zone="$ZONE" --project="$PROJECT" --quiet
else
  echo "Neither queued resource $QR nor TPU VM $TPU exists"
fi
echo "Deleted"
