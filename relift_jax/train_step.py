"""The two train steps: pure `(state, batch) -> (state, metrics)` over ONE parameter pytree.

`rl_train_step` updates params and `state.rl_opt` with the policy-gradient loss; `sft_train_step`
updates params and `state.sft_opt` with the cross-entropy loss on demonstrations (or the RL optimiser
state when `share_optimizer`). Batches (`relift_jax.batches`) are stacks of micro-batches carrying the
WHOLE batch's token / sequence counts; gradients are summed over the micro-batches, so accumulation
is exact.

Shape key: b rows per micro-batch, T tokens (prompt + response, right-padded), V vocab.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from relift_jax import losses
from relift_jax.batches import RLBatch, RLMicroBatch, SFTBatch, SFTMicroBatch
from relift_jax.config import OptimConfig, RLConfig, SFTConfig
from relift_jax.model import ModelConfig, Params, apply


@struct.dataclass
class TrainState:
    params: Params
    rl_opt: Any
    sft_opt: Any          # () when SFT shares the RL optimiser
    rl_steps: jax.Array   # int32 scalar: RL updates done (the RL schedule's step)
    sft_steps: jax.Array  # int32 scalar: SFT updates done


# ----------------------------------------------------------------------------- optimisers

def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    peak = cfg.learning_rate
    if cfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(peak, peak * cfg.final_lr_fraction, cfg.decay_steps)
    else:
        main = optax.cosine_decay_schedule(peak, cfg.decay_steps, alpha=cfg.final_lr_fraction)
    if cfg.warmup_steps <= 0:
        return main
    warm = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warm, main], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                   weight_decay=cfg.weight_decay))


def init_state(params: Params, rl_tx, sft_tx, *, share_optimizer: bool = False) -> TrainState:
    """Train state: params plus both optimiser states (the SFT one is empty when shared)."""
    init = jax.jit(lambda p: (rl_tx.init(p), () if share_optimizer else sft_tx.init(p)))
    rl_opt, sft_opt = init(params)
    return TrainState(params=params, rl_opt=rl_opt, sft_opt=sft_opt,
                      rl_steps=jnp.zeros((), jnp.int32), sft_steps=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- losses on a micro-batch

def token_logprobs(config: ModelConfig, params: Params, tokens_bxT: jax.Array,
                   valid_bxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token-aligned log-probs and entropies, `[b, T]` float32 each: column t is log p(token t |
    tokens < t) and the entropy of that distribution; column 0 has no prediction and holds 0.

    The one function behind the policy, old (recomputed) and reference log-probs.
    """
    logits_bxTxV = apply(config, params, tokens_bxT[:, :-1], valid_bxT[:, :-1])
    logp, ent = losses.token_logprobs_and_entropy(logits_bxTxV, tokens_bxT[:, 1:])
    pad = ((0, 0), (1, 0))
    return jnp.pad(logp, pad), jnp.pad(ent, pad)


def _sft_terms(config, params, mb: SFTMicroBatch, num_tokens):
    """(nll, entropy): token means over the demonstration tokens, with the batch's denominator."""
    logp, ent = token_logprobs(config, params, mb.tokens_bxT, mb.valid_bxT)
    nll = losses.aggregate(-logp, mb.loss_mask_bxT, "token-mean", num_tokens=num_tokens)
    entropy = losses.aggregate(ent, mb.loss_mask_bxT, "token-mean", num_tokens=num_tokens)
    return nll, entropy


