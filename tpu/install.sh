#!/usr/bin/env bash
# tpu/install.sh: copy this repository (its committed HEAD, `git archive`) to every worker and
# install it there into ~/relift_venv with jax[tpu]==X, X being setup.py's `jax>=X` pin (the jax
# the tests run against); also installs Cloud Storage FUSE (used by stage.sh).
#
# Usage: bash tpu/install.sh
# Uncommitted changes are not copied (a warning says so): commit what the run needs first.
# Refuses on a worker where relift_jax.main runs (tpu/stop.sh first).
# Env: TPU, ZONE, PROJECT (required); REMOTE_DIR (relift_jax), PYTHON_VERSION (3.11).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
tpu_init "$@"

jax_version=$(sed -n 's/.*"jax>=\([0-9][0-9.]*\)[",<].*/\1/p' "$REPO_ROOT/setup.py" | head -n 1)
[[ -n $jax_version ]] || tpu_die "no \"jax>=X\" pin found in $REPO_ROOT/setup.py"
if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
  echo "warning: uncommitted changes in $REPO_ROOT are not copied (git archive HEAD)" >&2
fi
commit=$(git -C "$REPO_ROOT" rev-parse --short HEAD)
archive=$(mktemp "${TMPDIR:-/tmp}/relift_jax.XXXXXX")
trap 'rm -f "$archive"' EXIT
git -C "$REPO_ROOT" archive --format=tar.gz -o "$archive" HEAD

echo "Copying $commit to every worker of $TPU; installing jax[tpu]==$jax_version"
tpu_scp "$archive" relift_jax.tgz
dir=$(printf %q "$REMOTE_DIR")
tpu_ssh all "set -e
if [ -f ~/relift.pid ] && kill -0 \"\$(cat ~/relift.pid)\" 2>/dev/null; then
  echo \"\$(hostname): relift_jax.main is running; stop it first (tpu/stop.sh)\" >&2; exit 1
fi
rm -rf $dir.new && mkdir -p $dir.new && tar xzf relift_jax.tgz -C $dir.new
rm -rf $dir && mv $dir.new $dir && rm -f relift_jax.tgz
echo $commit > $dir/COMMIT
$(tpu_worker install "$PYTHON_VERSION" "jax[tpu]==$jax_version")"
echo "Installed $commit on every worker (next: bash tpu/stage.sh)"
