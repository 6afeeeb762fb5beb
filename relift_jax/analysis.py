"""The paper's analysis: held-out accuracy bucketed by difficulty level and by the starting model's
pass@k (Easy >= 6/8, Medium 3-5/8, Hard 1-2/8, Hardest 0/8 for k = 8; fractions for other k).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

BUCKETS = ("Easy", "Medium", "Hard", "Hardest")


def pass_bucket(num_correct: int, n: int) -> str:
    """Bucket of a question from the starting model's samples (thresholds of the paper, per 8)."""
    rate = num_correct / n
    if rate >= 6 / 8:
        return "Easy"
    if rate >= 3 / 8:
        return "Medium"
    if rate > 0:
        return "Hard"
    return "Hardest"


def bucket_rows(base: Sequence[tuple[int, int]], final: Sequence[tuple[int, int]],
                levels: Sequence[int | None]) -> dict[str, list[dict]]:
    """Per-bucket rows {bucket, n, base_acc, final_acc} by level and by the base's pass bucket.

    Args:
      base, final: per held-out question (num_correct, num_samples) of the starting / final policy.
      levels: per question difficulty level (None when the data has none).
    """
    base_acc = np.array([c / n for c, n in base])
    final_acc = np.array([c / n for c, n in final])
    out: dict[str, list[dict]] = {"by_level": [], "by_base_pass": []}

    def row(name, sel):
        sel = np.asarray(sel, bool)
        return {"bucket": name, "n": int(sel.sum()),
                "base_acc": float(base_acc[sel].mean()) if sel.any() else float("nan"),
                "final_acc": float(final_acc[sel].mean()) if sel.any() else float("nan")}

    for lv in sorted({l for l in levels if l is not None}):
        out["by_level"].append(row(f"level {lv}", [l == lv for l in levels]))
    buckets = [pass_bucket(c, n) for c, n in base]
    for b in BUCKETS:
        out["by_base_pass"].append(row(b, [x == b for x in buckets]))
    out["by_base_pass"].append(row("All", [True] * len(base)))
    return out


def to_markdown(rows: dict[str, list[dict]], *, base_name: str = "start",
                final_name: str = "final") -> str:
    lines = []
    for title, key in (("By difficulty level", "by_level"), ("By the starting model's pass rate",
                                                               "by_base_pass")):
        if not rows.get(key):
            continue
        lines += [f"**{title}**", "", f"| bucket | questions | {base_name} | {final_name} | change |",
                  "|---|---:|---:|---:|---:|"]
        for r in rows[key]:
            if r["n"] == 0:
                lines.append(f"| {r['bucket']} | 0 | - | - | - |")
                continue
            d = r["final_acc"] - r["base_acc"]
            lines.append(f"| {r['bucket']} | {r['n']} | {100 * r['base_acc']:.1f} | "
                         f"{100 * r['final_acc']:.1f} | {100 * d:+.1f} |")
        lines.append("")
    return "\n".join(lines)
