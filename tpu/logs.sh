#!/usr/bin/env bash
# Follow worker 0's log.
set -euo pipefail
: "${TPU:?}" "${ZONE:?}" "${PROJECT:?}"
gcloud compute tpus tpu-vm ssh "$TPU" --worker=0 --zone="$ZONE" --project="$PROJECT" --command="tail -f ~/relift.log"
