"""Tests for relift_jax.grading and relift_jax.reward: the official math rule, letter grading, the
worker pool, pass@k.

Expected values in the tables are written by hand from the meaning of each answer (is it the same
mathematical object as the ground truth?), not copied from the grader; the few rows where
math-verify's real behaviour differs from the mathematically right answer say so in a comment.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import time

import numpy as np
import pytest

from relift_jax.grading import (
    REWARD_FNS,
    choice_reward,
    extract_choice,
    get_reward_fn,
    math_reward,
    register_reward,
)
from relift_jax.reward import RewardScorer, pass_at_k

import reward_workers
from reward_workers import length_reward

# The custom rewards sent to workers live in a module that is cheap to import (see its docstring).
HERE = reward_workers.__name__

SHARED = pathlib.Path(os.environ.get(
    "RELIFT_SHARED", pathlib.Path(__file__).resolve().parent.parent.parent / "shared")) / "data"


def think(answer: str, thought: str = "Let me compute this step by step...") -> str:
    """A realistic response: reasoning, the closing tag, then the answer part."""
    return f"{thought}\n</think>\n{answer}"


# ---------------------------------------------------------------------------------------------
# The official math rule on the benchmarks' answer formats
# ---------------------------------------------------------------------------------------------

MATH_TABLE = [
    # (response, ground truth, expected)
    # LaTeX fractions (MATH-500 style ground truths)
    (think(r"The answer is \boxed{\frac{3}{4}}."), r"\frac{3}{4}", 1.0),
    (think(r"The answer is \boxed{0.75}."), r"\frac{3}{4}", 1.0),
    (think(r"The answer is \boxed{\dfrac{3}{4}}."), r"\frac{3}{4}", 1.0),
    (think(r"The answer is \boxed{\frac{4}{3}}."), r"\frac{3}{4}", 0.0),
    (think(r"So $x = \boxed{\frac{14}{3}}$."), r"\frac{14}{3}", 1.0),
    # radicals
    (think(r"Simplifying, the length is \boxed{\sqrt{12}}."), r"2\sqrt{3}", 1.0),
    (think(r"The length is \boxed{2\sqrt{3}}."), r"2\sqrt{3}", 1.0),
    (think(r"The length is \boxed{3\sqrt{2}}."), r"2\sqrt{3}", 0.0),
    (think(r"\boxed{11\sqrt{2}}"), r"11\sqrt2", 1.0),
    # intervals
    (think(r"The solution set is \boxed{(-\infty, 2]}."), r"(-\infty, 2]", 1.0),
    (think(r"The solution set is \boxed{(-\infty, 2)}."), r"(-\infty, 2]", 0.0),
    (think(r"\boxed{(-\infty, 2) \cup (3, \infty)}"), r"(-\infty, 2) \cup (3, \infty)", 1.0),
    (think(r"\boxed{(-\infty, 2) \cup (4, \infty)}"), r"(-\infty, 2) \cup (3, \infty)", 0.0),
    # ordered pairs / tuples (MATH-500 polar coordinates, OlympiadBench solution lists)
    (think(r"In polar form: \boxed{(3, \frac{\pi}{2})}"), r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (think(r"In polar form: \boxed{(\frac{\pi}{2}, 3)}"), r"\left( 3, \frac{\pi}{2} \right)", 0.0),
    (think(r"\boxed{(1,8,19), (2,7,13), (4,5,7)}"), r"$(1,8,19), (2,7,13), (4,5,7)$", 1.0),
    (think(r"\boxed{(1,8,19), (2,7,13)}"), r"$(1,8,19), (2,7,13), (4,5,7)$", 0.0),
    (think(r"The roots are \boxed{-2, 1}."), r"1,-2", 1.0),  # an unordered list of roots
    # percentages
    (think(r"The increase is \boxed{62.5\%}."), "62.5%", 1.0),
    (think(r"As a fraction of the whole, \boxed{0.625}."), "62.5%", 1.0),
    (think(r"\boxed{8\%}"), r"$8 \%$", 1.0),
    (think(r"\boxed{9\%}"), r"$8 \%$", 0.0),
    # math-verify reads "62.5%" as 0.625, so a bare 62.5 (the percentage without its sign) is
    # graded wrong. A lenient human grader would accept it; the official rule does not.
    (think(r"The increase is \boxed{62.5}."), "62.5%", 0.0),
    # degrees and units
    (think(r"The angle is \boxed{90^\circ}."), r"90^\circ", 1.0),
    (think(r"The angle is \boxed{90}."), r"90^\circ", 1.0),
    (think(r"The angle is \boxed{45^\circ}."), r"90^\circ", 0.0),
    (think(r"\boxed{336}"), r"336^\circ", 1.0),  # AIME 2025 ground truth with a degree sign
    (think(r"It costs \boxed{5.4} cents."), r"5.4 \text{ cents}", 1.0),
    (think(r"\boxed{\frac{270}{7}}"), r"\frac{270}7\text{ degrees}", 1.0),
    (think(r"\boxed{\frac{270}{9}}"), r"\frac{270}7\text{ degrees}", 0.0),
    # Minerva decimals
    (think(r"The speed is \boxed{7.5} km/s."), "7.5", 1.0),
    (think(r"\boxed{7.50}"), "7.5", 1.0),
    (think(r"\boxed{7.6}"), "7.5", 0.0),
    (think(r"\boxed{0.006}"), "0.006", 1.0),
    (think(r"\boxed{0.007}"), "0.006", 0.0),
    (think(r"\boxed{4.5e33}"), "4.5e33", 1.0),
    # Surprising but real: the official rule wraps the ground truth in $...$, so Minerva's
    # "4.5e33" is read as LaTeX 4.5 * e * 33 (Euler's e), and a correct 4.5 \times 10^{33} or
    # 0.0013 for "1.3e-3" scores 0. Only an answer typed in the same e-notation matches.
    (think(r"\boxed{4.5 \times 10^{33}}"), "4.5e33", 0.0),
    (think(r"\boxed{0.0013}"), "1.3e-3", 0.0),
    # GSM8K integers, with thousands separators on either side
    (think(r"The profit is \boxed{70,000} dollars."), "70000", 1.0),
    (think(r"The profit is \boxed{\$70,000}."), "70000", 1.0),
    (think(r"\boxed{1450000}"), "1,450,000", 1.0),
    (think("She makes 18 dollars every day."), "18", 1.0),  # no \boxed: the number is found
    (think("She makes 19 dollars every day."), "18", 0.0),
    # AIME integers (zero-padded ground truths) and AMC floats
    (think(r"\boxed{25}"), "025", 1.0),
    (think(r"\boxed{204}"), "204", 1.0),
    (think(r"\boxed{240}"), "204", 0.0),
    (think(r"\boxed{142}"), "142.0", 1.0),
    (think(r"\boxed{-4}"), "-4.0", 1.0),
    (think(r"\boxed{4}"), "-4.0", 0.0),
    # complex numbers, expressions, equations, text answers
    (think(r"\boxed{6-5i}"), "6 - 5i", 1.0),
    (think(r"\boxed{6+5i}"), "6 - 5i", 0.0),
    (think(r"\boxed{\frac{1}{2(n+1)}}"), r"$\frac{1}{2 n+2}$", 1.0),
    (think(r"\boxed{\frac{1}{2n+1}}"), r"$\frac{1}{2 n+2}$", 0.0),
    (think(r"\boxed{5}"), "x=5", 1.0),
    (think(r"\boxed{\text{Evelyn}}"), r"\text{Evelyn}", 1.0),
    # the answer is only read after the LAST </think>
    ("I think it is \\boxed{7}.\n</think>\nWait.\n</think>\nThe answer is \\boxed{5}.", "5", 1.0),
    ("I think it is \\boxed{5}.\n</think>\nWait.\n</think>\nThe answer is \\boxed{7}.", "5", 0.0),
    ("Inside the thought: \\boxed{5}\n</think>\nSee above.", "5", 0.0),
    ("Thinking.\n</think>\nThe answer is \\boxed{5}.\n</think>\nNo final answer.", "5", 0.0),
    # no answer at all
    (think("I could not finish."), "18", 0.0),
    ("", "18", 0.0),
]


@pytest.mark.parametrize("response,truth,expected", MATH_TABLE)
def test_math_reward_table(response: str, truth: str, expected: float) -> None:
    assert math_reward(response, truth) == expected


def test_math_reward_think_gate() -> None:
    truncated = "Let me compute... the answer is \\boxed{\\frac{3}{4}}"  # never closed its thought
    assert math_reward(truncated, r"\frac{3}{4}") == 0.0
    assert math_reward(truncated, r"\frac{3}{4}", require_think_close=False) == 1.0
    assert math_reward(truncated, r"\frac{2}{3}", require_think_close=False) == 0.0
    # With a </think> the gate changes nothing.
    closed = think(r"\boxed{\frac{3}{4}}")
    assert math_reward(closed, r"\frac{3}{4}", require_think_close=False) == 1.0


def test_math_reward_swallows_checker_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("parser exploded")

    monkeypatch.setattr(math_verify, "parse", broken)
    assert math_reward(think(r"\boxed{1}"), "1") == 0.0


def test_math_reward_works_off_the_main_thread() -> None:
    # math-verify's default SIGALRM timeout raises outside the main thread; ours must not use it.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        ok = pool.submit(math_reward, think(r"\boxed{\sqrt{12}}"), r"2\sqrt{3}").result()
        bad = pool.submit(math_reward, think(r"\boxed{3}"), r"2\sqrt{3}").result()
    assert (ok, bad) == (1.0, 0.0)


# ---------------------------------------------------------------------------------------------
# Multiple choice (ARC-c, GPQA)
# ---------------------------------------------------------------------------------------------

CHOICE_TABLE = [
    (think(r"The answer is \boxed{C}."), "C", 1.0),
    (think(r"\boxed{\text{C}}"), "C", 1.0),
    (think(r"\boxed{\textbf{(C)}}"), "C", 1.0),
    (think(r"\boxed{C) Planetary days will become shorter.}"), "C", 1.0),
    (think(r"\boxed{B}"), "C", 0.0),
    (think("The answer is (C)."), "C", 1.0),
    (think("The answer is (B)."), "C", 0.0),
    (think("ANSWER: A"), "A", 1.0),  # GPQA's requested format
    (think("**Answer:** D"), "D", 1.0),
    (think("Answer: d"), "D", 1.0),
    (think("(C)"), "C", 1.0),
    (think("C"), "C", 1.0),
    (think("C."), "c", 1.0),  # ground truth compared case-insensitively
    (think("C) Planetary days will become shorter."), "C", 1.0),
    # the last \boxed wins over earlier boxes and over the prose
    (think(r"First I thought \boxed{A}, but rechecking gives \boxed{B}."), "B", 1.0),
    (think(r"The answer is (A)... no: \boxed{D}"), "D", 1.0),
    # then the last explicit "answer is" phrase wins over other parenthesised options
    (think("Option (A) is wrong and (B) too, so the answer is (C). Not (D)."), "C", 1.0),
    # words are not options: "a planet" is not option A, and "A robot" is not either
    (think("The answer is a planet."), "A", 0.0),
    (think("A robot would say so."), "A", 0.0),
    (think("The answer is I think (B)."), "B", 1.0),  # "I" the pronoun, not option I
    (think("The answer is I."), "I", 1.0),
    (think("I am not sure."), "B", 0.0),
    # ARC-c rows whose options are numbered 1-4
    (think(r"\boxed{2}"), "2", 1.0),
    (think("The answer is (4)."), "4", 1.0),
    (think(r"\boxed{3}"), "2", 0.0),
    # the format gate
    ("So it is \\boxed{C}", "C", 0.0),
    ("</think>", "C", 0.0),
    ("Hmm.\n</think>\n\\boxed{C}\n</think>\nI give up.", "C", 0.0),  # only after the last tag
]


@pytest.mark.parametrize("response,truth,expected", CHOICE_TABLE)
def test_choice_reward_table(response: str, truth: str, expected: float) -> None:
    assert choice_reward(response, truth) == expected


def test_choice_reward_gate_off_and_bad_truth() -> None:
    assert choice_reward("So it is \\boxed{C}", "C", require_think_close=False) == 1.0
    with pytest.raises(ValueError, match="option label"):
        choice_reward(think(r"\boxed{C}"), "CD")
    assert extract_choice("nothing here") is None


# ---------------------------------------------------------------------------------------------
# Real benchmark data (skipped where ../shared is absent)
# ---------------------------------------------------------------------------------------------


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def test_gsm8k_human_solutions_grade_correct() -> None:
    path = _require(SHARED / "gsm8k" / "test.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:40]]
    answers = [row["answer"].split("####")[1].strip() for row in rows]
    for row, answer in zip(rows, answers):
        body = re.sub(r"<<[^>]*>>", "", row["answer"].split("####")[0]).strip()
        # The human solution as the thought, its final number as a plain-text answer.
        assert math_reward(think(f"So the final answer is {answer}.", body), answer) == 1.0
    # Each solution graded against the next question's different answer scores 0.
    for row, answer, other in zip(rows, answers, answers[1:] + answers[:1]):
        if float(answer.replace(",", "")) != float(other.replace(",", "")):
            assert math_reward(think(f"\\boxed{{{answer}}}"), other) == 0.0


def test_gsm8k_comma_answers() -> None:
    path = _require(SHARED / "gsm8k" / "test.jsonl")
    answers = [json.loads(l)["answer"].split("####")[1].strip() for l in path.open()]
    with_commas = [a for a in answers if "," in a][:10]
    assert with_commas, "GSM8K test has answers like 1,450,000"
    for a in with_commas:
        assert math_reward(think(f"\\boxed{{{a.replace(',', '')}}}"), a) == 1.0
        assert math_reward(think(f"\\boxed{{{a}}}"), a.replace(",", "")) == 1.0


def test_math_benchmark_ground_truths_grade_themselves() -> None:
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(_require(SHARED / "benchmarks" / "math_eval.parquet"))
    truths = df["reward_model"].map(lambda r: r["ground_truth"])
    for source, count in [("math", 40), ("aime", 30), ("aime25", 30), ("amc", 20)]:
        sample = truths[df["data_source"] == source].drop_duplicates().head(count)
        for t in sample:
            assert math_reward(think(f"The answer is \\boxed{{{t}}}."), t) == 1.0, (source, t)
    # AIME answers are distinct integers: each against another question's answer is wrong.
    aime = sorted({int(t) for t in truths[df["data_source"] == "aime"]})
    for a, b in zip(aime, aime[1:]):
        assert math_reward(think(f"\\boxed{{{a}}}"), f"{b:03d}") == 0.0


@pytest.mark.parametrize("name", ["arc_c", "gpqa_diamond"])
def test_choice_benchmarks(name: str) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(_require(SHARED / "benchmarks" / f"{name}.parquet"))
    truths = df["reward_model"].map(lambda r: r["ground_truth"]).tolist()
    assert set(truths) <= set("ABCDEFGHIJ123456789")
    for t in sorted(set(truths)):
        other = {"A": "B", "1": "2"}.get(t, "A" if t.isalpha() else "1")
        assert choice_reward(think(f"The answer is \\boxed{{{t}}}."), t) == 1.0
        assert choice_reward(think(f"ANSWER: {t}"), t) == 1.0
        assert choice_reward(think(f"The answer is \\boxed{{{other}}}."), t) == 0.0


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert get_reward_fn("math") is math_reward
    assert get_reward_fn("choice") is choice_reward
    with pytest.raises(KeyError, match=r"known: \['choice', 'math'\]"):
        get_reward_fn("maths")
    register_reward("length", length_reward)
    try:
        assert get_reward_fn("length") is length_reward
    finally:
        del REWARD_FNS["length"]
    with pytest.raises(TypeError):
        register_reward("bad", "not a function")  # type: ignore[arg-type]
    assert get_reward_fn(f"{HERE}:length_reward") is length_reward
    assert get_reward_fn("relift_jax.grading:math_reward") is math_reward
    with pytest.raises(KeyError, match="does not resolve"):
        get_reward_fn("relift_jax.grading:no_such_fn")
    with pytest.raises(KeyError, match="does not resolve"):
        get_reward_fn("no_such_module_xyz:fn")


# ---------------------------------------------------------------------------------------------
# RewardScorer
# ---------------------------------------------------------------------------------------------

TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer("math", num_workers=2, timeout_s=TIMEOUT_S) as s:
        yield s


MIXED = [
    (think(r"\boxed{\frac{3}{4}}"), r"\frac{3}{4}", "math", 1.0),
    (think(r"\boxed{C}"), "C", "choice", 1.0),
    (think(r"\boxed{5}"), "6", "math", 0.0),
    (think("ANSWER: B"), "D", "choice", 0.0),
    ("no closing tag \\boxed{7}", "7", "math", 0.0),
    (think(r"\boxed{\sqrt{12}}"), r"2\sqrt{3}", "math", 1.0),
    (think(r"\boxed{(-\infty, 2]}"), r"(-\infty, 2]", "math", 1.0),
    (think("The answer is (2)."), "2", "choice", 1.0),
]


def test_scorer_matches_in_process_and_keeps_order(scorer: RewardScorer) -> None:
    responses, truths, names, expected = map(list, zip(*MIXED))
    got = scorer.score(responses, truths, names)
    assert got.dtype == np.float32 and got.shape == (len(MIXED),)
    np.testing.assert_array_equal(got, np.asarray(expected, np.float32))
    reference = [get_reward_fn(n)(r, t) for r, t, n in zip(responses, truths, names)]
    np.testing.assert_array_equal(got, np.asarray(reference, np.float32))
    # Reversed input gives reversed output: results are matched to items, not to arrival order.
    rev = scorer.score(responses[::-1], truths[::-1], names[::-1])
    np.testing.assert_array_equal(rev, got[::-1])
    with RewardScorer(num_workers=0) as inproc:
        np.testing.assert_array_equal(inproc.score(responses, truths, names), got)


def test_scorer_default_reward_and_empty_batch(scorer: RewardScorer) -> None:
    got = scorer.score([think(r"\boxed{1,000}"), think(r"\boxed{999}")], ["1000", "1000"])
    np.testing.assert_array_equal(got, [1.0, 0.0])
    assert scorer.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 responses but 1"):
        scorer.score(["a", "b"], ["1"])
    with pytest.raises(KeyError, match="unknown reward"):
        scorer.score(["a"], ["1"], ["nope"])


def test_scorer_keeps_workers_alive(scorer: RewardScorer) -> None:
    scorer.score([think(r"\boxed{1}")] * 4, ["1"] * 4)
    pids = sorted(w.process.pid for w in scorer._workers)
    scorer.score([think(r"\boxed{2}")] * 4, ["2"] * 4)
    assert sorted(w.process.pid for w in scorer._workers) == pids


def test_scorer_times_out_hanging_item(scorer: RewardScorer) -> None:
    hang = f"{HERE}:hang_on_marker"
    items = [
        (think(r"\boxed{3}"), "3", "math", 1.0),
        (think("HANG"), "3", hang, 0.0),
        (think(r"\boxed{C}"), "C", "choice", 1.0),
        (think(r"\boxed{4}"), "3", hang, 0.0),  # the helper grades normally without the marker
        (think(r"\boxed{\frac{1}{2}}"), "0.5", hang, 1.0),
        (think(r"\boxed{A}"), "C", "choice", 0.0),
    ]
    responses, truths, names, expected = map(list, zip(*items))
    before = scorer.num_timeouts
    start = time.monotonic()
    got = scorer.score(responses, truths, names)
    elapsed = time.monotonic() - start
    np.testing.assert_array_equal(got, expected)
    assert scorer.num_timeouts - before == 1
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 6.0, elapsed
    # The killed worker was replaced; the next batch is scored normally.
    np.testing.assert_array_equal(scorer.score([think(r"\boxed{8}")] * 3, ["8"] * 3), [1, 1, 1])
    assert len(scorer._workers) == 2 and all(w.process.is_alive() for w in scorer._workers)


def test_scorer_survives_worker_crash(scorer: RewardScorer) -> None:
    crash = f"{HERE}:exit_on_marker"
    before = scorer.num_crashes
    got = scorer.score(
        [think(r"\boxed{1}"), think("CRASH"), think(r"\boxed{2}")], ["1", "1", "2"],
        ["math", crash, crash],
    )
    np.testing.assert_array_equal(got, [1.0, 0.0, 1.0])
    assert scorer.num_crashes - before == 1


def test_scorer_reports_reward_errors(scorer: RewardScorer) -> None:
    boom = f"{HERE}:raise_on_marker"
    with pytest.raises(RuntimeError, match="boom from a custom reward"):
        scorer.score([think("BOOM"), "fine"], ["1", "1"], [boom, boom])
    # Still usable, and a custom non-binary reward passes through unchanged.
    got = scorer.score(["fine", "x"], ["1", "1234"], [boom, f"{HERE}:length_reward"])
    np.testing.assert_array_equal(got, [1.0, 0.25])


def test_scorer_rejects_unpicklable_reward(scorer: RewardScorer) -> None:
    register_reward("lambda_reward", lambda r, t, **kw: 1.0)
    try:
        with pytest.raises(TypeError, match="module-level function"):
            scorer.score(["a"], ["1"], ["lambda_reward"])
    finally:
        del REWARD_FNS["lambda_reward"]


def test_scorer_close_stops_workers() -> None:
    s = RewardScorer(num_workers=1, timeout_s=5.0)
    procs = [w.process for w in s._workers]
    np.testing.assert_array_equal(s.score([think(r"\boxed{2}")], ["2"]), [1.0])
    s.close()
    s.close()  # idempotent
    assert all(not p.is_alive() for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        s.score(["a"], ["1"])


def test_scorer_argument_checks() -> None:
    with pytest.raises(ValueError, match="start_method"):
        RewardScorer(num_workers=0, start_method="fork")
    with pytest.raises(ValueError, match="timeout_s"):
        RewardScorer(num_workers=0, timeout_s=0)
    with pytest.raises(KeyError):
        RewardScorer("nope", num_workers=0)


# ---------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------


def _closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize(
    "n,c,k",
    [(10, 3, 1), (10, 3, 5), (10, 0, 4), (10, 10, 3), (8, 7, 2), (32, 5, 8), (200, 13, 100)],
)
def test_pass_at_k_closed_form(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(_closed_form(n, c, k), rel=1e-12, abs=1e-12)


def test_pass_at_k_hand_values() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # only 4 wrong: every 5-subset has a correct one
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs contain the correct one


@pytest.mark.parametrize(
    "n,c,k", [(5, 1, 6), (5, 6, 1), (-1, 0, 1), (5, -1, 1), (5, 1, -1), (5, 1, 0)]
)
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@pytest.mark.parametrize("n", [7, 2])  # uneven shares; fewer items than processes
def test_process_share_scorer_splits_and_gathers(monkeypatch, n):
    """Multi-host scoring: process i grades its contiguous share; the gathered rewards equal the
    single-process scorer's, in order. The gather is faked here (3 'processes' run one by one);
    the real cross-process path runs in tests/test_multihost.py."""
    import jax
    from jax.experimental import multihost_utils

    from relift_jax.reward import ProcessShareScorer
    responses = [f"The answer is \\boxed{{{i % 3}}}" for i in range(n)]
    truths = [str(i % 2) for i in range(n)]
    with RewardScorer(num_workers=0) as inner:
        want = inner.score(responses, truths)
        assert ProcessShareScorer(inner).score(responses, truths).tolist() == want.tolist()
        monkeypatch.setattr(jax, "process_count", lambda: 3)
        shares, graded = [], []
        monkeypatch.setattr(multihost_utils, "process_allgather",
                            lambda x: (shares.append(x.copy()), np.stack([x] * 3))[1])
        real_score = inner.score
        monkeypatch.setattr(inner, "score",
                            lambda r, t, names=None: (graded.extend(r), real_score(r, t, names))[1])
        for i in range(3):
            monkeypatch.setattr(jax, "process_index", lambda i=i: i)
            ProcessShareScorer(inner).score(responses, truths)
        assert sorted(graded) == sorted(responses) and len(graded) == n  # each graded once
        np.testing.assert_array_equal(np.concatenate(shares)[:n], want)
