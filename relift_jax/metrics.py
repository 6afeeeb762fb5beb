"""What people see: TensorBoard scalars and text, a jsonl copy of every scalar, and PNG curves.

Only process 0 writes. Scalar names are prefixed (`rl/`, `sft/`, `rollout/`, `buffer/`, `eval/`,
`perf/`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np


class MetricsWriter:
    def __init__(self, run_dir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.run_dir = run_dir
        self._tb = None
        self._jsonl = None
        if self.enabled:
            os.makedirs(run_dir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")

    def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {}
        for k, v in metrics.items():
            v = float(np.asarray(v))
            clean[k] = v
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        self._tb.add_text(tag, text, step)
        with open(os.path.join(self.run_dir, "rollouts.txt"), "a") as f:
            f.write(f"=== step {step} {tag}\n{text}\n")

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_jsonl: str, out_png: str, keys: tuple[str, ...]) -> None:
    """One panel per key over steps, from a run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_jsonl)
    keys = tuple(k for k in keys if any(k in r for r in rows))
    if not keys:
        return
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_ylabel(k, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
