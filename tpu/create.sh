#!/usr/bin/env bash
# Create a TPU VM (pod slice). Needs TPU, ZONE, PROJECT; ACCELERATOR and VERSION may be overridden.
set -euo pipefail
: "${TPU:?}" "${ZONE:?}" "${PROJECT:?}"
gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" --project="$PROJECT" \
  --accelerator-type="${ACCELERATOR:-v5p-64}" --version="${VERSION:-v2-alpha-tpuv5}"
