#!/usr/bin/env bash
# tpu/logs.sh: follow a worker's ~/relift.log (Ctrl-C stops following, not the run).
#
# Usage: bash tpu/logs.sh [WORKER] [LINES]    # WORKER 0 (default), 1, ...; LINES shown first (100)
# Worker 0 is process 0, the one that writes metrics; the others show their own errors.
# Env: TPU, ZONE, PROJECT (required); REMOTE_DIR (relift_jax).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
tpu_init "$@"

worker=${1:-0}
[[ $worker =~ ^[0-9]+$ ]] || tpu_die "WORKER must be a number (0, 1, ...), not $worker"
tpu_ssh "$worker" "$(tpu_worker log "${2:-100}")"
