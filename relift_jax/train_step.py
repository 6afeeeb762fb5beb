"""The two train steps: pure `(state, batch) -> (state, metrics)` over ONE parameter pytree.

`rl_step` updates params and `state["rl_opt"]` with the policy-gradient loss; `sft_step` updates
params and `state["sft_opt"]` with the cross-entropy loss on demonstrations (or the RL optimiser state
when `share_optimizer`). Each batch arrives split into micro-batches `[M, b, T]`; gradients are summed
over them with the WHOLE batch's token / sequence counts as denominators, so accumulation is exact.

Also here: host-side packing of rollouts and demonstrations into those batches.

Shape key: M micro-batches, b rows per micro-batch, T tokens (prompt + response, right-padded).
Token-aligned arrays: `loss_mask[:, t]` and `old_logprobs[:, t]` describe token t, predicted from t-1.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from relift_jax import losses, sharding
from relift_jax.config import OptimConfig, RLConfig, SFTConfig
from relift_jax.model import ModelConfig, Params, apply

State = dict[str, Any]  # {"params", "rl_opt", "sft_opt", "rl_steps", "sft_steps"}


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


def init_state(params: Params, rl_tx, sft_tx, *, share_optimizer: bool = False) -> State:
    """Train state: params plus both optimiser states (the SFT one is empty when shared)."""
    init = jax.jit(lambda p: (rl_tx.init(p), () if share_optimizer else sft_tx.init(p)))
    rl_opt, sft_opt = init(params)
    return {"params": params, "rl_opt": rl_opt, "sft_opt": sft_opt,
            "rl_steps": jnp.zeros((), jnp.int32), "sft_steps": jnp.zeros((), jnp.int32)}


# ----------------------------------------------------------------------------- losses on a micro-batch

def _token_logprobs(config: ModelConfig, params: Params, tokens_bxT, valid_bxT):
    """Log-probs and entropies of tokens 1..T-1 given their prefixes: [b, T-1] each."""
    logits = apply(config, params, tokens_bxT[:, :-1], valid_bxT[:, :-1])
    return losses.token_logprobs_and_entropy(logits, tokens_bxT[:, 1:])


def _sft_terms(config, params, mb, entropy_coef, num_tokens):
    logits = apply(config, params, mb["tokens"][:, :-1], mb["valid"][:, :-1])
    return losses.sft_loss(logits, mb["tokens"][:, 1:], mb["loss_mask"][:, 1:],
                           entropy_coef=entropy_coef, num_tokens=num_tokens)


def _rl_loss(params, mb, totals, *, config: ModelConfig, rl: RLConfig, norm_len: int):
    logp, ent = _token_logprobs(config, params, mb["tokens"], mb["valid"])
    mask = mb["loss_mask"][:, 1:]
    pg, m = losses.policy_loss(logp, mb["old_logprobs"][:, 1:], mb["advantages"], mask,
                               clip_low=rl.clip_low, clip_high=rl.clip_high, agg=rl.agg,
                               norm_len=norm_len, num_tokens=totals["num_tokens"],
                               num_seqs=totals["num_seqs"])
    entropy = losses.aggregate(ent, mask, "token-mean", num_tokens=totals["num_tokens"])
    loss = pg - rl.entropy_coef * entropy
    metrics = {"pg_loss": pg, "entropy": entropy, "clip_frac": m["clip_frac"],
               "approx_kl": m["approx_kl"], "ratio_max": m["ratio_max"]}
    if rl.kl_coef > 0:
        kl = losses.kl_penalty(logp, mb["ref_logprobs"][:, 1:], rl.kl_kind)
        kl = losses.aggregate(kl, mask, "token-mean", num_tokens=totals["num_tokens"])
        loss = loss + rl.kl_coef * kl
        metrics["kl"] = kl
    if "sft" in mb:  # mode rl_with_sft_loss: an SFT loss added to every RL update
        sft, sm = _sft_terms(config, params, mb["sft"], 0.0, totals["sft_num_tokens"])
        loss = loss + rl.sft_loss_coef * sft
        metrics["sft_nll"] = sm["nll"]
    metrics["loss"] = loss
    return loss, metrics


def _sft_loss(params, mb, totals, *, config: ModelConfig, sft: SFTConfig):
    loss, m = _sft_terms(config, params, mb, sft.entropy_coef, totals["num_tokens"])
    return loss, {"loss": loss, "nll": m["nll"], "entropy": m["entropy"]}


def _accumulate(loss_fn, params, batch, totals):
    """Sum of per-micro-batch gradients and metrics; micro-batches are the leading axis of `batch`.

    Per-micro-batch metrics carry the whole batch's denominators, so sums are batch means, except
    `ratio_max`, whose maximum is taken.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def body(carry, mb):
        g_sum, m_sum = carry
        g, m = grad_fn(params, mb, totals)
        g_sum = jax.tree.map(jnp.add, g_sum, g)
        m_sum = {k: jnp.maximum(m_sum[k], v) if k == "ratio_max" else m_sum[k] + v
                 for k, v in m.items()}
        return (g_sum, m_sum), None

    first = jax.tree.map(lambda x: x[0], batch)
    m_shape = jax.eval_shape(lambda: grad_fn(params, first, totals)[1])
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), m_shape)
    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), batch)
    return grads, metrics


