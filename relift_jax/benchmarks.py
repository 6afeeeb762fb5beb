"""The benchmark registry and its questions: which files, which rows, how repeated rows group.

Benchmarks (`BENCHMARKS`, files in relift_jax/benchmarks/): aime24, aime25, amc (32 samples each:
avg@32), math500, minerva, olympiad (the six of `MATH_BENCHMARKS`, averaged into `math_avg`);
arc_c, gpqa (multiple choice, out of distribution: `ood_avg`); gsm8k (grade-school maths, reported
on its own and in neither average, since the paper's table has no GSM8K column).

math_eval.parquet stores each AIME/AMC question 32 times to mean avg@32: `group_questions` merges
identical rows into one `Question` that remembers how many rows it stood for.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence

from relift_jax import data, gsm8k
from relift_jax.data import Example

BENCHMARK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One registered benchmark.

    Attributes:
        name: the name used on the command line and in metrics.
        file: file name in BENCHMARK_DIR.
        data_source: keep only rows with this `data_source` (None: every row).
        samples: default samples per question (the k of avg@k).
        reward: reward function name ("math" or "choice").
    """

    name: str
    file: str
    data_source: str | None
    samples: int
    reward: str


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("aime24", "math_eval.parquet", "aime", 32, "math"),
    Benchmark("aime25", "math_eval.parquet", "aime25", 32, "math"),
    Benchmark("amc", "math_eval.parquet", "amc", 32, "math"),
    Benchmark("math500", "math_eval.parquet", "math", 1, "math"),
    Benchmark("minerva", "math_eval.parquet", "minerva", 1, "math"),
    Benchmark("olympiad", "math_eval.parquet", "olympiad_bench", 1, "math"),
    Benchmark("arc_c", "arc_c.parquet", "arc_c", 1, "choice"),
    Benchmark("gpqa", "gpqa_diamond.parquet", "gpqa", 1, "choice"),
    Benchmark("gsm8k", "gsm8k_test.jsonl", None, 1, "math"),
)}
MATH_BENCHMARKS = ("aime24", "aime25", "amc", "math500", "minerva", "olympiad")
OOD_BENCHMARKS = ("arc_c", "gpqa")


@dataclasses.dataclass(frozen=True)
class Question:
    """One distinct question of a suite.

    Attributes:
        suite: the suite (benchmark) name.
        qid: position of the question in its suite, in order of first appearance.
        example: its first row.
        repeats: how many identical rows the source held (32 for AIME in math_eval.parquet).
    """

    suite: str
    qid: int
    example: Example
    repeats: int


def benchmark_path(file: str) -> str:
    """Absolute path of a packaged benchmark file."""
    return os.path.join(BENCHMARK_DIR, file)


def _gsm8k_examples(path: str) -> list[Example]:
    """GSM8K test rows -> Examples, on the fly: ground truth = the number after "####" without
    thousands separators; prompt = question + the boxed-answer instruction (as in
    gsm8k.convert_gsm8k)."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = []
    for i, row in enumerate(rows):
        answer = row.get("answer")
        if not isinstance(answer, str) or "####" not in answer:
            raise data.DataError(f"{path}: row {i}: field 'answer': must be a solution ending in "
                                 f"'#### N', got {str(answer)[:80]!r}")
        truth = answer.rsplit("####", 1)[1].strip().replace(",", "")
        question = str(row.get("question", "")).strip()
        if not truth or not question:
            raise data.DataError(f"{path}: row {i}: empty 'question' or final answer")
        messages = ({"role": "user", "content": question + gsm8k.GSM8K_INSTRUCTION},)
        out.append(Example(i, messages, truth, None, "gsm8k", "math", {}))
    return out


@functools.lru_cache(maxsize=None)
def _load_file(file: str, reward: str) -> tuple[Example, ...]:
    # math_eval.parquet backs six benchmarks: read it once.
    path = benchmark_path(file)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: packaged benchmark file is missing "
                                f"(reinstall relift_jax)")
    if file.startswith("gsm8k"):
        return tuple(_gsm8k_examples(path))
    return tuple(data.load_examples(path, reward=reward))


def load_benchmark(name: str) -> list[Example]:
    """All rows of a registered benchmark (repeated rows included).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    check_benchmark_names([name])
    bench = BENCHMARKS[name]
    rows = _load_file(bench.file, bench.reward)
    return [ex for ex in rows if bench.data_source is None or ex.data_source == bench.data_source]


def check_benchmark_names(names: Sequence[str]) -> None:
    """Raise a ValueError naming every unknown benchmark and listing the valid names."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; valid names: {', '.join(BENCHMARKS)}")


def group_questions(suite: str, examples: Sequence[Example]) -> list[Question]:
    """Merge identical rows (same messages, ground truth, source and reward) into one Question.

    math_eval.parquet stores each AIME/AMC question 32 times to mean avg@32: those are 32 samples
    of ONE question, never 32 questions.
    """
    groups: dict[tuple, list] = {}
    for ex in examples:
        key = (tuple((m.get("role"), m.get("content")) for m in ex.messages), ex.ground_truth,
               ex.data_source, ex.reward)
        if key in groups:
            groups[key][1] += 1
        else:
            groups[key] = [ex, 1]
    return [Question(suite, i, ex, n) for i, (ex, n) in enumerate(groups.values())]


def resolve_suites(suites: Mapping[str, Sequence[Example]] | Sequence[str],
                   limit: int | None = None) -> dict[str, list[Question]]:
    """Benchmark names or {suite: examples} -> {suite: questions}, names checked first.

    Args:
        suites: registered benchmark names, or a mapping from suite name to Examples (the
            trainer's held-out split); a mapping value may also be None to mean the registered
            benchmark of that name.
        limit: keep the first `limit` questions of each suite.

    Returns:
        Ordered {suite: [Question]}.
    """
    if isinstance(suites, str):
        suites = [s.strip() for s in suites.split(",") if s.strip()]
    if isinstance(suites, Mapping):
        items = list(suites.items())
    else:
        items = [(name, None) for name in suites]
    if not items:
        raise ValueError("no suites to evaluate")
    check_benchmark_names([name for name, rows in items if rows is None])
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"suite names must be unique, got {names}")
    out = {}
    for name, rows in items:
        questions = group_questions(name, load_benchmark(name) if rows is None else rows)
        out[name] = questions[:limit] if limit is not None else questions
    return out
