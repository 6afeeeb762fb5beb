"""Sampler throughput: relift_jax.sampler.generate vs transformers `generate`, same weights, same CPU.

    python bench/sampler.py                # toy (~3M) and small (~50M), batch 32, 64 + 128 tokens
    python bench/sampler.py --sizes small --repeats 5 --new_tokens 64
    python bench/sampler.py --gpu          # Qwen2.5-0.5B shape, bf16, batch 256, no HF baseline

Both sides sample at temperature 1 with no top-k/top-p and produce exactly `new_tokens` tokens per row
(ours: eos_id=-1 so no row stops; transformers: min_new_tokens = max_new_tokens). Timings exclude
compilation (a warm-up call first; the compile time is reported separately) and are the median of
`--repeats` calls, ours and transformers interleaved so background load hits both alike.
transformers runs in child processes that never start jax, once per torch thread count in
`--threads` (default: all cores, and 1); the ratio is against the fastest of them.

Reported per size: parameter count, tokens/s of both, their ratio, compile seconds, and the fraction of
the CPU's measured float32 matmul rate that our sampling reaches (FLOPs = 2 x matmul params x tokens,
plus attention over the slots actually read). In --gpu mode: decode tokens/s and the fraction of the
HBM-bandwidth roofline (bytes per decode step = weights + the KV cache slots read).

Shape key: B rows, P prompt tokens, N new tokens, S cache slots, D hidden, L layers, V vocab.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from relift_jax import hf, model, sampler

PRESETS = {
    # ~3M parameters: small enough that per-step overheads, not matmuls, dominate.
    "toy": model.ModelConfig("qwen2", vocab_size=512, hidden_size=256, intermediate_size=688,
                             num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, qkv_bias=True,
                             tie_word_embeddings=True, max_position_embeddings=2048),
    # ~50M parameters with a 32k vocabulary: the LM head is a third of the decode FLOPs.
    "small": model.ModelConfig("qwen2", vocab_size=32000, hidden_size=512, intermediate_size=1376,
                               num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64,
                               qkv_bias=True, tie_word_embeddings=False,
                               max_position_embeddings=2048),
    # Qwen2.5-0.5B's shape (random weights), for the accelerator run.
    "qwen2.5-0.5b": model.ModelConfig("qwen2", vocab_size=151936, hidden_size=896,
                                      intermediate_size=4864, num_layers=24, num_heads=14,
                                      num_kv_heads=2, head_dim=64, qkv_bias=True,
                                      tie_word_embeddings=True, rope_theta=1e6,
                                      max_position_embeddings=32768, param_dtype="bfloat16",
                                      compute_dtype="bfloat16"),
}


@dataclasses.dataclass
class Row:
    size: str
    params: int
    ours_tps: float
    hf_tps: dict[int, float]  # torch threads -> tokens/s
    compile_s: float
    flop_frac: float | None = None
    bw_frac: float | None = None
    prefill_s: float = 0.0


# ----------------------------------------------------------------------------- accounting

def matmul_params(cfg: model.ModelConfig) -> int:
    """Parameters that take part in a matmul per token: every layer weight plus the LM head (the
    embedding lookup is a gather, but tied models reuse it as the head, so V*D counts once)."""
    embed = cfg.vocab_size * cfg.hidden_size
    untied_head = 0 if cfg.tie_word_embeddings else embed
    return cfg.num_params() - embed - untied_head + embed


def generate_flops(cfg: model.ModelConfig, B: int, P: int, N: int, S: int) -> tuple[float, float]:
    """(prefill, decode) FLOPs of one generate call as our sampler runs it.

    Prefill: 2 x matmul params per prompt token, attention over the P padded slots. Decode: 2 x matmul
    params per new token, attention (QK^T and PV: 4 x H x E per slot) over all S cache slots, since
    the decode step reads the whole cache and masks the unwritten slots.
    """
    HE = cfg.num_heads * cfg.head_dim
    prefill = B * P * (2 * matmul_params(cfg) + cfg.num_layers * 4 * HE * P)
    decode = B * N * (2 * matmul_params(cfg) + cfg.num_layers * 4 * HE * S)
    return float(prefill), float(decode)


def decode_step_bytes(cfg: model.ModelConfig, B: int, S: int) -> float:
    """Bytes a decode step must read at least: all weights once, plus K and V of all S slots."""
    w = jnp.dtype(cfg.weight_dtype).itemsize * cfg.num_params()
    kv = 2 * cfg.num_layers * B * S * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return float(w + kv)


def peak_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """float32 FLOP/s of a large jnp matmul on this machine, now (best of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------- runs

def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_ours(cfg, params, prompts: list[list[int]], N: int, seed: int,
             engine: str = "continuous"):
    out = sampler.generate(cfg, params, prompts, max_new_tokens=N, temperature=1.0, top_k=0,
                           top_p=1.0, eos_id=-1, seed=seed, engine=engine)
    assert all(len(t) == N for t in out.tokens), "a row stopped early: the counts would be wrong"
    return out


def time_prefill(cfg, params, prompts: list[list[int]], N: int) -> float:
    """Seconds of the prefill alone (already compiled by the warm-up), to split decode time out."""
    P = sampler.bucket(max(len(p) for p in prompts))
    B = sampler._batch_bucket(len(prompts), 1)
    tokens = np.zeros((B, P), np.int32)
    pad = np.zeros((B,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = p
        pad[i] = P - len(p)
    call = lambda: jax.block_until_ready(sampler._prefill(cfg, params, tokens, pad, P + N))  # noqa
    call()
    return min(_timed(call) for _ in range(3))


def run_hf(hf_model, prompts: list[list[int]], N: int, seed: int):
    import torch

    torch.manual_seed(seed)
    ids = torch.tensor(prompts, dtype=torch.long)  # equal lengths: no padding needed
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N,
                                min_new_tokens=N, pad_token_id=0, eos_token_id=None)
    assert out.shape == (len(prompts), ids.shape[1] + N), out.shape
    return out


class HFWorker:
    """transformers `generate` in a child process that never starts jax.

    In one process, XLA's CPU thread pool and torch's OpenMP threads fight over the same cores
    (measured here: torch's forward about 2x slower once jax has run), which would flatter our ratio.
    The child loads the folder our exporter wrote (so the weights are exactly ours), warms up, then
    times one `generate` per request; the parent interleaves requests with its own timings.
    """

    def __init__(self, cfg, params, prompts: list[list[int]], N: int, threads: int, workdir: str):
        import subprocess
        import sys

        if not os.path.exists(os.path.join(workdir, "export")):  # one export serves all workers
            hf.save_checkpoint(cfg, params, os.path.join(workdir, "export"))
            np.save(os.path.join(workdir, "prompts.npy"), np.asarray(prompts, np.int64))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--hf_worker", workdir,
             "--new_tokens", str(N), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._read() == "ready"

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"HF worker exited with {self.proc.wait()}")
        return line.strip()

    def time_generate(self, seed: int) -> float:
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def hf_worker(workdir: str, N: int, threads: int) -> None:
    """Child side of HFWorker: `seed` lines in, elapsed seconds out."""
    import sys

    import torch
    import transformers

    torch.set_num_threads(threads)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(workdir, "export"), dtype="float32").eval()
    prompts = np.load(os.path.join(workdir, "prompts.npy")).tolist()
    run_hf(hf_model, prompts[:2], 4, seed=0)  # first-call allocations and kernel selection
    print("ready", flush=True)
    for line in sys.stdin:
        print(_timed(lambda: run_hf(hf_model, prompts, N, seed=int(line))), flush=True)