def _apply_update(tx, params, opt_state, grads):
    grad_norm = optax.global_norm(grads)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grad_norm


# ----------------------------------------------------------------------------- the two steps

def rl_train_step(state: State, batch: dict, *, config: ModelConfig, rl: RLConfig, tx,
                  schedule, norm_len: int) -> tuple[State, dict]:
    """One policy-gradient update on a batch of micro-batches (see `pack_rl_batch`)."""
    totals = {k: batch.pop(k) for k in [k for k in batch if k.startswith("total_")]}
    totals = {k[len("total_"):]: v for k, v in totals.items()}
    loss_fn = functools.partial(_rl_loss, config=config, rl=rl, norm_len=norm_len)
    grads, metrics = _accumulate(loss_fn, state["params"], batch, totals)
    params, opt, gnorm = _apply_update(tx, state["params"], state["rl_opt"], grads)
    metrics.update(grad_norm=gnorm, lr=schedule(state["rl_steps"]))
    new = dict(state, params=params, rl_opt=opt, rl_steps=state["rl_steps"] + 1)
    return new, metrics


def sft_train_step(state: State, batch: dict, *, config: ModelConfig, sft: SFTConfig, tx,
                   schedule) -> tuple[State, dict]:
    """One SFT update; touches only params and the SFT optimiser state (or the shared RL one)."""
    totals = {"num_tokens": batch.pop("total_num_tokens")}
    loss_fn = functools.partial(_sft_loss, config=config, sft=sft)
    grads, metrics = _accumulate(loss_fn, state["params"], batch, totals)
    opt_key = "rl_opt" if sft.share_optimizer else "sft_opt"
    params, opt, gnorm = _apply_update(tx, state["params"], state[opt_key], grads)
    metrics.update(grad_norm=gnorm, lr=schedule(state["sft_steps"]))
    new = dict(state, params=params, sft_steps=state["sft_steps"] + 1)
    new[opt_key] = opt
    return new, metrics


def jit_step(step_fn, state_shardings=None, **static):
    """jit with the state donated (updated in place) and, on a mesh, its shardings pinned."""
    fn = functools.partial(step_fn, **static)
    if state_shardings is None:
        return jax.jit(fn, donate_argnums=0)
    return jax.jit(fn, donate_argnums=0, out_shardings=(state_shardings, None))


# ----------------------------------------------------------------------------- host-side packing

