"""Benchmark evaluation: sample k responses per question, grade them, report avg@k and pass@k.

Used from the command line on a finished checkpoint and by the trainer on a held-out split (it calls
`evaluate()` with ready `Example` lists). The protocol (docs/relift.md): temperature 0.6,
top_p 1.0, up to 8192 new tokens, system prompt removed, generation prompt ending in
"<think>\\n", math-verify on the text after "</think>". Where a response stops and which of its
text is graded follow relift_jax.rollout_policy, as for RL rollouts.

The benchmarks live in relift_jax.benchmarks, the resumable responses.jsonl in relift_jax.records,
the metrics, summary and table (EvalResult) in relift_jax.eval_summary.

CLI: python -m relift_jax.evaluate --checkpoint=PATH [--benchmarks=aime24,math500] [--samples=N]
    [--max_new_tokens=N] [--limit=N] [--output_dir=DIR] [--gin_file=F ...] [--gin.X=Y ...]
    [--dtype=float32|bfloat16] [--batch_size=N] [--temperature=T] [--seed=S]

Shape key: N questions in a batch, G samples per question, B = N * G sampler rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from relift_jax import data, rollout_policy
from relift_jax.config import ConfigError
from relift_jax.benchmarks import BENCHMARKS, Question, check_benchmark_names, resolve_suites
from relift_jax.data import Example
from relift_jax.eval_summary import EvalResult, format_table, summarize
from relift_jax.records import (RecordStore, batch_seed, expected_rows, fingerprint,
                                plan_batches)

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
        decode_attention: the decode steps' attention, "xla" or "ragged" (the Pallas TPU kernel
            over each row's filled cache; RolloutConfig.decode_attention); None: the model
            config's own.
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
    decode_attention: str | None = None

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
        if self.decode_attention not in (None, "xla", "ragged"):
            raise ValueError(f"EvalSettings.decode_attention must be 'xla' or 'ragged', got "
                             f"{self.decode_attention!r}")
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


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(config: Any, params: Any, tokenizer: Any,
             suites: Mapping[str, Sequence[Example]] | Sequence[str], settings: EvalSettings,
             *, stop_ids: Sequence[int] | None = None, scorer: Any = None,
             output_dir: str | None = None, progress: bool = True, mesh: Any = None,
             generate_fn: Callable | None = None) -> EvalResult:
    """Sample, grade and aggregate.

    Args:
        config, params: the model (relift_jax.model).
        tokenizer: Hugging Face tokenizer with a chat template.
        suites: benchmark names (see relift_jax.benchmarks.BENCHMARKS) or {suite: Examples}.
        settings: EvalSettings.
        stop_ids: the ids that end a response, EOS first; None: rollout_policy.stop_ids(tokenizer)
            (pass rollout_policy.stop_ids(tokenizer, model_dir) where the model folder is known,
            so that its generation_config.json counts too).
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
    stops = _stop_ids(tokenizer, stop_ids)
    _check_scorer(scorer, settings)
    sample = _sampler(config, params, tokenizer, settings, stops, mesh, generate_fn)
    questions, prompt_ids, plans, dropped = _encode_and_plan(tokenizer, questions, settings)
    store, own_scorer, bar = RecordStore(output_dir), scorer is None, None
    try:
        records, finished = store.open(
            fingerprint(config, settings, questions, prompt_ids, plans, stops),
            expected_rows(questions, plans, settings))
        todo = {s: [(b, [questions[s][i] for i in pos], [prompt_ids[s][i] for i in pos])
                    for b, pos in enumerate(plan) if (s, b) not in finished]
                for s, plan in plans.items()}
        if own_scorer and any(todo.values()):  # a fully resumed run never starts reward workers
            from relift_jax.reward import RewardScorer

            scorer = RewardScorer(num_workers=settings.reward_workers,
                                  require_think_close=settings.require_think_close,
                                  timeout_s=settings.reward_timeout_s)
        timing = {"sampling_s": 0.0, "generated_tokens": 0, "batches_run": 0,
                  "batches_resumed": len(finished), "suites": {}}
        bar = _progress_bar(progress, total=sum(len(qs) for qs in questions.values()),
                            initial=sum(len(plans[s][b]) for s, b in finished))
        for suite, batches in todo.items():
            records += _run_suite(suite, batches, sample, tokenizer, stops, scorer, store,
                                  settings, timing, bar)
    finally:
        if bar is not None:
            bar.close()
        store.close()
        if own_scorer and scorer is not None:
            scorer.close()
    timing["reward_timeouts"] = int(getattr(scorer, "num_timeouts", 0))
    return _finish(questions, records, settings, dropped, timing, store)


def _stop_ids(tokenizer: Any, stop_ids: Sequence[int] | None) -> tuple[int, ...]:
    """The ids that end a response, EOS first: `stop_ids`, else rollout_policy's for the
    tokenizer."""
    stops = tuple(int(i) for i in (rollout_policy.stop_ids(tokenizer) if stop_ids is None
                                   else stop_ids))
    if not stops:
        raise ValueError("evaluate: stop_ids must name at least one token id (EOS first)")
    return stops


def _check_scorer(scorer: Any, settings: EvalSettings) -> None:
    """A given scorer must apply the same `</think>` format gate as the settings ask for."""
    want = settings.require_think_close
    if scorer is not None and getattr(scorer, "require_think_close", want) != want:
        raise ValueError(f"scorer.require_think_close={scorer.require_think_close} but "
                         f"EvalSettings.require_think_close={want}")


