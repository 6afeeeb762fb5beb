"""The host-side ReLIFT loop: sample, score, RL step(s), buffer the hardest questions, SFT when full.

One controller runs every method of the paper as a mode:
  relift            RL on every batch; questions whose G samples all fail (pass rate <= threshold) and
                    that have a demonstration enter a buffer; at M of them, SFT step(s) on M. The
                    demonstrations come from an injected source (relift_jax.demos: the dataset's
                    column, or a teacher's verified samples); with SFTConfig.hardest_visits = v a
                    question enters only from its v-th hardest visit on.
  rl                RL only.
  sft               SFT on demonstrations only (no sampling).
  sft_then_rl       `SFTConfig.sft_iterations` iterations of SFT, then RL.
  rl_with_sft_loss  every RL update also carries an SFT loss on the batch's demonstrations.
  relift_uniform    RL, plus an SFT step every k iterations on M random demonstrations (ablation).

The device only sees the two jitted steps and the sampler; everything here is numpy on the host.
Step metrics stay on the device (the caller fetches them one iteration late, so the device never
waits for a scalar); host metrics (rewards, buffer, token counts) are plain floats.
The controller's own state (iteration, data cursors, buffer, counters) is a JSON dict for checkpoints.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from relift_jax import losses
from relift_jax.batches import Packing, attach_sft, pack_rl_batch, pack_sft_batch, with_ref_logprobs
from relift_jax.config import RLConfig, RolloutConfig, SFTConfig, TrainConfig
from relift_jax.data import DataCursor
from relift_jax.demos import ColumnDemos


@dataclasses.dataclass
class Question:
    """A training question, tokenised: what the controller needs of an Example."""

    prompt_ids: list[int]
    ground_truth: str
    demo_ids: list[int] | None
    reward: str = "math"
    level: int | None = None  # toy task difficulty, for per-level logging


@dataclasses.dataclass
class Rollouts:
    """What a sampler returns for N*G rows (see sampler.SampleOutput)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    stopped: np.ndarray


class DemoBuffer:
    """Question ids awaiting SFT. `add` puts the newest in front; `take` pops M by the chosen order."""

    def __init__(self, items: Sequence[int] = ()):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, ids: Sequence[int]) -> None:
        self.items = list(ids) + self.items  # newest first, as in the official code

    def take(self, m: int, order: str) -> list[int]:
        if order == "newest":
            out, self.items = self.items[:m], self.items[m:]
        else:
            out, self.items = self.items[-m:][::-1], self.items[:-m]
        return out


def iteration_seed(seed: int, iteration: int) -> int:
    """A sampling seed that depends only on (run seed, iteration), so resumed runs repeat exactly."""
    return int(np.random.default_rng([seed, iteration]).integers(0, 2**31 - 1))


