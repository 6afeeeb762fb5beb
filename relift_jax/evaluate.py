"""Benchmark evaluation: sample k responses per question, grade them, report avg@k and pass@k.

Used from the command line on a finished checkpoint and by the trainer on a held-out split (it calls
`evaluate()` with ready `Example` lists). The protocol (docs/relift.md): temperature 0.6,
top_p 1.0, up to 8192 new tokens, system prompt removed, generation prompt ending in
"<think>\\n", math-verify on the text after "</think>".

Benchmarks (`BENCHMARKS`, files in relift_jax/benchmarks/): aime24, aime25, amc (32 samples each:
avg@32), math500, minerva, olympiad (the six of `MATH_BENCHMARKS`, averaged into `math_avg`);
arc_c, gpqa (multiple choice, out of distribution: `ood_avg`); gsm8k (grade-school maths, reported
on its own and in neither average, since the paper's table has no GSM8K column).

Resumable: with an output_dir, responses.jsonl is written one whole batch at a time. Batches are a
deterministic function of the questions and settings, and each batch's seed is derived from
(settings.seed, suite, batch index), so a rerun skips the finished batches and regenerates the rest
exactly as an uninterrupted run would have.

CLI: python -m relift_jax.evaluate --checkpoint=PATH [--benchmarks=aime24,math500] [--samples=N]
    [--max_new_tokens=N] [--limit=N] [--output_dir=DIR] [--gin_file=F ...] [--gin.X=Y ...]
    [--dtype=float32|bfloat16] [--batch_size=N] [--temperature=T] [--seed=S]

Shape key: N questions in a batch, G samples per question, B = N * G sampler rows.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import numpy as np

from relift_jax import data
from relift_jax.data import Example
from relift_jax.reward import pass_at_k  # the unbiased estimator, per question

BENCHMARK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")
RESPONSES_FILE = "responses.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
FINGERPRINT_FILE = "eval_config.json"


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
DEFAULT_PASS_K = (1, 8, 16, 32)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How to evaluate. Defaults follow the paper's protocol.

    Attributes:
        samples: responses per question: None for each benchmark's default (32 for AIME/AMC, else
            1; 1 for suites that are not registered benchmarks), an int for every suite, or a
            mapping suite -> int (suites it does not name keep their default).
        temperature, top_p, top_k: sampling rule (top_k 0 = off).
        max_new_tokens: response budget; a response that reaches it is "truncated".
        max_prompt_len: longer prompts are left out and counted as `dropped` in the summary.
        keep_system_prompt: False removes the system message (the protocol).
        think_prefix: end the generation prompt with "<think>\\n".
        require_think_close: a response without "</think>" scores 0 (the official format gate).
        pass_k: the k of pass@k, each reported where k <= samples.
        batch_size: sampler rows per call; a batch holds max(1, batch_size // samples) questions.
        limit: evaluate only the first `limit` questions of each suite (None: all).
        seed: base seed; batch b of suite s samples with a seed derived from (seed, s, b).
        reward_workers, reward_timeout_s: the RewardScorer built when evaluate() gets none.
    """

    samples: int | Mapping[str, int] | None = None
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 8192
    max_prompt_len: int = 2048
    keep_system_prompt: bool = False
    think_prefix: bool = True
    require_think_close: bool = True
    pass_k: tuple[int, ...] = DEFAULT_PASS_K
    batch_size: int = 64
    limit: int | None = None
    seed: int = 0
    reward_workers: int = 2
    reward_timeout_s: float = 5.0

    def __post_init__(self):
        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"EvalSettings.{name} must be a positive int, got {value!r}")

        if isinstance(self.samples, Mapping):
            for suite, n in self.samples.items():
                positive_int(f"samples[{suite!r}]", n)
            # Frozen means immutable: keep a private copy, not the caller's dict.
            object.__setattr__(self, "samples", dict(self.samples))
        elif self.samples is not None:
            positive_int("samples", self.samples)
            object.__setattr__(self, "samples", int(self.samples))
        if not self.temperature >= 0:
            raise ValueError(f"EvalSettings.temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"EvalSettings.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"EvalSettings.top_k must be an int >= 0, got {self.top_k!r}")
        for name in ("max_new_tokens", "max_prompt_len", "batch_size"):
            positive_int(name, getattr(self, name))
        if self.limit is not None:
            positive_int("limit", self.limit)
        pass_k = tuple(self.pass_k)
        if not pass_k:
            raise ValueError("EvalSettings.pass_k must name at least one k")
        for k in pass_k:
            positive_int("pass_k entries", k)
        object.__setattr__(self, "pass_k", tuple(sorted(set(int(k) for k in pass_k))))
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"EvalSettings.seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.reward_workers, int) or self.reward_workers < 0:
            raise ValueError(f"EvalSettings.reward_workers must be an int >= 0, "
                             f"got {self.reward_workers!r}")
        if not self.reward_timeout_s > 0:
            raise ValueError(f"EvalSettings.reward_timeout_s must be > 0, "
                             f"got {self.reward_timeout_s!r}")

    def samples_for(self, suite: str) -> int:
        """Responses per question for `suite`."""
        if isinstance(self.samples, int):
            return self.samples
        if isinstance(self.samples, Mapping) and suite in self.samples:
            return int(self.samples[suite])
        return BENCHMARKS[suite].samples if suite in BENCHMARKS else 1

    def to_dict(self) -> dict:
        """JSON-ready copy of the settings."""
        out = dataclasses.asdict(self)
        out["pass_k"] = list(self.pass_k)
        return out


