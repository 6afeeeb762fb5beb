"""Training and evaluation rows -> examples, prompt token ids, demonstration token ids; the cursor.

Host-only: plain Python and numpy, no JAX. The rest of the framework sees only `Example`s and
token id lists; file formats and their quirks (numpy arrays out of parquet list columns, numbers
as ground truths, missing demonstrations) end here.

Two row schemas are read:

* "relift" (LUFFY / ReLIFT parquet): `prompt` = list of chat messages, `reward_model` =
  `{"ground_truth": ..., "style": ...}`, optional `target` = `[{"role": "assistant", "content":
  demonstration}]`, optional `data_source` and `extra_info`.
* "plain": `question`, `answer`, optional `demonstration`, `data_source` and `system`.

Rows come from a parquet / JSON lines file, or from one split of a local dataset folder read
with `datasets` (`save_to_disk` output or the hub layout; `FOLDER::SPLIT` picks the split); see
`load_examples`. Every malformed row raises `DataError` naming the source (file, or folder and
split), the row index, the field and the rule.

Also here: `convert_gsm8k`, which turns openai/grade-school-math jsonl into the relift schema
(CLI: `python -m relift_jax.data convert-gsm8k SRC DST [--limit N]`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SCHEMAS = ("auto", "relift", "plain")
OVERFLOW_MODES = ("drop", "raise")
THINK_PREFIX = "<think>\n"
GSM8K_INSTRUCTION = "\nLet's think step by step and output the final answer within \\boxed{}."

# Words in a data_source that mark a multiple-choice set whose answers are letters.
_CHOICE_SOURCE_RE = re.compile(r"(?<![a-z])arc(?![a-z])|gpqa")
_CHOICE_HINTS = ("mmlu", "choice", "mcq")
_LETTER_RE = re.compile(r"[A-J]")
_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


class DataError(ValueError):
    """A data file or row that breaks the schema; the message names file, row, field and rule."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One question.

    Attributes:
        index: row index in its source file (0-based, counting data rows only).
        messages: chat messages `{"role", "content"}`, the system message included if the row has
            one; the last user message is the question.
        ground_truth: the reference answer, as a string.
        demonstration: a worked solution for SFT, or None when the row has none.
        data_source: benchmark / dataset name (e.g. "aime", "gsm8k"); "" if absent.
        reward: name of the reward function that grades this question ("math" or "choice").
        extra: everything else in the row (`extra_info` entries, other columns); not compared.
    """

    index: int
    messages: tuple[dict, ...]
    ground_truth: str
    demonstration: str | None
    data_source: str
    reward: str = "math"
    extra: dict = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class EncodedPrompts:
    """Prompt token ids for the examples that fit.

    Attributes:
        ids: token ids of each kept prompt, in the order of `kept`.
        kept: positions (into the `examples` argument) of the kept prompts, ascending.
        num_dropped: how many prompts were longer than `max_prompt_len` and left out.
    """

    ids: list[list[int]]
    kept: list[int]
    num_dropped: int


# ---------------------------------------------------------------------------------------------
# Row validation
# ---------------------------------------------------------------------------------------------


def _short_repr(value: Any, limit: int = 120) -> str:
    """repr() cut to `limit` characters, so that an error on an 8k-token demonstration stays
    readable."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(source: str, row: int, field: str, rule: str, value: Any) -> DataError:
    return DataError(f"{source}: row {row}: field '{field}': {rule}, got {_short_repr(value)}")


def _plain(value: Any) -> Any:
    """numpy arrays / scalars (what pandas gives for parquet list columns) -> lists / Python
    scalars, recursively, so that Examples hold only JSON-like values."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _ground_truth(value: Any, source: str, row: int, field: str) -> str:
    """Accept a non-empty string or a finite number (some files store answers as numbers)."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    # bool is an int subclass, but True is never a meaningful maths answer.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(source, row, field, "must be a finite number", value)
        return str(value)
    raise _fail(source, row, field, "must be a non-empty string (or a number)", value)


def _optional_str(row: Mapping, key: str, source: str, index: int) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(source, index, key, "must be a string", value)
    return value