@dataclasses.dataclass(frozen=True)
class Packing:
    micro_batch_size: int
    pad_id: int
    batch_multiple: int = 1  # rows per micro-batch must split over the mesh's batch axes
    length_multiple: int = 16  # T is rounded up to this: few compiled shapes, little padding


def _layout(n_rows: int, max_len: int, pk: Packing) -> tuple[int, int, int]:
    """(micro-batches M, rows per micro-batch b, padded length T), bucketed to limit recompiles."""
    b = max(pk.batch_multiple, -(-min(pk.micro_batch_size, n_rows) // pk.batch_multiple)
            * pk.batch_multiple)
    M = -(-n_rows // b)
    return M, b, -(-max_len // pk.length_multiple) * pk.length_multiple


def _pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pk: Packing,
          extra: dict[str, Sequence[Sequence[float]]] | None = None) -> dict[str, np.ndarray]:
    n = len(prompts)
    M, b, T = _layout(n, max(len(p) + len(r) for p, r in zip(prompts, responses)), pk)
    out = {"tokens": np.full((M * b, T), pk.pad_id, np.int32),
           "valid": np.zeros((M * b, T), bool),
           "loss_mask": np.zeros((M * b, T), np.float32)}
    for name in extra or {}:
        out[name] = np.zeros((M * b, T), np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        L = len(p) + len(r)
        out["tokens"][i, :L] = list(p) + list(r)
        out["valid"][i, :L] = True
        out["loss_mask"][i, len(p):L] = 1.0
        for name, vals in (extra or {}).items():
            out[name][i, len(p):L] = vals[i]
    return {k: v.reshape(M, b, T) for k, v in out.items()}


def pack_rl_batch(prompts, responses, old_logprobs, advantages, pk: Packing) -> dict:
    """Rollouts -> an RL batch of micro-batches, plus the whole batch's denominators."""
    batch = _pack(prompts, responses, pk, {"old_logprobs": old_logprobs})
    M, b, _ = batch["tokens"].shape
    adv = np.zeros((M * b,), np.float32)
    adv[:len(advantages)] = advantages
    batch["advantages"] = adv.reshape(M, b)
    batch["total_num_tokens"] = np.float32(batch["loss_mask"].sum())
    batch["total_num_seqs"] = np.float32(sum(1 for r in responses if len(r)))
    return batch


def pack_sft_batch(prompts, demonstrations, pk: Packing) -> dict:
    """(prompt ids, demonstration ids) -> an SFT batch; the loss covers demonstration tokens only."""
    batch = _pack(prompts, demonstrations, pk)
    batch["total_num_tokens"] = np.float32(batch["loss_mask"].sum())
    return batch


def attach_sft(rl_batch: dict, sft_batch: dict) -> dict:
    """Mode rl_with_sft_loss: give each RL micro-batch a slice of the SFT batch."""
    M = rl_batch["tokens"].shape[0]
    sft = {k: v for k, v in sft_batch.items() if not k.startswith("total_")}
    Ms, bs, T = sft["tokens"].shape
    rows = Ms * bs
    per = -(-rows // M)
    flat = {k: v.reshape(rows, T) for k, v in sft.items()}
    pad = M * per - rows
    flat = {k: np.concatenate([v, np.zeros((pad, T), v.dtype)]) for k, v in flat.items()}
    rl_batch["sft"] = {k: v.reshape(M, per, T) for k, v in flat.items()}
    rl_batch["total_sft_num_tokens"] = sft_batch["total_num_tokens"]
    return rl_batch


def device_batch(batch: dict, mesh) -> dict:
    """Host arrays -> device arrays; on a mesh, rows (axis 1) split over the batch axes."""
    def put(x):
        x = np.asarray(x)
        if mesh is None or x.ndim < 2:
            return jnp.asarray(x)
        spec = sharding.logical_to_spec((None, "batch") + (None,) * (x.ndim - 2))
        return sharding.host_to_global(x, jax.sharding.NamedSharding(mesh, spec))
    return jax.tree.map(put, batch)