def _rl_loss(params, mb: RLMicroBatch, totals: RLBatch, *, config: ModelConfig, rl: RLConfig,
             norm_len: int):
    logp, ent = token_logprobs(config, params, mb.tokens_bxT, mb.valid_bxT)
    mask = mb.loss_mask_bxT
    pg, m = losses.policy_loss(logp, mb.old_logprobs_bxT, mb.advantages_b, mask,
                               clip_low=rl.clip_low, clip_high=rl.clip_high, agg=rl.agg,
                               norm_len=norm_len, num_tokens=totals.num_tokens,
                               num_seqs=totals.num_seqs, seq_denominator=rl.seq_norm_denominator,
                               num_devices=rl.seq_norm_num_devices)
    entropy = losses.aggregate(ent, mask, "token-mean", num_tokens=totals.num_tokens)
    loss = pg - rl.entropy_coef * entropy
    metrics = {"pg_loss": pg, "entropy": entropy, "clip_frac": m["clip_frac"],
               "approx_kl": m["approx_kl"], "ratio_max": m["ratio_max"]}
    if rl.kl_coef > 0:
        kl = losses.kl_penalty(logp, mb.ref_logprobs_bxT, rl.kl_kind)
        kl = losses.aggregate(kl, mask, "token-mean", num_tokens=totals.num_tokens)
        loss = loss + rl.kl_coef * kl
        metrics["kl"] = kl
    if mb.sft is not None:  # mode rl_with_sft_loss: an SFT loss added to every RL update
        nll, _ = _sft_terms(config, params, mb.sft, totals.sft_num_tokens)
        loss = loss + rl.sft_loss_coef * nll
        metrics["sft_nll"] = nll
    metrics["loss"] = loss
    return loss, metrics


def _sft_loss(params, mb: SFTMicroBatch, totals: SFTBatch, *, config: ModelConfig,
              sft: SFTConfig):
    nll, entropy = _sft_terms(config, params, mb, totals.num_tokens)
    loss = nll - sft.entropy_coef * entropy
    return loss, {"loss": loss, "nll": nll, "entropy": entropy}


def _accumulate(loss_fn, params, batch):
    """Sum of per-micro-batch gradients and metrics over `batch.micro_batches` (leading axis M).

    Per-micro-batch metrics carry the whole batch's denominators, so sums are batch means, except
    `ratio_max`, whose maximum is taken.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    totals = batch.replace(micro_batches=None)

    def body(carry, mb):
        g_sum, m_sum = carry
        g, m = grad_fn(params, mb, totals)
        g_sum = jax.tree.map(jnp.add, g_sum, g)
        m_sum = {k: jnp.maximum(m_sum[k], v) if k == "ratio_max" else m_sum[k] + v
                 for k, v in m.items()}
        return (g_sum, m_sum), None

    first = jax.tree.map(lambda x: x[0], batch.micro_batches)
    m_shape = jax.eval_shape(lambda: grad_fn(params, first, totals)[1])
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), m_shape)
    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), batch.micro_batches)
    return grads, metrics


def _apply_update(tx, params, opt_state, grads):
    grad_norm = optax.global_norm(grads)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grad_norm


# ----------------------------------------------------------------------------- the two steps

def rl_train_step(state: TrainState, batch: RLBatch, *, config: ModelConfig, rl: RLConfig, tx,
                  schedule, norm_len: int) -> tuple[TrainState, dict]:
    """One policy-gradient update on a batch of micro-batches (see `batches.pack_rl_batch`)."""
    loss_fn = functools.partial(_rl_loss, config=config, rl=rl, norm_len=norm_len)
    grads, metrics = _accumulate(loss_fn, state.params, batch)
    params, opt, gnorm = _apply_update(tx, state.params, state.rl_opt, grads)
    metrics.update(grad_norm=gnorm, lr=schedule(state.rl_steps))
    return state.replace(params=params, rl_opt=opt, rl_steps=state.rl_steps + 1), metrics


def sft_train_step(state: TrainState, batch: SFTBatch, *, config: ModelConfig, sft: SFTConfig, tx,
                   schedule) -> tuple[TrainState, dict]:
    """One SFT update; touches only params and the SFT optimiser state (or the shared RL one)."""
    loss_fn = functools.partial(_sft_loss, config=config, sft=sft)
    grads, metrics = _accumulate(loss_fn, state.params, batch)
    opt_state = state.rl_opt if sft.share_optimizer else state.sft_opt
    params, opt, gnorm = _apply_update(tx, state.params, opt_state, grads)
    metrics.update(grad_norm=gnorm, lr=schedule(state.sft_steps))
    new = state.replace(params=params, sft_steps=state.sft_steps + 1)
    return new.replace(rl_opt=opt) if sft.share_optimizer else new.replace(sft_opt=opt), metrics


def jit_step(step_fn, state_shardings=None, **static):
    """jit with the state donated (updated in place) and, on a mesh, its shardings pinned."""
    fn = functools.partial(step_fn, **static)
    if state_shardings is None:
        return jax.jit(fn, donate_argnums=0)
    return jax.jit(fn, donate_argnums=0, out_shardings=(state_shardings, None))
