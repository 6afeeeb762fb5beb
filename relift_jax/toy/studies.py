"""The studies the paper left open, as a sweep: one table and one plot per study.

    python -m relift_jax.toy.studies [--studies buffer_size,threshold,sft_lr,adaptive]
        [--seeds 0,1,2] [--runs_dir runs/toy/compare] [--out results/toy/studies] [--jobs 1]
        [--collect_only]

Each study varies one configuration field of ReLIFT (gin/toy/relift.gin) over a grid, every value
on the same seeds; the value gin/toy/relift.gin already has is the comparison's own ReLIFT run
(`relift_jax.toy.compare`, same run directory, not run twice). Writes
`<out>/<study>.md`, `<out>/<study>.json` and `<out>/<study>.png` (final All and Hardest accuracy
with 95% bootstrap intervals, paired differences to the default value, demonstrations used).

  buffer_size  SFTConfig.buffer_size (M): the paper never ablated it
  threshold    SFTConfig.hardest_max_pass_rate: 0 of G (the paper) or at most 1 of G
  sft_lr       SFTConfig.learning_rate of the SFT step
  adaptive     SFTConfig.hardest_visits: a question enters the buffer only after failing in that
               many visits (2 guards against one unlucky group); needs revisits, so it runs at the
               long budget (two epochs), where every question is seen twice
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from relift_jax import stats
from relift_jax.toy import compare


@dataclasses.dataclass(frozen=True)
class Study:
    binding: str              # the gin binding varied
    values: tuple             # its grid
    default: object           # gin/toy/relift.gin's value: that run is the comparison's ReLIFT run
    budget: str = "main"
    label: str = ""


STUDIES: dict[str, Study] = {
    "buffer_size": Study("SFTConfig.buffer_size", (16, 32, 64), 32, label="buffer size M"),
    "threshold": Study("SFTConfig.hardest_max_pass_rate", (0.0, 0.125), 0.0,
                       label="hardest = pass rate <= (0.125 = at most 1 of 8)"),
    "sft_lr": Study("SFTConfig.learning_rate", (1e-4, 3e-4, 1e-3), 3e-4, label="SFT learning rate"),
    "adaptive": Study("SFTConfig.hardest_visits", (1, 2), 1, budget="long",
                      label="failing visits before a question enters the buffer"),
}


def run_dir_of(runs_dir: str, study: Study, value, seed: int) -> str:
    if value == study.default:
        return compare.run_dir_of(runs_dir, study.budget, compare.REFERENCE, seed)
    name = study.binding.split(".")[-1]
    return os.path.join(runs_dir, study.budget, "studies", f"relift_{name}={value}_s{seed}")


def bindings(study: Study, value, seed: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [f"TrainConfig.seed = {seed}", *compare.BUDGETS[study.budget], *extra,
            f"{study.binding} = {value!r}"]


def run_study(study: Study, seeds: list[int], runs_dir: str, jobs: int = 1,
              gin_file: str = "gin/toy/relift.gin", extra: tuple[str, ...] = ()) -> None:
    """Runs the grid's missing (value, seed) runs, `jobs` at once (the default value's run is
    the comparison's ReLIFT run, so `extra` must match what that was run with)."""
    todo = [(v, s) for v in study.values for s in seeds
            if not compare.done(run_dir_of(runs_dir, study, v, s))]
    compare.launch_all([(gin_file, run_dir_of(runs_dir, study, v, s), bindings(study, v, s, extra))
                        for v, s in todo], jobs)