if __name__ != "__main__":
    # `python -m relift_jax.evaluate` executes this file as __main__ and then (through the
    # trampoline at the bottom) imports it as relift_jax.evaluate; gin refuses a second
    # registration, so only the package module registers.
    gin.external_configurable(EvalSettings, name="EvalSettings", module="relift_jax.evaluate")


# ---------------------------------------------------------------------------------------------
# Benchmarks -> questions
# ---------------------------------------------------------------------------------------------


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
    data.convert_gsm8k)."""
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
        messages = ({"role": "user", "content": question + data.GSM8K_INSTRUCTION},)
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


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Batching, seeds, resume
# ---------------------------------------------------------------------------------------------


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


def _read_records(path: str) -> tuple[list[dict], bool]:
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


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)  # never a half-written summary under the real name


def _check_fingerprint(output_dir: str, fingerprint: dict) -> None:
    """Refuse to mix responses of two different evaluations in one output_dir."""
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
    _write_json(path, fingerprint)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _stop_ids(tokenizer: Any) -> tuple[int, list[int]]:
    """(eos_id, extra stop ids): the tokenizer's EOS plus ChatML's turn ends when present."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; generation could never stop")
    vocab = tokenizer.get_vocab()
    extra = [vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab and vocab[t] != eos]
    return int(eos), extra


