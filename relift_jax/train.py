"""`run(run_dir, configs)`: one training run, top to bottom (mesh, set-up, resume, loop, export).

Takes plain configs (`relift_jax.config.RunConfig`); gin lives in `main.py` only. Step metrics are
fetched one iteration late so the device never waits for a scalar, and every fetched value is checked:
a non-finite loss or gradient norm stops the run before anything is saved over the last good
checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from relift_jax import build, checkpoint, metrics, rollout, rollout_policy, sharding
from relift_jax.config import RunConfig
from relift_jax.controller import Controller
from relift_jax.heldout import HeldOut
from relift_jax.reward import ProcessShareScorer, RewardScorer

# A non-finite value of any of these stops the run.
WATCHED = ("rl/loss", "rl/grad_norm", "sft/loss", "sft/grad_norm")
# Shown on the progress bar.
SHOWN = ("rollout/reward_mean", "buffer/size", "rl/loss", "sft/loss", "eval/heldout/accuracy")


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm became NaN or infinite; the message says where."""


def check_finite(iteration: int, m: dict[str, float], last_checkpoint: int | None) -> None:
    for key in WATCHED:
        if key in m and not math.isfinite(m[key]):
            kind = key.split("/")[0]
            counts = ", ".join(f"{m[f'{kind}/{c}']:.0f} {c[4:]}" for c in ("num_tokens", "num_seqs")
                               if f"{kind}/{c}" in m)
            kept = ("no checkpoint was written" if last_checkpoint is None else
                    f"the last good checkpoint (iteration {last_checkpoint}) is kept")
            raise NonFiniteError(f"iteration {iteration}: {key} = {m[key]} in the {kind.upper()} "
                                 f"step (batch: {counts}); stopping, {kept}")


def run(run_dir: str, configs: RunConfig, *, stop_after: int | None = None,
        operative_gin: str | None = None) -> dict:
    """Trains; returns the final held-out summary.

    Args:
      run_dir: TensorBoard events, checkpoints, exports and the operative config go here. A run
        directory with a checkpoint resumes from it (TrainConfig.resume).
      configs: every setting of the run.
      stop_after: end this process after that many iterations (for tests of resumption).
      operative_gin: the gin text that produced `configs`, saved with the run.
    """
    mesh = sharding.make_mesh(configs.mesh)
    with jax.set_mesh(mesh):  # for this run only: a second run in the same process starts clean
        r = _set_up(run_dir, configs, operative_gin, mesh)
        try:
            _resume(r)
            base_counts = (r.held.bucket_counts(r.state.params, "start")
                           if configs.train.bucket_samples and r.held else None)
            last_eval = _loop(r, stop_after)
            summary = _finish(r, base_counts)
            summary["eval"] = last_eval
        finally:
            r.close()
    metrics.plot_curves(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "curves.png"),
                        ("rollout/reward_mean", "eval/heldout/avg@1", "buffer/size",
                         "buffer/sft_fired", "rl/entropy", "rollout/response_len_mean"))
    return summary


@dataclasses.dataclass
class _Run:
    """What the loop works with: built once by `_set_up`."""

    run_dir: str
    c: RunConfig
    cfg: Any                 # model.ModelConfig
    tok: Any
    state: Any               # train_step.TrainState
    ctl: Controller
    held: HeldOut
    scorer: RewardScorer
    writer: metrics.MetricsWriter
    ckpt: checkpoint.Checkpointer

    def close(self) -> None:
        self.writer.close()
        self.ckpt.close()
        self.scorer.close()


def _set_up(run_dir: str, c: RunConfig, operative_gin: str | None, mesh) -> _Run:
    """Model, data (validated before any compilation), state, steps, rollouts, held-out, logs."""
    os.makedirs(run_dir, exist_ok=True)
    if operative_gin is not None and jax.process_index() == 0:
        with open(os.path.join(run_dir, "operative_config.gin"), "w") as f:
            f.write(operative_gin)
    cfg, params, tok, model_dir = build.load_model(c.model, build.param_shardings_for(mesh))
    d = build.load_data(c, tok, run_dir)
    state, rl_tx, sft_tx = build.train_state(c, params)
    steps = build.make_steps(c, cfg, state, rl_tx, sft_tx, tok, mesh)
    stops = rollout_policy.stop_ids(tok, model_dir)
    scorer = ProcessShareScorer(RewardScorer(  # multi-host: each process grades its share
        c.train.reward, num_workers=c.train.reward_workers, timeout_s=c.train.reward_timeout_s,
        require_think_close=c.train.require_think_close))
    # One jitted training forward serves the policy's log-probs and the frozen reference's.
    logprobs_fn = rollout.make_logprobs_fn(cfg, c.model.logits_chunk_len, mesh)
    ref_fn = (functools.partial(logprobs_fn, jax.tree.map(jnp.copy, params))
              if c.rl.kl_coef > 0 else None)  # a frozen copy of the start policy, only when used
    demos = (build.make_teacher_demos(c, run_dir, d.examples, tok, scorer, mesh)
             if c.sft.demo_source == "teacher" else None)  # None: the dataset's column
    ctl = Controller(questions=d.questions, train=c.train, rollout=c.rollout, rl=c.rl, sft=c.sft,
                     packing=steps.packing, rl_step=steps.rl, sft_step=steps.sft,
                     sample_fn=rollout.make_sample_fn(cfg, c.rollout, stops, tok.pad_token_id, mesh),
                     score_fn=rollout.make_score_fn(tok, scorer, stops, c.train.reward),
                     ref_logprobs_fn=ref_fn, shuffle=c.data.shuffle,
                     logprobs_fn=logprobs_fn, demos=demos)
    writer = metrics.MetricsWriter(run_dir)
    held = HeldOut(run_dir=run_dir, model_cfg=cfg, tokenizer=tok, examples=d.heldout, train=c.train,
                   rollout=c.rollout, scorer=scorer, stop_ids=stops, mesh=mesh, writer=writer,
                   layout=rollout.DecodeLayout(cfg, mesh, c.rollout.decode_tensor,
                                                 c.rollout.decode_attention))
    writer.scalars(0, {"data/train_questions": len(d.questions),
                       "data/with_demonstration": len(ctl.demo_ids),
                       "data/dropped_long_prompts": d.dropped})
    return _Run(run_dir, c, cfg, tok, state, ctl, held, scorer, writer,
                checkpoint.Checkpointer(run_dir, keep=c.train.keep_checkpoints))


