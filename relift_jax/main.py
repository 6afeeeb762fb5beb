"""Entry point: `python -m relift_jax.main --gin_file=A.gin [--gin_file=B.gin] [--gin.NAME=VALUE ...]
[--gin_search_paths=DIR,DIR] [--run_dir=PATH] [multi-host flags]`.

Multi-host (one process per host, every process runs the same command): on a Cloud TPU VM pass
`--distributed` (or set RELIFT_DISTRIBUTED=1) and JAX reads the coordinator from the TPU metadata;
elsewhere (GPU hosts, CPU tests) pass `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`. CPU processes talk through gloo.

The only place (with the evaluate CLI, which calls `parse_gin` here) that reads gin. t5x-style: gin
files are repeatable, `--gin.X=Y` flags become bindings applied after the files, `--run_dir` binds the
`RUN_DIR` macro. Gin builds the plain config dataclasses of `relift_jax.config` once; the library
(`train.run(run_dir, configs)`) never sees gin. A configuration error (unknown binding, failed
validation, missing model folder) prints one line and exits with status 2, before any work.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback
from typing import Any, Sequence

import gin

from relift_jax.config import (ConfigError, DataConfig, ModelLoadConfig, RLConfig, RolloutConfig,
                               RunConfig, SFTConfig, TeacherConfig, TrainConfig)
from relift_jax.sharding import MeshConfig


def run(run_dir: str | None = None, stop_after: int | None = None) -> dict:
    """The gin-visible `run` (bind `run.run_dir`, `run.stop_after`); returns its arguments.

    stop_after: end this process after that many iterations (for tests of resumption).
    """
    return {"run_dir": run_dir, "stop_after": stop_after}


_CONFIG_CLASSES = (MeshConfig, ModelLoadConfig, DataConfig, TrainConfig, RolloutConfig, RLConfig,
                   SFTConfig, TeacherConfig)
_REGISTERED: dict[Any, Any] = {}  # class or function -> its gin wrapper (gin registers a name once)
_SEARCH_PATHS: list[str] = []


def _register() -> None:
    if _REGISTERED:
        return
    from relift_jax.evaluate import EvalSettings
    for cls in (*_CONFIG_CLASSES, EvalSettings):
        _REGISTERED[cls] = gin.external_configurable(cls, module=cls.__module__)
    _REGISTERED[run] = gin.external_configurable(run, name="run", module="relift_jax.train")


class _QuietGinSearch(logging.Filter):
    """gin logs an ERROR for every search-path candidate it tries before the one that exists."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found:")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
    """Clears gin, then parses files and bindings; a bad binding raises ConfigError naming it."""
    _register()
    gin.clear_config()
    logging.getLogger().addFilter(_QuietGinSearch())
    here = os.path.dirname(os.path.abspath(__file__))
    for path in [*search_paths, os.getcwd(), os.path.join(os.path.dirname(here), "gin")]:
        if path and path not in _SEARCH_PATHS:
            _SEARCH_PATHS.append(path)
            gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
    except (ValueError, KeyError, IOError, SyntaxError) as e:
        raise ConfigError(f"gin configuration error: {_one_line(e)}") from None


def configured(cls_or_fn: Any) -> Any:
    """`cls()` with the parsed gin bindings applied; a failed validation raises ConfigError."""
    try:
        return _REGISTERED[cls_or_fn]()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"configuration error: {_one_line(e)}") from None


def configured_from(cls_or_fn: Any, gin_files: Sequence[str], bindings: Sequence[str],
                    search_paths: Sequence[str] = ()) -> Any:
    """Parse, build one configurable, clear gin again (the evaluate CLI's EvalSettings)."""
    try:
        parse_gin(gin_files, bindings, search_paths)
        return configured(cls_or_fn)
    finally:
        gin.clear_config()


@dataclasses.dataclass(frozen=True)
class Job:
    """A parsed training job: where it goes, what it runs, and the gin text that produced it."""

    run_dir: str
    configs: RunConfig
    operative_gin: str
    stop_after: int | None = None


def load_job(gin_files: Sequence[str], bindings: Sequence[str] = (), *,
             run_dir: str | None = None, search_paths: Sequence[str] = ()) -> Job:
    """gin files + bindings -> a Job of plain configs; gin is cleared again before returning."""
    bindings = list(bindings) + ([f"RUN_DIR = {run_dir!r}"] if run_dir else [])
    try:
        parse_gin(gin_files, bindings, search_paths)
        args = configured(run)
        configs = RunConfig(model=configured(ModelLoadConfig), data=configured(DataConfig),
                            train=configured(TrainConfig), rollout=configured(RolloutConfig),
                            rl=configured(RLConfig), sft=configured(SFTConfig),
                            mesh=configured(MeshConfig), teacher=configured(TeacherConfig))
        operative = gin.operative_config_str()
    finally:
        # The bindings belong to this job: nothing built later in this process may see them.
        gin.clear_config()
    if not args["run_dir"]:
        raise ConfigError("run.run_dir: required (pass --run_dir=PATH or bind run.run_dir)")
    if "://" in args["run_dir"]:
        raise ConfigError(f"run.run_dir = {args['run_dir']!r}: a URL is not a folder; relift_jax "
                          f"writes through the file system: mount the bucket (gcsfuse, as "
                          f"tpu/stage.sh does) and pass its folder, e.g. /gcs/BUCKET/runs/NAME")
    return Job(args["run_dir"], configs, operative, args["stop_after"])


