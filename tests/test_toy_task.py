"""Tests of the toy arithmetic task (relift_jax.toy.task) and its tokenizer (relift_jax.toy.tokenizer).

Every answer is checked against Python's own arithmetic on operands parsed back from the question
text, and every demonstration is re-executed by the small checker below, written without the task
module's code.
"""

from __future__ import annotations

import collections
import json
import re

import math_verify
import pytest
import transformers

from relift_jax.toy import task, tokenizer as toy_tok

SEEDS = range(12)
N_PER_SEED = 60


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def parse_question(text: str) -> tuple[int, str, int]:
    """'47+385=?' -> (47, '+', 385)."""
    m = re.fullmatch(r"(\d+)([+#-])(\d+)=\?", text)
    assert m is not None, f"unexpected question text {text!r}"
    a, op, b = m.groups()
    # No leading zeros in operands: "07+3" would be a different string for the same question.
    assert str(int(a)) == a and str(int(b)) == b, text
    return int(a), op, int(b)


def truth_of(a: int, op: str, b: int) -> int:
    """The answer by Python's own arithmetic (a#b is defined as a+b+1)."""
    return {"+": a + b, "-": a - b, "#": a + b + 1}[op]


def level_rule(level: int, a: int, op: str, b: int) -> None:
    """Asserts that a question fits the level's documented operand ranges."""
    digits = {1: 1, 2: 2, 3: 3, 4: 2, 5: 3, 6: 2, 7: 3}[level]
    want_op = "+" if level <= 3 else "-" if level <= 5 else "#"
    assert op == want_op, (level, a, op, b)
    if op in "+#":
        assert 0 <= a < 10**digits and 0 <= b < 10**digits
        assert len(str(max(a, b))) == digits
    else:
        assert len(str(a)) == digits and 0 <= b <= a


