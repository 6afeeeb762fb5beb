"""A synthetic arithmetic task that makes ReLIFT's claim visible on a laptop CPU in minutes.

The paper's claim: RL sharpens what a model can partly do, but a question the model NEVER solves
gives RL no signal, so only SFT on demonstrations can teach it. The levels are built so that a tiny
base model, trained by SFT on the addition levels only (`BASE_LEVELS`), lands in every bucket:

    level 1  a+b, operands 0-9                  easy      (base solves it)
    level 2  a+b, larger operand has 2 digits   medium    (base partly solves it; RL improves it)
    level 3  a+b, larger operand has 3 digits   hard      (base partly solves it; RL improves it)
    level 4  a-b, a has 2 digits, 0 <= b <= a   hardest   (a rule the base never saw)
    level 5  a-b, a has 3 digits, 0 <= b <= a   hardest   (a rule the base never saw)
    level 6  a#b = a+b+1, 2 digits              hardest   (a rule the base never saw)
    level 7  a#b = a+b+1, 3 digits              hardest   (a rule the base never saw)

The main job (gin/toy/relift.gin) uses levels 1-3 and 6-7. `a#b` is the addition walk started with a
carry of 1: a new rule inside familiar lengths and steps, which SFT on a few hundred demonstrations
teaches (an SFT-only run of 48 x 16 demonstrations took level 6 from 0% to 75% and level 7 to 46%).
Subtraction (4-5) needs a borrow procedure the base has no part of; at the toy budget SFT did not
teach it (0-4% after the same run), so it is kept as a harder family but not used by default.

Subtraction is a new RULE inside lengths the base was trained on, not a longer input: in a
calibration run a small decoder needed far more than a ReLIFT budget to learn positions it had never
seen, while a new rule over familiar positions is what SFT on a few hundred demonstrations can teach.

Demonstrations walk the columns right to left, one line per column (k lines for a k-digit level),
padding the shorter operand with zeros so every line has the same shape and every line is true
arithmetic that a checker can re-execute:

    47+385=?   ->  <think>\\n7+5+0=12\\n4+8+1=13\\n0+3+1=4\\n</think>\\n\\boxed{432}
    47#385=?   ->  <think>\\n7+5+1=13\\n4+8+1=13\\n0+3+1=4\\n</think>\\n\\boxed{433}
    385-47=?   ->  <think>\\n15-7-0=8\\n8-4-1=3\\n3-0-0=3\\n</think>\\n\\boxed{338}

An addition line is `x+y+carry_in=s`; its carry out is the tens digit of s (so the last line's s is
written whole at the front of the answer). A subtraction line is `m-y-borrow_in=d` where m is the
minuend digit x, or 10+x written "1x" when the column borrows (x < y + borrow_in, the school
method); the borrow out is 1 exactly when m >= 10. The answer drops leading zeros (100-99 -> 1).

Train / test split: every question belongs to exactly one split, decided by a stable integer hash
of its operands (test iff hash % 5 == 0, about 20%); addition hashes the unordered pair, so 47+385
and 385+47 are always in the same split. Level 1 has only 100 questions (about 20 held out), so
held-out sets there are small; `num_questions` gives the exact counts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping

import numpy as np

THINK_PREFIX = "<think>\n"


@dataclasses.dataclass(frozen=True)
class ToyQuestion:
    """One question of the toy task.

    Attributes:
      level: difficulty level, 1..NUM_LEVELS.
      question: the user message, e.g. "47+385=?".
      answer: the ground truth as a plain integer string, e.g. "432".
      demonstration: the full assistant text, "<think>\\n" + steps + "\\n</think>\\n\\boxed{answer}".
    """

    level: int
    question: str
    answer: str
    demonstration: str


@dataclasses.dataclass(frozen=True)
class _LevelSpec:
    op: str  # "+", "-" or "#" (a#b = a+b+1)
    digits: int  # digits of the larger operand (addition) or of the minuend (subtraction)


_SPECS: dict[int, _LevelSpec] = {
    1: _LevelSpec("+", 1),
    2: _LevelSpec("+", 2),
    3: _LevelSpec("+", 3),
    4: _LevelSpec("-", 2),
    5: _LevelSpec("-", 3),
    6: _LevelSpec("#", 2),
    7: _LevelSpec("#", 3),
}

LEVELS: dict[int, str] = {
    1: "addition a+b with both operands 0-9 (easy; base level)",
    2: "addition a+b whose larger operand has 2 digits (base level)",
    3: "addition a+b whose larger operand has 3 digits (base level)",
    4: "subtraction a-b with a of 2 digits and 0 <= b <= a, borrowing (never in the base data)",
    5: "subtraction a-b with a of 3 digits and 0 <= b <= a, borrowing (never in the base data)",
    6: "a#b = a+b+1, larger operand of 2 digits: the addition walk with carry-in 1 (never in the "
       "base data)",
    7: "a#b = a+b+1, larger operand of 3 digits (never in the base data)",
}
NUM_LEVELS = len(LEVELS)
BASE_LEVELS: tuple[int, ...] = (1, 2, 3)
SPLITS = ("train", "test")

# Mixed into the split hash so that the partition cannot coincide with anything else hashed the
# same way; changing it would silently reshuffle train and test, so it is a fixed constant.
_OP_CODE = {"+": 1, "-": 2, "#": 3}
_TEST_MODULUS = 5


def _check_level(level: int) -> _LevelSpec:
    if level not in _SPECS:
        raise ValueError(f"level {level!r} is not one of the toy levels {sorted(_SPECS)}")
    return _SPECS[level]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")


def _splitmix64(key_N: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a stable, well-mixed 64-bit hash (unlike Python's hash())."""
    z = key_N.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _is_test(op: str, a_N: np.ndarray, b_N: np.ndarray) -> np.ndarray:
    """True where the question a<op>b belongs to the held-out split."""
    if op in "+#":  # commutative: keep a+b and b+a on the same side of the split
        a_N, b_N = np.minimum(a_N, b_N), np.maximum(a_N, b_N)
    key_N = (np.uint64(_OP_CODE[op]) << np.uint64(40)) | (
        a_N.astype(np.uint64) << np.uint64(20)) | b_N.astype(np.uint64)
    return _splitmix64(key_N) % np.uint64(_TEST_MODULUS) == 0