class Controller:
    """Runs iterations; the steps, sampler, scorer and evaluation are injected callables.

    Args:
      questions: the training set, tokenised.
      rl_step / sft_step: (state, batch) -> (state, metrics), host batches in (batches.RLBatch /
        SFTBatch), device metrics out.
      sample_fn: (params, prompt_ids list, num_samples, seed) -> Rollouts.
      score_fn: (response ids list, ground truths, reward names) -> float rewards.
      ref_logprobs_fn: batch -> token-aligned reference log-probs (only when RL uses a KL penalty).
      logprobs_fn: (params, batch) -> the training forward's token-aligned log-probs (the
        sampler/trainer mismatch, RLConfig.old_logprobs = "recompute", truncated IS).
      demos: where the hardest questions' demonstrations come from (demos.ColumnDemos, the default,
        or demos.TeacherDemos); `request(ids, iteration)` and `get(id)`.
    """

    def __init__(self, *, questions: list[Question], train: TrainConfig, rollout: RolloutConfig,
                 rl: RLConfig, sft: SFTConfig, packing: Packing, rl_step: Callable,
                 sft_step: Callable, sample_fn: Callable, score_fn: Callable,
                 ref_logprobs_fn: Callable | None = None, shuffle: bool = True,
                 logprobs_fn: Callable | None = None, demos: Any = None):
        self.q = questions
        self.train, self.rollout, self.rl, self.sft = train, rollout, rl, sft
        self.packing = packing
        self.rl_step, self.sft_step = rl_step, sft_step
        self.sample_fn, self.score_fn = sample_fn, score_fn
        self.ref_logprobs_fn = ref_logprobs_fn
        self.logprobs_fn = logprobs_fn
        self.demos = demos if demos is not None else ColumnDemos(questions)
        self.demo_ids = [i for i, q in enumerate(questions) if q.demo_ids is not None]
        self.iteration = 0
        self.cursor = DataCursor(len(questions), seed=train.seed, shuffle=shuffle)
        self.demo_cursor = DataCursor(max(1, len(self.demo_ids)), seed=train.seed + 1,
                                      shuffle=shuffle)
        self.buffer = DemoBuffer()
        self.demos_used: set[int] = set()
        self.counters = self._fresh_counters()
        self.hardest_visits: dict[int, int] = {}  # question -> hardest visits (hardest_visits > 1)

    def _fresh_counters(self) -> dict[str, int]:
        c = {"sft_fired": 0, "rl_updates": 0, "sft_updates": 0, "questions_seen": 0,
             "hardest_without_demo": 0}
        if self.demos.kind == "teacher":
            c.update(teacher_requests=0, teacher_accepted=0, teacher_tries=0)
        return c

    # ------------------------------------------------------------------ state for checkpoints
    def state_dict(self) -> dict:
        d = {"iteration": self.iteration, "cursor": self.cursor.state(),
             "demo_cursor": self.demo_cursor.state(), "buffer": list(self.buffer.items),
             "demos_used": sorted(self.demos_used), "counters": dict(self.counters)}
        if self.sft.hardest_visits > 1:
            d["hardest_visits"] = sorted([i, n] for i, n in self.hardest_visits.items())
        return d

    def load_state_dict(self, d: dict) -> None:
        self.iteration = int(d["iteration"])
        self.cursor.restore(d["cursor"])
        self.demo_cursor.restore(d["demo_cursor"])
        self.buffer = DemoBuffer(int(i) for i in d["buffer"])
        self.demos_used = {int(i) for i in d["demos_used"]}
        # Checkpoints written before a counter existed restore it as 0.
        self.counters = {**self._fresh_counters(), **{k: int(v) for k, v in d["counters"].items()}}
        self.hardest_visits = {int(i): int(n) for i, n in d.get("hardest_visits", [])}

    # ------------------------------------------------------------------ one iteration
    def phase(self) -> str:
        mode = self.train.mode
        if mode == "sft_then_rl":
            return "sft" if self.iteration < self.sft.sft_iterations else "rl"
        return mode

    def step(self, state: Any) -> tuple[Any, dict[str, float]]:
        """Runs iteration `self.iteration` and returns the new state and host metrics."""
        phase = self.phase()
        metrics: dict[str, float] = {}
        timing = {"sample": 0.0, "score": 0.0, "rl": 0.0, "sft": 0.0, "demos": 0.0}
        fired = 0
        if phase == "sft":
            m = self.sft.sft_questions_per_step or self.sft.buffer_size
            ids = [self.demo_ids[i] for i in self.demo_cursor.next(m)]
            state, fired = self._sft(state, ids, metrics, timing)
        else:
            state, failing = self._rl_iteration(state, metrics, timing)
            if phase == "relift":
                self.buffer.add(self._hardest_with_demos(failing, metrics, timing))
                if len(self.buffer) >= self.sft.buffer_size:  # at most one trigger per iteration
                    ids = self.buffer.take(self.sft.buffer_size, self.sft.buffer_order)
                    state, fired = self._sft(state, ids, metrics, timing)
            elif phase == "relift_uniform" and (self.iteration + 1) % self.sft.uniform_every == 0:
                rng = np.random.default_rng([self.train.seed, self.iteration, 7])
                ids = [self.demo_ids[i] for i in
                       rng.choice(len(self.demo_ids), self.sft.buffer_size, replace=False)]
                state, fired = self._sft(state, ids, metrics, timing)
        metrics.update({
            "buffer/size": len(self.buffer),
            "buffer/sft_fired": fired,
            "buffer/sft_fired_total": self.counters["sft_fired"],
            "buffer/demos_used": len(self.demos_used),
            "buffer/demos_used_frac": len(self.demos_used) / max(1, len(self.q)),
        })
        total = sum(timing.values())
        for k, v in timing.items():
            metrics[f"perf/time_{k}_s"] = v
            metrics[f"perf/time_{k}_frac"] = v / total if total else 0.0
        self.iteration += 1
        return state, metrics

    def _rl_iteration(self, state, metrics, timing) -> tuple[Any, list[int]]:
        """Sample N x G, score, RL update(s); returns the state and this batch's hardest questions."""
        N, G = self.rollout.questions_per_iteration, self.rollout.group_size
        ids = self.cursor.next(N)
        self.counters["questions_seen"] += N
        qs = [self.q[i] for i in ids]

        t0 = time.perf_counter()
        ro = self.sample_fn(state.params, [q.prompt_ids for q in qs], G,
                            iteration_seed(self.train.seed, self.iteration))
        timing["sample"] = time.perf_counter() - t0
        n_tokens = sum(len(t) for t in ro.tokens)
        metrics["perf/sample_tokens_per_s"] = n_tokens / max(timing["sample"], 1e-9)

        t0 = time.perf_counter()
        rewards_NG = np.asarray(self.score_fn(
            ro.tokens, [q.ground_truth for q in qs for _ in range(G)],
            [q.reward for q in qs for _ in range(G)]), np.float32)
        timing["score"] = time.perf_counter() - t0
        pass_N = rewards_NG.reshape(N, G).mean(axis=1)
        metrics.update(rollout_metrics(rewards_NG, pass_N, ro, [q.level for q in qs]))

        # Rows that train: all, or (dynamic filtering) only groups whose rewards differ.
        keep_N = (pass_N > 0) & (pass_N < 1) if self.rl.dynamic_filter else np.ones(N, bool)
        rows = [j * G + g for j in range(N) if keep_N[j] for g in range(G)]
        metrics["rollout/kept_frac"] = len(rows) / (N * G)
        adv_NG = np.asarray(losses.group_advantages(rewards_NG, G,
                                                    scale_by_std=self.rl.scale_adv_by_std))
        t0 = time.perf_counter()
        if rows:
            state = self._rl_updates(state, ids, ro, adv_NG, rows, metrics)
        timing["rl"] = time.perf_counter() - t0
        metrics["perf/train_tokens_per_s"] = (
            sum(len(qs[r // G].prompt_ids) + len(ro.tokens[r]) for r in rows)
            / max(timing["rl"], 1e-9))

        failing = [i for j, i in enumerate(ids) if pass_N[j] <= self.sft.hardest_max_pass_rate]
        # Mode relift replaces this with the demonstration source's answer (_hardest_with_demos).
        metrics["buffer/hardest_in_batch"] = sum(self.q[i].demo_ids is not None for i in failing)
        return state, failing

    def _hardest_with_demos(self, failing: list[int], metrics, timing) -> list[int]:
        """The hardest questions that enter the buffer: hardest in enough visits, and with a
        demonstration from the source (the others are counted, not buffered)."""
        ready = failing
        if self.sft.hardest_visits > 1:
            for i in failing:
                self.hardest_visits[i] = self.hardest_visits.get(i, 0) + 1
            ready = [i for i in failing if self.hardest_visits[i] >= self.sft.hardest_visits]
        t0 = time.perf_counter()
        reply = self.demos.request(ready, self.iteration)
        timing["demos"] = time.perf_counter() - t0
        self.counters["hardest_without_demo"] += len(ready) - len(reply.ids)
        metrics["buffer/hardest_in_batch"] = len(reply.ids)
        metrics["buffer/hardest_without_demo"] = len(ready) - len(reply.ids)
        if self.demos.kind == "teacher":
            self.counters["teacher_requests"] += reply.requests
            self.counters["teacher_accepted"] += reply.accepted
            self.counters["teacher_tries"] += reply.tries
            metrics["demos/teacher_requests"] = reply.requests
            metrics["demos/teacher_accepted"] = reply.accepted
            if reply.requests:
                metrics["demos/teacher_tries_mean"] = reply.tries / reply.requests
        return reply.ids

    def _rl_updates(self, state, ids: list[int], ro: Rollouts, adv_NG: np.ndarray,
                    rows: list[int], metrics: dict) -> Any:
        """`num_mini_batches` RL steps over the kept rows (each with the SFT slice in mode
        rl_with_sft_loss, and the reference log-probs with a KL penalty)."""
        G = self.rollout.group_size
        qs = [self.q[i] for i in ids]
        sft_batch = None
        if self.phase() == "rl_with_sft_loss":
            demo_qs = [i for i in ids if self.q[i].demo_ids is not None]
            if demo_qs:
                self.demos_used.update(demo_qs)
                sft_batch = self._sft_batch(demo_qs)
        rl_metrics, n_tok, n_seq = [], 0.0, 0.0
        batches = [pack_rl_batch([qs[r // G].prompt_ids for r in chunk],
                                 [ro.tokens[r] for r in chunk],
                                 [ro.logprobs[r] for r in chunk], adv_NG[chunk], self.packing)
                   for chunk in np.array_split(np.asarray(rows),
                                               min(self.rl.num_mini_batches, len(rows)))]
        if self.logprobs_fn is not None and self.rl.needs_train_logprobs:
            batches = self._with_train_logprobs(state.params, batches, metrics)
        for batch in batches:
            if sft_batch is not None:
                batch = attach_sft(batch, sft_batch)
            if self.ref_logprobs_fn is not None:
                batch = with_ref_logprobs(batch, self.ref_logprobs_fn(batch))
            state, m = self.rl_step(state, batch)
            rl_metrics.append(m)
            n_tok, n_seq = n_tok + float(batch.num_tokens), n_seq + float(batch.num_seqs)
            self.counters["rl_updates"] += 1
        metrics.update(_mean_on_device(rl_metrics, "rl/"))
        metrics.update({"rl/num_tokens": n_tok, "rl/num_seqs": n_seq})
        # For the timing only: the next sampling needs these parameters anyway, so waiting here
        # costs nothing (the step's scalars are still fetched one iteration late).
        jax.block_until_ready(state)
        return state

    def _with_train_logprobs(self, params, batches: list, metrics: dict) -> list:
        """The training forward's log-probs of every mini-batch under the iteration's starting
        policy: the sampler/trainer mismatch, and the old log-probs ("recompute") or the
        truncated importance weights it asks for."""
        out, diff_sum, diff_max, count = [], 0.0, 0.0, 0.0
        for batch in batches:
            mb = batch.micro_batches
            train_lp = np.asarray(self.logprobs_fn(params, batch), np.float32)
            sampler_lp = np.asarray(mb.old_logprobs_bxT, np.float32)
            mask = np.asarray(mb.loss_mask_bxT) != 0
            diff = np.abs(train_lp - sampler_lp)[mask]
            diff_sum, count = diff_sum + float(diff.sum()), count + diff.size
            diff_max = max(diff_max, float(diff.max(initial=0.0)))
            new = {}
            if self.rl.tis_cap is not None:
                new["is_weights_bxT"] = np.asarray(losses.truncated_is_weights(
                    train_lp, sampler_lp, mask, self.rl.tis_cap))
            if self.rl.old_logprobs == "recompute":
                new["old_logprobs_bxT"] = np.where(mask, train_lp, 0.0).astype(np.float32)
            out.append(batch.replace(micro_batches=mb.replace(**new)) if new else batch)
        metrics["rollout/logprob_mismatch_mean"] = diff_sum / max(count, 1.0)
        metrics["rollout/logprob_mismatch_max"] = diff_max
        return out

    def _sft_batch(self, ids: list[int]):
        return pack_sft_batch([self.q[i].prompt_ids for i in ids],
                              [self.demos.get(i) for i in ids],
                              dataclasses.replace(
                                  self.packing, micro_batch_size=self.sft.micro_batch_size,
                                  tokens_per_micro_batch=self.sft.tokens_per_micro_batch))

    def _sft(self, state, ids: list[int], metrics, timing) -> tuple[Any, int]:
        if not ids:
            return state, 0
        t0 = time.perf_counter()
        batch = self._sft_batch(ids)
        ms = []
        for _ in range(self.sft.steps_per_trigger):
            state, m = self.sft_step(state, batch)
            ms.append(m)
            self.counters["sft_updates"] += 1
        self.counters["sft_fired"] += 1
        self.demos_used.update(ids)
        metrics.update(_mean_on_device(ms, "sft/"))
        jax.block_until_ready(state)  # timing only, as in the RL phase
        metrics["sft/num_tokens"] = float(batch.num_tokens)
        metrics["sft/num_seqs"] = float(len(ids))
        timing["sft"] = time.perf_counter() - t0
        return state, 1


def rollout_metrics(rewards_NG: np.ndarray, pass_N: np.ndarray, ro: Rollouts,
                    levels: Sequence[int | None]) -> dict[str, float]:
    """Host scalars of one iteration's rollouts (rewards, solve rates, lengths, per level)."""
    lengths = np.array([len(t) for t in ro.tokens])
    out = {
        "rollout/reward_mean": float(rewards_NG.mean()),
        "rollout/solve_all_frac": float(np.mean(pass_N == 1.0)),
        "rollout/solve_none_frac": float(np.mean(pass_N == 0.0)),
        "rollout/response_len_mean": float(lengths.mean()),
        "rollout/response_len_max": float(lengths.max()),
        "rollout/truncated_frac": float(np.mean(~np.asarray(ro.stopped))),
    }
    if all(lv is not None for lv in levels):
        for lv in sorted(set(levels)):
            sel = [j for j, l in enumerate(levels) if l == lv]
            out[f"rollout/pass_level{lv}"] = float(pass_N[sel].mean())
    return out


def _mean_on_device(step_metrics: list[dict], prefix: str) -> dict:
    """Per-step device metrics -> their mean over the steps, still on the device (no host wait)."""
    return {f"{prefix}{k}": jnp.mean(jnp.stack([jnp.asarray(m[k], jnp.float32)
                                                 for m in step_metrics]))
            for k in step_metrics[0]}
