"""Tests for relift_jax.data: loading, validation, prompts, demonstrations, cursor, GSM8K.

The tokenizer is built here: one token per printable ASCII character plus the Qwen-style special
tokens, so every expected token sequence can be written down by hand from `VOCAB`.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from relift_jax import data, data_sources, encoding, gsm8k
from relift_jax.data import DataCursor, DataError, Example

SHARED = os.environ.get("RELIFT_SHARED_DATA", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"))
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII + " " + "\n"
VOCAB = {c: i for i, c in enumerate(CHARS)}
UNK = len(VOCAB)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"]
SPECIAL_ID = {s: UNK + 1 + i for i, s in enumerate(SPECIALS)}
EOS = SPECIAL_ID["<|endoftext|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ids_of(*pieces: str) -> list[int]:
    """Hand-made token ids: a special token is one id, any other string one id per character."""
    out = []
    for p in pieces:
        out += [SPECIAL_ID[p]] if p in SPECIAL_ID else [VOCAB[c] for c in p]
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer, decoders, models
    import transformers

    vocab = dict(VOCAB, **{"<unk>": UNK})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()  # join pieces without the spaces a word-level decoder inserts
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(path))
    loaded = transformers.AutoTokenizer.from_pretrained(str(path))
    assert loaded.eos_token_id == EOS
    return loaded


def test_tokenizer_fixture_is_character_level(tokenizer):
    s = "<|im_start|>user\nWhat is $2^{10}$?<|im_end|>\n<think>\nok</think>"
    ids = tokenizer(s, add_special_tokens=False)["input_ids"]
    assert ids == ids_of("<|im_start|>", "user\nWhat is $2^{10}$?", "<|im_end|>", "\n", "<think>",
                         "\nok", "</think>")
    assert tokenizer.decode(ids) == s


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

SYSTEM = "Think first."


def relift_row(question: str, gt, demo: str | None = "<think>\nsteps\n</think>\n\nDone.",
               source: str = "math", index: int = 0) -> dict:
    row = {
        "data_source": source,
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "ability": "math",
        "reward_model": {"ground_truth": gt, "style": "rule"},
        "extra_info": {"index": index, "split": "train"},
    }
    if demo is not None:
        row["target"] = [{"role": "assistant", "content": demo}]
    return row


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def sys_user(q: str) -> tuple[dict, ...]:
    return ({"role": "system", "content": SYSTEM}, {"role": "user", "content": q})


def test_load_relift_parquet(tmp_path):
    rows = [relift_row("1+1?", "2", index=7),
            relift_row("Pick one. A) x B) y", "B", demo=None, source="arc_c"),
            relift_row("2+2?", "4", demo="")]
    path = write_parquet(tmp_path / "train.parquet", rows)
    got = data.load_examples(path)
    assert got == [
        Example(0, sys_user("1+1?"), "2", "<think>\nsteps\n</think>\n\nDone.", "math", "math"),
        Example(1, sys_user("Pick one. A) x B) y"), "B", None, "arc_c", "choice"),
        Example(2, sys_user("2+2?"), "4", None, "math", "math"),
    ]
    # Plain Python containers, not numpy / pyarrow objects.
    assert type(got[0].messages) is tuple and all(type(m) is dict for m in got[0].messages)
    assert got[0].extra == {"ability": "math", "index": 7, "split": "train"}


def test_load_relift_jsonl_numbers_and_missing_target(tmp_path):
    rows = [relift_row("6*7?", 42, demo=None), relift_row("half of 1?", 0.5)]
    rows[0]["prompt"] = rows[0]["prompt"][1:]  # no system message
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    a, b = data.load_examples(path)
    assert a.messages == ({"role": "user", "content": "6*7?"},)
    assert (a.ground_truth, a.demonstration) == ("42", None)
    assert (b.ground_truth, b.demonstration) == ("0.5", "<think>\nsteps\n</think>\n\nDone.")


def test_load_plain_and_reward_inference(tmp_path):
    rows = [
        {"question": "3+4?", "answer": "7", "demonstration": "3+4=7", "system": "Be brief."},
        {"question": "Which? A) 1 B) 2", "answer": "C", "data_source": "mmlu_pro"},
        {"question": "Name the matrix.", "answer": "C", "data_source": "math"},
        {"question": "Which? A) 1 B) 2", "answer": "A", "data_source": "ARC-Challenge"},
        {"question": "Q", "answer": "B", "data_source": "gpqa_diamond", "demonstration": ""},
        {"question": "Q", "answer": "B", "data_source": "research_set"},
    ]
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    got = data.load_examples(path)
    assert got[0] == Example(0, ({"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "3+4?"}), "7", "3+4=7", "", "math")
    assert got[1].messages == ({"role": "user", "content": "Which? A) 1 B) 2"},)
    assert [e.reward for e in got] == ["math", "choice", "math", "choice", "choice", "math"]
    assert got[4].demonstration is None
    # An explicit reward overrides the inference for every row.
    assert {e.reward for e in data.load_examples(path, reward="custom")} == {"custom"}


def test_schema_auto_detection_and_explicit(tmp_path):
    relift = write_jsonl(tmp_path / "r.jsonl", [relift_row("1+1?", "2")])
    plain = write_jsonl(tmp_path / "p.jsonl", [{"question": "1+1?", "answer": "2"}])
    assert data.load_examples(relift) == data.load_examples(relift, schema="relift")
    assert data.load_examples(plain) == data.load_examples(plain, schema="plain")
    with pytest.raises(DataError, match=r"row 0: field 'question'"):
        data.load_examples(relift, schema="plain")
    with pytest.raises(DataError, match=r"row 0: field 'prompt'"):
        data.load_examples(plain, schema="relift")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"problem": "1+1?", "solution": "2"}])
    with pytest.raises(DataError, match=r"odd\.jsonl: row 0: cannot detect the schema"):
        data.load_examples(odd)
    with pytest.raises(ValueError, match="schema"):
        data.load_examples(plain, schema="luffy")


def test_json_array_file(tmp_path):
    path = tmp_path / "rows.json"
    rows = [{"question": "a?", "answer": "1"}, {"question": "b?", "answer": "2"}]
    path.write_text(json.dumps(rows, indent=2))
    assert [e.ground_truth for e in data.load_examples(str(path))] == ["1", "2"]


def _del(key):
    return lambda r: r.pop(key)


RELIFT_BAD = [
    ("missing reward_model", _del("reward_model"), "reward_model"),
    ("missing ground truth", lambda r: r["reward_model"].pop("ground_truth"),
     "reward_model.ground_truth"),
    ("empty ground truth", lambda r: r["reward_model"].update(ground_truth="  "),
     "reward_model.ground_truth"),
    ("None ground truth", lambda r: r["reward_model"].update(ground_truth=None),
     "reward_model.ground_truth"),
    ("list ground truth", lambda r: r["reward_model"].update(ground_truth=["1", "2"]),
     "reward_model.ground_truth"),
    ("bool ground truth", lambda r: r["reward_model"].update(ground_truth=True),
     "reward_model.ground_truth"),
    ("prompt is a string", lambda r: r.update(prompt="1+1?"), "prompt"),
    ("no user message", lambda r: r.update(prompt=r["prompt"][:1]), "prompt"),
    ("content not a string", lambda r: r["prompt"][1].update(content=12), "prompt[1].content"),
    ("role missing", lambda r: r["prompt"][0].pop("role"), "prompt[0].role"),
    ("target from user", lambda r: r["target"][0].update(role="user"), "target[0].role"),
    ("target two messages", lambda r: r["target"].append(dict(r["target"][0])), "target"),
    ("data_source number", lambda r: r.update(data_source=3), "data_source"),
    ("extra_info list", lambda r: r.update(extra_info=[1]), "extra_info"),
]


@pytest.mark.parametrize("name,mutate,field", RELIFT_BAD, ids=[c[0] for c in RELIFT_BAD])
def test_relift_malformed_row_names_file_row_field(tmp_path, name, mutate, field):
    bad = relift_row("2+2?", "4")
    mutate(bad)
    path = write_jsonl(tmp_path / "bad.jsonl", [relift_row("1+1?", "2"), bad])
    with pytest.raises(DataError) as exc:
        data.load_examples(path)
    assert str(exc.value).startswith(f"{path}: row 1: field '{field}': ")


PLAIN_BAD = [
    ("empty answer", {"question": "q?", "answer": ""}, "answer"),
    ("missing answer", {"question": "q?"}, "answer"),
    ("missing question", {"answer": "1"}, "question"),
    ("question not str", {"question": ["q?"], "answer": "1"}, "question"),
    ("demonstration not str", {"question": "q?", "answer": "1", "demonstration": 5},
     "demonstration"),
    ("raw gsm8k answer", {"question": "q?", "answer": "2+2=<<2+2=4>>4\n#### 4"}, "answer"),
]


@pytest.mark.parametrize("name,bad,field", PLAIN_BAD, ids=[c[0] for c in PLAIN_BAD])
def test_plain_malformed_row_names_file_row_field(tmp_path, name, bad, field):
    rows = [{"question": "a?", "answer": "1"}, {"question": "b?", "answer": "2"}, bad]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as exc:
        data.load_examples(path, schema="plain")
    assert str(exc.value).startswith(f"{path}: row 2: field '{field}': ")


def test_malformed_parquet_row_and_bad_json_line(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", [relift_row("1+1?", "2"), relift_row("x", "")])
    with pytest.raises(DataError, match=r"bad\.parquet: row 1: field 'reward_model\.ground_truth': "
                                        r"must be a non-empty string"):
        data.load_examples(path)
    jl = tmp_path / "broken.jsonl"
    jl.write_text(json.dumps(relift_row("1+1?", "2")) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: row 1 \(line 3\): invalid JSON"):
        data.load_examples(str(jl))
    csv = tmp_path / "rows.csv"
    csv.write_text("question,answer\nq?,1\n")
    with pytest.raises(DataError, match="unsupported file type"):
        data.load_examples(str(csv))


# ---------------------------------------------------------------------------------------------
# Dataset folders (read with `datasets`)
# ---------------------------------------------------------------------------------------------

FOLDER_ROWS = [relift_row("1+1?", "2", index=7),
               relift_row("Pick one. A) x B) y", "B", demo=None, source="arc_c", index=8),
               relift_row("2+2?", "4", demo="", index=9)]
TEST_ROWS = [relift_row("3+3?", "6", index=0), relift_row("5*5?", "25", demo=None, index=1)]


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def assert_same_examples(got, want):
    assert got == want
    assert [e.extra for e in got] == [e.extra for e in want]  # extra is not part of ==


def test_save_to_disk_dataset_matches_file(tmp_path, offline):
    import datasets

    want = data.load_examples(write_parquet(tmp_path / "rows.parquet", FOLDER_ROWS))
    assert want == data.load_examples(write_jsonl(tmp_path / "rows.jsonl", FOLDER_ROWS))
    folder = str(tmp_path / "saved")
    datasets.Dataset.from_list(FOLDER_ROWS).save_to_disk(folder)
    assert_same_examples(data.load_examples(folder), want)
    with pytest.raises(DataError, match=r"saved: holds one dataset saved without splits; "
                                        r"drop '::test'"):
        data.load_examples(folder + "::test")


def test_save_to_disk_dataset_dict_split_selection(tmp_path, offline):
    import datasets

    folder = str(tmp_path / "dict")
    datasets.DatasetDict(train=datasets.Dataset.from_list(FOLDER_ROWS),
                         test=datasets.Dataset.from_list(TEST_ROWS)).save_to_disk(folder)
    train = data.load_examples(write_jsonl(tmp_path / "train.jsonl", FOLDER_ROWS))
    test = data.load_examples(write_jsonl(tmp_path / "test.jsonl", TEST_ROWS))
    assert_same_examples(data.load_examples(folder), train)  # "train" by default
    assert_same_examples(data.load_examples(folder + "::train"), train)
    assert_same_examples(data.load_examples(folder + "::test"), test)
    with pytest.raises(DataError, match=r"dict: no split 'validation' \(splits: test, train\)$"):
        data.load_examples(folder + "::validation")

    only_test = str(tmp_path / "only_test")
    datasets.DatasetDict(test=datasets.Dataset.from_list(TEST_ROWS)).save_to_disk(only_test)
    with pytest.raises(DataError, match=r"only_test: no split 'train' \(splits: test\); "
                                        r"choose one with '.*only_test::SPLIT'"):
        data.load_examples(only_test)
    assert_same_examples(data.load_examples(only_test + "::test"), test)


def test_hub_layout_parquet_folder(tmp_path, offline):
    (tmp_path / "hub" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", FOLDER_ROWS)
    write_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", TEST_ROWS)
    folder = str(tmp_path / "hub")
    assert_same_examples(data.load_examples(folder),
                         data.load_examples(write_parquet(tmp_path / "a.parquet", FOLDER_ROWS)))
    assert_same_examples(data.load_examples(folder + "::test"),
                         data.load_examples(write_parquet(tmp_path / "b.parquet", TEST_ROWS)))


def test_hub_layout_jsonl_folder_with_dataset_card(tmp_path, offline):
    # A folder named like a packaged builder must still be read as a local folder.
    folder = tmp_path / "json"
    (folder / "rows").mkdir(parents=True)
    write_jsonl(folder / "rows" / "first.jsonl", FOLDER_ROWS)
    write_jsonl(folder / "rows" / "second.jsonl", TEST_ROWS)
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: rows/first.jsonl\n"
        "  - split: dev\n    path: rows/second.jsonl\n---\n# Toy maths\n")
    assert_same_examples(data.load_examples(str(folder)),
                         data.load_examples(str(folder / "rows" / "first.jsonl")))
    assert_same_examples(data.load_examples(f"{folder}::dev"),
                         data.load_examples(str(folder / "rows" / "second.jsonl")))

    bare = tmp_path / "bare"  # no card, one file: datasets calls its only split "train"
    bare.mkdir()
    write_jsonl(bare / "plain.jsonl", [{"question": "a?", "answer": "1"},
                                       {"question": "b?", "answer": "2", "demonstration": "d"}])
    assert_same_examples(data.load_examples(str(bare)),
                         data.load_examples(str(bare / "plain.jsonl")))


def test_bad_row_in_dataset_folder_names_folder_split_row_field(tmp_path):
    import datasets

    bad = FOLDER_ROWS[:1] + [relift_row("x", " ")]
    folder = str(tmp_path / "saved")
    datasets.Dataset.from_list(bad).save_to_disk(folder)
    with pytest.raises(DataError) as exc:
        data.load_examples(folder)
    assert str(exc.value).startswith(f"{folder}: row 1: field 'reward_model.ground_truth': "
                                      f"must be a non-empty string")

    (tmp_path / "hub" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", bad)
    write_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", FOLDER_ROWS)
    with pytest.raises(DataError) as exc:
        data.load_examples(f"{tmp_path / 'hub'}::test")
    assert str(exc.value).startswith(f"{tmp_path / 'hub'}::test: row 1: field "
                                     f"'reward_model.ground_truth': ")


def test_missing_and_unrecognised_sources(tmp_path):
    missing = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl: no such file or folder "
                                                r"\(expected a \.parquet"):
        data.load_examples(missing)
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such file or folder"):
        data.load_examples(str(tmp_path / "nowhere") + "::test")

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("# just notes\n")
    (tmp_path / "notes" / "a.txt").write_text("hello\n")
    (tmp_path / "empty").mkdir()
    for name in ("notes", "empty"):
        with pytest.raises(DataError) as exc:
            data.load_examples(str(tmp_path / name))
        msg = str(exc.value)
        assert msg.startswith(f"{tmp_path / name}: not a dataset folder: expected a folder "
                              f"written by datasets' save_to_disk") and "\n" not in msg

    rows = write_jsonl(tmp_path / "rows.jsonl", FOLDER_ROWS)
    with pytest.raises(DataError, match=r"rows\.jsonl::test: '::test' selects a split of a "
                                        r"dataset folder, but .*rows\.jsonl is a file"):
        data.load_examples(rows + "::test")
    with pytest.raises(DataError, match="both parts non-empty"):
        data.load_examples(str(tmp_path / "empty") + "::")

    # datasets cannot read it: one line naming the folder and the cause.
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "rows.parquet").write_text("not parquet")
    with pytest.raises(DataError) as exc:
        data.load_examples(str(tmp_path / "broken"))
    assert str(exc.value).startswith(f"{tmp_path / 'broken'}: datasets could not load this "
                                     f"folder: ")
    assert "\n" not in str(exc.value)


def test_literal_path_with_separator_wins(tmp_path):
    path = write_jsonl(tmp_path / "odd::name.jsonl", FOLDER_ROWS)
    assert data_sources.split_data_spec(path) == (path, None)
    assert len(data.load_examples(path)) == 3
    assert data_sources.split_data_spec("C:\\data\\gsm8k::test") == ("C:\\data\\gsm8k", "test")


def test_real_benchmark_through_dataset_folders(tmp_path, offline):
    import datasets

    src = _bench("train_time_validation")
    want = data.load_examples(src)
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    shutil.copy(src, hub / "train-00000-of-00001.parquet")
    assert_same_examples(data.load_examples(str(tmp_path / "hub")), want)
    saved = str(tmp_path / "saved")
    datasets.DatasetDict(validation=datasets.Dataset.from_parquet(src)).save_to_disk(saved)
    assert_same_examples(data.load_examples(saved + "::validation"), want)


def test_parse_row_normalises_numpy_arrays():
    # What pandas gives for parquet list / struct columns.
    row = {
        "prompt": np.array([{"role": "user", "content": "1+1?", "name": None}], dtype=object),
        "reward_model": {"ground_truth": np.int64(2), "style": "rule"},
        "target": np.array([{"role": "assistant", "content": "two"}], dtype=object),
        "extra_info": {"index": np.int64(3), "tags": np.array(["a", "b"])},
    }
    ex = data.parse_row(row, schema="auto", index=5, source="mem")
    assert ex == Example(5, ({"role": "user", "content": "1+1?"},), "2", "two", "", "math")
    assert ex.extra == {"index": 3, "tags": ["a", "b"]}
    assert type(ex.extra["index"]) is int


# ---------------------------------------------------------------------------------------------
# Prompts and demonstrations
# ---------------------------------------------------------------------------------------------

MSGS = ({"role": "system", "content": "Be careful."}, {"role": "user", "content": "1+1?"})


def test_render_prompt(tokenizer):
    full = ("<|im_start|>system\nBe careful.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
            "<|im_start|>assistant\n")
    no_sys = "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    assert encoding.render_prompt(tokenizer, MSGS) == full + "<think>\n"
    assert encoding.render_prompt(tokenizer, MSGS, think_prefix=False) == full
    assert encoding.render_prompt(tokenizer, MSGS, keep_system_prompt=False) == no_sys + "<think>\n"
    assert encoding.render_prompt(tokenizer, list(MSGS), keep_system_prompt=False,
                              think_prefix=False) == no_sys
    with pytest.raises(ValueError, match="no messages"):
        encoding.render_prompt(tokenizer, MSGS[:1], keep_system_prompt=False)


def _ex(i: int, question: str) -> Example:
    return Example(i, ({"role": "system", "content": "S"}, {"role": "user", "content": question}),
                   "1", None, "t")


def test_encode_prompts_drops_and_counts(tokenizer):
    examples = [_ex(10, "ab"), _ex(11, "a" * 30), _ex(12, "abc")]

    def expected(q, system=True):
        head = ["<|im_start|>", "system\nS", "<|im_end|>", "\n"] if system else []
        return ids_of(*head, "<|im_start|>", "user\n" + q, "<|im_end|>", "\n", "<|im_start|>",
                      "assistant\n", "<think>", "\n")

    # One token per special or character: system turn 1+8+1+1, user turn 1+7+1+1, generation
    # prompt 1+10+1+1: 34 tokens for "ab", 35 for "abc", 62 for 30 a's (23, 24, 51 without system).
    assert len(expected("ab")) == 34
    enc = data.encode_prompts(tokenizer, examples, max_prompt_len=35)
    assert enc.kept == [0, 2] and enc.num_dropped == 1
    assert enc.ids == [expected("ab"), expected("abc")]

    enc = data.encode_prompts(tokenizer, examples, max_prompt_len=34, keep_system_prompt=False)
    assert enc.kept == [0, 2] and enc.num_dropped == 1
    assert enc.ids[0] == expected("ab", system=False)

    enc = data.encode_prompts(tokenizer, examples, max_prompt_len=34)  # "abc" (35) goes too
    assert enc.kept == [0] and enc.num_dropped == 2

    with pytest.raises(DataError, match=r"row 11 .*62 tokens, longer than max_prompt_len 35"):
        data.encode_prompts(tokenizer, examples, max_prompt_len=35, on_overflow="raise")
    with pytest.raises(ValueError, match="on_overflow"):
        data.encode_prompts(tokenizer, examples, max_prompt_len=35, on_overflow="truncate")


@pytest.mark.parametrize("text", ["<think>\nab+c", "<think>ab+c", "ab+c"])
def test_encode_demonstration(tokenizer, text):
    abc = ids_of("ab+c")
    assert data.encode_demonstration(tokenizer, text, max_len=9, eos_id=EOS) == (abc + [EOS], False)
    assert data.encode_demonstration(tokenizer, text, max_len=5, eos_id=EOS) == (abc + [EOS], False)
    # Four text tokens and no room for EOS: cut, and no EOS written over the last token.
    assert data.encode_demonstration(tokenizer, text, max_len=4, eos_id=EOS) == (abc, True)
    assert data.encode_demonstration(tokenizer, text, max_len=2, eos_id=EOS) == (abc[:2], True)


def test_encode_demonstration_without_think_prefix(tokenizer):
    ids, truncated = data.encode_demonstration(tokenizer, "<think>\nab", max_len=8, eos_id=EOS,
                                               think_prefix=False)
    assert (ids, truncated) == (ids_of("<think>", "\nab") + [EOS], False)
    for max_len in range(1, 12):
        ids, truncated = data.encode_demonstration(tokenizer, "<think>\nsolve it</think>",
                                                   max_len=max_len, eos_id=EOS)
        assert len(ids) <= max_len
        assert (ids[-1] == EOS) == (not truncated) == (max_len >= 10)


# ---------------------------------------------------------------------------------------------
# Cursor
# ---------------------------------------------------------------------------------------------


def test_cursor_epochs_are_permutations_and_seeded():
    c = DataCursor(7, seed=3)
    seq = c.next(21)
    epochs = [seq[0:7], seq[7:14], seq[14:21]]
    for e in epochs:
        assert sorted(e) == list(range(7))
    # Reshuffled per epoch: three equal orders out of 5040 would have probability ~4e-8.
    assert len({tuple(e) for e in epochs}) > 1
    assert (c.epoch, c.position, c.examples_seen) == (3, 0, 21)
    assert DataCursor(7, seed=3).next(21) == seq
    assert DataCursor(7, seed=4).next(21) != seq
    assert DataCursor(5, seed=3, shuffle=False).next(12) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


@pytest.mark.parametrize("cut", [3, 7, 9, 16])  # mid-epoch, on a boundary, after one, later
def test_cursor_restore_is_exact(cut):
    full = DataCursor(7, seed=11).next(30)
    first = DataCursor(7, seed=11)
    head = first.next(cut)
    state = json.loads(json.dumps(first.state()))  # must survive a JSON round trip
    assert state["examples_seen"] == cut and state["epoch"] == cut // 7
    resumed = DataCursor(7, seed=11)
    resumed.restore(state)
    assert head + resumed.next(30 - cut) == full


def test_cursor_restore_rejects_other_dataset():
    state = DataCursor(7, seed=1).state()
    with pytest.raises(ValueError, match="num_examples"):
        DataCursor(8, seed=1).restore(state)
    with pytest.raises(ValueError, match="seed"):
        DataCursor(7, seed=2).restore(state)


# ---------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------

GSM_RAW = [
    {"question": "Tom has 3 bags of 2 apples. How many apples?",
     "answer": "He has 3*2 = <<3*2=6>>6 apples.\n#### 6"},
    {"question": "A car costs $1,000 and a bike $234. Total? ",
     "answer": "1,000+234 = <<1000+234=1234>>1,234 dollars.\nSo the total is 1,234.\n#### 1,234"},
]
GSM_SUFFIX = "\nLet's think step by step and output the final answer within \\boxed{}."


def test_convert_gsm8k_handmade(tmp_path):
    src = write_jsonl(tmp_path / "gsm.jsonl", GSM_RAW)
    dst = str(tmp_path / "out" / "gsm.jsonl")
    assert gsm8k.convert_gsm8k(src, dst) == 2
    rows = [json.loads(line) for line in open(dst)]
    assert rows[1] == {
        "prompt": [{"role": "user",
                    "content": "A car costs $1,000 and a bike $234. Total?" + GSM_SUFFIX}],
        "reward_model": {"ground_truth": "1234", "style": "rule"},
        "target": [{"role": "assistant", "content":
                    "<think>\n1,000+234 = 1,234 dollars.\nSo the total is 1,234.\n</think>\n\n"
                    "The answer is \\boxed{1234}."}],
        "data_source": "gsm8k",
        "extra_info": {"index": 1},
    }
    examples = data.load_examples(dst)
    assert [e.ground_truth for e in examples] == ["6", "1234"]
    assert examples[0].demonstration == ("<think>\nHe has 3*2 = 6 apples.\n</think>\n\n"
                                         "The answer is \\boxed{6}.")
    assert examples[0].messages == ({"role": "user", "content":
                                     "Tom has 3 bags of 2 apples. How many apples?" + GSM_SUFFIX},)

    kept = str(tmp_path / "kept.parquet")
    assert gsm8k.convert_gsm8k(src, kept, strip_calculator=False, limit=1) == 1
    (ex,) = data.load_examples(kept)
    assert ex.demonstration.startswith("<think>\nHe has 3*2 = <<3*2=6>>6 apples.\n</think>")


def test_convert_gsm8k_errors_and_cli(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", GSM_RAW + [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: field 'answer': .*'####"):
        gsm8k.convert_gsm8k(bad, str(tmp_path / "o.jsonl"))
    assert not os.path.exists(tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match=r"\.jsonl or \.parquet"):
        gsm8k.convert_gsm8k(bad, str(tmp_path / "o.csv"))

    src = write_jsonl(tmp_path / "gsm.jsonl", GSM_RAW)
    dst = str(tmp_path / "cli.parquet")
    assert data.main(["convert-gsm8k", src, dst, "--limit", "1"]) == 0
    assert "wrote 1 rows" in capsys.readouterr().out
    assert [e.ground_truth for e in data.load_examples(dst)] == ["6"]


def test_convert_real_gsm8k_first_50(tmp_path):
    src = f"{SHARED}/gsm8k/train.jsonl"
    if not os.path.exists(src):
        pytest.skip(f"{src} not present")
    dst = str(tmp_path / "gsm8k50.parquet")
    assert gsm8k.convert_gsm8k(src, dst, limit=50) == 50
    examples = data.load_examples(dst)
    assert len(examples) == 50
    # Known first rows of GSM8K train (Natalia's clips; Weng's babysitting).
    assert examples[0].ground_truth == "72" and examples[1].ground_truth == "10"
    assert examples[0].demonstration.startswith(
        "<think>\nNatalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips")
    assert examples[0].messages[0]["content"].startswith("Natalia sold clips to 48 of her friends")
    assert all("<<" not in e.demonstration and "####" not in e.demonstration for e in examples)
    assert all("," not in e.ground_truth for e in examples)
    assert {(e.data_source, e.reward) for e in examples} == {("gsm8k", "math")}
    assert [e.extra["index"] for e in examples] == list(range(50))


# ---------------------------------------------------------------------------------------------
# Real benchmark files
# ---------------------------------------------------------------------------------------------


def _bench(name: str) -> str:
    path = f"{SHARED}/benchmarks/{name}.parquet"
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    return path


def test_real_math_eval_counts():
    examples = data.load_examples(_bench("math_eval"))
    counts = collections.Counter(e.data_source for e in examples)
    # docs/relift.md: AIME24 and AIME25 30 x 32, AMC 83 x 32, MATH-500, Minerva 272, Olympiad 675.
    assert counts == {"aime": 30 * 32, "aime25": 30 * 32, "amc": 83 * 32, "math": 500,
                      "minerva": 272, "olympiad_bench": 675}
    for source, n_unique in (("aime", 30), ("aime25", 30), ("amc", 83)):
        per_question = collections.Counter(e.messages[-1]["content"] for e in examples
                                           if e.data_source == source)
        assert len(per_question) == n_unique and set(per_question.values()) == {32}
    assert {e.reward for e in examples} == {"math"}
    assert all(e.messages[0]["role"] == "system" and e.messages[-1]["role"] == "user"
               for e in examples)
    assert all(e.demonstration is None for e in examples)


# ARC labels a few questions' options 1-4 instead of A-D (the original dataset does so).
@pytest.mark.parametrize("name,rows,labels", [("arc_c", 1172, set("ABCDE12345")),
                                              ("gpqa_diamond", 198, set("ABCD"))])
def test_real_multiple_choice_benchmarks(name, rows, labels):
    examples = data.load_examples(_bench(name))
    assert len(examples) == rows  # ARC-Challenge test split, GPQA Diamond
    assert {e.reward for e in examples} == {"choice"}
    assert {e.ground_truth for e in examples} <= labels


def test_real_train_time_validation_loads():
    examples = data.load_examples(_bench("train_time_validation"))
    assert len(examples) > 0
    assert {e.reward for e in examples} == {"math"}
    assert [e.index for e in examples] == list(range(len(examples)))
