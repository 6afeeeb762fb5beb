#!/usr/bin/env bash
# tpu/resume.sh: after a preemption, get the slice back and continue the run. When the queued
# resource is SUSPENDED/FAILED, or its node is not READY, or either is gone: delete.sh, create.sh
# (waits for capacity), install.sh, stage.sh, then run_all.sh --last, which replays the saved
# arguments; the run continues from the last checkpoint in its run_dir (on the bucket).
#
# Usage: bash tpu/resume.sh
# Needs the same environment as the first run (TPU, ZONE, PROJECT, MODEL_GCS, DATA_GCS, BUCKET,
# ACCELERATOR, SPOT, ...): keep the exports in a file and source it before every script.
# Refuses when the slice is ACTIVE and READY (nothing was preempted; to restart the process only:
# bash tpu/stop.sh; bash tpu/run_all.sh --last).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
tpu_init "$@"
tpu_need MODEL_GCS DATA_GCS
[[ -f $RELIFT_TPU_STATE/$TPU.args ]] ||
  tpu_die "no saved arguments in $RELIFT_TPU_STATE/$TPU.args: start the run with run_all.sh"

qr_state=$(tpu_qr_state)
node_state=$(tpu_node_state)
echo "queued resource $QR: ${qr_state:-none}; TPU VM $TPU: ${node_state:-none}"
case $qr_state in
  ACTIVE)
    [[ $node_state != READY ]] ||
      tpu_die "$QR is ACTIVE and $TPU READY: nothing to resume (restart the process: bash tpu/stop.sh; bash tpu/run_all.sh --last)"
    bash "$TPU_DIR/delete.sh"
    ;;
  FAILED | SUSPENDING | SUSPENDED) bash "$TPU_DIR/delete.sh" ;;
  "") [[ -z $node_state ]] || bash "$TPU_DIR/delete.sh" ;;
  *) ;;  # still queued or provisioning: create.sh waits for it
esac
bash "$TPU_DIR/create.sh"
bash "$TPU_DIR/install.sh"
bash "$TPU_DIR/stage.sh"
bash "$TPU_DIR/run_all.sh" --last