def evaluate(config: Any, params: Any, tokenizer: Any,
             suites: Mapping[str, Sequence[Example]] | Sequence[str], settings: EvalSettings,
             *, scorer: Any = None, output_dir: str | None = None, progress: bool = True,
             mesh: Any = None, generate_fn: Callable | None = None) -> EvalResult:
    """Sample, grade and aggregate.

    Args:
        config, params: the model (relift_jax.model).
        tokenizer: Hugging Face tokenizer with a chat template.
        suites: benchmark names (see BENCHMARKS) or {suite name: Examples}.
        settings: EvalSettings.
        scorer: a RewardScorer (kept open); None builds one from the settings and closes it.
        output_dir: where responses.jsonl, summary.json and summary.md go; an existing
            responses.jsonl of the same evaluation is resumed. None: nothing is written.
        progress: show a tqdm bar.
        mesh: passed to the sampler.
        generate_fn: replaces relift_jax.sampler.generate (same signature); for tests.

    Returns:
        EvalResult.
    """
    questions = resolve_suites(suites, settings.limit)  # bad names fail before any compilation
    if generate_fn is None:
        from relift_jax.sampler import generate as generate_fn
    eos_id, extra_stops = _stop_ids(tokenizer)
    stop_set = {eos_id, *extra_stops}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    questions, prompt_ids, plans, dropped = _encode_and_plan(tokenizer, questions, settings)

    records: list[dict] = []
    finished: set[tuple[str, int]] = set()
    out_file = None
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        fingerprint = _fingerprint(config, settings, questions, prompt_ids, plans)
        _check_fingerprint(output_dir, fingerprint)
        records, finished = _resume(os.path.join(output_dir, RESPONSES_FILE), questions, plans,
                                    settings)
        out_file = open(os.path.join(output_dir, RESPONSES_FILE), "a", encoding="utf-8")

    own_scorer = scorer is None
    if not own_scorer and getattr(scorer, "require_think_close",
                                  settings.require_think_close) != settings.require_think_close:
        raise ValueError(f"scorer.require_think_close={scorer.require_think_close} but "
                         f"EvalSettings.require_think_close={settings.require_think_close}")

    total_q = sum(len(qs) for qs in questions.values())
    resumed_q = sum(len(plans[s][b]) for s, b in finished)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_q, initial=resumed_q, desc="eval", unit="q")
    timing = {"sampling_s": 0.0, "generated_tokens": 0, "batches_run": 0,
              "batches_resumed": len(finished), "suites": {}}
    try:
        for suite, plan in plans.items():
            g = settings.samples_for(suite)
            s_time, s_tokens = 0.0, 0
            for b, positions in enumerate(plan):
                if (suite, b) in finished:
                    continue
                if bar is not None:
                    bar.set_postfix_str(suite)
                batch_qs = [questions[suite][i] for i in positions]
                start = time.perf_counter()
                out = generate_fn(config, params, [prompt_ids[suite][i] for i in positions],
                                  max_new_tokens=settings.max_new_tokens,
                                  temperature=settings.temperature, top_p=settings.top_p,
                                  top_k=settings.top_k, eos_id=eos_id, stop_ids=extra_stops,
                                  seed=batch_seed(settings.seed, suite, b), num_samples=g,
                                  pad_id=pad_id, mesh=mesh)
                elapsed = time.perf_counter() - start
                if scorer is None:
                    # Built on first use: a fully resumed run never pays for the worker start-up.
                    from relift_jax.reward import RewardScorer

                    scorer = RewardScorer(num_workers=settings.reward_workers,
                                          timeout_s=settings.reward_timeout_s,
                                          require_think_close=settings.require_think_close)
                new = _batch_records(tokenizer, suite, b, batch_qs, g, out, stop_set, scorer)
                s_time += elapsed
                s_tokens += sum(r["length"] for r in new)
                if out_file is not None:
                    # One write per batch, then flush: a crash leaves whole batches (plus at most
                    # one torn line, which resume ignores).
                    out_file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
                    out_file.flush()
                    os.fsync(out_file.fileno())
                records.extend(new)
                timing["batches_run"] += 1
                if bar is not None:
                    bar.update(len(positions))
                    tps = (timing["generated_tokens"] + s_tokens) / max(
                        timing["sampling_s"] + s_time, 1e-9)
                    bar.set_postfix_str(f"{suite} {tps:.0f} tok/s")
            timing["sampling_s"] += s_time
            timing["generated_tokens"] += s_tokens
            timing["suites"][suite] = {"sampling_s": s_time, "generated_tokens": s_tokens,
                                       "tokens_per_s": s_tokens / s_time if s_time else None}
    finally:
        if bar is not None:
            bar.close()
        if out_file is not None:
            out_file.close()
        if own_scorer and scorer is not None:
            scorer.close()

    # Sampling wall time includes compilation: the first batches of a new shape are slower.
    timing["tokens_per_s"] = (timing["generated_tokens"] / timing["sampling_s"]
                              if timing["sampling_s"] else None)
    timing["reward_timeouts"] = int(getattr(scorer, "num_timeouts", 0))
    order = {s: i for i, s in enumerate(plans)}
    records.sort(key=lambda r: (order[r["suite"]], r["question"], r["sample"]))
    summary, per_question = summarize(questions, records, settings, dropped)
    summary["timing"] = timing
    table = format_table(summary)
    if output_dir is not None:
        _write_json(os.path.join(output_dir, SUMMARY_JSON), summary)
        with open(os.path.join(output_dir, SUMMARY_MD), "w", encoding="utf-8") as f:
            f.write(table)
    return EvalResult(summary, table, records, per_question)


