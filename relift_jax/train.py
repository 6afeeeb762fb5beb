"""`run(run_dir, configs)`: one training run, top to bottom (mesh, set-up, resume, loop, export).

Takes plain configs (`relift_jax.config.RunConfig`); gin lives in `main.py` only. Step metrics are
fetched one iteration late so the device never waits for a scalar, and every fetched value is checked:
a non-finite loss or gradient norm stops the run before anything is saved over the last good
checkpoint.
"""
from __future__ import annotations

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
from relift_jax.reward import RewardScorer

# A non-finite value of any of these stops the run.
WATCHED = ("rl/loss", "rl/grad_norm", "sft/loss", "sft/grad_norm")


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
        return _train(run_dir, configs, stop_after, operative_gin, mesh)


def _train(run_dir: str, c: RunConfig, stop_after, operative_gin, mesh) -> dict:
    os.makedirs(run_dir, exist_ok=True)
    if operative_gin is not None and jax.process_index() == 0:
        with open(os.path.join(run_dir, "operative_config.gin"), "w") as f:
            f.write(operative_gin)

    # --- set-up: model, data (validated before any compilation), state, steps
    cfg, params, tok, model_dir = build.load_model(c.model, build.param_shardings_for(mesh))
    d = build.load_data(c, tok, run_dir)
    state, rl_tx, sft_tx = build.train_state(c, params)
    steps = build.make_steps(c, cfg, state, rl_tx, sft_tx, tok, mesh)
    stops = rollout_policy.stop_ids(tok, model_dir)
    scorer = RewardScorer(c.train.reward, num_workers=c.train.reward_workers,
                          timeout_s=c.train.reward_timeout_s,
                          require_think_close=c.train.require_think_close)
    ref_fn = (rollout.make_ref_logprobs_fn(cfg, jax.tree.map(jnp.copy, params))
              if c.rl.kl_coef > 0 else None)  # a frozen copy of the start policy, only when used
    ctl = Controller(questions=d.questions, train=c.train, rollout=c.rollout, rl=c.rl, sft=c.sft,
                     packing=steps.packing, rl_step=steps.rl, sft_step=steps.sft,
                     sample_fn=rollout.make_sample_fn(cfg, c.rollout, stops, tok.pad_token_id, mesh),
                     score_fn=rollout.make_score_fn(tok, scorer, stops, c.train.reward),
                     ref_logprobs_fn=ref_fn, shuffle=c.data.shuffle)
    writer = metrics.MetricsWriter(run_dir)
    held = HeldOut(run_dir=run_dir, model_cfg=cfg, tokenizer=tok, examples=d.heldout, train=c.train,
                   rollout=c.rollout, scorer=scorer, stop_ids=stops, mesh=mesh, writer=writer)

    # --- checkpoint: resume when the run directory has one
    ckpt = checkpoint.Checkpointer(run_dir, keep=c.train.keep_checkpoints)
    latest = ckpt.latest() if c.train.resume else None
    if latest is not None:
        state, saved = ckpt.restore(latest, state)
        ctl.load_state_dict(saved["controller"])
        held.best = saved["best"]
        print(f"resumed from {ckpt.dir}/{latest} (iteration {ctl.iteration})")
    writer.scalars(ctl.iteration, {"data/train_questions": len(d.questions),
                                   "data/with_demonstration": len(ctl.demo_ids),
                                   "data/dropped_long_prompts": d.dropped})
    base_counts = (held.bucket_counts(state.params, "start")
                   if c.train.bucket_samples and held else None)

    # --- the loop
    t = c.train
    end = t.iterations if stop_after is None else min(t.iterations, ctl.iteration + stop_after)
    bar = tqdm(total=t.iterations, initial=ctl.iteration, desc=t.mode, dynamic_ncols=True,
               disable=jax.process_index() != 0)
    pending: tuple[int, dict] | None = None  # the last iteration's metrics, still on the device
    last_eval: dict[str, float] = {}

    def fetch(p) -> dict[str, float]:  # one iteration's metrics to the host, checked
        m = {k: float(v) for k, v in jax.device_get(p[1]).items()}
        check_finite(p[0], m, ckpt.latest())
        return m

    def write(it: int, m: dict[str, float]) -> None:
        writer.scalars(it, m)
        bar.set_postfix({k.split("/")[-1]: f"{m[k]:.3g}" for k in (
            "rollout/reward_mean", "buffer/size", "rl/loss", "sft/loss",
            "eval/heldout/accuracy") if k in m})

    if ctl.iteration == 0 and t.eval_every and held:  # the starting point of every eval curve
        writer.scalars(0, held.curve_point(state.params, 0))
    while ctl.iteration < end:
        t0 = time.perf_counter()
        state, m = ctl.step(state)
        it = ctl.iteration  # iterations done
        m.update({"perf/iteration_s": time.perf_counter() - t0,
                  "perf/reward_timeouts": scorer.num_timeouts})
        if pending is not None:  # the previous iteration's scalars: long done on the device
            write(pending[0], fetch(pending))
        pending = (it, m)
        evaluate_now = t.eval_every and it % t.eval_every == 0 or it == t.iterations
        save_now = t.save_every and it % t.save_every == 0 or it == t.iterations
        if evaluate_now or save_now:  # never evaluate, export or save an unchecked state
            m, pending = fetch(pending), None
            if evaluate_now:
                last_eval = held.curve_point(state.params, it)
                held.maybe_export_best(state.params, it, last_eval)
                m.update(last_eval)
            write(it, m)
            if save_now:
                ckpt.save(it, state, {"controller": ctl.state_dict(), "best": held.best})
            writer.flush()
        bar.update(1)
    if pending is not None:
        write(pending[0], fetch(pending))
    bar.close()
    summary = _finish(run_dir, c, ctl, held, state, cfg, tok, base_counts)
    summary["eval"] = last_eval
    writer.close()
    ckpt.close()
    scorer.close()
    metrics.plot_curves(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "curves.png"),
                        ("rollout/reward_mean", "eval/heldout/avg@1", "buffer/size",
                         "buffer/sft_fired", "rl/entropy", "rollout/response_len_mean"))
    return summary


def _finish(run_dir, c: RunConfig, ctl, held: HeldOut, state, cfg, tok, base_counts) -> dict:
    """At the last iteration: the final export and the start-vs-final bucket table."""
    summary: dict[str, Any] = {"iterations": ctl.iteration, "best": held.best}
    if ctl.iteration < c.train.iterations:
        return summary
    checkpoint.export_hf(cfg, state.params, os.path.join(run_dir, "export", "final"),
                         tokenizer=tok, info={"iteration": ctl.iteration})
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
