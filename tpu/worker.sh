#!/usr/bin/env bash
# tpu/worker.sh: the part that runs ON each TPU worker (the other tpu/*.sh scripts call it through
# `gcloud compute tpus tpu-vm ssh --worker=...`); it needs no TPU/ZONE/PROJECT.
#
# Usage: bash relift_jax/tpu/worker.sh SUBCOMMAND [ARG...]
#   install PYTHON_VERSION REQUIREMENT...  gcsfuse (apt), uv, a venv (~/relift_venv) with
#                                         Python PYTHON_VERSION, `pip install -e <repo> REQUIREMENT...`;
#                                         checks that the venv's jax is the jax[tpu]==X asked for
#   stage MODEL_GCS DATA_GCS STAGE_DIR [BUCKET MOUNT]
#                                         copy the checkpoint folder and the data file from GCS to
#                                         STAGE_DIR; mount BUCKET at MOUNT with Cloud Storage FUSE
#   run ARG...                            write ~/relift.cmd (cd <repo>; activate the venv;
#                                         RELIFT_DISTRIBUTED=1 python -m relift_jax.main ARG...)
#                                         and start it in the background: log ~/relift.log (appended),
#                                         pid ~/relift.pid
#   status                                whether that process runs, and the log's last line
#   stop                                  SIGTERM to it (SIGKILL after 30 s)
#   log [LINES]                           follow ~/relift.log
# Env: RELIFT_VENV (default ~/relift_venv).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${RELIFT_VENV:-$HOME/relift_venv}
LOG=$HOME/relift.log
PID_FILE=$HOME/relift.pid
CMD_FILE=$HOME/relift.cmd
HOST=$(hostname)

die() {
  echo "$HOST: $*" >&2
  exit 1
}

# The pid of the running relift_jax.main, or nothing (an exited, unreaped one does not count).
running_pid() {
  local pid stat
  [[ -f $PID_FILE ]] || return 0
  pid=$(<"$PID_FILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  stat=$(ps -o stat= -p "$pid" 2>/dev/null || true)
  if [[ -n $stat && $stat != Z* ]]; then
    echo "$pid"
  fi
}

# A folder this user can write, made with sudo where needed (/data, /gcs/... on a fresh VM).
make_dir() {
  mkdir -p "$1" 2>/dev/null || { sudo mkdir -p "$1" && sudo chown "$(id -u):$(id -g)" "$1"; }
}

install_gcsfuse() {
  command -v gcsfuse >/dev/null && return 0
  # https://cloud.google.com/storage/docs/cloud-storage-fuse/install (Debian/Ubuntu)
  local repo
  repo=gcsfuse-$(lsb_release -c -s)
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt $repo main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -q
  sudo apt-get install -y -q gcsfuse
}

cmd_install() {
  [[ $# -ge 2 ]] || die "usage: worker.sh install PYTHON_VERSION REQUIREMENT..."
  local python_version=$1 jax_version="" req uv
  shift
  for req in "$@"; do
    if [[ $req == jax\[tpu\]==* ]]; then jax_version=${req#*==}; fi
  done
  [[ -z $(running_pid) ]] || die "relift_jax.main is running (pid $(running_pid)); stop it first (tpu/stop.sh)"
  install_gcsfuse
  # uv gives the venv a Python >= 3.11 (jax's minimum) on images whose python3 is older.
  uv=$(command -v uv || echo "$HOME/.local/bin/uv")
  if [[ ! -x $uv ]]; then
    python3 -m pip install --user --quiet uv
  fi
  if [[ ! -x $VENV/bin/python ]]; then
    "$uv" venv --python "$python_version" "$VENV"
  fi
  "$uv" pip install --python "$VENV/bin/python" -e "$REPO" "$@"
  if [[ -n $jax_version ]]; then
    "$VENV/bin/python" - "$jax_version" <<'EOF'
import sys

import jax

want = sys.argv[1]
if jax.__version__ != want:
    sys.exit(f"jax {jax.__version__} is installed, not {want}")
print(f"jax {jax.__version__}")
EOF
  fi
  echo "$HOST: installed $REPO into $VENV"
}

cmd_stage() {
  [[ $# -eq 3 || $# -eq 5 ]] || die "usage: worker.sh stage MODEL_GCS DATA_GCS STAGE_DIR [BUCKET MOUNT]"
  local model_gcs=${1%/} data_gcs=$2 stage_dir=$3
  make_dir "$stage_dir"
  gcloud storage rsync --recursive "$model_gcs" "$stage_dir/${model_gcs##*/}"
  gcloud storage cp "$data_gcs" "$stage_dir/${data_gcs##*/}"
  if [[ $# -eq 5 ]]; then
    local bucket=$4 mount=$5
    if mountpoint -q "$mount"; then
      echo "$HOST: $mount is already mounted"
    else
      make_dir "$mount"
      # Several hosts write the run directory: no metadata caching; Orbax renames its temporary
      # checkpoint folder when a save completes (atomic on a hierarchical-namespace bucket, a
      # copy of every file on a flat one, which needs the rename limit).
      gcsfuse --implicit-dirs --metadata-cache-ttl-secs=0 --rename-dir-limit=1000000 \
        "$bucket" "$mount"
    fi
  fi
  echo "$HOST: staged into $stage_dir"
}

cmd_run() {
  [[ $# -ge 1 ]] || die "usage: worker.sh run ARG... (the arguments of python -m relift_jax.main)"
  local pid
  pid=$(running_pid)
  [[ -z $pid ]] || die "relift_jax.main is already running (pid $pid); stop it first (tpu/stop.sh)"
  [[ -f $VENV/bin/activate ]] || die "no venv at $VENV: run tpu/install.sh first"
  {
    echo "# written by tpu/worker.sh run on $(date -u +%FT%TZ); replay with: bash ~/relift.cmd"
    printf 'cd %q\n' "$REPO"
    printf '. %q\n' "$VENV/bin/activate"
    printf 'export RELIFT_DISTRIBUTED=1\n'
    printf 'exec python -m relift_jax.main'
    printf ' %q' "$@"
    printf '\n'
  } >"$CMD_FILE"
  echo "=== $(date -u +%FT%TZ) $HOST: starting $CMD_FILE" >>"$LOG"
  nohup bash "$CMD_FILE" >>"$LOG" 2>&1 </dev/null &
  echo "$!" >"$PID_FILE"
  echo "$HOST: started pid $!; log ~/relift.log"
}

cmd_status() {
  local pid last=""
  pid=$(running_pid)
  [[ -f $LOG ]] && last=$(tail -n 1 "$LOG")
  if [[ -n $pid ]]; then
    echo "$HOST: running (pid $pid, for $(ps -o etime= -p "$pid" | tr -d ' ')); last log line: $last"
  else
    echo "$HOST: not running; last log line: $last"
  fi
}

cmd_stop() {
  local pid i
  pid=$(running_pid)
  if [[ -z $pid ]]; then
    echo "$HOST: not running"
    return 0
  fi
  kill -TERM "$pid"
  for ((i = 0; i < 150; i++)); do
    [[ -n $(running_pid) ]] || { echo "$HOST: stopped pid $pid"; return 0; }
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
  echo "$HOST: killed pid $pid"
}

cmd_log() {
  touch "$LOG"
  exec tail -n "${1:-100}" -F "$LOG"
}

case ${1:-} in
  -h | --help) awk 'NR == 1 || /^# shellcheck/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0" ;;
  install | stage | run | status | stop | log)
    sub=$1
    shift
    "cmd_$sub" "$@"
    ;;
  *) die "usage: worker.sh install|stage|run|status|stop|log ... (see --help)" ;;
esac