def _encode_and_plan(tokenizer: Any, questions: Mapping[str, list[Question]],
                     settings: EvalSettings) -> tuple[dict, dict, dict, dict]:
    """Encode every suite and plan its batches up front: the plan is what resume relies on.

    Returns:
        ({suite: kept questions}, {suite: prompt ids}, {suite: batches of positions},
        {suite: number of over-long prompts left out}).
    """
    kept, prompt_ids, plans, dropped = {}, {}, {}, {}
    for suite, qs in questions.items():
        enc = data.encode_prompts(tokenizer, [q.example for q in qs],
                                  max_prompt_len=settings.max_prompt_len,
                                  keep_system_prompt=settings.keep_system_prompt,
                                  think_prefix=settings.think_prefix, on_overflow="drop")
        if enc.num_dropped:
            print(f"warning: {suite}: {enc.num_dropped} of {len(qs)} prompts are longer than "
                  f"max_prompt_len={settings.max_prompt_len} tokens and are left out",
                  file=sys.stderr)
        kept[suite] = [qs[i] for i in enc.kept]
        dropped[suite] = enc.num_dropped
        prompt_ids[suite] = enc.ids
        plans[suite] = plan_batches([len(p) for p in enc.ids], settings.samples_for(suite),
                                    settings.batch_size)
    return kept, prompt_ids, plans, dropped


def _batch_records(tokenizer: Any, suite: str, batch: int, batch_qs: Sequence[Question], g: int,
                   out: Any, stop_set: set[int], scorer: Any) -> list[dict]:
    """Decode and grade one batch; rows of `out` are question by question, g samples each."""
    n_rows = len(batch_qs) * g
    if len(out.tokens) != n_rows:
        raise RuntimeError(f"generate returned {len(out.tokens)} rows, expected {n_rows} "
                           f"({len(batch_qs)} questions x {g} samples)")
    texts = []
    for toks, stopped in zip(out.tokens, out.stopped):
        toks = list(toks)
        if stopped and toks and toks[-1] in stop_set:
            toks = toks[:-1]  # the stop token is not part of the answer text
        # Keep special tokens: where "</think>" is a special token, skipping it would fail the
        # format gate of every response.
        texts.append(tokenizer.decode(toks, skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False))
    rows = [(q, s) for q in batch_qs for s in range(g)]
    scores = scorer.score(texts, [q.example.ground_truth for q, _ in rows],
                          [q.example.reward for q, _ in rows])
    return [{"suite": suite, "batch": batch, "question": q.qid, "sample": s,
             "data_source": q.example.data_source, "source_index": q.example.index,
             "response": text, "ground_truth": q.example.ground_truth, "reward": q.example.reward,
             "score": float(score), "length": int(length), "truncated": not bool(stopped)}
            for (q, s), text, score, length, stopped
            in zip(rows, texts, scores, out.lengths, out.stopped)]


def _fingerprint(config: Any, settings: EvalSettings, questions: Mapping[str, list[Question]],
                 prompt_ids: Mapping[str, list[list[int]]], plans: Mapping) -> dict:
    """What must match for a resume: settings, model architecture, prompts and batch plans. The
    weights themselves are not hashed (too slow); a new checkpoint needs a new output_dir."""
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
            "suites": suites}


