"""RL-shaped sampling: relift_jax's engines vs transformers `generate(num_return_sequences=G)`, same
weights, same CPU, response lengths spread as in RL.

    python bench/rollout.py                      # toy preset, 16 prompts x 8, max 1024 and 256
    python bench/rollout.py --size small --repeats 1

The workload: Q prompts of 64 random tokens, G samples each at temperature 1, max M new tokens, and
a set of stop ids sized so that a row stops with probability about 1/`--mean_len` per token (random
weights give a nearly uniform next-token distribution): lengths are roughly geometric, mean about
0.4 M at M = 1024, and the batch's longest row usually reaches M.

Both sides count real tokens only (a row's tokens up to and including its stop id) and are timed
after warm-up calls with the same seeds (so compiles are excluded, as in a long run where the
shapes recur; ours reported separately), the median of `--repeats`, interleaved. transformers
runs in a child process that never starts jax (their thread pools fight otherwise), at each torch
thread count of `--threads`; the ratio is against the fastest.

Engines: "dense" (the reference: all rows in one batch, cache of prompt bucket + M, run until the
longest row ends) and "continuous" (relift_jax.engine: prefix sharing, windows over the filled cache,
finished rows leave the batch; SLOTS rows at once, 0 = all) and "grouped" (the same with length
groups: each group of rows of similar length decodes over its own window).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler import PRESETS  # noqa: E402  (bench/sampler.py)

from relift_jax import hf, model, sampler  # noqa: E402


def workload(size: str, args):
    cfg = PRESETS[size]
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.RandomState(0)
    prompts = rng.randint(0, cfg.vocab_size, (args.prompts, args.prompt_len)).tolist()
    n_stops = max(1, round(cfg.vocab_size / args.mean_len))
    stops = rng.choice(cfg.vocab_size, n_stops, replace=False).tolist()
    return cfg, params, prompts, stops


def run_ours(cfg, params, prompts, stops, max_new: int, seed: int, engine: str, slots: int):
    out = sampler.generate(cfg, params, prompts, max_new_tokens=max_new, temperature=1.0,
                           eos_id=stops, seed=seed, num_samples=ARGS.group, engine=engine,
                           slots=slots)
    return int(out.lengths.sum()), out.lengths


def hf_child(workdir: str, threads: int, group: int, max_new: int) -> None:
    """`seed` lines in, `seconds tokens` out: generate(num_return_sequences=group)."""
    import torch
    import transformers
    torch.set_num_threads(threads)
    m = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "export"),
                                                          dtype="float32").eval()
    prompts = np.load(os.path.join(workdir, "prompts.npy"))
    stops = np.load(os.path.join(workdir, "stops.npy")).tolist()

    def go(seed: int, p, n: int) -> tuple[float, int]:
        torch.manual_seed(seed)
        ids = torch.tensor(p, dtype=torch.long)
        t = time.perf_counter()
        with torch.no_grad():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
                             num_return_sequences=group, eos_token_id=stops, pad_token_id=stops[0])
        dt = time.perf_counter() - t
        new = out[:, ids.shape[1]:].numpy()
        tokens = 0
        for row in new:  # up to and including the first stop id
            hit = np.flatnonzero(np.isin(row, stops))
            tokens += int(hit[0]) + 1 if hit.size else len(row)
        return dt, tokens
    go(0, prompts[:1], 4)
    print("ready", flush=True)
    for line in sys.stdin:
        dt, tokens = go(int(line), prompts, max_new)
        print(f"{dt} {tokens}", flush=True)


class HFChild:
    def __init__(self, workdir: str, threads: int, max_new: int):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--hf_child", workdir, "--threads",
             str(threads), "--group", str(ARGS.group), "--max_new", str(max_new)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, seed: int) -> tuple[float, int]:
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        dt, tokens = self.proc.stdout.readline().split()
        return float(dt), int(tokens)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def bench(size: str, max_new: int, engines: list[tuple[str, int]], with_hf: bool) -> dict:
    cfg, params, prompts, stops = workload(size, ARGS)
    res: dict = {"size": size, "params": cfg.num_params(), "max_new": max_new, "stops": len(stops)}
    timings: dict = {e: [] for e in engines}
    compile_s, lengths = {}, None
    for e in engines:  # warm-up: every seed timed below, so each run's shapes are compiled
        t = time.perf_counter()
        for r in range(ARGS.repeats):
            run_ours(cfg, params, prompts, stops, max_new, r + 1, *e)
        compile_s[e] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        if with_hf:
            hf.save_checkpoint(cfg, params, os.path.join(tmp, "export"))
            np.save(os.path.join(tmp, "prompts.npy"), np.asarray(prompts, np.int64))
            np.save(os.path.join(tmp, "stops.npy"), np.asarray(stops, np.int64))
            children = [(th, HFChild(tmp, th, max_new)) for th in ARGS.threads]
        hf_runs: dict = {th: [] for th, _ in children}
        for r in range(ARGS.repeats):
            for e in engines:
                t = time.perf_counter()
                tokens, lengths = run_ours(cfg, params, prompts, stops, max_new, r + 1, *e)
                timings[e].append((time.perf_counter() - t, tokens))
            for th, c in children:
                hf_runs[th].append(c.run(r + 1))
        for _, c in children:
            c.close()
    for e, runs in timings.items():
        res[e] = statistics.median(tok / dt for dt, tok in runs)
        res[("compile", e)] = max(0.0, compile_s[e] - sum(dt for dt, _ in runs))
    res["hf"] = {th: statistics.median(tok / dt for dt, tok in runs)
                 for th, runs in hf_runs.items()}
    res["mean_len"] = float(np.mean(lengths))
    res["max_len"] = int(np.max(lengths))
    return res


def work_profile(size: str, max_new: int, engines: list[tuple[str, int]]) -> None:
    """Where the decode work goes, counted (not timed): each engine's decode row-steps per real
    token (rows carried while finished or padding) and the K/V cache slots its decode steps read
    per slot a ragged kernel would read (each token attends over its own filled prefix only)."""
    from relift_jax import engine as engine_lib
    cfg, params, prompts, stops = workload(size, ARGS)
    P = len(prompts[0])
    print(f"\nwork profile, max new {max_new}: row-steps / real token; K/V slots read / "
          "slots a ragged kernel reads; segment programs run")
    for name, slots in engines:
        calls = []
        real_segment = engine_lib._segment

        def segment(config, sp, steps, params_, state, key, _calls=calls):
            out = real_segment(config, sp, steps, params_, state, key)
            toks = np.asarray(out[1])
            ran = int((toks >= 0).any(axis=0).sum())
            _calls.append((toks.shape[0], state[0]["k"].shape[3], ran))
            return out
        engine_lib._segment = segment
        try:
            tokens, lengths = run_ours(cfg, params, prompts, stops, max_new, 1, name, slots)
        finally:
            engine_lib._segment = real_segment
        ideal = sum(n * P + n * (n + 1) // 2 for n in lengths.tolist())
        if name == "dense":
            B, S, steps = sampler._batch_bucket(len(lengths), 1), sampler.bucket(P) + max_new, \
                int(lengths.max())
            row_steps, reads = B * steps, B * S * steps
        else:
            row_steps = sum(b * ran for b, _, ran in calls)
            reads = sum(b * w * ran for b, w, ran in calls)
        print(f"  {name}[{slots or 'all'}]: {row_steps / tokens:.2f} row-steps per token, "
              f"{reads / ideal:.2f}x the ragged K/V reads, {len(calls)} segment calls")
    n = ARGS.prompts * ARGS.group
    steps = int(lengths.max())
    hf_reads = sum(n * (P + t + 1) for t in range(steps))
    print(f"  transformers generate (from the same lengths): {n * steps / tokens:.2f} row-steps "
          f"per token, {hf_reads / ideal:.2f}x the ragged K/V reads")


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="toy", choices=sorted(PRESETS))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--max_new", default="1024,256", help="comma-separated maxima of new tokens")
    p.add_argument("--mean_len", type=float, default=400.0, help="1 / stop probability per token")
    p.add_argument("--engines", default="dense:0,continuous:0,continuous:32,grouped:0,grouped:32",
                   help="comma-separated ENGINE:SLOTS (slots 0: all rows; ignored by dense)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", default=f"{os.cpu_count()},1")
    p.add_argument("--skip_hf", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="count where the decode work goes (one untimed call per engine) instead")
    p.add_argument("--hf_child", default=None, help=argparse.SUPPRESS)
    ARGS = p.parse_args()
    ARGS.threads = sorted({int(t) for t in ARGS.threads.split(",")}, reverse=True)
    if ARGS.hf_child:
        return hf_child(ARGS.hf_child, ARGS.threads[0], ARGS.group, int(ARGS.max_new))
    engines = [(e, int(s)) for e, s in (x.split(":") for x in ARGS.engines.split(","))]
    print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores; {ARGS.size}: {ARGS.prompts} prompts "
          f"x {ARGS.group} samples, prompt {ARGS.prompt_len} tokens, temperature 1, "
          f"repeats {ARGS.repeats}; transformers with torch threads {ARGS.threads}")
    if ARGS.profile:
        for m in (int(x) for x in ARGS.max_new.split(",")):
            work_profile(ARGS.size, m, engines)
        return
    results = []
    for i, m in enumerate(int(x) for x in ARGS.max_new.split(",")):
        # transformers at the first maximum only (the ratio the target names)
        results.append(bench(ARGS.size, m, engines, with_hf=not ARGS.skip_hf and i == 0))
    names = [f"{e}" + (f"[{s or 'all'}]" if e != "dense" else "") for e, s in engines]
    print("\n| max new | mean len (max) | " + " | ".join(f"{n} tok/s" for n in names) +
          " | HF tok/s (best) | best ours / HF | compile s |")
    print("|---" * (len(names) + 5) + "|")
    for r in results:
        ours = [r[e] for e in engines]
        hf_best = max(r["hf"].values()) if r["hf"] else None
        ratio = f"{max(ours) / hf_best:.2f}x" if hf_best else "-"
        hf_txt = (", ".join(f"{v:,.0f} ({th} thr)" for th, v in r["hf"].items())
                  if r["hf"] else "-")
        comp = ", ".join(f"{r[('compile', e)]:.0f}" for e in engines)
        print(f"| {r['max_new']} | {r['mean_len']:.0f} ({r['max_len']}) | " +
              " | ".join(f"{v:,.0f}" for v in ours) + f" | {hf_txt} | {ratio} | {comp} |")
    if len(results) > 1:
        for e, n in zip(engines, names):
            print(f"{n}: tokens/s at max {results[0]['max_new']} / at max {results[1]['max_new']}"
                  f" = {results[0][e] / results[1][e]:.2f}")


ARGS: argparse.Namespace


if __name__ == "__main__":
    main()
