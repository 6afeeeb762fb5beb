"""The paper's comparison at toy scale, over seeds, with error bars.

    python -m relift_jax.toy.compare [--budget main|long] [--seeds 0,1,2,3,4]
        [--methods relift,rl,sft,sft_then_rl,rl_with_sft_loss,relift_uniform,sft_equal,relift_teacher]
        [--runs_dir runs/toy/compare] [--out results/toy] [--jobs 1] [--collect_only]

Every method starts from the same toy base model (built once, first) on the same questions, one
process per (method, seed), `gin/toy/<method>.gin` plus the budget's bindings. Two baselines the
paper lacks:
  sft_equal       SFT only, on as many randomly chosen demonstrations as ReLIFT used with the same
                  seed and budget, in ReLIFT's step size (M per step, as many steps as it fired):
                  does ReLIFT's *choice* of questions, or its RL, earn anything over plain SFT on
                  the same demonstration budget?
  relift_teacher  ReLIFT whose demonstrations come from a teacher model on demand
                  (gin/toy/relift_teacher.gin; SFTConfig.demo_source = 'teacher').
Budgets: `main` is the README's main job (48 iterations, 0.38 epochs of the 2,000 training
questions); `long` is 250 iterations, two epochs.

Runs already finished (their summary.json exists) are not run again, so an interrupted sweep goes
on where it stopped. Writes `<out>/<budget>/table.md` (mean over seeds with a 95% percentile
bootstrap interval, and each method's paired difference to ReLIFT on the same seeds), `table.json`,
`final_accuracy.png` (All and Hardest with intervals, one dot per seed) and `heldout_accuracy.png`
(held-out accuracy over iterations, mean and interval band).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

from relift_jax import stats

METHODS = ("relift", "rl", "sft", "sft_then_rl", "rl_with_sft_loss", "relift_uniform",
           "sft_equal", "relift_teacher")
REFERENCE = "relift"
BUDGETS: dict[str, tuple[str, ...]] = {
    "main": (),
    "long": ("TrainConfig.iterations = 250", "TrainConfig.eval_every = 25",
             "TrainConfig.save_every = 50", "SFTConfig.sft_iterations = 125"),
}
COLUMNS = ("All", "Hardest", "Hard", "Medium", "Easy")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_dir_of(runs_dir: str, budget: str, method: str, seed: int) -> str:
    return os.path.join(runs_dir, budget, f"{method}_s{seed}")


def done(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, "summary.json"))


def _flag(binding: str) -> str:
    """'TrainConfig.seed = 3' -> '--gin.TrainConfig.seed=3'."""
    name, value = binding.split("=", 1)
    return f"--gin.{name.strip()}={value.strip()}"


def launch(gin_file: str, run_dir: str, bindings: list[str], threads: int | None = None,
           log: str | None = None) -> float:
    """Runs one training job in its own process; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "relift_jax.main", f"--gin_file={gin_file}",
           f"--run_dir={run_dir}", *[_flag(b) for b in bindings]]
    env = dict(os.environ)
    # Every run compiles the same programs: a shared persistent cache skips most of the compiling
    # (the cached executable is the one that would be compiled, so the numbers are unchanged).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, "runs", "jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if threads:  # one XLA thread per job when several jobs share the cores
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                            "intra_op_parallelism_threads=1").strip()
    print("+", " ".join(cmd[2:]), flush=True)
    t0 = time.time()
    os.makedirs(run_dir, exist_ok=True)
    with open(log or os.path.join(run_dir, "stdout.log"), "w") as out:
        subprocess.run(cmd, check=True, cwd=_REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    sec = time.time() - t0
    with open(os.path.join(run_dir, "wall_s.json"), "w") as f:
        json.dump({"wall_s": sec, "threads": threads or os.cpu_count()}, f)
    return sec


def _operative(run_dir: str, name: str) -> str | None:
    path = os.path.join(run_dir, "operative_config.gin")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        m = re.search(rf"^{re.escape(name)} = (.+)$", f.read(), re.M)
    return m.group(1).strip() if m else None


def sft_equal_bindings(relift_run: str) -> list[str] | None:
    """SFT on as many random demonstrations as the ReLIFT run used: its M per step, its number of
    SFT steps; None when that ReLIFT run fired no SFT step."""
    with open(os.path.join(relift_run, "summary.json")) as f:
        fired = int(json.load(f)["counters"]["sft_fired"])
    if not fired:
        return None
    m = int(_operative(relift_run, "SFTConfig.buffer_size") or 32)
    return [f"TrainConfig.iterations = {fired}", f"TrainConfig.eval_every = {fired}",
            f"TrainConfig.save_every = {fired}", f"SFTConfig.sft_questions_per_step = {m}"]


def job(method: str, seed: int, budget: str, runs_dir: str, extra: list[str]
        ) -> tuple[str, list[str]] | None:
    """(gin file, bindings) of one run; None when it cannot run (sft_equal without SFT steps)."""
    bindings = [f"TrainConfig.seed = {seed}", *BUDGETS[budget], *extra]
    if method == "sft_equal":
        eq = sft_equal_bindings(run_dir_of(runs_dir, budget, REFERENCE, seed))
        return None if eq is None else ("gin/toy/sft.gin", bindings + eq)
    return f"gin/toy/{method}.gin", bindings


def run_all(methods: list[str], seeds: list[int], budget: str, runs_dir: str, extra: list[str],
            jobs: int = 1) -> None:
    """Runs what is missing; ReLIFT first (sft_equal reads its runs), `jobs` processes at once."""
    order = sorted(methods, key=lambda m: (m != REFERENCE, m == "sft_equal"))
    if "sft_equal" in methods and REFERENCE not in methods:
        order.insert(0, REFERENCE)
    waves = [[m for m in order if m != "sft_equal"], [m for m in order if m == "sft_equal"]]
    for wave in waves:
        specs = []
        for m, s in [(m, s) for m in wave for s in seeds]:
            if done(run_dir_of(runs_dir, budget, m, s)):
                continue
            spec = job(m, s, budget, runs_dir, extra)
            if spec is None:
                print(f"skip {m} seed {s}: its ReLIFT run fired no SFT step")
                continue
            specs.append((spec[0], run_dir_of(runs_dir, budget, m, s), spec[1]))
        launch_all(specs, jobs)


def launch_all(specs: list[tuple[str, str, list[str]]], jobs: int = 1) -> None:
    """Runs (gin file, run dir, bindings) jobs, `jobs` at once (one XLA thread each when > 1)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(launch, g, rd, b, 1 if jobs > 1 else None) for g, rd, b in specs]
        for f in futures:
            f.result()


def gin_bindings(extra: list[str]) -> list[str]:
    """The `--gin.NAME=VALUE` flags among unparsed arguments, as bindings `NAME=VALUE`."""
    return [e[len("--gin."):] for e in extra if e.startswith("--gin.")]


def names_from(p: argparse.ArgumentParser, flag: str, value: str, known) -> list[str]:
    """A comma-separated list of names, each one of `known` (else the parser's usage error)."""
    names = [n for n in value.split(",") if n]
    unknown = sorted(set(names) - set(known))
    if unknown:
        p.error(f"{flag}: unknown {unknown}; known: {', '.join(known)}")
    return names


# ----------------------------------------------------------------------------- collect

def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def collect(run_dir: str) -> dict:
    """One finished run: final and base accuracy by level and bucket, demos, SFT steps, curve."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    rows = _rows(os.path.join(run_dir, "metrics.jsonl"))
    final = {r["bucket"]: r["final_acc"] for r in s["buckets"]["by_level"]}
    final.update({r["bucket"]: r["final_acc"] for r in s["buckets"]["by_base_pass"]})
    base = {r["bucket"]: r["base_acc"] for r in s["buckets"]["by_base_pass"]}
    base.update({r["bucket"]: r["base_acc"] for r in s["buckets"]["by_level"]})
    wall = None
    if os.path.exists(os.path.join(run_dir, "wall_s.json")):
        with open(os.path.join(run_dir, "wall_s.json")) as f:
            wall = json.load(f)["wall_s"]
    counters = s.get("counters", {})
    return {"final": final, "base": base, "demos_used": s.get("demos_used", 0),
            "demos_used_frac": s.get("demos_used_frac", 0.0),
            "sft_fired": counters.get("sft_fired", 0), "counters": counters, "wall_s": wall,
            "curve": [(r["step"], r["eval/heldout/accuracy"]) for r in rows
                      if "eval/heldout/accuracy" in r]}


def summarize(results: dict[str, dict[int, dict]]) -> dict:
    """Per method: mean and 95% bootstrap interval of every column, and the paired difference of
    All and Hardest to ReLIFT over the seeds both have."""
    out = {}
    ref = results.get(REFERENCE, {})
    for method, by_seed in results.items():
        seeds = sorted(by_seed)
        runs = [by_seed[s] for s in seeds]
        levels = sorted(c for c in runs[0]["final"] if c.startswith("level"))
        row = {"seeds": seeds,
               "accuracy": {c: stats.bootstrap_ci([r["final"][c] for r in runs]).as_dict()
                            for c in (*COLUMNS, *levels) if c in runs[0]["final"]},
               "per_seed_all": [r["final"]["All"] for r in runs],
               "demos_used": float(np.mean([r["demos_used"] for r in runs])),
               "demos_used_frac": float(np.mean([r["demos_used_frac"] for r in runs])),
               "sft_fired": float(np.mean([r["sft_fired"] for r in runs])),
               "wall_s": float(np.mean([r["wall_s"] for r in runs if r["wall_s"]] or [np.nan]))}
        shared = [s for s in seeds if s in ref]
        if method != REFERENCE and shared:
            row["vs_relift"] = {c: stats.paired_difference(
                [by_seed[s]["final"][c] for s in shared],
                [ref[s]["final"][c] for s in shared]).as_dict() for c in ("All", "Hardest")}
            row["vs_relift_seeds"] = shared
        out[method] = row
    return out


def _iv(d: dict | None) -> str:
    return stats.Interval(**d).fmt() if d else "-"


def write_table(summary: dict, base: dict, out: str, budget: str, note: str = "") -> str:
    levels = sorted(c for c in base if c.startswith("level"))
    head = ("| method | seeds | All [95% CI] | All - ReLIFT [95% CI] | Hardest [95% CI] | "
            "Hardest - ReLIFT | " + " | ".join(levels) + " | Easy | Medium | Hard | demos used "
            "(% of data) | SFT steps | s per run |")
    lines = [head, "|---|---:|" + "---:|" * (len(levels) + 11)]
    lines.append("| base model | - | " + f"{100 * base['All']:.1f} | - | "
                 f"{100 * base['Hardest']:.1f} | - | " +
                 " | ".join(f"{100 * base[c]:.1f}" for c in levels) +
                 f" | {100 * base['Easy']:.1f} | {100 * base['Medium']:.1f} | "
                 f"{100 * base['Hard']:.1f} | 0 | 0 | - |")
    for method, r in summary.items():
        acc, vs = r["accuracy"], r.get("vs_relift", {})
        lines.append(
            f"| {method} | {len(r['seeds'])} | {_iv(acc['All'])} | {_iv(vs.get('All'))} | "
            f"{_iv(acc['Hardest'])} | {_iv(vs.get('Hardest'))} | " +
            " | ".join(f"{100 * acc[c]['mean']:.1f}" for c in levels) +
            f" | {100 * acc['Easy']['mean']:.1f} | {100 * acc['Medium']['mean']:.1f} | "
            f"{100 * acc['Hard']['mean']:.1f} | {r['demos_used']:.0f} "
            f"({100 * r['demos_used_frac']:.1f}%) | {r['sft_fired']:.1f} | {r['wall_s']:.0f} |")
    md = (f"Budget `{budget}`; held-out accuracy (%) of the final policy, mean over seeds with a 95% "
          f"percentile bootstrap interval; `- ReLIFT` is the paired difference on the same seeds. "
          f"{note}\n\n" + "\n".join(lines) + "\n")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump({"budget": budget, "base": base, "methods": summary}, f, indent=1)
    return md


def plot(summary: dict, results: dict[str, dict[int, dict]], out: str, budget: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, col in zip(axes, ("All", "Hardest")):
        for i, m in enumerate(methods):
            iv = summary[m]["accuracy"][col]
            ax.errorbar([i], [100 * iv["mean"]], yerr=[[100 * (iv["mean"] - iv["lo"])],
                                                        [100 * (iv["hi"] - iv["mean"])]],
                        fmt="o", capsize=4, color=f"C{i}")
            ys = [100 * results[m][s]["final"][col] for s in sorted(results[m])]
            ax.scatter(i + np.linspace(-0.15, 0.15, len(ys)), ys, s=10, color=f"C{i}", alpha=0.5)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"held-out accuracy, {col} (%)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"budget {budget}: mean, 95% bootstrap interval, one dot per seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "final_accuracy.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, m in enumerate(methods):
        curves = [results[m][s]["curve"] for s in sorted(results[m])]
        steps = [st for st, _ in curves[0]]
        if m == "sft_equal" or any([st for st, _ in c] != steps for c in curves):
            continue  # sft_equal runs a few SFT steps, not the budget's iterations
        ivs = [stats.bootstrap_ci([c[k][1] for c in curves]) for k in range(len(steps))]
        ax.plot(steps, [100 * v.mean for v in ivs], marker="o", ms=3, label=m, color=f"C{i}")
        ax.fill_between(steps, [100 * v.lo for v in ivs], [100 * v.hi for v in ivs],
                        alpha=0.15, color=f"C{i}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out accuracy (%, greedy)")
    ax.set_title(f"budget {budget}: mean over seeds, 95% bootstrap band; iteration 0 = base",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "heldout_accuracy.png"), dpi=110)
    plt.close(fig)


def collect_all(methods: list[str], seeds: list[int], budget: str, runs_dir: str
                ) -> dict[str, dict[int, dict]]:
    results: dict[str, dict[int, dict]] = {}
    for m in methods:
        for s in seeds:
            rd = run_dir_of(runs_dir, budget, m, s)
            if done(rd):
                results.setdefault(m, {})[s] = collect(rd)
            else:
                print(f"missing: {rd} (not run or not finished); left out of the table")
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="main")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--runs_dir", default="runs/toy/compare")
    p.add_argument("--out", default="results/toy")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once (each with one XLA thread when > 1)")
    p.add_argument("--collect_only", action="store_true", help="only rebuild the table and plots")
    args, extra = p.parse_known_args(argv)
    extra = gin_bindings(extra)
    methods = names_from(p, "--methods", args.methods, METHODS)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    if not args.collect_only:
        run_all(methods, seeds, args.budget, args.runs_dir, extra, args.jobs)
    results = collect_all(methods, seeds, args.budget, args.runs_dir)
    if not results:
        sys.exit("no finished runs to tabulate")
    summary = summarize(results)
    base = next(iter(next(iter(results.values())).values()))["base"]
    out = os.path.join(args.out, args.budget)
    md = write_table(summary, base, out, args.budget)
    plot(summary, results, out, args.budget)
    print(md)
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
