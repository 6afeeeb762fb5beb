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
from relift_jax.model import ModelConfig, Params, hidden_states, logits_from_hidden


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


def _moment_like(x):
    """Optimiser moments are float32 whatever the parameter dtype (bf16 params, f32 moments)."""
    return jax.ShapeDtypeStruct(x.shape, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) \
        else jax.ShapeDtypeStruct(x.shape, x.dtype)


def init_state(params: Params, rl_tx, sft_tx, *, share_optimizer: bool = False) -> TrainState:
    """Train state: params plus both optimiser states (the SFT one is empty when shared).

    The moments are float32 and are created directly in their parameter's sharding (an optax init
    does not depend on the parameters' values, so without `out_shardings` XLA would replicate
    every moment on every device: 113 GB per chip for a 7B model on v5p-64).
    """
    def init(p):
        m = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.tree.map(_moment_like, p))
        return rl_tx.init(m), (() if share_optimizer else sft_tx.init(m))

    out = opt_shardings(params, rl_tx, sft_tx, share_optimizer)
    rl_opt, sft_opt = (jax.jit(init) if out is None else jax.jit(init, out_shardings=out))(params)
    return TrainState(params=params, rl_opt=rl_opt, sft_opt=sft_opt,
                      rl_steps=jnp.zeros((), jnp.int32), sft_steps=jnp.zeros((), jnp.int32))


