#!/usr/bin/env bash
# tpu/stop.sh: stop relift_jax.main on every worker (SIGTERM, SIGKILL after 30 s); the VMs stay.
# The run restarts from its last checkpoint with: bash tpu/run_all.sh --last
#
# Usage: bash tpu/stop.sh
# Env: TPU, ZONE, PROJECT (required); REMOTE_DIR (relift_jax).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
tpu_init "$@"

tpu_ssh all "$(tpu_worker stop)"