def _resume(path: str, questions: Mapping[str, list[Question]], plans: Mapping,
            settings: EvalSettings) -> tuple[list[dict], set[tuple[str, int]]]:
    """Records of the batches an earlier run finished, and their (suite, batch) keys. A batch
    with missing rows (a torn write) is dropped and the file rewritten without it."""
    if not os.path.exists(path):
        return [], set()
    old, torn = _read_records(path)
    by_batch: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for r in old:
        by_batch[(r.get("suite"), r.get("batch"))].append(r)
    kept, finished = [], set()
    for (suite, b), rows in by_batch.items():
        if suite not in plans or not isinstance(b, int) or not 0 <= b < len(plans[suite]):
            continue
        g = settings.samples_for(suite)
        expect = {(questions[suite][i].qid, s) for i in plans[suite][b] for s in range(g)}
        if {(r["question"], r["sample"]) for r in rows} == expect and len(rows) == len(expect):
            kept.extend(rows)
            finished.add((suite, b))
    if torn or len(kept) != len(old):
        # Rewrite, or the next append would continue the torn line.
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        os.replace(tmp, path)
    return kept, finished


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(model folder, default output_dir) for --checkpoint.

    A Hugging Face folder (config.json + safetensors + tokenizer) is used as is, results going to
    `<folder>/eval`. A relift_jax run directory is read through `<run>/export/best` when it exists,
    else `<run>/export/final`; results go to `<run>/eval/best` (or `/final`), outside the export
    folder, which a later export replaces. `./eval_results` when that place is not writable.
    """
    if os.path.exists(os.path.join(path, "config.json")):
        model_dir, out = path, os.path.join(path, "eval")
        parent = path
    else:
        for name in ("best", "final"):
            candidate = os.path.join(path, "export", name)
            if os.path.exists(os.path.join(candidate, "config.json")):
                model_dir, out, parent = candidate, os.path.join(path, "eval", name), path
                break
        else:
            raise FileNotFoundError(
                f"--checkpoint={path}: neither a Hugging Face folder (no config.json) nor a run "
                f"directory with export/best/config.json or export/final/config.json")
    if not os.access(parent, os.W_OK):
        out = os.path.abspath("eval_results")
    return model_dir, out


def _split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """t5x-style: `--gin.EvalSettings.temperature=0.7` -> binding `EvalSettings.temperature=0.7`."""
    rest, bindings = [], []
    for arg in argv:
        if arg.startswith("--gin.") and not arg.startswith("--gin_file"):
            binding = arg[len("--gin."):]
            if "=" not in binding:
                raise ValueError(f"{arg}: a gin flag must look like --gin.NAME.PARAM=VALUE")
            bindings.append(binding)
        else:
            rest.append(arg)
    return rest, bindings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m relift_jax.evaluate",
                                description="Evaluate a checkpoint on maths/OOD benchmarks.")
    p.add_argument("--checkpoint", required=True,
                   help="Hugging Face folder, or a run directory (uses export/best, else "
                        "export/final)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                   help=f"comma-separated, from: {', '.join(BENCHMARKS)}")
    p.add_argument("--samples", type=int, default=None, help="responses per question, all suites")
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="first N questions per benchmark")
    p.add_argument("--output_dir", default=None,
                   help="default: <checkpoint>/eval (or <run>/eval/best|final)")
    p.add_argument("--gin_file", action="append", default=[], help="repeatable")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--batch_size", type=int, default=None, help="sampler rows per call")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; flags override gin bindings, which override EvalSettings' defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, bindings = _split_gin_flags(argv)
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    check_benchmark_names(names)  # before loading or compiling anything
    model_dir, default_out = resolve_checkpoint(args.checkpoint)
    output_dir = args.output_dir or default_out

    repo_gin = os.path.join(os.path.dirname(BENCHMARK_DIR), os.pardir, "gin")
    with gin.unlock_config():
        gin.clear_config()  # in-process reruns (tests) must not inherit earlier bindings
        for search in (os.getcwd(), os.path.abspath(repo_gin)):
            gin.add_config_file_search_path(search)
        gin.parse_config_files_and_bindings(args.gin_file, bindings, finalize_config=False)
    settings = _gin_settings()
    overrides = {k: getattr(args, k) for k in ("max_new_tokens", "limit", "batch_size",
                                               "temperature", "seed", "samples")
                 if getattr(args, k) is not None}
    settings = dataclasses.replace(settings, **overrides)

    import jax.numpy as jnp

    from relift_jax import hf

    config, params = hf.load_checkpoint(model_dir, dtype=getattr(jnp, args.dtype))
    tokenizer = hf.load_tokenizer(model_dir)
    print(f"evaluating {model_dir} on {', '.join(names)} -> {output_dir}", file=sys.stderr)
    result = evaluate(config, params, tokenizer, names, settings, output_dir=output_dir,
                      progress=not args.no_progress)
    t = result.summary["timing"]
    print(result.table_md)
    tps = "-" if t["tokens_per_s"] is None else f"{t['tokens_per_s']:.0f}"
    print(f"{t['generated_tokens']} tokens in {t['sampling_s']:.1f} s of sampling ({tps} tok/s); "
          f"{t['batches_resumed']} batches resumed; results in {output_dir}")
    return 0


def _gin_settings() -> EvalSettings:
    """EvalSettings with the gin bindings applied (the registered wrapper lives in the package
    module, which is this one unless run as __main__)."""
    configurable = gin.get_configurable("relift_jax.evaluate.EvalSettings")
    return configurable()


if __name__ == "__main__":
    from relift_jax.evaluate import main as _main  # the package module: see the gin note above

    sys.exit(_main())
