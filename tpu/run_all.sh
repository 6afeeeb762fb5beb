#!/usr/bin/env bash
# Run `python -m relift_jax.main "$@"` on every worker at once (one process per host).
set -euo pipefail
: "${TPU:?}" "${ZONE:?}" "${PROJECT:?}"
args=$(printf " %q" "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone="$ZONE" --project="$PROJECT" --command="
  cd ~/relift_jax && . ~/venv/bin/activate &&
  RELIFT_DISTRIBUTED=1 nohup python -m relift_jax.main $args > ~/relift.log 2>&1 &"
