#!/usr/bin/env bash
# tpu/run_all.sh: start `python -m relift_jax.main ARG...` on every worker at once, in the
# background, with RELIFT_DISTRIBUTED=1 (jax.distributed.initialize() reads the TPU metadata).
# Each worker keeps the command in ~/relift.cmd, its output in ~/relift.log, the pid in
# ~/relift.pid. The arguments are also saved here ($RELIFT_TPU_STATE/$TPU.args) for --last.
#
# Usage: bash tpu/run_all.sh --gin_file=FILE [--gin.NAME=VALUE ...] --run_dir=DIR
#        bash tpu/run_all.sh --last      # the same arguments again (resume.sh uses it)
# --run_dir must be a folder every worker sees and that outlives the VMs: the bucket stage.sh
# mounts (/gcs/<bucket>/runs/NAME). A gs:// path is refused: relift_jax writes the run directory
# with plain file I/O, so it would land on each worker's local disk and be lost on preemption.
# A run_dir that holds checkpoints resumes from the last one (TrainConfig.resume, on by default).
# Env: TPU, ZONE, PROJECT (required); REMOTE_DIR (relift_jax), RELIFT_TPU_STATE (~/.relift_tpu).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
tpu_init "$@"

saved=$RELIFT_TPU_STATE/$TPU.args
if [[ ${1:-} == --last ]]; then
  [[ $# -eq 1 ]] || tpu_die "--last takes no other arguments"
  [[ -f $saved ]] || tpu_die "no saved arguments in $saved (run run_all.sh with arguments once)"
  set --
  while IFS= read -r -d '' a; do set -- "$@" "$a"; done <"$saved"
  echo "Replaying the arguments saved in $saved"
fi
[[ $# -gt 0 ]] || tpu_die "give the arguments of python -m relift_jax.main, or --last (see --help)"
prev=""
for a in "$@"; do
  if [[ $a == --run_dir=gs://* || ($prev == --run_dir && $a == gs://*) ]]; then
    tpu_die "--run_dir ${a#--run_dir=}: relift_jax writes the run directory with plain file I/O, so not gs://; use the bucket mounted by stage.sh (${RUNS_MOUNT:-/gcs/<bucket>}/runs/NAME)"
  fi
  prev=$a
done

mkdir -p "$RELIFT_TPU_STATE"
printf '%s\0' "$@" >"$saved"
tpu_ssh all "$(tpu_worker run "$@")"
echo "Started on every worker of $TPU. Follow: bash tpu/logs.sh; check: bash tpu/status.sh"