@functools.lru_cache(maxsize=None)
def _question_space(level: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All operand pairs (a_N, b_N) of one level and split, in a fixed (a, b) order."""
    spec = _SPECS[level]
    hi = 10**spec.digits
    lo = 10 ** (spec.digits - 1) if spec.digits > 1 else 0
    a_N, b_N = (g.ravel() for g in np.meshgrid(np.arange(hi), np.arange(hi), indexing="ij"))
    if spec.op in "+#":
        keep_N = np.maximum(a_N, b_N) >= lo
    else:
        keep_N = (a_N >= lo) & (b_N <= a_N)
    a_N, b_N = a_N[keep_N], b_N[keep_N]
    in_split_N = _is_test(spec.op, a_N, b_N) == (split == "test")
    # int32 halves the cache of the 3-digit levels (about a million pairs each).
    return a_N[in_split_N].astype(np.int32), b_N[in_split_N].astype(np.int32)


def num_questions(level: int, split: str) -> int:
    """Number of distinct questions of a level in a split (the most `generate` returns unique)."""
    _check_level(level)
    _check_split(split)
    return len(_question_space(level, split)[0])


def _addition_steps(a: int, b: int, digits: int, carry: int = 0) -> list[str]:
    xs, ys = str(a).zfill(digits), str(b).zfill(digits)
    lines = []
    for x, y in zip(map(int, reversed(xs)), map(int, reversed(ys))):
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return lines


def _subtraction_steps(a: int, b: int, digits: int) -> list[str]:
    xs, ys = str(a).zfill(digits), str(b).zfill(digits)
    lines, borrow = [], 0
    for x, y in zip(map(int, reversed(xs)), map(int, reversed(ys))):
        m = x + 10 if x < y + borrow else x
        lines.append(f"{m}-{y}-{borrow}={m - y - borrow}")
        borrow = int(m >= 10)
    if borrow:
        raise AssertionError(f"{a}-{b}: final borrow; the task only asks a-b with a >= b")
    return lines


def make_question(level: int, a: int, b: int) -> ToyQuestion:
    """Builds the question a<op>b of a level, with its answer and demonstration.

    Raises:
      ValueError: if (a, b) is not a question of that level.
    """
    spec = _check_level(level)
    hi = 10**spec.digits
    lo = 10 ** (spec.digits - 1) if spec.digits > 1 else 0
    if spec.op in "+#":
        valid = 0 <= a < hi and 0 <= b < hi and max(a, b) >= lo
        carry_in = int(spec.op == "#")  # the whole new rule: the walk starts with a carry of 1
        lines, answer = _addition_steps(a, b, spec.digits, carry_in), a + b + carry_in
    else:
        valid = lo <= a < hi and 0 <= b <= a
        lines, answer = (_subtraction_steps(a, b, spec.digits) if valid else []), a - b
    if not valid:
        raise ValueError(f"{a}{spec.op}{b} is not a level-{level} question ({LEVELS[level]})")
    demonstration = THINK_PREFIX + "\n".join(lines) + f"\n</think>\n\\boxed{{{answer}}}"
    return ToyQuestion(level, f"{a}{spec.op}{b}=?", str(answer), demonstration)


def generate(level: int, n: int, *, seed: int, split: str) -> list[ToyQuestion]:
    """Draws n questions of one level, deterministically from (seed, level, split).

    "test" returns unique questions, and fewer than n when the split holds fewer
    (`num_questions(level, "test")`; level 1 has about 20). "train" returns unique questions
    while n allows and then repeats the split in fresh random orders, so a long training
    stream of level 1 cycles through its ~80 questions.

    Raises:
      ValueError: for an unknown level or split, a negative n or a negative seed.
    """
    _check_level(level)
    _check_split(split)
    if n < 0:
        raise ValueError(f"number of questions n={n} must be >= 0")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0 (it seeds numpy's SeedSequence)")
    a_Q, b_Q = _question_space(level, split)
    count = len(a_Q)
    rng = np.random.default_rng([seed, level, SPLITS.index(split)])
    if n <= count or split == "test":
        index_N = rng.choice(count, size=min(n, count), replace=False)
    else:
        index_N = np.concatenate([rng.permutation(count) for _ in range(-(-n // count))])[:n]
    return [make_question(level, int(a_Q[i]), int(b_Q[i])) for i in index_N]


_QUESTION_RE = re.compile(r"(\d+)([+#-])(\d+)=\?")
_ADD_LINE_RE = re.compile(r"(\d)\+(\d)\+([01])=(\d{1,2})")
_SUB_LINE_RE = re.compile(r"(1?\d)-(\d)-([01])=(\d)")


def verify_demonstration(q: ToyQuestion) -> bool:
    """Re-executes a demonstration's step lines from the question text alone.

    Checks the framing ("<think>\\n" ... "\\n</think>\\n\\boxed{...}"), each line's arithmetic, that
    its digits are the question's digits of that column, that carries/borrows chain from line to
    line, and that the boxed answer is the one the lines produce. Useful for hand-written or
    externally generated demonstrations; `make_question` output always passes.
    """
    m = _QUESTION_RE.fullmatch(q.question)
    body = re.fullmatch(r"<think>\n(.*)\n</think>\n\\boxed\{(\d+)\}", q.demonstration, re.DOTALL)
    if m is None or body is None:
        return False
    a, op, b = m.group(1), m.group(2), m.group(3)
    lines = body.group(1).split("\n")
    width = max(len(a), len(b))
    if len(lines) != width:
        return False
    xs, ys = a.zfill(width)[::-1], b.zfill(width)[::-1]
    carry, digits = int(op == "#"), []
    for i, line in enumerate(lines):
        step = (_SUB_LINE_RE if op == "-" else _ADD_LINE_RE).fullmatch(line)
        if step is None:
            return False
        x, y, c, r = (int(g) for g in step.groups())
        if c != carry or y != int(ys[i]) or x % 10 != int(xs[i]):
            return False
        if op in "+#":
            if x + y + c != r:
                return False
            carry = r // 10
            digits.append(str(r) if i == width - 1 else str(r % 10))
        else:
            borrow = int(x >= 10)
            # The "1x" form is only right when the column must borrow, and then it must be used.
            if borrow != int(x % 10 < y + c) or x - y - c != r:
                return False
            carry = borrow
            digits.append(str(r))
    if op == "-" and carry:
        return False
    produced = "".join(reversed(digits)).lstrip("0") or "0"
    return produced == body.group(2) == q.answer


def to_row(q: ToyQuestion, index: int, *, with_demonstration: bool = True) -> dict:
    """One dataset row in the ReLIFT / LUFFY schema that relift_jax.data reads."""
    row: dict = {
        "prompt": [{"role": "user", "content": q.question}],
        "reward_model": {"ground_truth": q.answer, "style": "rule"},
    }
    if with_demonstration:
        row["target"] = [{"role": "assistant", "content": q.demonstration}]
    row["data_source"] = f"toy_level{q.level}"
    row["extra_info"] = {"level": q.level, "index": index}
    return row


def write_dataset(
    path: str | os.PathLike[str],
    levels: Iterable[int],
    n_per_level: int | Mapping[int, int],
    *,
    seed: int,
    split: str,
    with_demonstrations: bool = True,
) -> int:
    """Writes questions of several levels to a jsonl file in the ReLIFT schema.

    Rows are interleaved round-robin across levels (level order as given), so reading the file
    front to back already mixes difficulties; `extra_info.index` is the question's position
    within its level's list from `generate`.

    Args:
      path: output .jsonl file; parent folders are created.
      levels: which levels to include.
      n_per_level: questions per level, one number or {level: number}.
      seed, split: as for `generate`.
      with_demonstrations: write the "target" column (omit it for RL-only or evaluation data).

    Returns:
      The number of rows written.
    """
    levels = list(levels)
    if isinstance(n_per_level, Mapping):
        missing = [lv for lv in levels if lv not in n_per_level]
        if missing:
            raise ValueError(f"n_per_level has no count for levels {missing}")
        counts = {lv: n_per_level[lv] for lv in levels}
    else:
        counts = {lv: n_per_level for lv in levels}
    per_level = {lv: generate(lv, counts[lv], seed=seed, split=split) for lv in levels}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("w") as f:
        for i in range(max((len(qs) for qs in per_level.values()), default=0)):
            for lv in levels:
                if i < len(per_level[lv]):
                    row = to_row(per_level[lv][i], i, with_demonstration=with_demonstrations)
                    f.write(json.dumps(row) + "\n")
                    written += 1
    return written
