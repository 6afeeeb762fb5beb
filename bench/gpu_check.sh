#!/usr/bin/env bash
# One prepared check for a lent GPU machine (see /work/shared/docs/gpu.md): versions, a cuDNN /
# blockwise attention correctness smoke, the train-step benchmark and the sampler benchmark.
#
# Prepare here first (no device time): the wheels the GPU image lacks, into the ignored .whl/
#   echo /.whl/ >> .git/info/exclude    # once
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl gin-config tensorboardx math-verify \
#     latex2sympy2-extended antlr4-python3-runtime datasets dill multiprocess
# and check the Python side on the CPU:  python bench/train_step.py --gpu --dry_run --repeats 1
#
# Then on the device (run tool, carry [".whl"], timeout_s 480):   bash bench/gpu_check.sh
#
# Each part has its own `timeout` (30 + 75 + 170 + 75 + 75 s: 7.1 minutes at the very worst, about
# 5.5 expected; the device tool's start-up comes on top). Call it with timeout_s 480. Full logs
# go to $OUT (or ./gpu_check_out when $OUT is unset); a short summary is printed last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
T0=$(date +%s)

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || { echo "wheel install failed, see pip.log"; tail -5 "$OUT/pip.log"; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/ carried: the benches need none of its packages, continuing"
  export PYTHONPATH=$PWD
fi
# The 1.5B RL step needs ~26 GiB of state (bf16 params, two float32 AdamW states) plus its
# temporaries: let XLA take more than its default 75% of the card.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

# DRY=1 bash bench/gpu_check.sh: the same flow on this CPU with tiny shapes (no GPU needed), to
# check the script itself before spending device time.
TS_ARGS="--repeats 3 --budget_s 130"
SAMPLER_ARGS="--repeats 3"
TEST_ENV="JAX_PLATFORMS=cuda"
TEST_K="(blockwise or cudnn or ragged) and not tpu"
if [ "${DRY:-0}" = 1 ]; then
  TS_ARGS="--dry_run --repeats 1 --sizes qwen2.5-0.5b"
  SAMPLER_ARGS="--num_layers 1 --batch 4 --prompt_len 8 --new_tokens 4 --repeats 1"
  TEST_ENV="JAX_PLATFORMS=cpu"
  TEST_K="blockwise_backward_keeps_no_scores or cudnn or ragged_decode_gpu"
fi

declare -A RC SECS
part() {  # part NAME TIMEOUT_S CMD...: run with a timeout, log to $OUT/NAME.log, keep rc and time
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "=== $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$(( $(date +%s) - t ))
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: rc ${RC[$name]} in ${SECS[$name]}s"
}

part env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv;
  python3 -c "import jax, jaxlib, flax, optax; print(\"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__); print(jax.devices(), [d.device_kind for d in jax.devices()])"'

# Correctness first. conftest.py defaults JAX_PLATFORMS to cpu, so name the GPU; float32 matmuls at
# full precision, since the blockwise-vs-dense tolerances are float32-derived (TF32 would fail them).
# (The TPU ahead-of-time test is left out: it needs libtpu, and took 187 s on a CPU where it exists.)
part attention_tests 75 env $TEST_ENV JAX_DEFAULT_MATMUL_PRECISION=highest \
  python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k "$TEST_K" -rs --durations=5

# The train step: RL per attention per model first, then SFT; no new configuration after 130 s
# (one takes under a minute: compile, warm-up, 3 timed steps); SIGTERM still prints the table.
part train_step 170 python3 bench/train_step.py --gpu $TS_ARGS \
  --json "$OUT/train_step.json"

# HBM bandwidth for the sampler's roofline: NVIDIA's datasheet, H200 4.8 TB/s, H100 SXM 3.35 TB/s.
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
case "$GPU_NAME" in *H200*) PEAK_BW=4.8e12 ;; *) PEAK_BW=3.35e12 ;; esac
part sampler 75 python3 bench/sampler.py --gpu $SAMPLER_ARGS --peak_bw $PEAK_BW
# The same with the engine's decode steps in the ragged Pallas Triton kernel (each row's filled
# key blocks only; never run on a GPU before this script).
part sampler_ragged 75 python3 bench/sampler.py --gpu $SAMPLER_ARGS --peak_bw $PEAK_BW \
  --decode_attention ragged

echo
echo "=== summary ($(( $(date +%s) - T0 ))s in all; logs in $OUT)"
for name in env attention_tests train_step sampler sampler_ragged; do
  printf '%-16s rc %-4s %4ss\n' "$name" "${RC[$name]}" "${SECS[$name]}"
done
echo
grep -E '^[0-9]+ (passed|failed)|passed|failed|error' "$OUT/attention_tests.log" | tail -n 2
grep -E '^jax |^device|^peak' "$OUT/train_step.log" "$OUT/sampler.log" "$OUT/sampler_ragged.log" \
  | head -n 6
echo
sed -n '/^| model /,$p' "$OUT/train_step.log"
echo
sed -n '/^| size /,$p' "$OUT/sampler.log" "$OUT/sampler_ragged.log"