def opt_shardings(params: Params, rl_tx, sft_tx, share_optimizer: bool = False):
    """(RL, SFT) optimiser-state shardings: every moment like its parameter, counters replicated.

    `params` may be arrays or ShapeDtypeStructs with shardings (ahead-of-time compilation).
    """
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), params)
    leaves = jax.tree.leaves(shardings)
    if not leaves or not all(isinstance(s, jax.sharding.NamedSharding) for s in leaves):
        return None  # one device: nothing to place
    replicated = jax.sharding.NamedSharding(leaves[0].mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(_moment_like, params)

    def like_params(tx):
        st = jax.eval_shape(tx.init, abstract)
        return optax.tree_map_params(tx, lambda _, s: s, st, shardings,
                                     transform_non_params=lambda _: replicated)
    return like_params(rl_tx), (() if share_optimizer else like_params(sft_tx))


# ----------------------------------------------------------------------------- losses on a micro-batch

def token_logprobs(config: ModelConfig, params: Params, tokens_bxT: jax.Array,
                   segment_ids_bxT: jax.Array, positions_bxT: jax.Array, *,
                   chunk_len: int = 0) -> tuple[jax.Array, jax.Array]:
    """Token-aligned log-probs and entropies, `[b, T]` float32 each: column t is log p(token t |
    the tokens before it in its sequence) and the entropy of that distribution; column 0 has no
    prediction and holds 0. The one function behind the policy, recomputed-old and reference
    log-probs.

    Rows may hold several sequences (segment ids > 0, 0 = padding; positions restart in each).
    With `chunk_len` > 0 the vocabulary projection runs `chunk_len` positions at a time and is
    recomputed in the backward pass, so no `[b, T, V]` float32 logits tensor ever exists (at
    T = 9,216 and V = 152,064 that would be 5.6 GB per sequence).
    """
    h_bxTxD, _ = hidden_states(config, params, tokens_bxT[:, :-1], positions_bxT[:, :-1],
                               segment_ids_bxT[:, :-1] > 0, segment_ids_BxT=segment_ids_bxT[:, :-1])
    targets_bxT = tokens_bxT[:, 1:]

    def project(h_bxcxD, t_bxc):
        return losses.token_logprobs_and_entropy(logits_from_hidden(config, params, h_bxcxD), t_bxc)

    n = targets_bxT.shape[1]
    if chunk_len <= 0 or chunk_len >= n:
        logp, ent = project(h_bxTxD, targets_bxT)
    else:
        nc = -(-n // chunk_len)
        pad = nc * chunk_len - n
        b, _, D = h_bxTxD.shape
        h_cxbxkxD = jnp.pad(h_bxTxD, ((0, 0), (0, pad), (0, 0))).reshape(
            b, nc, chunk_len, D).transpose(1, 0, 2, 3)
        t_cxbxk = jnp.pad(targets_bxT, ((0, 0), (0, pad))).reshape(b, nc, chunk_len).transpose(1, 0, 2)
        step = jax.checkpoint(lambda _, ht: (None, project(*ht)))  # logits recomputed backward
        _, (logp, ent) = jax.lax.scan(step, None, (h_cxbxkxD, t_cxbxk))
        logp, ent = (x.transpose(1, 0, 2).reshape(b, nc * chunk_len)[:, :n] for x in (logp, ent))
    return jnp.pad(logp, ((0, 0), (1, 0))), jnp.pad(ent, ((0, 0), (1, 0)))


def _sft_terms(config, params, mb: SFTMicroBatch, num_tokens, chunk_len: int, entropy_coef: float):
    """losses.sft_loss on a micro-batch, with the batch's token count as denominator."""
    logp, ent = token_logprobs(config, params, mb.tokens_bxT, mb.segment_ids_bxT, mb.positions_bxT,
                               chunk_len=chunk_len)
    return losses.sft_loss_from_logprobs(logp, ent, mb.loss_mask_bxT, entropy_coef=entropy_coef,
                                         num_tokens=num_tokens)


def _rl_loss(params, mb: RLMicroBatch, totals: RLBatch, *, config: ModelConfig, rl: RLConfig,
             norm_len: int, chunk_len: int):
    logp, ent = token_logprobs(config, params, mb.tokens_bxT, mb.segment_ids_bxT, mb.positions_bxT,
                               chunk_len=chunk_len)
    mask = mb.loss_mask_bxT
    pg, m = losses.policy_loss(logp, mb.old_logprobs_bxT, mb.advantages_bxT, mask,
                               clip_low=rl.clip_low, clip_high=rl.clip_high, agg=rl.agg,
                               norm_len=norm_len, num_tokens=totals.num_tokens,
                               num_seqs=totals.num_seqs, seq_denominator=rl.seq_norm_denominator,
                               num_devices=rl.seq_norm_num_devices, seq_lens=mb.seq_lens_bxT,
                               is_weights=mb.is_weights_bxT)
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
        _, sm = _sft_terms(config, params, mb.sft, totals.sft_num_tokens, chunk_len, 0.0)
        loss = loss + rl.sft_loss_coef * sm["nll"]
        metrics["sft_nll"] = sm["nll"]
    metrics["loss"] = loss
    return loss, metrics


def _sft_loss(params, mb: SFTMicroBatch, totals: SFTBatch, *, config: ModelConfig,
              sft: SFTConfig, chunk_len: int):
    loss, m = _sft_terms(config, params, mb, totals.num_tokens, chunk_len, sft.entropy_coef)
    return loss, {"loss": loss, "nll": m["nll"], "entropy": m["entropy"]}


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
    """AdamW in float32 (float32 gradients and moments); the update is cast to each parameter's
    dtype when applied."""
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grad_norm


# ----------------------------------------------------------------------------- the two steps

def rl_train_step(state: TrainState, batch: RLBatch, *, config: ModelConfig, rl: RLConfig, tx,
                  schedule, norm_len: int, chunk_len: int = 0) -> tuple[TrainState, dict]:
    """One policy-gradient update on a batch of micro-batches (see `batches.pack_rl_batch`).

    chunk_len: positions per vocabulary-projection chunk (0: all at once); see token_logprobs.
    """
    loss_fn = functools.partial(_rl_loss, config=config, rl=rl, norm_len=norm_len,
                                chunk_len=chunk_len)
    grads, metrics = _accumulate(loss_fn, state.params, batch)
    params, opt, gnorm = _apply_update(tx, state.params, state.rl_opt, grads)
    metrics.update(grad_norm=gnorm, lr=schedule(state.rl_steps))
    return state.replace(params=params, rl_opt=opt, rl_steps=state.rl_steps + 1), metrics


def sft_train_step(state: TrainState, batch: SFTBatch, *, config: ModelConfig, sft: SFTConfig, tx,
                   schedule, chunk_len: int = 0) -> tuple[TrainState, dict]:
    """One SFT update; touches only params and the SFT optimiser state (or the shared RL one)."""
    loss_fn = functools.partial(_sft_loss, config=config, sft=sft, chunk_len=chunk_len)
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
