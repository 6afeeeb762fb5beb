"""Held-out evaluation during training: accuracy curves, per-level scores, the paper's start-vs-final
buckets, and the best export. The same code as `python -m relift_jax.evaluate`, with the same stop
ids and graded text as the RL rollouts.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from relift_jax import analysis, checkpoint, evaluate
from relift_jax.config import RolloutConfig, TrainConfig


def example_level(ex) -> int | None:
    lv = ex.extra.get("level") if isinstance(ex.extra, dict) else None
    return int(lv) if lv is not None else None


class HeldOut:
    """Evaluates a policy on the held-out examples; keeps the best score and its export."""

    def __init__(self, *, run_dir: str, model_cfg: Any, tokenizer: Any, examples: Sequence,
                 train: TrainConfig, rollout: RolloutConfig, scorer: Any, stop_ids: Sequence[int],
                 mesh: Any, writer: Any, layout: Any = None):
        # Sampled like the RL rollouts: the rollout's decode attention.
        self.cfg = model_cfg.replace(decode_attention=rollout.decode_attention)
        self.run_dir, self.tok = run_dir, tokenizer
        self.examples = list(examples)
        self.train, self.rollout = train, rollout
        self.scorer, self.stop_ids, self.mesh, self.writer = scorer, tuple(stop_ids), mesh, writer
        self.layout = layout if layout is not None and layout.shardings is not None else None
        self.level_of = {ex.index: example_level(ex) for ex in self.examples}
        self.best = {"score": -1.0, "iteration": -1}

    def __bool__(self) -> bool:
        return bool(self.examples)

    def _evaluate(self, params, samples: int, temperature: float) -> evaluate.EvalResult:
        r, t = self.rollout, self.train
        settings = evaluate.EvalSettings(
            samples=samples, temperature=temperature, pass_k=(1, samples),
            max_new_tokens=r.max_response_len, max_prompt_len=r.max_prompt_len,
            keep_system_prompt=r.keep_system_prompt, think_prefix=r.think_prefix,
            require_think_close=t.require_think_close, seed=t.seed, batch_size=max(64, samples))
        mesh, in_mesh = self.mesh, contextlib.nullcontext()
        if self.layout is not None:  # the sampler's own weight layout (RL rollouts' too)
            params, mesh, in_mesh = self.layout(params), self.layout.mesh, jax.set_mesh(
                self.layout.mesh)
        with in_mesh:
            return evaluate.evaluate(self.cfg, params, self.tok, {"heldout": self.examples},
                                     settings, scorer=self.scorer, progress=False, mesh=mesh,
                                     stop_ids=self.stop_ids)

    def curve_point(self, params, iteration: int) -> dict[str, float]:
        """The scalars of one point on the eval curves (empty without held-out data)."""
        if not self.examples:
            return {}
        res = self._evaluate(params, self.train.eval_samples, self.train.eval_temperature)
        out = res.metrics("eval")
        out["perf/eval_tokens_per_s"] = out.pop("eval/tokens_per_s", 0.0)  # a timing, not a score
        levels: dict[int, list[float]] = {}
        for pq in res.per_question:
            lv = self.level_of.get(pq["source_index"])
            if lv is not None:
                levels.setdefault(lv, []).append(pq["correct"] / pq["n"])
        for lv, accs in sorted(levels.items()):
            out[f"eval/heldout/level{lv}"] = float(np.mean(accs))
        for rec in res.records[:self.train.log_rollouts]:
            self.writer.text(iteration, "eval/rollout", json.dumps(rec, indent=1))
        return out

    def maybe_export_best(self, params, iteration: int, metrics: dict[str, float]) -> None:
        score = float(metrics.get("eval/heldout/accuracy", -1.0))
        if self.train.export_best and score > self.best["score"]:
            self.best = {"score": score, "iteration": iteration}
            checkpoint.export_hf(self.cfg, params, os.path.join(self.run_dir, "export", "best"),
                                 tokenizer=self.tok,
                                 info={"iteration": iteration, "heldout_score": score})

    def bucket_counts(self, params, name: str) -> list[tuple[int, int]]:
        """(correct, n) per question, cached in the run dir so a resumed run reuses it."""
        path = os.path.join(self.run_dir, f"bucket_eval_{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                return [tuple(x) for x in json.load(f)]
        res = self._evaluate(params, self.train.bucket_samples, 1.0)
        counts = [(pq["correct"], pq["n"]) for pq in res.per_question]
        if jax.process_index() == 0:
            with open(path, "w") as f:
                json.dump(counts, f)
        return counts

    def bucket_table(self, base_counts, params) -> tuple[dict, str]:
        """The paper's analysis: accuracy by level and by the starting model's pass rate."""
        final_counts = self.bucket_counts(params, "final")
        levels = [example_level(ex) for ex in self.examples]
        rows = analysis.bucket_rows(base_counts, final_counts, levels)
        return rows, analysis.to_markdown(rows)
