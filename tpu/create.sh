#!/usr/bin/env bash
# tpu/create.sh: request the TPU slice as a queued resource and wait until it is ACTIVE.
#
# Usage: bash tpu/create.sh
# If the queued resource already exists and is still queued or provisioning, only waits.
# Env: TPU, ZONE, PROJECT (required); ACCELERATOR (v5p-64), RUNTIME_VERSION, QR ($TPU-qr),
#   SPOT=1 (Spot capacity) or RESERVED=1 (your reservation), WAIT_TIMEOUT (21600 s),
#   POLL_INTERVAL (60 s). See tpu/env.sh.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
tpu_init "$@"

state=$(tpu_qr_state)
case $state in
  "")
    flags=()
    [[ $SPOT == 1 ]] && flags+=(--spot)
    [[ $RESERVED == 1 ]] && flags+=(--reserved)
    [[ ${#flags[@]} -le 1 ]] || tpu_die "SPOT=1 and RESERVED=1 exclude each other"
    echo "Requesting $ACCELERATOR ($RUNTIME_VERSION) as queued resource $QR, node $TPU, in $ZONE"
    gcloud compute tpus queued-resources create "$QR" --zone="$ZONE" --project="$PROJECT" \
      --node-id="$TPU" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME_VERSION" \
      --scopes=https://www.googleapis.com/auth/cloud-platform ${flags[@]+"${flags[@]}"}
    ;;
  FAILED | SUSPENDING | SUSPENDED)
    tpu_die "queued resource $QR exists and is $state: bash tpu/resume.sh (or tpu/delete.sh, then create.sh)"
    ;;
  *) echo "Queued resource $QR exists ($state)" ;;
esac

deadline=$((SECONDS + WAIT_TIMEOUT))
while :; do
  state=$(tpu_qr_state)
  case $state in
    ACTIVE)
      echo "$QR is ACTIVE: node $TPU is ready (next: bash tpu/install.sh)"
      exit 0
      ;;
    FAILED | SUSPENDING | SUSPENDED)
      tpu_die "queued resource $QR is $state (why: gcloud compute tpus queued-resources describe $QR --zone=$ZONE --project=$PROJECT); bash tpu/delete.sh, then create.sh again"
      ;;
    *) ;;  # not visible yet, CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING
  esac
  ((SECONDS < deadline)) ||
    tpu_die "still ${state:-not visible} after ${WAIT_TIMEOUT}s; the request stays queued: run create.sh again to keep waiting, or tpu/delete.sh"
  echo "$(date +%H:%M:%S) $QR: ${state:-not visible yet}; next check in ${POLL_INTERVAL}s"
  sleep "$POLL_INTERVAL"
done
