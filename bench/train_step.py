"""Train-step throughput: relift_jax's RL and SFT steps on RL-like batches, packing off and on.

    python bench/train_step.py                      # CPU: toy + small, RL + SFT, packing off / on
    python bench/train_step.py --sizes toy --repeats 5
    python bench/train_step.py --gpu                # Qwen2.5-0.5B / 1.5B shapes, bf16, packing on
    python bench/train_step.py --gpu --dry_run      # the --gpu plan on tiny shapes, on the CPU

What runs is what training runs: `train_step.rl_train_step` / `sft_train_step` through `jit_step`
(state donated), on batches from `batches.pack_rl_batch` / `pack_sft_batch` (moved to the device
once, before timing, as the controller does once per iteration). Each configuration is compiled
ahead of time (`.lower().compile()`: the compile seconds), called once to warm up, then timed
`--repeats` times; the median is reported.

The batch (seed 0): `--rollouts` sequences, prompts uniform in `--prompt_len` (lo,hi), responses
gamma-distributed (shape 2, so lengths spread as sampled rollouts do) with mean `--response_mean`,
clipped to [1, `--response_max`]. The SFT step gets the same sequences as demonstrations.

Accounting (the model FLOPs, the same whatever padding, packing or rematerialisation the step does):
    real tokens = sum over sequences of (prompt + response) length
    FLOPs/step  = 6 x matmul_params x real tokens                       (forward 2, backward 4)
                + 6 x layers x heads x head_dim x sum over sequences of L (L + 1)
The second line is causal attention within each sequence (QK^T and PV, 2 x 2 x H x E FLOPs per
(query, key) pair, L (L + 1) / 2 pairs, x 3 for forward + backward); `matmul_params` is
bench/sampler.py's (every layer matrix plus the LM head; a tied embedding counts once). Work the
step does beyond this (padding, attention across packed neighbours or padding, the recomputed
forward of remat, the recomputed logits of chunking, AdamW) is not counted: it is overhead.

Reported per configuration: tokens/s (real tokens over the median step), model FLOPs per step,
their rate as a share of a peak (CPU: the float32 matmul rate measured in the same run, as
bench/sampler.py does; GPU: the card's dense bf16 Tensor Core figure from NVIDIA's datasheet, and
a bf16 8192^3 matmul measured in the same run), compile seconds, padding fraction (empty token
slots), the compiled step's temporary memory (XLA's memory_analysis), and with packing on, its
tokens/s over the same step's packing-off tokens/s.

Shape key: M micro-batches, b rows per micro-batch, T tokens per row, L one sequence's length,
H query heads, E head dim, V vocab.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from relift_jax import model
from relift_jax.batches import (Packing, device_batch, pack_rl_batch, pack_sft_batch,
                                padding_fraction)
from relift_jax.config import RLConfig, SFTConfig
from relift_jax.train_step import (init_state, jit_step, make_optimizer, make_schedule,
                                   rl_train_step, sft_train_step)


def _load_sampler_bench():
    """bench/sampler.py by path (bench/ is not a package): its PRESETS, matmul_params and peak."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sampler.py")
    spec = importlib.util.spec_from_file_location("bench_sampler", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


_sb = _load_sampler_bench()
PRESETS = dict(_sb.PRESETS)
PRESETS["qwen2.5-1.5b"] = PRESETS["qwen2.5-0.5b"].replace(
    hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
    head_dim=128)  # vocab 151936, tied, qkv bias, rope 1e6, bf16: as the 0.5B preset
matmul_params = _sb.matmul_params

# Dense BF16 Tensor Core TFLOP/s (without sparsity) from NVIDIA's datasheets, by device_kind
# substring, most specific first. H100 SXM and H200 (SXM) share the Hopper SXM rate.
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12),
                  ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


# ----------------------------------------------------------------------------- the batch

@dataclasses.dataclass(frozen=True)
class Lengths:
    rollouts: int
    prompt_lo: int
    prompt_hi: int
    response_mean: float
    response_max: int


