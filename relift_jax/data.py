"""Training and evaluation rows -> validated examples; the resumable cursor over them.

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

Where the parts live: reading files and folders in relift_jax.data_sources (with `DataError`);
prompt and demonstration token ids in relift_jax.encoding (`encode_prompts` and
`encode_demonstration` are also reachable here); the GSM8K converter in relift_jax.gsm8k, run by
this module's CLI: `python -m relift_jax.data convert-gsm8k SRC DST [--limit N]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from relift_jax.data_sources import DataError, read_source, row_error, short_repr
# Callers across the project use these as data.encode_prompts / data.encode_demonstration.
from relift_jax.encoding import encode_demonstration, encode_prompts  # noqa: F401
from relift_jax.gsm8k import convert_gsm8k

SCHEMAS = ("auto", "relift", "plain")

# Words in a data_source that mark a multiple-choice set whose answers are letters.
_CHOICE_SOURCE_RE = re.compile(r"(?<![a-z])arc(?![a-z])|gpqa")
_CHOICE_HINTS = ("mmlu", "choice", "mcq")
_LETTER_RE = re.compile(r"[A-J]")


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


# ---------------------------------------------------------------------------------------------
# Row validation
# ---------------------------------------------------------------------------------------------


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
            raise row_error(source, row, field, "must be a finite number", value)
        return str(value)
    raise row_error(source, row, field, "must be a non-empty string (or a number)", value)


def _optional_str(row: Mapping, key: str, source: str, index: int) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise row_error(source, index, key, "must be a string", value)
    return value


def _messages(value: Any, source: str, row: int, field: str) -> tuple[dict, ...]:
    """Validate a list of chat messages and return plain dicts holding only non-None keys (parquet
    struct columns fill keys that a message lacks with None)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise row_error(source, row, field, "must be a non-empty list of chat messages", value)
    out = []
    for j, msg in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(msg, Mapping):
            raise row_error(source, row, where,
                            "must be a message dict with 'role' and 'content'", msg)
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise row_error(source, row, f"{where}.role", "must be a non-empty string", role)
        if not isinstance(content, str):
            raise row_error(source, row, f"{where}.content", "must be a string", content)
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
        raise row_error(source, index, "prompt", "is required (relift schema)", sorted(row))
    messages = _messages(row["prompt"], source, index, "prompt")
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise row_error(source, index, "prompt", "must contain a user message with content",
                    [m["role"] for m in messages])

    rm = row.get("reward_model")
    if not isinstance(rm, Mapping):
        raise row_error(source, index, "reward_model", "must be a dict with 'ground_truth'", rm)
    ground_truth = _ground_truth(rm.get("ground_truth"), source, index,
                                 "reward_model.ground_truth")

    demonstration = None
    target = row.get("target")
    if target is not None and not (isinstance(target, (list, tuple)) and len(target) == 0):
        if not isinstance(target, (list, tuple)) or len(target) != 1:
            raise row_error(source, index, "target",
                            "must be a list of exactly one assistant message", target)
        (msg,) = _messages(target, source, index, "target")
        if msg["role"] != "assistant":
            raise row_error(source, index, "target[0].role", "must be 'assistant'", msg["role"])
        demonstration = msg["content"] or None

    data_source = _optional_str(row, "data_source", source, index)
    info = row.get("extra_info")
    if info is not None and not isinstance(info, Mapping):
        raise row_error(source, index, "extra_info", "must be a dict", info)
    # extra_info wins over a column of the same name.
    consumed = {"prompt", "reward_model", "target", "data_source", "extra_info"}
    extra = _other_columns(row, consumed)
    extra.update(info or {})
    return Example(index, messages, ground_truth, demonstration, data_source,
                   reward or _infer_reward(data_source, ground_truth), extra)


def _plain_example(row: Mapping, index: int, source: str, reward: str | None) -> Example:
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise row_error(source, index, "question", "must be a non-empty string", question)
    ground_truth = _ground_truth(row.get("answer"), source, index, "answer")
    if "\n####" in ground_truth:
        # Raw GSM8K: the answer is a whole solution; grading against it would be silently wrong.
        raise row_error(source, index, "answer",
                    "must be the final answer, not a GSM8K solution ending in '#### N' "
                    "(convert it with `python -m relift_jax.data convert-gsm8k`)", ground_truth)
    demonstration = row.get("demonstration")
    if demonstration is not None and not isinstance(demonstration, str):
        raise row_error(source, index, "demonstration", "must be a string", demonstration)
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
        raise DataError(f"{source}: row {index}: must be a dict of columns, got {short_repr(row)}")
    row = _plain(row)
    if schema == "auto":
        try:
            schema = detect_schema(row)
        except ValueError as e:
            raise DataError(f"{source}: row {index}: {e}") from None
    build = _relift_example if schema == "relift" else _plain_example
    return build(row, index, source, reward)


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
            raise DataError(f"{source}: row 0: must be a dict of columns, got {short_repr(first)}")
        try:
            schema = detect_schema(first)
        except ValueError as e:
            raise DataError(f"{source}: row 0: {e}") from None
    return [parse_row(row, schema=schema, index=i, source=source, reward=reward)
            for i, row in enumerate(rows)]


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
# Command line
# ---------------------------------------------------------------------------------------------


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
