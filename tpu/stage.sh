#!/usr/bin/env bash
# tpu/stage.sh: on every worker, copy the base checkpoint (a Hugging Face folder) and the training
# data file from GCS to local disk (STAGE_DIR), and mount BUCKET (where run directories go) with
# Cloud Storage FUSE at RUNS_MOUNT; prints the flags that point tpu/run_all.sh at them.
#
# Usage: bash tpu/stage.sh
# Env: TPU, ZONE, PROJECT, MODEL_GCS (gs://.../Qwen2.5-Math-7B), DATA_GCS (gs://.../train.parquet)
#   (required); BUCKET (mounted when set), RUNS_MOUNT (/gcs/<bucket>), STAGE_DIR (/data).
# Re-running is cheap (rsync of the checkpoint; an existing mount is kept).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
tpu_init "$@"
tpu_need MODEL_GCS DATA_GCS
[[ $MODEL_GCS == gs://* && $DATA_GCS == gs://* ]] || tpu_die "MODEL_GCS and DATA_GCS must be gs:// paths"

model_src=${MODEL_GCS%/}
model=$STAGE_DIR/${model_src##*/}
data=$STAGE_DIR/${DATA_GCS##*/}
args=(stage "$model_src" "$DATA_GCS" "$STAGE_DIR")
[[ -n $BUCKET_NAME ]] && args+=("$BUCKET_NAME" "$RUNS_MOUNT")
tpu_ssh all "$(tpu_worker "${args[@]}")"

echo "Staged on every worker. Arguments for bash tpu/run_all.sh:"
echo "  --gin.ModelLoadConfig.path=\"'$model'\" --gin.ModelLoadConfig.tokenizer_path=\"'$model'\" \\"
echo "  --gin.DataConfig.train=\"'$data'\" --run_dir=${RUNS_MOUNT:-<a folder all workers share>}/runs/NAME"
