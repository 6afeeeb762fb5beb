#!/usr/bin/env bash
# tpu/status.sh: the queued resource's state, the TPU VM's state and, when it is up, whether
# relift_jax.main runs on each worker (with the last line of its log).
#
# Usage: bash tpu/status.sh
# Env: TPU, ZONE, PROJECT (required); QR ($TPU-qr), REMOTE_DIR (relift_jax).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
tpu_init "$@"

qr_state=$(tpu_qr_state)
node_state=$(tpu_node_state)
echo "queued resource $QR: ${qr_state:-none}"
echo "TPU VM $TPU: ${node_state:-none}"
if [[ $qr_state == ACTIVE && $node_state == READY ]]; then
  tpu_ssh all "$(tpu_worker status)"
elif [[ -n $qr_state && $qr_state != ACTIVE ]]; then
  case $qr_state in
    FAILED | SUSPENDING | SUSPENDED) echo "preempted or failed: bash tpu/resume.sh" ;;
    *) echo "not allocated yet: bash tpu/create.sh waits for it" ;;
  esac
fi