def summarize(study: Study, seeds: list[int], runs_dir: str) -> dict:
    rows = {}
    ref = {s: compare.collect(run_dir_of(runs_dir, study, study.default, s)) for s in seeds
           if compare.done(run_dir_of(runs_dir, study, study.default, s))}
    for v in study.values:
        runs = {s: compare.collect(run_dir_of(runs_dir, study, v, s)) for s in seeds
                if compare.done(run_dir_of(runs_dir, study, v, s))}
        if not runs:
            continue
        ss = sorted(runs)
        row = {"value": v, "seeds": ss,
               "accuracy": {c: stats.bootstrap_ci([runs[s]["final"][c] for s in ss]).as_dict()
                            for c in ("All", "Hardest")},
               "demos_used": sum(runs[s]["demos_used"] for s in ss) / len(ss),
               "sft_fired": sum(runs[s]["sft_fired"] for s in ss) / len(ss),
               "hardest_without_demo": sum(runs[s]["counters"].get("hardest_without_demo", 0)
                                           for s in ss) / len(ss)}
        shared = [s for s in ss if s in ref]
        if v != study.default and shared:
            row["vs_default"] = {c: stats.paired_difference(
                [runs[s]["final"][c] for s in shared],
                [ref[s]["final"][c] for s in shared]).as_dict() for c in ("All", "Hardest")}
        rows[str(v)] = row
    return rows


def write(name: str, study: Study, rows: dict, out: str) -> str:
    iv = lambda d: stats.Interval(**d).fmt() if d else "-"  # noqa: E731
    lines = [f"Study `{name}`: {study.binding} ({study.label}), budget `{study.budget}`, ReLIFT on "
             f"the toy task; held-out accuracy (%) of the final policy, mean over seeds with a 95% "
             f"percentile bootstrap interval; `- default` is the paired difference to "
             f"{study.binding} = {study.default!r} on the same seeds.", "",
             "| value | seeds | All [95% CI] | All - default | Hardest [95% CI] | "
             "Hardest - default | demos used | SFT steps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v, r in rows.items():
        vs = r.get("vs_default", {})
        lines.append(f"| {v}{' (default)' if r['value'] == study.default else ''} | "
                     f"{len(r['seeds'])} | {iv(r['accuracy']['All'])} | {iv(vs.get('All'))} | "
                     f"{iv(r['accuracy']['Hardest'])} | {iv(vs.get('Hardest'))} | "
                     f"{r['demos_used']:.0f} | {r['sft_fired']:.1f} |")
    md = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"study": name, "binding": study.binding, "budget": study.budget,
                   "default": study.default, "rows": rows}, f, indent=1)
    _plot(name, study, rows, out)
    return md


def _plot(name: str, study: Study, rows: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(rows)))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, col in zip(axes, ("All", "Hardest")):
        acc = [r["accuracy"][col] for r in rows.values()]
        ax.errorbar(xs, [100 * a["mean"] for a in acc],
                    yerr=[[100 * (a["mean"] - a["lo"]) for a in acc],
                          [100 * (a["hi"] - a["mean"]) for a in acc]], fmt="o-", capsize=4)
        ax.set_xticks(xs)
        ax.set_xticklabels(list(rows))
        ax.set_xlabel(study.label or study.binding, fontsize=8)
        ax.set_ylabel(f"held-out {col} (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name}: {study.binding}, budget {study.budget}; mean and 95% bootstrap "
                 f"interval over {max(len(r['seeds']) for r in rows.values())} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}.png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studies", default=",".join(STUDIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--runs_dir", default="runs/toy/compare")
    p.add_argument("--out", default="results/toy/studies")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--gin_file", default="gin/toy/relift.gin")
    p.add_argument("--collect_only", action="store_true")
    args, extra = p.parse_known_args(argv)
    extra = tuple(compare.gin_bindings(extra))
    names = compare.names_from(p, "--studies", args.studies, STUDIES)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    for name in names:
        study = STUDIES[name]
        if not args.collect_only:
            run_study(study, seeds, args.runs_dir, args.jobs, args.gin_file, extra)
        rows = summarize(study, seeds, args.runs_dir)
        if not rows:
            print(f"{name}: no finished runs", file=sys.stderr)
            continue
        print(write(name, study, rows, args.out))
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