def make_rollouts(ln: Lengths, vocab: int, seed: int = 0):
    """(prompts, responses, old log-probs per response token, one advantage per rollout)."""
    rng = np.random.RandomState(seed)
    p_len = rng.randint(ln.prompt_lo, ln.prompt_hi + 1, ln.rollouts)
    r_len = np.clip(np.round(rng.gamma(2.0, ln.response_mean / 2.0, ln.rollouts)), 1,
                    ln.response_max).astype(int)
    prompts = [rng.randint(1, vocab, n).tolist() for n in p_len]
    responses = [rng.randint(1, vocab, n).tolist() for n in r_len]
    # Around log(1/V), as a near-uniform policy's would be: ratios near 1, a finite loss.
    old = [(-np.log(vocab) + 0.1 * rng.randn(n)).astype(np.float32) for n in r_len]
    adv = rng.randn(ln.rollouts).astype(np.float32)
    return prompts, responses, old, adv


def model_flops(cfg: model.ModelConfig, seq_lens: list[int]) -> float:
    """Training FLOPs of one step over these sequences (module docstring)."""
    L = np.asarray(seq_lens, np.float64)
    dense = 6.0 * matmul_params(cfg) * L.sum()
    attn = 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * float((L * (L + 1)).sum())
    return dense + attn


def packing_for(name: str, *, micro_batch_size: int, tokens_per_micro_batch: int,
                row_len: int | None) -> Packing:
    """"off": one sequence per row, micro_batch_size rows. "on": sequence packing with a budget of
    tokens_per_micro_batch; `row_len` sets the packed rows' length through Packing.batch_multiple
    (the only knob batches.Packing has for it: rows are tokens_per_micro_batch / batch_multiple
    long); None: the library's default, one row per micro-batch on one device. "on@N": "on" with
    rows of N tokens."""
    if name == "off":
        return Packing(micro_batch_size=micro_batch_size, pad_id=0)
    if name.startswith("on@"):
        name, row_len = "on", int(name[3:])
    if name != "on":
        raise ValueError(f"packing {name!r} is not off, on or on@<row length>")
    bm = 1 if not row_len else max(1, tokens_per_micro_batch // row_len)
    return Packing(micro_batch_size=micro_batch_size, pad_id=0, batch_multiple=bm,
                   tokens_per_micro_batch=tokens_per_micro_batch)


# ----------------------------------------------------------------------------- one configuration

@dataclasses.dataclass
class Result:
    size: str
    step: str            # rl | sft
    packing: str         # off | on
    attention: str
    remat: str
    shape: str = "-"     # M x b x T
    padding: float = float("nan")
    real_tokens: int = 0
    flops: float = 0.0   # model FLOPs per step
    compile_s: float = float("nan")
    step_s: float = float("nan")      # median
    step_spread: float = float("nan")  # (max - min) / median of the timed repeats
    temp_gib: float = float("nan")
    pack_ms: float = float("nan")
    loss: float = float("nan")
    error: str = ""

    @property
    def tps(self) -> float:
        return self.real_tokens / self.step_s if self.step_s == self.step_s else float("nan")


def _steps(cfg, step: str, lengths: Lengths, chunk_len: int):
    """(jitted step, pack function) of one step kind, built as build.make_steps builds them."""
    if step == "rl":
        rl = RLConfig()
        tx = make_optimizer(rl.optim())
        fn = jit_step(rl_train_step, config=cfg, rl=rl, tx=tx, schedule=make_schedule(rl.optim()),
                      norm_len=lengths.response_max, chunk_len=chunk_len)
        return fn, lambda ro, pk: pack_rl_batch(ro[0], ro[1], ro[2], ro[3], pk)
    sft = SFTConfig()
    tx = make_optimizer(sft.optim())
    fn = jit_step(sft_train_step, config=cfg, sft=sft, tx=tx, schedule=make_schedule(sft.optim()),
                  chunk_len=chunk_len)
    return fn, lambda ro, pk: pack_sft_batch(ro[0], ro[1], pk)


def fresh_state(cfg: model.ModelConfig):
    params = model.init_params(cfg, jax.random.key(0))
    rl, sft = RLConfig(), SFTConfig()
    return init_state(params, make_optimizer(rl.optim()), make_optimizer(sft.optim()))


def run_config(res: Result, cfg, state, rollouts, pk: Packing, lengths: Lengths, *,
               chunk_len: int, repeats: int, log):
    """Fill `res` by compiling and timing one step; returns the (donated, updated) state."""
    step_fn, pack = _steps(cfg, res.step, lengths, chunk_len)
    t = time.perf_counter()
    host = pack(rollouts, pk)
    res.pack_ms = (time.perf_counter() - t) * 1e3
    res.padding = padding_fraction(host)
    M, b, T = host.micro_batches.tokens_bxT.shape
    res.shape = f"{M}x{b}x{T}"
    seq_lens = [len(p) + len(r) for p, r in zip(rollouts[0], rollouts[1])]
    res.real_tokens, res.flops = sum(seq_lens), model_flops(cfg, seq_lens)
    batch = jax.block_until_ready(device_batch(host, None))

    t = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    res.compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    if mem is not None:
        res.temp_gib = mem.temp_size_in_bytes / 2**30
    log(f"  {res.size} {res.step} packing {res.packing} ({res.shape}, padding {res.padding:.1%}, "
        f"{res.real_tokens:,} real tokens): compiled in {res.compile_s:.1f}s, "
        f"temp {res.temp_gib:.2f} GiB")

    state, metrics = jax.block_until_ready(compiled(state, batch))  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - t)
    res.step_s = statistics.median(times)
    res.step_spread = (max(times) - min(times)) / res.step_s
    res.loss = float(metrics["loss"])
    if not np.isfinite(res.loss):
        raise FloatingPointError(f"loss {res.loss} after {repeats + 1} steps")
    log(f"  -> steps {', '.join(f'{x:.3f}' for x in times)} s; median {res.step_s:.3f}s, "
        f"{res.tps:,.0f} tok/s, loss {res.loss:.4f}")
    return state