def _build_if_absent(name: str, path: str | None, build_gin: str | None,
                     build_run_dir: str | None) -> None:
    """Runs the recipe `build_gin` (in this process) when the model folder `path` is absent."""
    from relift_jax import build
    if path is None or os.path.exists(path) or not build_gin:
        return
    recipe = load_job([build_gin], run_dir=build_run_dir)
    build.check_model_path(recipe.configs.model)
    print(f"{path} is absent: building it with --gin_file={build_gin}", flush=True)
    run_job(recipe)
    if not os.path.exists(path):
        raise ConfigError(f"{name}.build_gin = {build_gin!r} ran but did not create "
                          f"{name}.path = {path!r}")


def run_job(job: Job) -> dict:
    """Builds the base model (and the teacher) first when the job says how (the toy recipes), then
    trains."""
    from relift_jax import build, train
    m, t = job.configs.model, job.configs.teacher
    teacher = job.configs.sft.demo_source == "teacher"
    if teacher and not t.build_gin:
        build.check_teacher_path(t)  # before any work
    _build_if_absent("ModelLoadConfig", m.path, m.build_gin, m.build_run_dir)
    build.check_model_path(m)
    if teacher:
        _build_if_absent("TeacherConfig", t.path, t.build_gin, t.build_run_dir)
        build.check_teacher_path(t)
    return train.run(job.run_dir, job.configs, stop_after=job.stop_after,
                     operative_gin=job.operative_gin)


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m relift_jax.main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    p.add_argument("--gin_search_paths", default="", help="comma-separated folders for gin files")
    p.add_argument("--run_dir", default=None, help="run directory (binds the RUN_DIR macro)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host from the environment (TPU metadata); same as RELIFT_DISTRIBUTED=1")
    p.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
    p.add_argument("--num_processes", type=int, default=None, help="number of processes")
    p.add_argument("--process_id", type=int, default=None, help="this process, 0..N-1")
    p.add_argument("--initialization_timeout_s", type=int, default=300,
                   help="how long to wait for every process to join")
    p.add_argument("--heartbeat_timeout_s", type=int, default=30,
                   help="a process not heard from for this long is dead: the others exit non-zero")
    args, rest = p.parse_known_args(argv)
    bindings = []
    for a in rest:
        if not a.startswith("--gin."):
            p.error(f"unrecognised argument {a!r}")
        name, eq, value = a[len("--gin."):].partition("=")
        if not eq:
            p.error(f"{a!r}: a gin binding needs --gin.NAME=VALUE")
        bindings.append(f"{name} = {value}")
    if not args.gin_file:
        p.error("give at least one --gin_file (for example gin/toy/relift.gin)")
    explicit = [args.coordinator_address, args.num_processes, args.process_id]
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        p.error("--coordinator_address, --num_processes and --process_id go together")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        p.error(f"--process_id={args.process_id}: must be in [0, {args.num_processes})")
    args.gin_bindings = bindings
    return args


def initialize_distributed(args: argparse.Namespace) -> bool:
    """Joins the processes of a multi-host run; False (and nothing done) for a single process.

    Every process then sees the global device list; `jax.distributed` exits a process whose peer
    died (its heartbeat times out) instead of letting a collective wait forever.
    """
    auto = args.distributed or os.environ.get("RELIFT_DISTRIBUTED") == "1"
    if args.coordinator_address is None and not auto:
        return False
    import jax
    # Only the CPU backend reads this (GPU and TPU have their own collectives): CPU processes of
    # one run need it to run a cross-process collective at all.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator_address is None:
        jax.distributed.initialize(initialization_timeout=args.initialization_timeout_s,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout_s)
    else:
        jax.distributed.initialize(args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id,
                                   initialization_timeout=args.initialization_timeout_s,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout_s)
    return True


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    multi = initialize_distributed(args)
    try:
        job = load_job(args.gin_file, args.gin_bindings, run_dir=args.run_dir,
                       search_paths=[p for p in args.gin_search_paths.split(",") if p])
        return run_job(job)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        _exit(2, multi)
    except (Exception, KeyboardInterrupt):
        if not multi:
            raise
        traceback.print_exc()
        _exit(1, multi)


def _exit(status: int, multi: bool) -> None:
    """Exits; a process of a multi-host run skips the distributed shutdown barrier.

    The barrier waits for every peer, and a peer still inside a collective never arrives: the failed
    process would hang, its heartbeats would go on, and so would the peers' wait. Ending at once
    stops the heartbeats, and every peer exits non-zero within the heartbeat timeout.
    """
    if not multi:
        raise SystemExit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