def _sampler(config: Any, params: Any, tokenizer: Any, settings: EvalSettings,
             stops: tuple[int, ...], mesh: Any, generate_fn: Callable | None) -> Callable:
    """`sample(prompts, seed=, num_samples=)`: generate_fn (default relift_jax.sampler.generate)
    with the model, the sampling rule and the stop ids bound."""
    if generate_fn is None:
        from relift_jax.sampler import generate as generate_fn
    if settings.decode_attention is not None:
        config = config.replace(decode_attention=settings.decode_attention)
    return functools.partial(
        generate_fn, config, params, max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
        eos_id=stops[0], stop_ids=list(stops[1:]), mesh=mesh,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0])


def _run_suite(suite: str, todo: Sequence[tuple[int, list[Question], list[list[int]]]],
               sample: Callable, tokenizer: Any, stops: tuple[int, ...], scorer: Any,
               store: RecordStore, settings: EvalSettings, timing: dict, bar: Any) -> list[dict]:
    """Sample, grade and store the unfinished batches (index, questions, prompts) of one suite."""
    g = settings.samples_for(suite)
    t = timing["suites"][suite] = {"sampling_s": 0.0, "generated_tokens": 0}
    records = []
    for b, batch_qs, prompts in todo:
        if bar is not None:
            bar.set_postfix_str(suite)
        start = time.perf_counter()
        out = sample(prompts, seed=batch_seed(settings.seed, suite, b), num_samples=g)
        elapsed = time.perf_counter() - start
        new = _batch_records(tokenizer, suite, b, batch_qs, g, out, stops, scorer)
        store.append(new)
        records += new
        tokens = sum(r["length"] for r in new)
        for d in (t, timing):
            d["sampling_s"] += elapsed
            d["generated_tokens"] += tokens
        timing["batches_run"] += 1
        if bar is not None:
            bar.update(len(batch_qs))
            tps = timing["generated_tokens"] / max(timing["sampling_s"], 1e-9)
            bar.set_postfix_str(f"{suite} {tps:.0f} tok/s")
    t["tokens_per_s"] = t["generated_tokens"] / t["sampling_s"] if t["sampling_s"] else None
    return records


def _finish(questions: Mapping[str, list[Question]], records: list[dict], settings: EvalSettings,
            dropped: Mapping[str, int], timing: dict, store: RecordStore) -> EvalResult:
    """Aggregate in a fixed order (a resumed run equals an uninterrupted one) and write the
    summaries. Sampling wall time includes compilation: the first batches of a shape are slower."""
    timing["tokens_per_s"] = (timing["generated_tokens"] / timing["sampling_s"]
                              if timing["sampling_s"] else None)
    order = {s: i for i, s in enumerate(questions)}
    records.sort(key=lambda r: (order[r["suite"]], r["question"], r["sample"]))
    summary, per_question = summarize(questions, records, settings, dropped)
    summary["timing"] = timing
    table = format_table(summary)
    store.write_summary(summary, table)
    return EvalResult(summary, table, records, per_question)


def _progress_bar(show: bool, total: int, initial: int) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="eval", unit="q")


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
                   out: Any, stops: Sequence[int], scorer: Any) -> list[dict]:
    """Decode and grade one batch; rows of `out` are question by question, g samples each."""
    n_rows = len(batch_qs) * g
    if len(out.tokens) != n_rows:
        raise RuntimeError(f"generate returned {len(out.tokens)} rows, expected {n_rows} "
                           f"({len(batch_qs)} questions x {g} samples)")
    texts = [rollout_policy.response_text(tokenizer, toks, stops) for toks in out.tokens]
    rows = [(q, s) for q in batch_qs for s in range(g)]
    scores = scorer.score(texts, [q.example.ground_truth for q, _ in rows],
                          [q.example.reward for q, _ in rows])
    return [{"suite": suite, "batch": batch, "question": q.qid, "sample": s,
             "data_source": q.example.data_source, "source_index": q.example.index,
             "response": text, "ground_truth": q.example.ground_truth, "reward": q.example.reward,
             "score": float(score), "length": int(length), "truncated": not bool(stopped)}
            for (q, s), text, score, length, stopped
            in zip(rows, texts, scores, out.lengths, out.stopped)]


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
    try:
        settings = _gin_settings(args.gin_file, bindings)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    overrides = {k: getattr(args, k) for k in ("max_new_tokens", "limit", "batch_size",
                                               "temperature", "seed", "samples")
                 if getattr(args, k) is not None}
    settings = dataclasses.replace(settings, **overrides)

    import jax.numpy as jnp

    from relift_jax import hf

    config, params = hf.load_checkpoint(model_dir, dtype=getattr(jnp, args.dtype))
    tokenizer = hf.load_tokenizer(model_dir)
    stops = rollout_policy.stop_ids(tokenizer, model_dir)
    print(f"evaluating {model_dir} on {', '.join(names)} -> {output_dir}", file=sys.stderr)
    result = evaluate(config, params, tokenizer, names, settings, stop_ids=stops,
                      output_dir=output_dir, progress=not args.no_progress)
    t = result.summary["timing"]
    print(result.table_md)
    tps = "-" if t["tokens_per_s"] is None else f"{t['tokens_per_s']:.0f}"
    print(f"{t['generated_tokens']} tokens in {t['sampling_s']:.1f} s of sampling ({tps} tok/s); "
          f"{t['batches_resumed']} batches resumed; results in {output_dir}")
    return 0


def _gin_settings(gin_files: Sequence[str], bindings: Sequence[str]) -> EvalSettings:
    """EvalSettings from gin files and `NAME.PARAM=VALUE` bindings, through main.py's parser (the
    one place that reads gin); leaves no bindings behind for a later in-process caller."""
    from relift_jax import main as entry
    return entry.configured_from(EvalSettings, gin_files, bindings)


if __name__ == "__main__":
    # Run the package module's main, not this __main__ copy, so that one EvalSettings class (the
    # one gin registers) is in play.
    from relift_jax.evaluate import main as _main

    sys.exit(_main())