def run_plan(plan, cfgs: dict[str, model.ModelConfig], *, lengths: Lengths, chunk_len: int,
             repeats: int, budget_s: float | None,
             tokens_per_micro_batch: dict[str, int], micro_batch_size: int,
             row_len: int | None, log, on_result=lambda results: None) -> list[Result]:
    """Run (size, attention, step, packing) items in order; one train state per size, re-used
    while consecutive items share it. A failing item is reported and the next one runs.
    Attention None: the first attention an earlier item of this size ran without error.
    KeyboardInterrupt (also SIGTERM, see main) ends the plan; the results so far are returned."""
    results, state, state_of, rollouts_of = [], None, None, {}
    t0 = time.perf_counter()
    for size, attention, step, packing in plan:
        if attention is None:
            ok = [r.attention for r in results if r.size == size and not r.error]
            tried = [r.attention for r in results if r.size == size]
            attention = (ok or tried or ["blockwise"])[0]
        res = Result(size=size, step=step, packing=packing, attention=attention,
                     remat=cfgs[size].remat)
        results.append(res)
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            res.error = f"skipped: past the {budget_s:.0f}s budget"
            log(f"  {size} {step} {attention}: {res.error}")
            continue
        if attention == "cudnn" and jax.default_backend() != "gpu":
            res.error = "skipped: cudnn needs a GPU"
            log(f"  {size} {step} cudnn: {res.error}")
            continue
        try:
            cfg = cfgs[size].replace(attention=attention)
            if state_of != size:
                state = None  # free the previous model's buffers first
                state, state_of = fresh_state(cfg), size
            if size not in rollouts_of:
                rollouts_of[size] = make_rollouts(lengths, cfg.vocab_size)
            pk = packing_for(packing, micro_batch_size=micro_batch_size,
                             tokens_per_micro_batch=tokens_per_micro_batch[size], row_len=row_len)
            state = run_config(res, cfg, state, rollouts_of[size], pk, lengths,
                               chunk_len=chunk_len, repeats=repeats, log=log)
        except KeyboardInterrupt:
            res.error = "interrupted"
            log(f"  {size} {step} {attention}: interrupted; the table has what finished")
            break
        except Exception as e:  # noqa: BLE001  (reported in the table; the next item runs)
            res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            log(f"  {size} {step} {attention}: FAILED {res.error}")
            log(traceback.format_exc())
            state, state_of = None, None  # donated buffers may be gone
        on_result(results)
    return results


