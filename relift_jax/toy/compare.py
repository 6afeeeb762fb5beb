"""The paper's comparison at toy scale: every method from the same base model and question budget.

    python -m relift_jax.toy.compare [--methods relift,rl,sft,sft_then_rl,rl_with_sft_loss,relift_uniform]
                                     [--seeds 0] [--runs_dir runs/toy/compare] [--out results/toy]

Each method is `gin/toy/<method>.gin` run in its own process (the base model is built once, first).
Writes `<out>/table.md`, `<out>/table.json`, `<out>/heldout_accuracy.png` (held-out accuracy over
iterations per method) and `<out>/sft_fired.png` (when SFT fired).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

METHODS = ("relift", "rl", "sft", "sft_then_rl", "rl_with_sft_loss", "relift_uniform")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_method(method: str, seed: int, runs_dir: str, extra: list[str]) -> tuple[str, float]:
    run_dir = os.path.join(runs_dir, f"{method}_s{seed}")
    cmd = [sys.executable, "-m", "relift_jax.main", f"--gin_file=gin/toy/{method}.gin",
           f"--run_dir={run_dir}", f"--gin.TrainConfig.seed={seed}", *extra]
    t0 = time.time()
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=_REPO)
    return run_dir, time.time() - t0


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def collect(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    rows = _rows(os.path.join(run_dir, "metrics.jsonl"))
    # Held-out response length of the final policy (every method has it; sft has no rollouts).
    lens = [r["eval/heldout/mean_length"] for r in rows if "eval/heldout/mean_length" in r]
    final = {r["bucket"]: r["final_acc"] for r in s["buckets"]["by_level"]}
    final.update({r["bucket"]: r["final_acc"] for r in s["buckets"]["by_base_pass"]})
    base = {r["bucket"]: r["base_acc"] for r in s["buckets"]["by_base_pass"]}
    base.update({r["bucket"]: r["base_acc"] for r in s["buckets"]["by_level"]})
    return {"final": final, "base": base, "demos_used": s.get("demos_used", 0),
            "demos_used_frac": s.get("demos_used_frac", 0.0),
            "response_len_mean": float(lens[-1]) if lens else float("nan"),
            "sft_fired": s.get("counters", {}).get("sft_fired", 0),
            "curve": [(r["step"], r["eval/heldout/accuracy"]) for r in rows
                      if "eval/heldout/accuracy" in r],
            "sft_steps": [r["step"] for r in rows if r.get("buffer/sft_fired")]}


def write_table(results: dict[str, list[dict]], out: str, seconds: dict[str, float]) -> str:
    first = next(iter(results.values()))[0]
    cols = [c for c in first["final"] if c.startswith("level")] + \
           ["Easy", "Medium", "Hard", "Hardest", "All"]
    head = "| method | " + " | ".join(cols) + " | demos used | % of data | resp. len | SFT steps |"
    lines = [head, "|---|" + "---:|" * (len(cols) + 4)]
    base = first["base"]
    lines.append("| base model | " + " | ".join(
        f"{100 * base.get(c, float('nan')):.1f}" for c in cols) + " | 0 | 0.0 | - | 0 |")
    table = {}
    for method, runs in results.items():
        mean = {c: float(np.nanmean([r["final"].get(c, np.nan) for r in runs])) for c in cols}
        demos = float(np.mean([r["demos_used"] for r in runs]))
        frac = float(np.mean([r["demos_used_frac"] for r in runs]))
        rlen = float(np.mean([r["response_len_mean"] for r in runs]))
        fired = float(np.mean([r["sft_fired"] for r in runs]))
        table[method] = {"accuracy": mean, "demos_used": demos, "demos_used_frac": frac,
                         "response_len_mean": rlen, "sft_fired": fired, "seeds": len(runs),
                         "all_per_seed": [r["final"]["All"] for r in runs],
                         "seconds": seconds.get(method)}
        lines.append(f"| {method} | " + " | ".join(f"{100 * mean[c]:.1f}" for c in cols) +
                     f" | {demos:.0f} | {100 * frac:.1f} | {rlen:.1f} | {fired:.0f} |")
    md = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump({"columns": cols, "base": {c: base.get(c) for c in cols}, "methods": table},
                  f, indent=1)
    return md


def plot(results: dict[str, list[dict]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in results.items():
        steps = [s for s, _ in runs[0]["curve"]]
        accs = np.mean([[a for _, a in r["curve"]] for r in runs], axis=0)
        ax.plot(steps, 100 * accs, marker="o", label=method)
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out accuracy (%, greedy)")
    ax.set_title(f"mean over {len(next(iter(results.values())))} seed(s); iteration 0 = base model",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "heldout_accuracy.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 2.8))
    for i, (method, runs) in enumerate(results.items()):
        ax.scatter(runs[0]["sft_steps"], [i] * len(runs[0]["sft_steps"]), marker="|", s=120)
    ax.set_yticks(range(len(results)))
    ax.set_yticklabels(list(results))
    ax.set_xlabel("iteration at which an SFT step fired")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sft_fired.png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--runs_dir", default="runs/toy/compare")
    p.add_argument("--out", default="results/toy")
    p.add_argument("--collect_only", action="store_true", help="only rebuild the table and plots")
    args, extra = p.parse_known_args(argv)
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    for m in methods:
        for s in seeds:
            run_dir = os.path.join(args.runs_dir, f"{m}_s{s}")
            if not args.collect_only:
                run_dir, sec = run_method(m, s, args.runs_dir, extra)
                seconds[m] = seconds.get(m, 0.0) + sec
            results.setdefault(m, []).append(collect(run_dir))
    md = write_table(results, args.out, seconds)
    plot(results, args.out)
    print(md)


if __name__ == "__main__":
    main()