def _messages(value: Any, source: str, row: int, field: str) -> tuple[dict, ...]:
    """Validate a list of chat messages and return plain dicts holding only non-None keys (parquet
    struct columns fill keys that a message lacks with None)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(source, row, field, "must be a non-empty list of chat messages", value)
    out = []
    for j, msg in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(msg, Mapping):
            raise _fail(source, row, where, "must be a message dict with 'role' and 'content'", msg)
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise _fail(source, row, f"{where}.role", "must be a non-empty string", role)
        if not isinstance(content, str):
            raise _fail(source, row, f"{where}.content", "must be a string", content)
        out.append({k: v for k, v in msg.items() if v is not None})
    return tuple(out)


def _infer_reward(data_source: str, ground_truth: str) -> str:
    """"choice" for multiple-choice sets, else "math".

    The "arc" match requires a non-letter on both sides so that e.g. "research" is not taken for
    ARC; a bare letter answer only counts as a choice when the source name says so, because maths
    answers can be single letters too.
    """
    ds = data_source.lower()
    if _CHOICE_SOURCE_RE.search(ds):
        return "choice"
    if _LETTER_RE.fullmatch(ground_truth) and any(h in ds for h in _CHOICE_HINTS):
        return "choice"
    return "math"


def _other_columns(row: Mapping, consumed: set[str]) -> dict:
    """Columns the schema does not use (kept in Example.extra), less pandas index columns."""
    return {k: v for k, v in row.items()
            if k not in consumed and not k.startswith("__index_level_")}


def _relift_example(row: Mapping, index: int, source: str, reward: str | None) -> Example:
    if "prompt" not in row:
        raise _fail(source, index, "prompt", "is required (relift schema)", sorted(row))
    messages = _messages(row["prompt"], source, index, "prompt")
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise _fail(source, index, "prompt", "must contain a user message with content",
                    [m["role"] for m in messages])

    rm = row.get("reward_model")
    if not isinstance(rm, Mapping):
        raise _fail(source, index, "reward_model", "must be a dict with 'ground_truth'", rm)
    ground_truth = _ground_truth(rm.get("ground_truth"), source, index,
                                 "reward_model.ground_truth")

    demonstration = None
    target = row.get("target")
    if target is not None and not (isinstance(target, (list, tuple)) and len(target) == 0):
        if not isinstance(target, (list, tuple)) or len(target) != 1:
            raise _fail(source, index, "target", "must be a list of exactly one assistant message",
                        target)
        (msg,) = _messages(target, source, index, "target")
        if msg["role"] != "assistant":
            raise _fail(source, index, "target[0].role", "must be 'assistant'", msg["role"])
        demonstration = msg["content"] or None

    data_source = _optional_str(row, "data_source", source, index)
    info = row.get("extra_info")
    if info is not None and not isinstance(info, Mapping):
        raise _fail(source, index, "extra_info", "must be a dict", info)
    # extra_info wins over a column of the same name.
    consumed = {"prompt", "reward_model", "target", "data_source", "extra_info"}
    extra = _other_columns(row, consumed)
    extra.update(info or {})
    return Example(index, messages, ground_truth, demonstration, data_source,
                   reward or _infer_reward(data_source, ground_truth), extra)


def _plain_example(row: Mapping, index: int, source: str, reward: str | None) -> Example:
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _fail(source, index, "question", "must be a non-empty string", question)
    ground_truth = _ground_truth(row.get("answer"), source, index, "answer")
    if "\n####" in ground_truth:
        # Raw GSM8K: the answer is a whole solution; grading against it would be silently wrong.
        raise _fail(source, index, "answer",
                    "must be the final answer, not a GSM8K solution ending in '#### N' "
                    "(convert it with `python -m relift_jax.data convert-gsm8k`)", ground_truth)
    demonstration = row.get("demonstration")
    if demonstration is not None and not isinstance(demonstration, str):
        raise _fail(source, index, "demonstration", "must be a string", demonstration)
    system = _optional_str(row, "system", source, index)
    data_source = _optional_str(row, "data_source", source, index)
    messages = ({"role": "system", "content": system},) if system else ()
    messages += ({"role": "user", "content": question},)
    consumed = {"question", "answer", "demonstration", "system", "data_source"}
    extra = _other_columns(row, consumed)
    return Example(index, messages, ground_truth, demonstration or None, data_source,
                   reward or _infer_reward(data_source, ground_truth), extra)


def detect_schema(row: Mapping) -> str:
    """"relift" if the row has a `prompt` column, "plain" if it has `question`.

    Raises:
        ValueError: if it has neither (callers wrap this into a DataError with file and row).
    """
    if "prompt" in row:
        return "relift"
    if "question" in row:
        return "plain"
    raise ValueError(f"cannot detect the schema: expected a 'prompt' (relift) or 'question' "
                     f"(plain) column, got columns {sorted(row)}")


def parse_row(row: Mapping, *, schema: str, index: int = 0, source: str = "<row>",
              reward: str | None = None) -> Example:
    """Validate one row and turn it into an Example.

    Args:
        row: a dict of column -> value (numpy arrays are accepted where lists are expected).
        schema: "relift", "plain" or "auto".
        index: the row index, stored in the Example and named in errors.
        source: the file name (or other origin) named in errors.
        reward: reward function name for this row; None to infer it from the row.

    Returns:
        The Example.

    Raises:
        DataError: if the row breaks the schema.
    """
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
    if not isinstance(row, Mapping):
        raise DataError(f"{source}: row {index}: must be a dict of columns, got {_short_repr(row)}")
    row = _plain(row)
    if schema == "auto":
        try:
            schema = detect_schema(row)
        except ValueError as e:
            raise DataError(f"{source}: row {index}: {e}") from None
    build = _relift_example if schema == "relift" else _plain_example
    return build(row, index, source, reward)


# ---------------------------------------------------------------------------------------------
# Sources: files and dataset folders
# ---------------------------------------------------------------------------------------------


def _read_jsonl(path: str, text: str) -> list[Any]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: row {len(rows)} (line {line_no}): invalid JSON: {e}") from None
    return rows


def read_rows(path: str) -> list[Any]:
    """Rows of a `.parquet`, `.jsonl` or `.json` file as plain Python values.

    A `.json` file may hold one JSON array of rows or be JSON lines (what `datasets` writes).
    Blank lines in JSON lines are skipped and do not count as rows.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq  # pyarrow is heavy; only parquet readers pay for it

        return pq.read_table(path).to_pylist()
    if ext not in (".jsonl", ".json"):
        raise DataError(f"{path}: unsupported file type {ext!r} (expected .parquet, .jsonl, .json)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if ext == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # not a single document: read it as JSON lines
        if isinstance(whole, list):
            return whole
        if whole is not None and not (isinstance(whole, dict) and "\n" not in text.strip()):
            # A lone one-line object is a one-row JSON lines file; anything else is not rows.
            raise DataError(f"{path}: a .json file must hold an array of rows or JSON lines, "
                            f"got a single {type(whole).__name__}")
    return _read_jsonl(path, text)


SPLIT_SEP = "::"
DEFAULT_SPLIT = "train"
# A folder holding (somewhere below it) one of these is read as a hub-layout dataset: the file
# types read above plus arrow; a folder of only text, csv or images is no data source here.
_FOLDER_DATA_EXTS = (".parquet", ".jsonl", ".json", ".arrow")


def split_data_spec(spec: str) -> tuple[str, str | None]:
    """`"PATH::SPLIT"` -> `("PATH", "SPLIT")`; `"PATH"` -> `("PATH", None)`.

    "::" appears in no Windows path (":" is reserved there except after a drive letter) and in
    practically no posix one; an existing path is still taken literally, so a file whose name
    does contain "::" stays readable.
    """
    if SPLIT_SEP not in spec or os.path.exists(spec):
        return spec, None
    path, split = spec.rsplit(SPLIT_SEP, 1)
    if not path or not split:
        raise DataError(f"{spec}: expected PATH or PATH{SPLIT_SEP}SPLIT with both parts non-empty")
    return path, split


@contextlib.contextmanager
def _quiet_datasets():
    """Silence `datasets` progress bars and info logging for one load, then restore them: a
    training log should not get a bar per split."""
    import datasets

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    try:
        yield datasets
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.utils.enable_progress_bars()


def _pick_split(splits: Mapping, path: str, split: str | None) -> tuple[Any, str]:
    name = split or DEFAULT_SPLIT
    if name not in splits:
        how = "" if split else f"; choose one with '{path}{SPLIT_SEP}SPLIT'"
        raise DataError(f"{path}: no split {name!r} (splits: {', '.join(sorted(splits))}){how}")
    return splits[name], f"{path}{SPLIT_SEP}{name}"


def _is_saved_to_disk(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    names = set(os.listdir(path))
    return "dataset_dict.json" in names or {"state.json", "dataset_info.json"} <= names


def _has_data_files(path: str) -> bool:
    for _, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .cache, .huggingface
        if any(f.lower().endswith(_FOLDER_DATA_EXTS) for f in files):
            return True
    return False


def read_folder_rows(path: str, split: str | None = None) -> tuple[list[Any], str]:
    """Rows of one split of a local dataset folder, read with `datasets`.

    Args:
        path: a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a folder
            in the Hugging Face hub layout (e.g. `data/train-00000-of-00001.parquet`, or `*.jsonl`
            files; a README.md dataset card with `configs:` is honoured).
        split: the split to read; None means "train" for folders with splits.

    Returns:
        `(rows, source)`: the rows as plain Python values, and the name errors should use
        (`PATH::SPLIT` for folders with splits, `PATH` for a saved single `Dataset`).

    Raises:
        DataError: a folder in neither layout, a missing split, or one `datasets` cannot read.
    """
    saved = _is_saved_to_disk(path)
    if not saved and not _has_data_files(path):
        raise DataError(f"{path}: not a dataset folder: expected a folder written by "
                        f"datasets' save_to_disk (dataset_info.json or dataset_dict.json) or "
                        f"data files ({', '.join(_FOLDER_DATA_EXTS)}) in the hub layout")
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory() as cache:
        # The rows become Python objects at once, so an arrow cache is worth nothing after this
        # call: a throwaway one leaves no state in ~/.cache and can never be stale. An absolute
        # path keeps a folder named like a packaged builder ("json", "parquet") local, and only
        # an existing local folder ever reaches `datasets`: nothing is looked up on the hub.
        try:
            if saved:
                loaded = datasets.load_from_disk(path)
            else:
                loaded = datasets.load_dataset(os.path.abspath(path), cache_dir=cache)
        except Exception as e:  # datasets raises many types; all mean "could not read it"
            cause = e.__cause__ or e
            first = (str(cause).strip().splitlines() or [""])[0]
            raise DataError(f"{path}: datasets could not load this folder: "
                            f"{type(cause).__name__}: {first}") from e
        if isinstance(loaded, datasets.DatasetDict):
            ds, source = _pick_split(loaded, path, split)
        elif split is not None:
            raise DataError(f"{path}: holds one dataset saved without splits; "
                            f"drop '{SPLIT_SEP}{split}'")
        else:
            ds, source = loaded, path
        return ds.to_list(), source


def read_source(spec: str) -> tuple[list[Any], str]:
    """Rows of a data file or of one split of a dataset folder (see `load_examples`).

    Returns:
        `(rows, source)`: the rows, and the name errors should use for them.
    """
    path, split = split_data_spec(spec)
    if os.path.isdir(path):
        return read_folder_rows(path, split)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder (expected a .parquet, .jsonl or "
                                f".json file, or a dataset folder)")
    if split is not None:
        raise DataError(f"{spec}: '{SPLIT_SEP}{split}' selects a split of a dataset folder, "
                        f"but {path} is a file")
    return read_rows(path), path


def load_examples(path: str, *, schema: str = "auto", reward: str | None = None) -> list[Example]:
    """Read and validate every row of a data file or of one split of a local dataset folder.

    Sources (all local; nothing is fetched from the Hugging Face hub):

    * a `.parquet`, `.jsonl` or `.json` file, read directly (values exactly as stored; JSON
      errors name the line);
    * a folder written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`, read
      with `datasets.load_from_disk`;
    * a folder in the hub layout (`data/train-00000-of-00001.parquet`, `*.jsonl`, ..., with or
      without a README.md dataset card), read with `datasets.load_dataset(folder)`.

    A folder with splits gives split "train" unless `path` names one as `FOLDER::SPLIT`, e.g.
    `data/gsm8k::test`. Folders go through arrow, which gives each column one type: numbers
    mixing ints and floats come back as floats (42 -> "42.0"), so store ground truths as strings.

    Args:
        path: the source, as above.
        schema: "relift", "plain", or "auto" (detected from the first row's columns, then applied
            to every row).
        reward: reward function name for every row; None to infer per row ("choice" for ARC /
            GPQA / other multiple-choice sources with letter answers, else "math").

    Returns:
        One Example per row, in source order (an empty list for a source without rows).

    Raises:
        DataError: on an unreadable file or folder, a missing split, or the first malformed row
            (named as `PATH: row I: field 'F': rule`, PATH being `FOLDER::SPLIT` for splits).
        FileNotFoundError: if `path` does not exist.
        ValueError: on an unknown `schema` or an empty `reward`.
    """
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
    if reward is not None and (not isinstance(reward, str) or not reward):
        raise ValueError(f"reward must be None or a non-empty string, got {reward!r}")
    rows, source = read_source(path)
    if rows and schema == "auto":
        first = rows[0]
        if not isinstance(first, Mapping):
            raise DataError(f"{source}: row 0: must be a dict of columns, got {_short_repr(first)}")
        try:
            schema = detect_schema(first)
        except ValueError as e:
            raise DataError(f"{source}: row 0: {e}") from None
    return [parse_row(row, schema=schema, index=i, source=source, reward=reward)
            for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def render_prompt(tokenizer: Any, messages: Sequence[Mapping], *, keep_system_prompt: bool = True,
                  think_prefix: bool = True) -> str:
    """The text the policy continues: chat template with the generation prompt.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: chat messages.
        keep_system_prompt: False drops system messages (the evaluation protocol removes them).
        think_prefix: append "<think>\\n", as the official ReLIFT generation prompt ends with it;
            not appended twice if the template already ends with it.

    Returns:
        The prompt text.
    """
    msgs = [dict(m) for m in messages if keep_system_prompt or m.get("role") != "system"]
    if not msgs:
        raise ValueError("no messages left to render (only system messages, which were dropped)")
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if think_prefix and not text.endswith(THINK_PREFIX):
        text += THINK_PREFIX
    return text


def encode_prompts(tokenizer: Any, examples: Sequence[Example], *, max_prompt_len: int,
                   keep_system_prompt: bool = True, think_prefix: bool = True,
                   on_overflow: str = "drop") -> EncodedPrompts:
    """Render and tokenise prompts, leaving out those longer than `max_prompt_len`.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        examples: the examples to encode.
        max_prompt_len: the most prompt tokens allowed.
        keep_system_prompt, think_prefix: as in `render_prompt`.
        on_overflow: "drop" (count and skip over-long prompts) or "raise" (DataError).

    Returns:
        EncodedPrompts.
    """
    if on_overflow not in OVERFLOW_MODES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_MODES}, got {on_overflow!r}")
    if not isinstance(max_prompt_len, int) or max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be a positive int, got {max_prompt_len!r}")
    if not examples:
        return EncodedPrompts([], [], 0)
    texts = [render_prompt(tokenizer, ex.messages, keep_system_prompt=keep_system_prompt,
                           think_prefix=think_prefix) for ex in examples]
    # The chat template already holds whatever BOS the model wants; special tokens would double it.
    all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids, kept = [], []
    for pos, (ex, toks) in enumerate(zip(examples, all_ids)):
        if len(toks) > max_prompt_len:
            if on_overflow == "raise":
                raise DataError(f"row {ex.index} (example {pos}, data_source {ex.data_source!r}): "
                                f"prompt is {len(toks)} tokens, longer than max_prompt_len "
                                f"{max_prompt_len}")
            continue
        ids.append([int(t) for t in toks])
        kept.append(pos)
    return EncodedPrompts(ids, kept, len(examples) - len(kept))


def encode_demonstration(tokenizer: Any, text: str, *, max_len: int, eos_id: int,
                         think_prefix: bool = True) -> tuple[list[int], bool]:
    """Token ids of a demonstration used as the SFT response.

    A demonstration that does not fit with its EOS is cut to `max_len` tokens and gets no EOS: the
    official code writes EOS over the last kept token, teaching the model to stop mid-thought.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the demonstration.
        max_len: the most response tokens allowed (EOS included).
        eos_id: the end-of-sequence token id.
        think_prefix: the prompt ends with "<think>\\n", so a leading "<think>\\n" (or "<think>")
            is stripped from the demonstration rather than repeated.

    Returns:
        (ids, truncated): ids end with `eos_id` iff truncated is False; len(ids) <= max_len.
    """
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if think_prefix:
        for prefix in (THINK_PREFIX, "<think>"):
            if text.startswith(prefix):
                text = text[len(prefix):]
                break
    tokens = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if len(tokens) + 1 <= max_len:
        return tokens + [int(eos_id)], False
    return tokens[:max_len], True


# ---------------------------------------------------------------------------------------------
# Cursor
# ---------------------------------------------------------------------------------------------


class DataCursor:
    """Endless, resumable walk over example positions, a fresh seeded permutation per epoch.

    The permutation of epoch e is `np.random.default_rng([seed, e]).permutation(num_examples)`, so
    it depends only on (seed, epoch) and restoring needs no RNG state. `epoch` is the epoch the
    next position comes from: after exactly one pass, `epoch == 1` and `position == 0`.
    """

    def __init__(self, num_examples: int, *, seed: int, shuffle: bool = True):
        if not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def examples_seen(self) -> int:
        """Positions handed out so far, over all epochs."""
        return self.epoch * self.num_examples + self.position

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order = rng.permutation(self.num_examples)
            else:
                self._order = np.arange(self.num_examples)
            self._order_epoch = self.epoch
        return self._order

    def next(self, n: int) -> list[int]:
        """The next `n` example positions, continuing into the next epoch when one runs out."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        out: list[int] = []
        while len(out) < n:
            order = self._epoch_order()
            take = min(n - len(out), self.num_examples - self.position)
            out.extend(int(i) for i in order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_examples:
                self.epoch += 1
                self.position = 0
        return out

    def state(self) -> dict:
        """JSON-serialisable state; `restore` of it continues the exact same sequence."""
        return {"num_examples": self.num_examples, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "position": self.position,
                "examples_seen": self.examples_seen}

    def restore(self, state: Mapping) -> None:
        """Continue from `state`. The dataset size, seed and shuffle flag must match this
        cursor's, since with any other value the continuation would silently differ."""
        for key in ("num_examples", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cursor state has {key}={state[key]!r} but this cursor has "
                                 f"{key}={getattr(self, key)!r}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_examples:
            raise ValueError(f"cursor state out of range: epoch {epoch}, position {position} "
                             f"(num_examples {self.num_examples})")
        seen = epoch * self.num_examples + position
        if "examples_seen" in state and state["examples_seen"] != seen:
            raise ValueError(f"cursor state is inconsistent: examples_seen "
                             f"{state['examples_seen']} != epoch * num_examples + position")
        self.epoch, self.position = epoch, position


# ---------------------------------------------------------------------------------------------
# GSM8K conversion
# ---------------------------------------------------------------------------------------------


def _gsm8k_row(raw: Any, i: int, src: str, strip_calculator: bool) -> dict:
    if not isinstance(raw, Mapping):
        raise DataError(f"{src}: row {i}: must be a JSON object, got {_short_repr(raw)}")
    question, answer = raw.get("question"), raw.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise _fail(src, i, "question", "must be a non-empty string", question)
    if not isinstance(answer, str) or "####" not in answer:
        raise _fail(src, i, "answer", "must be a solution string ending in '#### <answer>'", answer)
    steps, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")  # "1,000" -> "1000": thousands separators only
    if not final:
        raise _fail(src, i, "answer", "must have a final answer after '####'", answer)
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
        raw_rows = _read_jsonl(src, f.read())
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


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: `python -m relift_jax.data convert-gsm8k SRC DST [--limit N]`."""
    parser = argparse.ArgumentParser(prog="python -m relift_jax.data",
                                     description="relift_jax data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    gsm = sub.add_parser("convert-gsm8k", help="openai grade-school-math jsonl -> relift schema")
    gsm.add_argument("src", help="input jsonl (question, answer ending in '#### N')")
    gsm.add_argument("dst", help="output .jsonl or .parquet")
    gsm.add_argument("--limit", type=int, default=None, help="convert only the first N rows")
    gsm.add_argument("--keep-calculator", action="store_true",
                     help="keep the <<a*b=c>> calculator annotations in the demonstrations")
    args = parser.parse_args(argv)
    n = convert_gsm8k(args.src, args.dst, strip_calculator=not args.keep_calculator,
                      limit=args.limit)
    print(f"wrote {n} rows to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
