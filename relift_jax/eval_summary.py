"""Aggregation of graded evaluation responses: per-suite metrics, the summary, the table.

Pure host-side work over the response records that relift_jax.evaluate produces: avg@G and the
unbiased pass@k per suite, the maths and out-of-distribution averages, and the markdown table.
Nothing here samples, grades or writes files.

Shape key: N questions of a suite, G samples per question.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from relift_jax.benchmarks import MATH_BENCHMARKS, OOD_BENCHMARKS, Question
from relift_jax.reward import pass_at_k  # the unbiased estimator, per question

if TYPE_CHECKING:  # evaluate imports this module; the settings are only read here
    from relift_jax.evaluate import EvalSettings


def suite_metrics(scores_NxG: np.ndarray, lengths_NxG: np.ndarray, truncated_NxG: np.ndarray,
                  pass_k: Sequence[int]) -> dict:
    """Metrics of one suite from its per-response arrays (questions x samples).

    accuracy = mean score over all responses (avg@G). pass@k: the unbiased estimator per question,
    then averaged over questions; a response counts as correct with full credit (score >= 1).

    Returns:
        dict with questions, samples, accuracy, "avg@G", "pass@k" for each k <= G, mean_length,
        truncated_frac.
    """
    n_q, g = scores_NxG.shape
    out: dict[str, Any] = {"questions": int(n_q), "samples": int(g)}
    if n_q == 0:
        out.update(accuracy=None, mean_length=None, truncated_frac=None)
        return out
    accuracy = float(np.mean(scores_NxG, dtype=np.float64))
    out["accuracy"] = accuracy
    out[f"avg@{g}"] = accuracy
    correct_N = np.sum(scores_NxG >= 1.0, axis=1)
    for k in pass_k:
        if k <= g:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(g, int(c), k) for c in correct_N]))
    out["mean_length"] = float(np.mean(lengths_NxG, dtype=np.float64))
    out["truncated_frac"] = float(np.mean(truncated_NxG, dtype=np.float64))
    return out


def _mean_of(suites: Mapping[str, dict], names: Sequence[str]) -> float | None:
    vals = [suites[n]["accuracy"] for n in names
            if n in suites and suites[n].get("accuracy") is not None]
    return float(np.mean(vals)) if vals else None


def format_table(summary: Mapping) -> str:
    """Markdown table of a summary: accuracy (%), pass@k (%), lengths; no timings, so that a
    resumed run's table equals an uninterrupted one's."""
    lines = ["| suite | questions | samples | accuracy | pass@k | mean length | truncated "
             "| dropped |", "|---|---|---|---|---|---|---|---|"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    for name, m in summary["suites"].items():
        g = m["samples"]
        acc = "-" if m.get("accuracy") is None else f"{pct(m['accuracy'])} (avg@{g})"
        ks = sorted(int(key[5:]) for key in m if key.startswith("pass@") and int(key[5:]) > 1)
        pk = ", ".join(f"@{k} {pct(m[f'pass@{k}'])}" for k in ks) or "-"
        length = "-" if m.get("mean_length") is None else f"{m['mean_length']:.0f}"
        lines.append(f"| {name} | {m['questions']} | {g} | {acc} | {pk} | {length} | "
                     f"{pct(m.get('truncated_frac'))}% | {m.get('dropped', 0)} |")
    for key, label, group in (("math_avg", "math avg", MATH_BENCHMARKS),
                              ("ood_avg", "OOD avg", OOD_BENCHMARKS)):
        if summary.get(key) is not None:
            present = [n for n in group if n in summary["suites"]]
            lines.append(f"| **{label}** ({', '.join(present)}) | | | **{pct(summary[key])}** "
                         f"| | | | |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class EvalResult:
    """What evaluate() returns.

    Attributes:
        summary: {"suites": {suite: metrics}, "math_avg", "ood_avg", "settings", "timing"}; only
            "timing" (tokens/s, seconds, batches resumed) differs between a resumed run and an
            uninterrupted one.
        table_md: the markdown table (no timings).
        records: one dict per response, ordered by suite, question, sample.
        per_question: one dict per question: suite, question, data_source, source_index, n,
            correct (full-credit responses), score_sum, mean_length.
    """

    summary: dict
    table_md: str
    records: list[dict]
    per_question: list[dict]

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat scalars for a metrics writer: `eval/aime24/avg@32`, `eval/math_avg`, ..."""
        out = {}
        for suite, m in self.summary["suites"].items():
            for key, value in m.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{prefix}/{suite}/{key}"] = float(value)
        for key in ("math_avg", "ood_avg"):
            if self.summary.get(key) is not None:
                out[f"{prefix}/{key}"] = float(self.summary[key])
        tps = self.summary.get("timing", {}).get("tokens_per_s")
        if tps is not None:
            out[f"{prefix}/tokens_per_s"] = float(tps)
        return out


def summarize(questions: Mapping[str, Sequence[Question]], records: Sequence[dict],
              settings: EvalSettings, dropped: Mapping[str, int]) -> tuple[dict, list[dict]]:
    """Summary and per-question rows from the response records (pure: no timings).

    Returns:
        (summary without "timing", per_question).
    """
    by_q: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for r in records:
        by_q[(r["suite"], r["question"])].append(r)
    suites, per_question = {}, []
    for suite, qs in questions.items():
        g = settings.samples_for(suite)
        done = [q for q in qs if (suite, q.qid) in by_q]
        shape = (len(done), g)
        scores, lengths, trunc = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        for i, q in enumerate(done):
            rows = sorted(by_q[(suite, q.qid)], key=lambda r: r["sample"])
            if len(rows) != g:
                raise RuntimeError(f"suite {suite!r} question {q.qid}: {len(rows)} responses, "
                                   f"expected {g}")
            scores[i] = [r["score"] for r in rows]
            lengths[i] = [r["length"] for r in rows]
            trunc[i] = [r["truncated"] for r in rows]
            per_question.append({
                "suite": suite, "question": q.qid, "data_source": q.example.data_source,
                "source_index": q.example.index, "n": g, "correct": int(np.sum(scores[i] >= 1.0)),
                "score_sum": float(np.sum(scores[i])), "mean_length": float(np.mean(lengths[i]))})
        m = suite_metrics(scores, lengths, trunc, settings.pass_k)
        m["dropped"] = int(dropped.get(suite, 0))
        suites[suite] = m
    summary = {"suites": suites, "math_avg": _mean_of(suites, MATH_BENCHMARKS),
               "ood_avg": _mean_of(suites, OOD_BENCHMARKS), "settings": settings.to_dict()}
    return summary, per_question
