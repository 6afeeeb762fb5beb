#!/usr/bin/env bash
# Copy this repository to every worker and install it with JAX for TPU.
set -euo pipefail
: "${TPU:?}" "${ZONE:?}" "${PROJECT:?}"
cd "$(dirname "$0")/.."
tar czf /tmp/relift_jax.tgz --exclude=.venv --exclude=runs --exclude=.git .
gcloud compute tpus tpu-vm scp /tmp/relift_jax.tgz "$TPU":~/ --worker=all --zone="$ZONE" --project="$PROJECT"
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone="$ZONE" --project="$PROJECT" --command='
  mkdir -p ~/relift_jax && tar xzf ~/relift_jax.tgz -C ~/relift_jax && cd ~/relift_jax &&
  python3 -m venv ~/venv && . ~/venv/bin/activate && pip install -q -e . "jax[tpu]"'
