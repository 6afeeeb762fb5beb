#!/usr/bin/env bash
# tpu/env.sh: settings and helpers sourced by every tpu/*.sh script (run directly, it prints them).
#
# Usage: bash tpu/env.sh [--help]
#
# Required (every script that calls gcloud):
#   TPU       TPU VM (node) name, e.g. relift-v5p-64
#   ZONE      zone with capacity for ACCELERATOR, e.g. us-east5-a (v5p)
#   PROJECT   Google Cloud project id
# Optional:
#   ACCELERATOR      accelerator type (default v5p-64: 32 chips, 8 hosts)
#   RUNTIME_VERSION  TPU software version (default by family: v5p v2-alpha-tpuv5,
#                    v6e v2-alpha-tpuv6e, v5litepod v2-alpha-tpuv5-lite, v4 tpu-ubuntu2204-base)
#   QR               queued resource id (default "$TPU-qr")
#   SPOT=1           request Spot capacity (preemptible; see resume.sh)
#   RESERVED=1       use the project's reservation
#   BUCKET           GCS bucket (name or gs://name) mounted on every worker for run directories
#   RUNS_MOUNT       where stage.sh mounts BUCKET on every worker (default /gcs/<bucket name>)
#   STAGE_DIR        local disk folder on every worker for the checkpoint and data (default /data)
#   REMOTE_DIR       the repository's folder in the workers' home folder (default relift_jax)
#   PYTHON_VERSION   Python of the workers' virtual environment (default 3.11; jax needs >= 3.11)
#   WAIT_TIMEOUT     seconds create.sh waits for ACTIVE (default 21600), POLL_INTERVAL (default 60)
#   RELIFT_TPU_STATE local folder for the last run_all.sh arguments (default ~/.relift_tpu)
set -euo pipefail

TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT=$(dirname "$TPU_DIR")
ACCELERATOR=${ACCELERATOR:-v5p-64}
QR=${QR:-${TPU:+$TPU-qr}}
if [[ -z ${RUNTIME_VERSION:-} ]]; then
  case $ACCELERATOR in
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) RUNTIME_VERSION= ;;  # tpu_init asks for it
  esac
fi
SPOT=${SPOT:-0}
RESERVED=${RESERVED:-0}
BUCKET=${BUCKET:-}
BUCKET_NAME=${BUCKET#gs://}
BUCKET_NAME=${BUCKET_NAME%%/*}
RUNS_MOUNT=${RUNS_MOUNT:-${BUCKET_NAME:+/gcs/$BUCKET_NAME}}
STAGE_DIR=${STAGE_DIR:-/data}
REMOTE_DIR=${REMOTE_DIR:-relift_jax}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-21600}
POLL_INTERVAL=${POLL_INTERVAL:-60}
RELIFT_TPU_STATE=${RELIFT_TPU_STATE:-$HOME/.relift_tpu}

# The header comment of script $1, without its shellcheck directives (its second line to the
# first line that is not a comment).
tpu_usage() {
  awk 'NR == 1 || /^# shellcheck/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

tpu_die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# tpu_init "$@": --help/-h prints the calling script's usage and exits 0; otherwise TPU, ZONE and
# PROJECT must be set.
tpu_init() {
  if [[ ${1:-} == --help || ${1:-} == -h ]]; then
    tpu_usage "$0"
    exit 0
  fi
  tpu_need TPU ZONE PROJECT
  [[ -n $RUNTIME_VERSION ]] ||
    tpu_die "RUNTIME_VERSION is not set and has no default for ACCELERATOR=$ACCELERATOR"
  [[ $REMOTE_DIR =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] ||
    tpu_die "REMOTE_DIR must be a folder name (in the workers' home folder), not $REMOTE_DIR"
  QR=${QR:-$TPU-qr}
}

# tpu_need VAR...: exit with a one-line message naming the first unset variable.
tpu_need() {
  local v
  for v in "$@"; do
    [[ -n ${!v:-} ]] || tpu_die "$v is not set (export TPU, ZONE, PROJECT and the others in tpu/README.md)"
  done
}

# tpu_ssh WORKER COMMAND: run COMMAND (one string, parsed by the worker's bash in its home folder)
# on worker WORKER (0, 1, ... or all).
tpu_ssh() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --project="$PROJECT" --worker="$1" \
    --command="$2"
}

# tpu_scp LOCAL_FILE REMOTE_PATH: copy a file to every worker (REMOTE_PATH relative to the home).
tpu_scp() {
  gcloud compute tpus tpu-vm scp "$1" "$TPU:$2" --zone="$ZONE" --project="$PROJECT" --worker=all
}

# tpu_worker SUBCOMMAND ARG...: the command line that runs tpu/worker.sh on a worker, every
# argument quoted once for the worker's shell.
tpu_worker() {
  local cmd
  cmd="bash $(printf %q "$REMOTE_DIR/tpu/worker.sh")"
  cmd+=$(printf ' %q' "$@")
  printf '%s' "$cmd"
}

# The queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...), empty if none.
tpu_qr_state() {
  gcloud compute tpus queued-resources describe "$QR" --zone="$ZONE" --project="$PROJECT" \
    --format='value(state.state)' 2>/dev/null || true
}

# The TPU VM's state (READY, PREEMPTED, ...), empty if none.
tpu_node_state() {
  gcloud compute tpus tpu-vm describe "$TPU" --zone="$ZONE" --project="$PROJECT" \
    --format='value(state)' 2>/dev/null || true
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then  # run, not sourced
  if [[ ${1:-} == --help || ${1:-} == -h ]]; then
    tpu_usage "$0"
    exit 0
  fi
  for v in TPU ZONE PROJECT QR ACCELERATOR RUNTIME_VERSION SPOT RESERVED BUCKET RUNS_MOUNT \
           STAGE_DIR REMOTE_DIR PYTHON_VERSION WAIT_TIMEOUT POLL_INTERVAL RELIFT_TPU_STATE; do
    printf '%s=%s\n' "$v" "${!v:-}"
  done
fi