def _setup(preset: str, args):
    """(config, random params, prompts) of a preset, the same for ours and transformers."""
    cfg = PRESETS[preset]
    if args.num_layers:
        cfg = cfg.replace(num_layers=args.num_layers)
    cfg = cfg.replace(decode_attention=args.decode_attention)
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.RandomState(0)
    prompts = rng.randint(0, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
    return cfg, params, prompts


def bench_cpu(size: str, args, peak: float) -> Row:
    cfg, params, prompts = _setup(size, args)
    B, N = args.batch, args.new_tokens

    first = _timed(lambda: run_ours(cfg, params, prompts, N, seed=0, engine=args.engine))
    ours_t: list[float] = []
    hf_t: dict[int, list[float]] = {th: [] for th in ([] if args.skip_hf else args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        workers = {th: HFWorker(cfg, params, prompts, N, th, tmp) for th in hf_t}
        for r in range(args.repeats):
            ours_t.append(_timed(lambda: run_ours(cfg, params, prompts, N, seed=r + 1,
                                                  engine=args.engine)))
            for th, worker in workers.items():
                hf_t[th].append(worker.time_generate(seed=r + 1))
        for worker in workers.values():
            worker.close()
    ours_s = statistics.median(ours_t)
    prefill_s = time_prefill(cfg, params, prompts, N)
    P = sampler.bucket(args.prompt_len)
    fl_prefill, fl_decode = generate_flops(cfg, sampler._batch_bucket(B, 1), P, N, P + N)
    return Row(size=size, params=cfg.num_params(), ours_tps=B * N / ours_s,
               hf_tps={th: B * N / statistics.median(t) for th, t in hf_t.items()},
               compile_s=max(0.0, first - ours_s), prefill_s=prefill_s,
               flop_frac=(fl_prefill + fl_decode) / ours_s / peak)


def bench_gpu(args) -> Row:
    """The Qwen2.5-0.5B shape on the device. The HBM roofline counts, per decode step, the weights
    once plus the K/V of the slots each row has filled by then (what a ragged kernel must read);
    the dense cache (prompt bucket + N slots every step) is printed beside it."""
    cfg, params, prompts = _setup("qwen2.5-0.5b", args)
    B, N = args.batch, args.new_tokens
    first = _timed(lambda: run_ours(cfg, params, prompts, N, seed=0, engine=args.engine))
    times = [_timed(lambda: run_ours(cfg, params, prompts, N, seed=r + 1, engine=args.engine))
             for r in range(args.repeats)]
    total_s = statistics.median(times)
    prefill_s = time_prefill(cfg, params, prompts, N)  # the dense sampler's prefill, subtracted
    decode_s = max(total_s - prefill_s, 1e-9)
    S = sampler.bucket(args.prompt_len) + N
    Bp = sampler._batch_bucket(B, 1)
    weights = decode_step_bytes(cfg, 0, 0)
    slot = decode_step_bytes(cfg, 1, 1) - weights  # K and V of one row's slot, all layers
    filled = N * weights + slot * B * sum(args.prompt_len + t for t in range(1, N + 1))
    bw_frac = filled / decode_s / args.peak_bw
    print(f"device {jax.devices()[0].device_kind}, engine {args.engine} "
          f"({args.decode_attention} attention): total {total_s:.3f}s, "
          f"prefill {prefill_s:.3f}s, decode {decode_s:.3f}s for {N} steps "
          f"({decode_s / N * 1e3:.2f} ms/step); per step {filled / N / 1e9:.2f} GB weights + "
          f"filled K/V (the dense cache would be {decode_step_bytes(cfg, Bp, S) / 1e9:.2f} GB)")
    return Row(size="qwen2.5-0.5b", params=cfg.num_params(), ours_tps=B * N / decode_s, hf_tps={},
               compile_s=max(0.0, first - total_s), bw_frac=bw_frac, prefill_s=prefill_s)


# ----------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="toy,small", help="comma-separated: toy, small")
    p.add_argument("--batch", type=int, default=None, help="rows (default 32; 256 with --gpu)")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default=f"{os.cpu_count()},1",
                   help="torch thread counts to time transformers with (comma-separated); the "
                        "ratio is against the fastest. On an oversubscribed CPU, OpenMP with as "
                        "many threads as cores can be several times slower than 1 thread.")
    p.add_argument("--num_layers", type=int, default=0, help="override the presets' depth")
    p.add_argument("--engine", default="continuous", choices=("continuous", "grouped", "dense"),
                   help="sampler.generate's engine")
    p.add_argument("--decode_attention", default="xla", choices=("xla", "ragged"),
                   help="ModelConfig.decode_attention for the engines' decode steps: 'ragged' is "
                        "the Pallas kernel (TPU, CUDA GPU; interpret mode on CPU, slow)")
    p.add_argument("--skip_hf", action="store_true", help="time ours only")
    p.add_argument("--gpu", action="store_true", help="Qwen2.5-0.5B shape in bf16 on the device")
    p.add_argument("--peak_bw", type=float, default=3.35e12, help="HBM bytes/s (H100 SXM)")
    p.add_argument("--hf_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.threads = sorted({int(t) for t in str(args.threads).split(",") if t.strip()}, reverse=True)
    if args.hf_worker:
        return hf_worker(args.hf_worker, args.new_tokens, args.threads[0])
    args.batch = args.batch or (256 if args.gpu else 32)

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)), "
          f"{os.cpu_count()} CPU cores; batch {args.batch}, prompt {args.prompt_len}, "
          f"new tokens {args.new_tokens}, repeats {args.repeats}, engine {args.engine}, "
          f"decode attention {args.decode_attention}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if args.gpu:
        row = bench_gpu(args)
        print("\n| size | params | decode tok/s | compile s | HBM roofline fraction |\n"
              "|---|---|---|---|---|")
        print(f"| {row.size} | {row.params:,} | {row.ours_tps:,.0f} | {row.compile_s:.1f} | "
              f"{row.bw_frac:.1%} of weights + filled K/V (peak {args.peak_bw:.3g} B/s) |")
        return

    peak = peak_matmul_flops()
    print(f"measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s (jnp 2048x2048); "
          f"transformers in child processes with torch threads {args.threads}")
    rows = [bench_cpu(s.strip(), args, peak) for s in args.sizes.split(",") if s.strip()]
    hf_cols = "".join(f" HF tok/s ({th} thr) |" for th in ([] if args.skip_hf else args.threads))
    print(f"\n| size | params | ours tok/s |{hf_cols} ratio to best HF | compile s | prefill s | "
          f"fraction of matmul peak |")
    print("|---" * (7 + hf_cols.count("|")) + "|")
    for r in rows:
        hf_vals = "".join(f" {r.hf_tps[th]:,.0f} |" for th in sorted(r.hf_tps, reverse=True))
        ratio = f"{r.ours_tps / max(r.hf_tps.values()):.2f}x" if r.hf_tps else "-"
        print(f"| {r.size} | {r.params:,} | {r.ours_tps:,.0f} |{hf_vals} {ratio} | "
              f"{r.compile_s:.1f} | {r.prefill_s:.3f} | {r.flop_frac:.1%} |")


if __name__ == "__main__":
    main()