def replay_steps(a: int, op: str, b: int, demonstration: str) -> str:
    """Re-executes a demonstration's column lines; returns the answer the lines produce.

    Asserts the framing, each line's arithmetic (evaluated with Python on the line's own numbers),
    that each line uses the digits of its column (right to left), that carries/borrows in equal the
    previous line's carry/borrow out, and that a borrow is taken exactly when needed.
    """
    prefix, suffix = "<think>\n", "\n</think>\n\\boxed{"
    assert demonstration.startswith(prefix) and demonstration.endswith("}")
    body, boxed = demonstration[len(prefix):-1].split(suffix)
    lines = body.split("\n")
    width = len(str(max(a, b)))
    assert len(lines) == width, (demonstration, width)
    written, carry = [], int(op == "#")  # a#b = a+b+1: the addition walk with carry-in 1
    for col, line in enumerate(lines):
        lhs, rhs = line.split("=")
        x_s, y_s, c_s = lhs.split("-" if op == "-" else "+")
        x, y, c, r = int(x_s), int(y_s), int(c_s), int(rhs)
        digit_a, digit_b = (a // 10**col) % 10, (b // 10**col) % 10
        assert c == carry, f"{line!r}: carry/borrow in {c}, previous out {carry}"
        assert y == digit_b, f"{line!r}: second operand digit {y} != {digit_b}"
        if op in "+#":
            assert x == digit_a and x + y + c == r, line
            assert str(r) == rhs, line  # no padding like "=05"
            carry = r // 10
            written.append(rhs if col == width - 1 else rhs[-1])
        else:
            borrow = 1 if digit_a - digit_b - c < 0 else 0
            assert x == digit_a + 10 * borrow, f"{line!r}: minuend {x} for digit {digit_a}"
            assert x - y - c == r and 0 <= r <= 9, line
            carry = borrow
            written.append(rhs)
    if op == "-":
        assert carry == 0, "subtraction a-b with a >= b never borrows past the last column"
    produced = str(int("".join(reversed(written))))
    assert boxed == produced, (boxed, produced)
    return produced


def all_questions(level: int) -> set[str]:
    """Every question of a level, enumerated by plain loops (small levels only)."""
    digits = {1: 1, 2: 2, 4: 2}[level]
    lo = 10 ** (digits - 1) if digits > 1 else 0
    out = set()
    for a in range(10**digits):
        for b in range(10**digits):
            if level <= 3 and max(a, b) >= lo:
                out.add(f"{a}+{b}=?")
            if level >= 4 and a >= lo and b <= a:
                out.add(f"{a}-{b}=?")
    return out


# ---------------------------------------------------------------------------------------------
# Questions, answers and demonstrations
# ---------------------------------------------------------------------------------------------


def test_level_constants():
    assert task.NUM_LEVELS == len(task.LEVELS) == 7
    assert sorted(task.LEVELS) == list(range(1, 8))
    assert set(task.BASE_LEVELS) == {1, 2, 3}  # the addition levels; subtraction is held back


@pytest.mark.parametrize("level", range(1, 8))
def test_answers_and_demonstrations_are_correct(level):
    for split in task.SPLITS:
        for seed in SEEDS:
            for q in task.generate(level, N_PER_SEED, seed=seed, split=split):
                a, op, b = parse_question(q.question)
                level_rule(level, a, op, b)
                assert q.level == level
                truth = truth_of(a, op, b)
                assert q.answer == str(truth)
                assert q.demonstration.endswith("\\boxed{" + str(truth) + "}")
                assert replay_steps(a, op, b, q.demonstration) == str(truth)
                assert task.verify_demonstration(q)


@pytest.mark.parametrize("a,op,b,answer,lines", [
    (47, "+", 385, "432", ["7+5+0=12", "4+8+1=13", "0+3+1=4"]),
    (985, "+", 47, "1032", ["5+7+0=12", "8+4+1=13", "9+0+1=10"]),
    (9, "+", 9, "18", ["9+9+0=18"]),
    (385, "-", 47, "338", ["15-7-0=8", "8-4-1=3", "3-0-0=3"]),
    (100, "-", 99, "1", ["10-9-0=1", "10-9-1=0", "1-0-1=0"]),
    (55, "-", 55, "0", ["5-5-0=0", "5-5-0=0"]),
    (47, "#", 385, "433", ["7+5+1=13", "4+8+1=13", "0+3+1=4"]),
    (99, "#", 0, "100", ["9+0+1=10", "9+0+1=10"]),
])
def test_worked_examples(a, op, b, answer, lines):
    """Hand-computed school-method columns for a few edge cases (full carry, leading zeros)."""
    level = {("+", 1): 1, ("+", 2): 2, ("+", 3): 3, ("-", 2): 4, ("-", 3): 5, ("#", 2): 6,
             ("#", 3): 7}[
        (op, len(str(max(a, b))))]
    q = task.make_question(level, a, b)
    assert q.question == f"{a}{op}{b}=?"
    assert q.answer == answer
    assert q.demonstration == "<think>\n" + "\n".join(lines) + "\n</think>\n\\boxed{" + answer + "}"


def test_make_question_rejects_other_levels():
    for level, a, b in [(1, 10, 3), (2, 3, 4), (3, 47, 38), (4, 5, 6), (4, 30, 31), (5, 99, 3),
                        (6, 3, 4), (7, 47, 38)]:
        with pytest.raises(ValueError, match="not a level"):
            task.make_question(level, a, b)
    with pytest.raises(ValueError, match="not one of the toy levels"):
        task.generate(8, 1, seed=0, split="train")
    with pytest.raises(ValueError, match="split"):
        task.generate(1, 1, seed=0, split="valid")


def test_verify_demonstration_rejects_corruptions():
    q = task.make_question(5, 385, 47)
    bad = [
        q.demonstration.replace("15-7-0=8", "15-7-0=9"),   # wrong arithmetic
        q.demonstration.replace("8-4-1=3", "8-4-0=4"),     # dropped borrow
        q.demonstration.replace("15-7-0=8", "5-7-0=8"),    # borrow taken but not written
        q.demonstration.replace("\\boxed{338}", "\\boxed{339}"),
        q.demonstration.replace("\n</think>", "</think>"),
    ]
    for text in bad:
        assert text != q.demonstration
        assert not task.verify_demonstration(task.ToyQuestion(5, q.question, q.answer, text))
    # Replaying an addition without the "1x" borrow form is wrong for a column that must borrow.
    q4 = task.make_question(4, 40, 1)
    bad4 = q4.demonstration.replace("10-1-0=9", "0-1-0=9")
    assert not task.verify_demonstration(task.ToyQuestion(4, q4.question, q4.answer, bad4))


# ---------------------------------------------------------------------------------------------
# Determinism and splits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", range(1, 8))
def test_deterministic_by_seed(level):
    for split in task.SPLITS:
        n = min(15, task.num_questions(level, split))
        first = task.generate(level, n, seed=3, split=split)
        assert first == task.generate(level, n, seed=3, split=split)
        assert first != task.generate(level, n, seed=4, split=split)


@pytest.mark.parametrize("level", [1, 2, 4])
def test_small_levels_partition_exactly(level):
    """Train and test are disjoint and together are the whole question space."""
    n_train, n_test = task.num_questions(level, "train"), task.num_questions(level, "test")
    train = [q.question for q in task.generate(level, n_train, seed=0, split="train")]
    test = [q.question for q in task.generate(level, n_test + 50, seed=0, split="test")]
    assert len(test) == n_test  # asking for more returns every held-out question once
    assert len(set(train)) == n_train and len(set(test)) == n_test
    assert not set(train) & set(test)
    assert set(train) | set(test) == all_questions(level)
    # About a fifth held out (a hash split; generous bounds).
    assert 0.1 < n_test / (n_train + n_test) < 0.3


@pytest.mark.parametrize("level", [3, 5])
def test_large_levels_disjoint_and_counted(level):
    digits = 3
    if level == 3:  # pairs in [0, 1000)^2 whose larger member has 3 digits
        space = 10 ** (2 * digits) - 10 ** (2 * (digits - 1))
    else:  # sum over a = 100..999 of (a + 1) choices of b
        space = sum(a + 1 for a in range(100, 1000))
    n_train, n_test = task.num_questions(level, "train"), task.num_questions(level, "test")
    assert n_train + n_test == space
    assert 0.18 < n_test / space < 0.22
    test = [q.question for q in task.generate(level, 3000, seed=1, split="test")]
    train = [q.question for q in task.generate(level, 20000, seed=1, split="train")]
    assert len(set(test)) == len(test)
    assert len(set(train)) == len(train)  # unique while the split is large enough
    assert not set(train) & set(test)
    if level == 3:  # commuted questions stay on the same side of the split
        commuted = {f"{b}+{a}=?" for a, _, b in map(parse_question, test)}
        assert not commuted & set(train)


def test_train_stream_cycles_small_level():
    count = task.num_questions(1, "train")
    stream = [q.question for q in task.generate(1, 2 * count + 5, seed=7, split="train")]
    counts = collections.Counter(stream)
    assert len(counts) == count
    assert set(counts.values()) <= {2, 3}
    # The first `count` draws are one full pass over the split.
    assert len(set(stream[:count])) == count


# ---------------------------------------------------------------------------------------------
# Dataset file
# ---------------------------------------------------------------------------------------------


def test_write_dataset_schema(tmp_path):
    path = tmp_path / "sub" / "train.jsonl"
    written = task.write_dataset(path, [1, 4, 5], {1: 3, 4: 2, 5: 4}, seed=5, split="train")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == len(rows) == 9
    # Round-robin over the given level order while each level has questions left.
    assert [r["extra_info"]["level"] for r in rows] == [1, 4, 5, 1, 4, 5, 1, 5, 5]
    expected = {lv: task.generate(lv, n, seed=5, split="train") for lv, n in [(1, 3), (4, 2), (5, 4)]}
    for row in rows:
        lv, i = row["extra_info"]["level"], row["extra_info"]["index"]
        q = expected[lv][i]
        assert set(row) == {"prompt", "reward_model", "target", "data_source", "extra_info"}
        assert row["prompt"] == [{"role": "user", "content": q.question}]
        assert row["reward_model"] == {"ground_truth": q.answer, "style": "rule"}
        assert row["target"] == [{"role": "assistant", "content": q.demonstration}]
        assert row["data_source"] == f"toy_level{lv}"
        a, op, b = parse_question(row["prompt"][0]["content"])
        assert row["reward_model"]["ground_truth"] == str(truth_of(a, op, b))

    bare = tmp_path / "test.jsonl"
    task.write_dataset(bare, [2], 4, seed=5, split="test", with_demonstrations=False)
    rows = [json.loads(line) for line in bare.read_text().splitlines()]
    assert len(rows) == 4 and all("target" not in r for r in rows)


def test_dataset_reads_through_data_module(tmp_path):
    data = pytest.importorskip("relift_jax.data")
    path = tmp_path / "toy.jsonl"
    task.write_dataset(path, [3, 5], 3, seed=0, split="train")
    examples = data.load_examples(str(path))
    assert len(examples) == 6
    for ex in examples:
        a, op, b = parse_question(ex.messages[-1]["content"])
        assert ex.ground_truth == str(truth_of(a, op, b))
        assert ex.demonstration.endswith("\\boxed{" + ex.ground_truth + "}")
        assert ex.reward == "math"


# ---------------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------------


def _sample_for_reward() -> list[task.ToyQuestion]:
    return [q for lv in task.LEVELS for q in task.generate(lv, 8, seed=11, split="test")]


def _corrupt(q: task.ToyQuestion) -> str:
    wrong = str(int(q.answer) + 1)
    return q.demonstration.replace("\\boxed{" + q.answer + "}", "\\boxed{" + wrong + "}")


def test_math_verify_scores_demonstrations():
    """Direct check with math-verify, the official rule: gold "$gt$" against the text after </think>."""
    for q in _sample_for_reward():
        response = q.demonstration[len("<think>\n"):]  # the prompt already ends with "<think>\n"
        answer_text = response.split("</think>")[-1]
        gold = math_verify.parse("$" + q.answer + "$")
        assert math_verify.verify(gold, math_verify.parse(answer_text)), q
        bad_answer = _corrupt(q)[len("<think>\n"):].split("</think>")[-1]
        assert not math_verify.verify(gold, math_verify.parse(bad_answer)), q


def test_reward_module_scores_demonstrations():
    grading = pytest.importorskip("relift_jax.grading")
    for q in _sample_for_reward():
        response = q.demonstration[len("<think>\n"):]
        assert grading.math_reward(response, q.answer) == 1.0, q
        assert grading.math_reward(_corrupt(q)[len("<think>\n"):], q.answer) == 0.0, q
        no_close = response.replace("</think>", "")
        assert grading.math_reward(no_close, q.answer) == 0.0, q


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(str(toy_tok.TOKENIZER_DIR))


def test_tokenizer_basics(tok):
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert len(tok) <= 128
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]:
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (special, ids)
        assert tok.convert_ids_to_tokens(ids) == [special]
    # No BOS or other token is added around plain text.
    assert tok("1+2=?")["input_ids"] == tok("1+2=?", add_special_tokens=False)["input_ids"]
    # Character level: one id per character of any printable-ASCII text.
    text = "".join(chr(c) for c in range(32, 127)) + "\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    # The reward looks for "</think>" in decoded text, so it must survive skip_special_tokens.
    ids = tok("<think>\n1</think>\n\\boxed{1}<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\n1</think>\n\\boxed{1}"
    # A character outside the vocabulary is visible as <|unk|>, not silently dropped.
    assert tok.decode(tok("1×2", add_special_tokens=False)["input_ids"]) == "1<|unk|>2"


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "47+385=?"}]
    want = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n47+385=?<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False) == (
        want[: -len("<|im_start|>assistant\n")])