# ----------------------------------------------------------------------------- peaks

def peak_bf16_flops(n: int = 8192, repeats: int = 5) -> float:
    """bf16 FLOP/s of an n^3 jnp matmul with float32 accumulation, on random data (best of)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def datasheet_peak(device_kind: str) -> float | None:
    for key, flops in DATASHEET_BF16:
        if key.lower() in device_kind.lower():
            return flops
    return None


# ----------------------------------------------------------------------------- tables

def _f(x: float, fmt: str) -> str:
    return "-" if x != x else format(x, fmt)


def _ratio(results: list[Result], r: Result) -> str:
    if r.packing == "off" or r.error:
        return "-"
    off = [o for o in results if o.size == r.size and o.step == r.step and o.packing == "off"
           and o.attention == r.attention and o.remat == r.remat and not o.error]
    return f"{r.tps / off[0].tps:.2f}x" if off else "-"


def cpu_table(results: list[Result], peak: float) -> str:
    lines = ["| size | step | packing | attention | M x b x T | padding | real tokens | "
             "compile s | step s (spread) | tok/s | GFLOP/step | of f32 matmul peak | on/off |",
             "|---" * 13 + "|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.size} | {r.step} | {r.packing} | {r.attention} | {r.error} |"
                         + " |" * 8)
            continue
        lines.append(
            f"| {r.size} | {r.step} | {r.packing} | {r.attention} | {r.shape} | {r.padding:.1%} | "
            f"{r.real_tokens:,} | {r.compile_s:.1f} | {r.step_s:.2f} ({r.step_spread:.0%}) | "
            f"{r.tps:,.0f} | {r.flops / 1e9:,.0f} | {r.flops / r.step_s / peak:.1%} | "
            f"{_ratio(results, r)} |")
    return "\n".join(lines)


def gpu_table(results: list[Result], sheet: float | None, measured: float) -> str:
    lines = ["| model | step | attention | remat | M x b x T | padding | temp GiB | compile s | "
             "step s | tok/s | model TFLOP/s | MFU (datasheet) | MFU (measured bf16 matmul) |",
             "|---" * 13 + "|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.size} | {r.step} | {r.attention} | {r.remat} | {r.error} |"
                         + " |" * 8)
            continue
        rate = r.flops / r.step_s
        lines.append(
            f"| {r.size} | {r.step} | {r.attention} | {r.remat} | {r.shape} | {r.padding:.1%} | "
            f"{r.temp_gib:.1f} | {r.compile_s:.1f} | {r.step_s:.3f} | {r.tps:,.0f} | "
            f"{rate / 1e12:.1f} | {_f(rate / sheet if sheet else float('nan'), '.1%')} | "
            f"{rate / measured:.1%} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", action="store_true",
                   help="Qwen2.5-0.5B and 1.5B shapes in bf16, packing on, on the accelerator")
    p.add_argument("--dry_run", action="store_true",
                   help="with --gpu: the same plan on 1-layer, 512-vocabulary models and short "
                        "sequences, so it runs on a CPU (there: float32 compute, since XLA:CPU "
                        "has no bf16 x bf16 -> f32 dot, and cudnn items skipped)")
    p.add_argument("--sizes", default=None,
                   help="presets (default: toy,small; with --gpu qwen2.5-0.5b,qwen2.5-1.5b)")
    p.add_argument("--steps", default="rl,sft", help="rl, sft")
    p.add_argument("--packing", default=None,
                   help="off, on, on@<row length> (default: off,on,on@640; with --gpu: on)")
    p.add_argument("--attention", default=None,
                   help="attention implementations (default: xla; with --gpu: cudnn,blockwise). "
                        "With --gpu, the SFT step runs with one only: the first that worked "
                        "for the RL step.")
    p.add_argument("--remat", default=None, help="none | full | save_matmuls (default: the "
                   "preset's, none on CPU; with --gpu: full)")
    p.add_argument("--chunk_len", type=int, default=None,
                   help="logits chunk (positions); default 0 (none) on CPU, 1024 with --gpu")
    p.add_argument("--rollouts", type=int, default=64)
    p.add_argument("--prompt_len", default=None, help="lo,hi (default 32,64; --gpu 150,250)")
    p.add_argument("--response_mean", type=float, default=None,
                   help="default 85 (a third of 256); --gpu 700")
    p.add_argument("--response_max", type=int, default=None, help="default 256; --gpu 2048")
    p.add_argument("--micro_batch_size", type=int, default=8, help="rows, packing off")
    p.add_argument("--tokens_per_micro_batch", type=int, default=None,
                   help="packing on (default: micro_batch_size x the longest possible sequence, "
                        "prompt + response maxima rounded up to 16: the slots of a packing-off "
                        "micro-batch at worst; --gpu: 16384)")
    p.add_argument("--row_len", type=int, default=None,
                   help="packed row length (default: one row per micro-batch on CPU; --gpu 4096)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget_s", type=float, default=None,
                   help="start no new configuration after this many seconds (reported skipped)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    gpu = args.gpu
    sizes = _csv(args.sizes or ("qwen2.5-0.5b,qwen2.5-1.5b" if gpu else "toy,small"))
    steps = _csv(args.steps)
    packings = _csv(args.packing or ("on" if gpu else "off,on,on@640"))
    attentions = _csv(args.attention or ("cudnn,blockwise" if gpu else "xla"))
    chunk_len = args.chunk_len if args.chunk_len is not None else (1024 if gpu else 0)
    lo, hi = (int(x) for x in _csv(args.prompt_len or ("150,250" if gpu else "32,64")))
    lengths = Lengths(args.rollouts, lo, hi,
                      args.response_mean or (700.0 if gpu else 85.0),
                      args.response_max or (2048 if gpu else 256))
    row_len = args.row_len if args.row_len is not None else (4096 if gpu else None)
    if args.dry_run:
        if not gpu:
            p.error("--dry_run goes with --gpu")
        lengths = Lengths(min(args.rollouts, 16), 16, 48, 100.0, 256)
        chunk_len, row_len = min(chunk_len, 128), 512

    cfgs = {}
    for s in sizes:
        if s not in PRESETS:
            p.error(f"--sizes: {s!r} is not one of {sorted(PRESETS)}")
        cfg = PRESETS[s]
        if gpu:
            cfg = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16",
                              remat=args.remat or "full")
        elif args.remat:
            cfg = cfg.replace(remat=args.remat)
        if args.dry_run:
            cfg = cfg.replace(num_layers=1, vocab_size=512, intermediate_size=256)
            if jax.default_backend() == "cpu":  # XLA:CPU runs no bf16 x bf16 -> f32 dot
                cfg = cfg.replace(compute_dtype="float32")
        cfgs[s] = cfg
    T_off = -(-(lengths.prompt_hi + lengths.response_max) // 16) * 16
    tpmb = args.tokens_per_micro_batch or (
        (2048 if args.dry_run else 16384) if gpu else args.micro_batch_size * T_off)

    # The plan. CPU: per size, per step, per attention, packing off then on (the ratio's pair).
    # GPU: breadth first, so a budget cut still leaves every model's main number: RL per
    # attention per model, then SFT per model with the attention that worked for its RL step.
    if gpu:
        plan = [(s, a, "rl", pk) for a in attentions for s in sizes
                for pk in packings] if "rl" in steps else []
        if "sft" in steps:
            plan += [(s, None if "rl" in steps else attentions[0], "sft", pk) for s in sizes
                     for pk in packings]
    else:
        plan = [(s, a, st, pk) for s in sizes for st in steps for a in attentions
                for pk in packings]

    dev = jax.devices()[0]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"jax {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind!r} "
        f"({jax.device_count()} device(s)), {os.cpu_count()} CPU cores; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    log(f"batch: {lengths.rollouts} rollouts, prompts {lengths.prompt_lo}-{lengths.prompt_hi}, "
        f"responses gamma(2) mean {lengths.response_mean:g} clipped to {lengths.response_max}; "
        f"packing off: {args.micro_batch_size} rows per micro-batch; packing on: "
        f"{tpmb} tokens per micro-batch, rows "
        f"{'of ' + str(row_len) if row_len else 'one per micro-batch'}; "
        f"logits chunk {chunk_len or 'none'}")
    for s, cfg in cfgs.items():
        log(f"{s}: {cfg.num_params():,} params ({matmul_params(cfg):,} in matmuls), "
            f"{cfg.param_dtype}/{cfg.compute_dtype}, remat {cfg.remat}")
    ro = make_rollouts(lengths, 512)
    r_len = [len(r) for r in ro[1]]
    log(f"response lengths: mean {np.mean(r_len):.0f}, median {np.median(r_len):.0f}, "
        f"max {max(r_len)} ({sum(x == lengths.response_max for x in r_len)} at the cap); "
        f"real tokens {sum(len(a) + len(b) for a, b in zip(ro[0], ro[1])):,}")

    if gpu:
        sheet = datasheet_peak(dev.device_kind) if jax.default_backend() == "gpu" else None
        measured = (peak_bf16_flops() if jax.default_backend() == "gpu"
                    else peak_bf16_flops(n=512, repeats=2))
        log(f"peak: datasheet dense BF16 Tensor Core "
            f"{'%.0f TFLOP/s' % (sheet / 1e12) if sheet else 'unknown for this device'} "
            f"(NVIDIA's {dev.device_kind} datasheet figure, without sparsity); measured bf16 "
            f"jnp matmul {'8192' if jax.default_backend() == 'gpu' else '512'}^3 on random data: "
            f"{measured / 1e12:.1f} TFLOP/s")
    else:
        peak = _sb.peak_matmul_flops()
        log(f"measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s (jnp 2048x2048, best of 5)")

    def write_json(results):
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": dev.device_kind, "jax": jax.__version__,
                           "results": [dataclasses.asdict(r) | {"tps": r.tps} for r in results]},
                          f, indent=1)

    # `timeout` sends SIGTERM: end the plan and still print the table of what finished.
    signal.signal(signal.SIGTERM, _interrupt)
    results = run_plan(plan, cfgs, lengths=lengths, chunk_len=chunk_len, repeats=args.repeats,
                       budget_s=args.budget_s, tokens_per_micro_batch={s: tpmb for s in sizes},
                       micro_batch_size=args.micro_batch_size, row_len=row_len, log=log,
                       on_result=write_json)
    if not gpu:  # the peak again: a busy machine's rate drifts over a run of minutes
        peak_end = _sb.peak_matmul_flops()
        log(f"float32 matmul peak at the end: {peak_end / 1e9:.1f} GFLOP/s; the table uses the "
            f"larger of the two")
        peak = max(peak, peak_end)

    write_json(results)
    print()
    print(gpu_table(results, sheet, measured) if gpu else cpu_table(results, peak))
    expected = lambda r: r.error.startswith("skipped")  # noqa: E731
    return 0 if all(not r.error or expected(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
