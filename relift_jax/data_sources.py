"""Local data sources -> rows: parquet / JSON lines files, and dataset folders read with `datasets`.

Also the error every data problem raises (`DataError`) and the helpers that word its messages, so
that an error names the source (file, or `FOLDER::SPLIT`), the row, the field and the rule.
Host-only: plain Python; `pyarrow` and `datasets` are imported only by the readers that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any


class DataError(ValueError):
    """A data file or row that breaks the schema; the message names file, row, field and rule."""


def short_repr(value: Any, limit: int = 120) -> str:
    """repr() cut to `limit` characters, so that an error on an 8k-token demonstration stays
    readable."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def row_error(source: str, row: int, field: str, rule: str, value: Any) -> DataError:
    """The error for one bad field: `SOURCE: row I: field 'F': RULE, got VALUE`."""
    return DataError(f"{source}: row {row}: field '{field}': {rule}, got {short_repr(value)}")


# ---------------------------------------------------------------------------------------------
# Files and dataset folders
# ---------------------------------------------------------------------------------------------


def parse_jsonl(path: str, text: str) -> list[Any]:
    """Rows of JSON lines text; blank lines are skipped, an invalid line names its line number."""
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
    return parse_jsonl(path, text)


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