@pytest.mark.parametrize("level", range(1, 8))
def test_round_trip_and_length(tok, level):
    """Full training sequences (prompt + demonstration + EOS) round-trip exactly and stay short."""
    longest = 0
    questions = task.generate(level, 300, seed=2, split="train")
    # The longest sequences come from the widest operands and answers; include them explicitly.
    worst = {1: (9, 9), 2: (99, 99), 3: (999, 999), 4: (99, 98), 5: (999, 998), 6: (99, 99),
             7: (999, 999)}[level]
    questions.append(task.make_question(level, *worst))
    for q in questions:
        prompt = tok.apply_chat_template([{"role": "user", "content": q.question}], tokenize=False,
                                         add_generation_prompt=True)
        assert prompt == f"<|im_start|>user\n{q.question}<|im_end|>\n<|im_start|>assistant\n"
        text = prompt + q.demonstration + "<|im_end|>"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert ids.count(tok.convert_tokens_to_ids("<think>")) == 1
        assert ids.count(tok.convert_tokens_to_ids("</think>")) == 1
        assert ids[-1] == tok.eos_token_id
        longest = max(longest, len(ids))
    print(f"level {level}: longest prompt+demonstration+EOS = {longest} tokens")
    assert longest <= 80  # the CPU budget the toy recipe is designed for


def test_committed_tokenizer_is_up_to_date(tmp_path, tok):
    """`python -m relift_jax.toy.tokenizer` output equals the committed folder."""
    toy_tok.save_tokenizer(tmp_path)
    fresh = json.loads((tmp_path / "tokenizer.json").read_text())
    committed = json.loads((toy_tok.TOKENIZER_DIR / "tokenizer.json").read_text())
    assert fresh == committed
    built = toy_tok.build_tokenizer()
    assert built.get_vocab() == tok.get_vocab()
    assert built.chat_template == tok.chat_template
    # ids are fixed by construction: pad 0, then the chat markers, then characters in order.
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]] == [0, 1, 2]
    chars = [vocab[c] for c in ["\n"] + [chr(c) for c in range(32, 127)]]
    assert chars == sorted(chars) and len(set(vocab.values())) == len(vocab)
