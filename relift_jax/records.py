"""The resumable store of one evaluation: responses.jsonl, its fingerprint and the summaries.

Resumable: responses.jsonl is written one whole batch at a time. Batches are a deterministic
function of the questions and settings (`plan_batches`), and each batch's seed is derived from
(seed, suite, batch index) (`batch_seed`), so a rerun skips the finished batches and regenerates
the rest exactly as an uninterrupted run would have. eval_config.json holds a fingerprint of what
must match for that (settings, model architecture, prompts, batch plans, stop ids); a folder
holding another evaluation's responses is refused, never mixed in.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # evaluate imports this module; these types are only read here
    from relift_jax.benchmarks import Question
    from relift_jax.evaluate import EvalSettings

RESPONSES_FILE = "responses.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
FINGERPRINT_FILE = "eval_config.json"

BatchKey = tuple[str, int]  # (suite, batch index)


def batch_seed(seed: int, suite: str, batch: int) -> int:
    """Seed of one batch: a stable hash (Python's hash() of a str changes per process)."""
    digest = hashlib.sha256(f"{seed}/{suite}/{batch}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def plan_batches(prompt_lens: Sequence[int], samples: int, batch_size: int) -> list[list[int]]:
    """Positions of the questions in each batch: sorted by prompt length (ties by position) so
    that short prompts share a batch and pad little; max(1, batch_size // samples) per batch."""
    order = sorted(range(len(prompt_lens)), key=lambda i: (prompt_lens[i], i))
    per = max(1, batch_size // samples)
    return [order[i:i + per] for i in range(0, len(order), per)]


def expected_rows(questions: Mapping[str, list[Question]], plans: Mapping,
                  settings: EvalSettings) -> dict[tuple[str, int], set[tuple[int, int]]]:
    """The (question, sample) pairs each planned batch holds when finished."""
    return {(suite, b): {(questions[suite][i].qid, s) for i in positions
                         for s in range(settings.samples_for(suite))}
            for suite, plan in plans.items() for b, positions in enumerate(plan)}


def fingerprint(config: Any, settings: EvalSettings, questions: Mapping[str, list[Question]],
                prompt_ids: Mapping[str, list[list[int]]], plans: Mapping,
                stops: Sequence[int]) -> dict:
    """What must match for a resume: settings, model architecture, prompts, batch plans and stop
    ids. The weights themselves are not hashed (too slow); a new checkpoint needs a new
    output_dir."""
    settings_d = settings.to_dict()
    settings_d.pop("reward_workers")  # does not change any result
    model = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)
    suites = {}
    for suite, qs in questions.items():
        h = hashlib.sha256(json.dumps([[q.qid, q.example.ground_truth] for q in qs]).encode())
        h.update(json.dumps(prompt_ids[suite]).encode())
        h.update(json.dumps(plans[suite]).encode())
        suites[suite] = {"questions": len(qs), "batches": len(plans[suite]),
                         "samples": settings.samples_for(suite), "sha256": h.hexdigest()}
    return {"settings": settings_d, "model": json.loads(json.dumps(model, default=str)),
            "stop_ids": list(stops), "suites": suites}


class RecordStore:
    """responses.jsonl, eval_config.json, summary.json and summary.md in `output_dir`.

    With output_dir None nothing is written and there is nothing to resume.
    """

    def __init__(self, output_dir: str | None):
        self.output_dir = output_dir
        self._file = None

    def open(self, fingerprint: dict, expected: Mapping[BatchKey, set[tuple[int, int]]]
             ) -> tuple[list[dict], set[BatchKey]]:
        """Check the fingerprint, then load the finished batches.

        Args:
            fingerprint: JSON-ready description of the evaluation (see the module docstring).
            expected: for every planned batch, the (question, sample) pairs it must hold.

        Returns:
            (records of the finished batches, their (suite, batch) keys).
        """
        if self.output_dir is None:
            return [], set()
        os.makedirs(self.output_dir, exist_ok=True)
        check_fingerprint(self.output_dir, fingerprint)
        path = os.path.join(self.output_dir, RESPONSES_FILE)
        records, finished = resume(path, expected)
        self._file = open(path, "a", encoding="utf-8")
        return records, finished

    def append(self, records: Sequence[dict]) -> None:
        """Write one whole batch, then flush: a crash leaves whole batches (plus at most one torn
        line, which resume ignores)."""
        if self._file is None:
            return
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def write_summary(self, summary: Mapping, table_md: str) -> None:
        if self.output_dir is None:
            return
        write_json(os.path.join(self.output_dir, SUMMARY_JSON), summary)
        with open(os.path.join(self.output_dir, SUMMARY_MD), "w", encoding="utf-8") as f:
            f.write(table_md)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def resume(path: str, expected: Mapping[BatchKey, set[tuple[int, int]]]
           ) -> tuple[list[dict], set[BatchKey]]:
    """Records of the batches an earlier run finished, and their (suite, batch) keys. A batch
    with missing rows (a torn write) is dropped and the file rewritten without it."""
    if not os.path.exists(path):
        return [], set()
    old, torn = read_records(path)
    by_batch: dict[BatchKey, list[dict]] = collections.defaultdict(list)
    for r in old:
        by_batch[(r.get("suite"), r.get("batch"))].append(r)
    kept, finished = [], set()
    for key, rows in by_batch.items():
        want = expected.get(key)
        if want is not None and len(rows) == len(want) and \
                {(r["question"], r["sample"]) for r in rows} == want:
            kept.extend(rows)
            finished.add(key)
    if torn or len(kept) != len(old):
        # Rewrite, or the next append would continue the torn line.
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        os.replace(tmp, path)
    return kept, finished


def read_records(path: str) -> tuple[list[dict], bool]:
    """Lines of an existing responses.jsonl, and whether its last line was torn (a crash
    mid-write; that line is ignored)."""
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return records, True
            raise ValueError(f"{path}: line {i + 1} is not JSON; the file is damaged "
                             f"(delete it or choose another output_dir)") from None
    return records, bool(lines) and not lines[-1].endswith("\n")


def write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)  # never a half-written file under the real name


def check_fingerprint(output_dir: str, fingerprint: dict) -> None:
    """Refuse to mix responses of two different evaluations in one output_dir; record this one's
    fingerprint."""
    path = os.path.join(output_dir, FINGERPRINT_FILE)
    responses = os.path.join(output_dir, RESPONSES_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != fingerprint:
            diffs = [k for k in fingerprint if old.get(k) != fingerprint[k]]
            detail = diffs
            if "settings" in diffs:
                detail = [f"settings.{k}: {old['settings'].get(k)!r} -> {v!r}"
                          for k, v in fingerprint["settings"].items()
                          if old.get("settings", {}).get(k) != v] or diffs
            raise ValueError(f"{output_dir} holds responses of a different evaluation "
                             f"(differs in {detail}); use another --output_dir or delete it")
    elif os.path.exists(responses) and os.path.getsize(responses) > 0:
        raise ValueError(f"{responses} exists but {path} does not: cannot tell which evaluation "
                         f"wrote it; use another --output_dir or delete it")
    write_json(path, fingerprint)
