"""openai/grade-school-math jsonl -> the relift schema (prompt, reward_model, target, ...).

The demonstration is the worked solution (calculator annotations removed by default) between
"<think>" and "</think>", then the boxed final answer. CLI: `python -m relift_jax.data convert-gsm8k
SRC DST [--limit N]` (relift_jax.data.main).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from relift_jax.data_sources import DataError, parse_jsonl, row_error, short_repr
from relift_jax.encoding import THINK_PREFIX

GSM8K_INSTRUCTION = "\nLet's think step by step and output the final answer within \\boxed{}."
_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


def _gsm8k_row(raw: Any, i: int, src: str, strip_calculator: bool) -> dict:
    if not isinstance(raw, Mapping):
        raise DataError(f"{src}: row {i}: must be a JSON object, got {short_repr(raw)}")
    question, answer = raw.get("question"), raw.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise row_error(src, i, "question", "must be a non-empty string", question)
    if not isinstance(answer, str) or "####" not in answer:
        raise row_error(src, i, "answer", "must be a solution string ending in '#### <answer>'",
                        answer)
    steps, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")  # "1,000" -> "1000": thousands separators only
    if not final:
        raise row_error(src, i, "answer", "must have a final answer after '####'", answer)
    if strip_calculator:
        steps = _CALCULATOR_RE.sub("", steps)
    demonstration = f"{THINK_PREFIX}{steps.strip()}\n</think>\n\nThe answer is \\boxed{{{final}}}."
    return {
        "prompt": [{"role": "user", "content": question.strip() + GSM8K_INSTRUCTION}],
        "reward_model": {"ground_truth": final, "style": "rule"},
        "target": [{"role": "assistant", "content": demonstration}],
        "data_source": "gsm8k",
        "extra_info": {"index": i},
    }


def convert_gsm8k(src: str, dst: str, *, strip_calculator: bool = True,
                  limit: int | None = None) -> int:
    """Convert openai/grade-school-math jsonl into the relift schema.

    Args:
        src: jsonl with `question` and `answer` (a solution ending in "#### N").
        dst: output file; `.jsonl` or `.parquet` by its extension (written atomically).
        strip_calculator: remove the `<<48/2=24>>` calculator annotations from the solution.
        limit: convert only the first `limit` rows.

    Returns:
        The number of rows written.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")
    ext = os.path.splitext(dst)[1].lower()
    if ext not in (".jsonl", ".parquet"):
        raise ValueError(f"{dst}: output must end in .jsonl or .parquet, got {ext!r}")
    with open(src, encoding="utf-8") as f:
        raw_rows = parse_jsonl(src, f.read())
    if limit is not None:
        raw_rows = raw_rows[:limit]
    rows = [_gsm8k_row(raw, i, src, strip_calculator) for i, raw in enumerate(raw_rows)]

    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        if ext == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, dst)  # a crash mid-write must not leave a half file under the real name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(rows)