def _resume(r: _Run) -> None:
    """Continues from the run directory's latest checkpoint, if any (TrainConfig.resume)."""
    latest = r.ckpt.latest() if r.c.train.resume else None
    if latest is None:
        return
    r.state, saved = r.ckpt.restore(latest, r.state)
    r.ctl.load_state_dict(saved["controller"])
    r.held.best = saved["best"]
    print(f"resumed from {r.ckpt.dir}/{latest} (iteration {r.ctl.iteration})")


def _fetch(r: _Run, it: int, m_device: dict) -> dict[str, float]:
    """One iteration's metrics to the host, checked for non-finite losses and gradient norms."""
    m = {k: float(v) for k, v in jax.device_get(m_device).items()}
    check_finite(it, m, r.ckpt.latest())
    return m


def _loop(r: _Run, stop_after: int | None) -> dict[str, float]:
    """The iterations; returns the last evaluation's scalars."""
    t, ctl = r.c.train, r.ctl
    end = t.iterations if stop_after is None else min(t.iterations, ctl.iteration + stop_after)
    bar = tqdm(total=t.iterations, initial=ctl.iteration, desc=t.mode, dynamic_ncols=True,
               disable=jax.process_index() != 0)

    def write(it: int, m: dict[str, float]) -> None:
        r.writer.scalars(it, m)
        bar.set_postfix({k.split("/")[-1]: f"{m[k]:.3g}" for k in SHOWN if k in m})

    if ctl.iteration == 0 and t.eval_every and r.held:  # the starting point of every eval curve
        r.writer.scalars(0, r.held.curve_point(r.state.params, 0))
    pending: tuple[int, dict] | None = None  # the last iteration's metrics, still on the device
    last_eval: dict[str, float] = {}
    while ctl.iteration < end:
        t0 = time.perf_counter()
        r.state, m = ctl.step(r.state)
        it = ctl.iteration  # iterations done
        sharding.check_same_on_every_process(  # multi-host: every decision made the same everywhere
            f"iteration {it}: the controller's state (buffer, data cursor, counters)",
            ctl.state_dict())
        m.update({"perf/iteration_s": time.perf_counter() - t0,
                  "perf/reward_timeouts": r.scorer.num_timeouts})
        if pending is not None:  # the previous iteration's scalars: long done on the device
            write(pending[0], _fetch(r, *pending))
        pending = (it, m)
        evaluate_now = t.eval_every and it % t.eval_every == 0 or it == t.iterations
        save_now = t.save_every and it % t.save_every == 0 or it == t.iterations
        if evaluate_now or save_now:  # never evaluate, export or save an unchecked state
            m, pending = _fetch(r, it, m), None
            if evaluate_now:
                last_eval = r.held.curve_point(r.state.params, it)
                r.held.maybe_export_best(r.state.params, it, last_eval)
                m.update(last_eval)
            write(it, m)
            if save_now:
                r.ckpt.save(it, r.state, {"controller": ctl.state_dict(), "best": r.held.best})
            r.writer.flush()
        bar.update(1)
    if pending is not None:
        write(pending[0], _fetch(r, *pending))
    bar.close()
    return last_eval


def _finish(r: _Run, base_counts) -> dict:
    """At the last iteration: the final export and the start-vs-final bucket table."""
    run_dir, c, ctl, held, state = r.run_dir, r.c, r.ctl, r.held, r.state
    summary: dict[str, Any] = {"iterations": ctl.iteration, "best": held.best}
    if ctl.iteration < c.train.iterations:
        return summary
    checkpoint.export_hf(r.cfg, state.params, os.path.join(run_dir, "export", "final"),
                         tokenizer=r.tok, info={"iteration": ctl.iteration})
    if base_counts is None:
        return summary
    rows, table = held.bucket_table(base_counts, state.params)
    summary.update(buckets=rows, counters=ctl.counters, demos_used=len(ctl.demos_used),
                   demos_used_frac=len(ctl.demos_used) / len(ctl.q))
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "summary.md"), "w") as f:
            f.write(table)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(f"\n{c.train.mode}: held-out accuracy, {c.train.bucket_samples} samples per "
              f"question (start = the policy before training)\n\n{table}")
    return summary
