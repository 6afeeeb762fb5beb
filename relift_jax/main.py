"""Entry point: `python -m relift_jax.main --gin_file=A.gin [--gin_file=B.gin] [--gin.NAME=VALUE ...]
[--gin_search_paths=DIR,DIR] [--run_dir=PATH]`.

t5x-style: gin files are repeatable, `--gin.X=Y` flags become bindings applied after the files,
`--run_dir` binds the `RUN_DIR` macro. Unknown or misspelled bindings fail here, before any work.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import gin


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m relift_jax.main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    p.add_argument("--gin_search_paths", default="", help="comma-separated folders for gin files")
    p.add_argument("--run_dir", default=None, help="run directory (binds the RUN_DIR macro)")
    args, rest = p.parse_known_args(argv)
    bindings = []
    for a in rest:
        if not a.startswith("--gin."):
            p.error(f"unrecognised argument {a!r}")
        name, eq, value = a[len("--gin."):].partition("=")
        if not eq:
            p.error(f"{a!r}: a gin binding needs --gin.NAME=VALUE")
        bindings.append(f"{name} = {value}")
    args.gin_bindings = bindings
    return args


class _QuietGinSearch(logging.Filter):
    """gin logs an ERROR for every search-path candidate it tries before the one that exists."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found:")


def _default_search_paths() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return [os.getcwd(), os.path.join(os.path.dirname(here), "gin")]


def parse_gin(args: argparse.Namespace) -> None:
    """Registers the configurables, then parses files and bindings; errors name the binding."""
    from relift_jax import config, evaluate, train  # noqa: F401  (registers the configurables)

    logging.getLogger().addFilter(_QuietGinSearch())
    for path in [p for p in args.gin_search_paths.split(",") if p] + _default_search_paths():
        gin.add_config_file_search_path(path)
    bindings = list(args.gin_bindings)
    if args.run_dir:
        bindings.append(f"RUN_DIR = {args.run_dir!r}")
    try:
        gin.parse_config_files_and_bindings(args.gin_file, bindings, finalize_config=False)
    except (ValueError, KeyError, IOError) as e:
        raise SystemExit(f"gin configuration error: {e}") from None
    gin.finalize()


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    if not args.gin_file:
        raise SystemExit("give at least one --gin_file (for example gin/toy/relift.gin)")
    if os.environ.get("RELIFT_DISTRIBUTED") == "1":  # multi-host: one process per TPU host
        import jax
        jax.distributed.initialize()
    gin.clear_config()
    parse_gin(args)
    from relift_jax import train
    try:
        return train.run()
    except ValueError as e:
        if "REQUIRED" in str(e) or "gin" in str(e).lower():
            raise SystemExit(f"gin configuration error: {e}") from None
        raise
    finally:
        # The bindings belong to this run: a caller that goes on in the same process (a test,
        # a notebook) must not construct its configs with them.
        gin.clear_config()


if __name__ == "__main__":
    main()
