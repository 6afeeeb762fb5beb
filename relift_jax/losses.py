"""Losses for ReLIFT: group advantages, the policy-gradient loss, KL estimates and the SFT loss.

Array in, array out: every function is a pure jnp function that can be jitted (string and clip
arguments are static). All arithmetic is done in float32 whatever the input dtype, because these
are the numerically sensitive reductions of training.

Shape key:
    B  sequences in a (micro-)batch
    T  tokens per sequence (response positions)
    V  vocabulary size
    N  questions
    G  generations (rollouts) per question

Gradient accumulation: `aggregate`, `policy_loss` and `sft_loss` accept external denominators
(`num_tokens`, `num_seqs`). When a mini-batch is split into micro-batches and each micro-batch is
given the denominators of the WHOLE mini-batch, the sum of the micro-batch losses equals the loss
of the whole mini-batch computed with the default denominators. The official ReLIFT scale
(`seq_denominator="num_devices"`) divides by a constant instead, so it accumulates exactly as is.
"""

from __future__ import annotations

from typing import Any

import math

import jax
import jax.numpy as jnp

ArrayLike = Any  # numpy or jax array, or a Python scalar

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# What "seq-mean-token-sum-norm" divides the summed per-sequence losses by (see `aggregate`).
SEQ_NORM_DENOMINATORS = ("num_seqs", "num_devices")
# "k3" alone is deliberately absent: verl's "k3" is clamped and TRL's is not (see `kl_penalty`).
KL_KINDS = ("k1", "k3_unclamped", "low_var_kl")
K3_AMBIGUOUS = (
    "ambiguous: use 'low_var_kl' for verl's clamped k3 (verl's 'k3' is an alias of it) or "
    "'k3_unclamped' for TRL's GRPO k3"
)


def group_advantages(
    rewards: ArrayLike, group_size: int, *, scale_by_std: bool, eps: float = 1e-6
) -> jax.Array:
    """Group-relative advantages (GRPO; Dr.GRPO when `scale_by_std` is False).

    The std is the unbiased sample std (ddof=1, Bessel's correction), as in all three peers:
    verl `verl/trainer/ppo/core_algos.py:compute_grpo_outcome_advantage` (`torch.std(scores_tensor)`,
    also in the official ReLIFT fork's copy), TRL `trl/trainer/grpo_trainer.py` (`nanstd` from
    `trl/trainer/utils.py`, which multiplies the variance by count / (count - 1)). With ddof=0 the
    advantages would be sqrt(G / (G - 1)) too large: 1.069x for G=8.

    G=1: the sample std is undefined (0/0). Each reward minus its own mean is exactly 0, and the
    std is taken as 0 (TRL's choice for a single generation), so every advantage is 0, never NaN.
    verl differs here: a singleton group gets mean 0 and std 1, i.e. the raw reward as advantage.

    Args:
        rewards: `[N*G]` rewards, ordered group by group (the G rollouts of question 0 first).
        group_size: G, the number of rollouts per question.
        scale_by_std: divide by (sample std of the group (ddof=1) + eps).
        eps: added to the std so that a group with equal rewards gets advantage 0, not NaN
            (verl's epsilon=1e-6; TRL uses 1e-4).

    Returns:
        `[N*G]` float32 advantages.

    Raises:
        ValueError: if `rewards` is not 1-D, `group_size` < 1 or the length is not divisible by it.
    """
    rewards_NG = jnp.asarray(rewards, dtype=jnp.float32)
    if rewards_NG.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N*G], got shape {rewards_NG.shape}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards_NG.shape[0] % group_size != 0:
        raise ValueError(
            f"number of rewards {rewards_NG.shape[0]} is not divisible by "
            f"group size {group_size}"
        )
    rewards_NxG = rewards_NG.reshape(-1, group_size)
    adv_NxG = rewards_NxG - rewards_NxG.mean(axis=1, keepdims=True)
    if scale_by_std and group_size > 1:  # G=1: adv is already 0 and the std is taken as 0
        adv_NxG = adv_NxG / (rewards_NxG.std(axis=1, ddof=1, keepdims=True) + eps)
    return adv_NxG.reshape(-1)


def aggregate(
    loss_BxT: ArrayLike,
    mask_BxT: ArrayLike,
    agg: str,
    *,
    norm_len: float | None = None,
    num_tokens: ArrayLike | None = None,
    num_seqs: ArrayLike | None = None,
    seq_denominator: str = "num_seqs",
    num_devices: int | None = None,
    seq_lens_BxT: ArrayLike | None = None,
) -> jax.Array:
    """Reduces a per-token loss to a scalar.

    Modes:
        "token-mean": sum(loss * mask) / num_tokens.
        "seq-mean-token-mean": sum over rows of (masked mean of the row; 0 for an empty row)
            / num_seqs.
        "seq-mean-token-sum-norm": sum over rows of (masked sum of the row / norm_len) / D, where
            `norm_len` is typically the padded response length and D is set by `seq_denominator`:
            "num_seqs" (default): D = num_seqs. This is TRL's `loss_type="dr_grpo"`
                (`trl/trainer/grpo_trainer.py:GRPOTrainer._compute_loss`:
                `(per_token_loss * mask).sum() / (per_token_loss.size(0) *
                self.max_completion_length)`), a mean over sequences.
            "num_devices": D = num_devices, a constant: the official ReLIFT scale. The official
                code (github TheRoadQaQ/ReLIFT, `relift/verl/verl/relift/core_algos.py:
                compute_policy_loss` with `loss_remove_token_mean=True`) computes, per micro-batch,
                `(pg_losses * eos_mask).sum() / eos_mask.shape[-1]` (sum over the micro-batch's
                sequences, / the padded response length 8192) and `actor.py:update_policy`
                backpropagates `policy_loss / self.gradient_accumulation`, where
                gradient_accumulation = ppo_mini_batch_size // ppo_micro_batch_size after
                `fsdp_worker.py` normalises both (x rollout.n, / data-parallel size): with
                `examples/math-7b/train.sh` (train_batch_size=128, rollout.n=8, 8 GPUs,
                ppo_mini_batch_size=64, ppo_micro_batch_size=64, use_dynamic_bsz=True) both are
                64*8/8 = 64 sequences per GPU, so gradient_accumulation = 1 and each GPU's gradient
                is the SUM over its 64 sequences of (token sum / 8192), however dynamic batching
                splits them. FSDP then AVERAGES the gradients of the 8 GPUs. Per update (one of 2
                mini-batches of 64 prompts x 8 = 512 sequences) the loss is therefore
                sum over 512 sequences of (token sum / 8192) / 8, i.e. D = 8 devices, where
                "num_seqs" gives D = 512: the official gradient is 512 / 8 = 64x ours (generally
                num_seqs / num_devices = sequences per device per update).

    Default denominators: num_tokens = number of masked tokens; num_seqs = number of rows with at
    least one masked token (all-padding rows do not count). Both are floored at 1 so that an empty
    batch gives 0, not NaN. Pass the mini-batch's values when accumulating over micro-batches.
    With seq_denominator="num_devices" the denominator does not depend on the batch, so the
    micro-batch losses sum to the whole batch's loss with nothing to pass (num_seqs is ignored).

    Args:
        loss_BxT: per-token loss `[B, T]`.
        mask_BxT: `[B, T]` 1 for tokens that count, 0 for padding (bool, int or float).
        agg: one of `AGG_MODES`.
        norm_len: the constant per-sequence divisor; required for "seq-mean-token-sum-norm".
        num_tokens: external token count (token-mean).
        num_seqs: external sequence count (seq-mean-*).
        seq_denominator: one of `SEQ_NORM_DENOMINATORS`; "num_devices" only with
            "seq-mean-token-sum-norm".
        num_devices: the data-parallel size whose averaging is reproduced (official: 8, whatever
            our own mesh is); required with seq_denominator="num_devices".
        seq_lens_BxT: for packed rows (several sequences per row): at each counted token, the
            number of counted tokens of ITS sequence. "seq-mean-token-mean" then weights each token
            by 1 / its sequence's length instead of taking row means (the other modes are sums
            over tokens and do not need it); pass num_seqs too.

    Returns:
        float32 scalar.

    Raises:
        ValueError: for an unknown `agg` or `seq_denominator`, "seq-mean-token-sum-norm" without
            `norm_len`, or "num_devices" with another `agg` or without a positive `num_devices`.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {AGG_MODES}")
    if seq_denominator not in SEQ_NORM_DENOMINATORS:
        raise ValueError(
            f"unknown seq_denominator {seq_denominator!r}; expected one of {SEQ_NORM_DENOMINATORS}"
        )
    if seq_denominator == "num_devices":
        if agg != "seq-mean-token-sum-norm":
            raise ValueError(
                f"seq_denominator 'num_devices' needs agg 'seq-mean-token-sum-norm', got {agg!r}"
            )
        if num_devices is None or num_devices < 1:
            raise ValueError(
                f"seq_denominator 'num_devices' needs num_devices >= 1, got {num_devices!r}"
            )
    mask_BxT = jnp.asarray(mask_BxT).astype(jnp.float32)
    # where, not a plain product: padded positions may hold inf/NaN (e.g. garbage logprobs).
    loss_BxT = jnp.where(mask_BxT != 0, jnp.asarray(loss_BxT, jnp.float32), 0.0) * mask_BxT

    if agg == "token-mean":
        denom = jnp.sum(mask_BxT) if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
        return jnp.sum(loss_BxT) / jnp.maximum(denom, 1.0)

    if seq_lens_BxT is not None and agg == "seq-mean-token-mean":
        if num_seqs is None:
            raise ValueError("packed rows (seq_lens_BxT) need num_seqs: rows are not sequences")
        lens_BxT = jnp.maximum(jnp.asarray(seq_lens_BxT, jnp.float32), 1.0)
        return jnp.sum(loss_BxT / lens_BxT) / jnp.maximum(jnp.asarray(num_seqs, jnp.float32), 1.0)
    tokens_B = jnp.sum(mask_BxT, axis=1)
    if seq_denominator == "num_devices":
        denom = jnp.asarray(num_devices, jnp.float32)
    elif num_seqs is None:
        denom = jnp.sum((tokens_B > 0).astype(jnp.float32))
    else:
        denom = jnp.asarray(num_seqs, jnp.float32)
    denom = jnp.maximum(denom, 1.0)
    if agg == "seq-mean-token-mean":
        seq_B = jnp.sum(loss_BxT, axis=1) / jnp.maximum(tokens_B, 1.0)
    else:
        if norm_len is None:
            raise ValueError(
                "aggregation 'seq-mean-token-sum-norm' needs norm_len (e.g. the padded response "
                "length), got None"
            )
        seq_B = jnp.sum(loss_BxT, axis=1) / jnp.asarray(norm_len, jnp.float32)
    return jnp.sum(seq_B) / denom


def _masked_token_mean(
    x_BxT: jax.Array, mask_BxT: jax.Array, num_tokens: ArrayLike | None
) -> jax.Array:
    """sum(x * mask) / max(num_tokens or sum(mask), 1), safe against inf/NaN at padding."""
    return aggregate(x_BxT, mask_BxT, "token-mean", num_tokens=num_tokens)


def truncated_is_weights(train_logprobs: ArrayLike, sampler_logprobs: ArrayLike, mask: ArrayLike,
                         cap: float) -> jax.Array:
    """Truncated importance sampling (verl's and TRL's TIS): per token min(pi_train / pi_sampler,
    cap), correcting for the sampler's numerics differing from the training forward's; 1 at
    padding. All `[B, T]`."""
    log_w = jnp.asarray(train_logprobs, jnp.float32) - jnp.asarray(sampler_logprobs, jnp.float32)
    w = jnp.minimum(jnp.exp(jnp.minimum(log_w, math.log(cap))), cap)
    return jnp.where(jnp.asarray(mask) != 0, w, 1.0)


def policy_loss(
    logprobs: ArrayLike,
    old_logprobs: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    *,
    clip_low: float | None,
    clip_high: float | None,
    agg: str,
    norm_len: float | None = None,
    num_tokens: ArrayLike | None = None,
    num_seqs: ArrayLike | None = None,
    seq_denominator: str = "num_seqs",
    num_devices: int | None = None,
    seq_lens: ArrayLike | None = None,
    is_weights: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Policy-gradient loss -A * ratio, optionally PPO-clipped, aggregated by `aggregate`.

    With clipping the per-token loss is max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high));
    clip_high > clip_low is "clip-higher" (DAPO). ReLIFT's default is no clipping (both None).

    Args:
        logprobs: `[B, T]` log-probabilities of the sampled tokens under the current policy.
        old_logprobs: `[B, T]` the same under the policy that sampled them.
        advantages: `[B]` one advantage per sequence, or `[B, T]` one per token (packed rows:
            each token carries its sequence's advantage).
        mask: `[B, T]` response-token mask.
        clip_low, clip_high: both None (no clipping) or both floats.
        seq_lens: `[B, T]` as `aggregate`'s seq_lens_BxT (packed rows).
        is_weights: `[B, T]` per-token importance weights multiplying each token's loss (truncated
            importance sampling: `truncated_is_weights`); constants, no gradient flows into them.
        agg, norm_len, num_tokens, num_seqs, seq_denominator, num_devices: as in `aggregate`
            (seq_denominator="num_devices" is the official ReLIFT scale; the metrics below are
            token-means either way).

    Returns:
        (loss, metrics). metrics holds float32 scalars:
            pg_loss: the loss;
            clip_frac: token-mean of "the clipped branch is strictly larger" (0 without clipping);
            approx_kl: token-mean of (old_logprobs - logprobs), verl's `ppo_kl` (the k1 estimator);
            ratio_mean: token-mean of the ratio;
            ratio_max: max of the ratio over masked tokens (0 if none).
        The token-means use `num_tokens` when given, so like the loss they SUM over micro-batches;
        ratio_max combines by max.

    Raises:
        ValueError: if exactly one of clip_low / clip_high is None, or as in `aggregate`.
    """
    if (clip_low is None) != (clip_high is None):
        raise ValueError(
            "clip_low and clip_high must both be None or both be floats, "
            f"got clip_low={clip_low}, clip_high={clip_high}"
        )
    logprobs_BxT = jnp.asarray(logprobs, jnp.float32)
    old_logprobs_BxT = jnp.asarray(old_logprobs, jnp.float32)
    adv = jnp.asarray(advantages, jnp.float32)
    adv_Bx1 = adv[:, None] if adv.ndim == 1 else adv  # [B, 1] or already per token [B, T]
    mask_BxT = jnp.asarray(mask).astype(jnp.float32)
    valid_BxT = mask_BxT != 0

    # Zero the log-ratio at padding before exp: neither the value nor its gradient may overflow
    # there.
    log_ratio_BxT = jnp.where(valid_BxT, logprobs_BxT - old_logprobs_BxT, 0.0)
    ratio_BxT = jnp.exp(log_ratio_BxT)
    loss_BxT = -adv_Bx1 * ratio_BxT
    if clip_low is None:
        clipped_BxT = jnp.zeros_like(loss_BxT)
    else:
        clipped_loss_BxT = -adv_Bx1 * jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high)
        clipped_BxT = (clipped_loss_BxT > loss_BxT).astype(jnp.float32)
        loss_BxT = jnp.maximum(loss_BxT, clipped_loss_BxT)
    if is_weights is not None:
        loss_BxT = loss_BxT * jax.lax.stop_gradient(jnp.asarray(is_weights, jnp.float32))

    loss = aggregate(
        loss_BxT, mask_BxT, agg, norm_len=norm_len, num_tokens=num_tokens, num_seqs=num_seqs,
        seq_denominator=seq_denominator, num_devices=num_devices, seq_lens_BxT=seq_lens,
    )
    # Metrics are diagnostics: keep them out of the gradient.
    ratio_BxT = jax.lax.stop_gradient(ratio_BxT)
    metrics = {
        "pg_loss": loss,
        "clip_frac": _masked_token_mean(clipped_BxT, mask_BxT, num_tokens),
        "approx_kl": _masked_token_mean(
            -jax.lax.stop_gradient(log_ratio_BxT), mask_BxT, num_tokens
        ),
        "ratio_mean": _masked_token_mean(ratio_BxT, mask_BxT, num_tokens),
        # ratio > 0, so 0 at padding never wins over a real token.
        "ratio_max": jnp.max(jnp.where(valid_BxT, ratio_BxT, 0.0)),
    }
    return loss, metrics


def kl_penalty(logprobs: ArrayLike, ref_logprobs: ArrayLike, kind: str) -> jax.Array:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probabilities.

    Schulman's k3 exists in two versions among the peers, under the same name, so this function
    accepts neither bare "k3" nor a silent default between them:
        verl `verl/trainer/ppo/core_algos.py:kl_penalty_forward`: "low_var_kl" and its alias "k3"
            clamp `kl = ref_logprob - logprob` to [-20, 20] before `torch.exp` and the result to
            [-10, 10]. The official ReLIFT fork's older copy (`relift/verl/verl/trainer/ppo/
            core_algos.py:kl_penalty`, "low_var_kl" only) clamps only the result; the values are
            the same (the output clamp binds from diff > 2.61 and diff < -11.0, inside [-20, 20]);
            the inner clamp only keeps exp from overflowing into a NaN gradient.
        TRL `trl/trainer/grpo_trainer.py:GRPOTrainer._compute_loss`: `torch.exp(ref - logp) -
            (ref - logp) - 1` with no clamp at all.

    Args:
        logprobs: `[B, T]` under the policy.
        ref_logprobs: `[B, T]` under the reference model.
        kind: "k1": logp - ref (verl "kl"/"k1");
            "k3_unclamped": exp(ref - logp) - (ref - logp) - 1, unbiased and non-negative, with no
                clamp (TRL's GRPO k3; grows like exp(ref - logp) for large deviations);
            "low_var_kl": the same with ref - logp clamped to [-20, 20] and the result to
                [-10, 10] (verl's "low_var_kl" / "k3"; zero gradient where the clamp binds).
            "k3" is rejected with a message naming the two.

    Returns:
        `[B, T]` float32 (unmasked; aggregate it with the response mask).

    Raises:
        ValueError: for an unknown kind, including the ambiguous "k3".
    """
    logprobs_BxT = jnp.asarray(logprobs, jnp.float32)
    ref_logprobs_BxT = jnp.asarray(ref_logprobs, jnp.float32)
    if kind == "k1":
        return logprobs_BxT - ref_logprobs_BxT
    if kind in ("k3_unclamped", "low_var_kl"):
        diff_BxT = ref_logprobs_BxT - logprobs_BxT
        if kind == "low_var_kl":
            diff_BxT = jnp.clip(diff_BxT, -20.0, 20.0)
        kl_BxT = jnp.exp(diff_BxT) - diff_BxT - 1.0
        return jnp.clip(kl_BxT, -10.0, 10.0) if kind == "low_var_kl" else kl_BxT
    if kind == "k3":
        raise ValueError(f"KL estimator 'k3' is {K3_AMBIGUOUS}")
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


def token_logprobs_and_entropy(
    logits_BxTxV: ArrayLike, targets_BxT: ArrayLike, *, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities of the targets and the entropy of the full distribution, in float32.

    Materialises a `[B, T, V]` float32 log-softmax; callers with a large vocabulary should chunk
    over T.

    Args:
        logits_BxTxV: `[B, T, V]` logits (any float dtype).
        targets_BxT: `[B, T]` integer token ids.
        temperature: the logits are divided by it, as in sampling, so that logprobs match the
            sampler.

    Returns:
        (logprobs_BxT, entropy_BxT), both float32: log softmax(logits / temperature)[target] and
        -sum_v p_v log p_v.
    """
    scaled_BxTxV = jnp.asarray(logits_BxTxV, jnp.float32) / temperature
    logp_BxTxV = jax.nn.log_softmax(scaled_BxTxV, axis=-1)
    targets_BxT = jnp.asarray(targets_BxT).astype(jnp.int32)
    logprobs_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    p_BxTxV = jnp.exp(logp_BxTxV)
    # A -inf logit (masked vocabulary) gives p = 0 and logp = -inf; count it as 0, not NaN.
    safe_logp_BxTxV = jnp.where(p_BxTxV > 0, logp_BxTxV, 0.0)
    entropy_BxT = -jnp.sum(p_BxTxV * safe_logp_BxTxV, axis=-1)
    return logprobs_BxT, entropy_BxT


def sft_loss(
    logits: ArrayLike,
    targets: ArrayLike,
    mask: ArrayLike,
    *,
    entropy_coef: float = 0.0,
    num_tokens: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean negative log-likelihood minus an entropy bonus (ReLIFT's SFT step).

    Args:
        logits: `[B, T, V]` logits predicting `targets`.
        targets: `[B, T]` target token ids.
        mask: `[B, T]` 1 for demonstration tokens (response incl. EOS), 0 for prompt and padding.
        entropy_coef: weight of the entropy bonus (ReLIFT default 0.001).
        num_tokens: external token count for gradient accumulation (default: masked tokens here).

    Returns:
        (loss, metrics) with metrics float32 scalars: nll, entropy (token-means, with the same
        denominator as the loss, so they sum over micro-batches), loss, and num_tokens (the masked
        tokens in THIS batch).
    """
    logprobs_BxT, entropy_BxT = token_logprobs_and_entropy(logits, targets)
    return sft_loss_from_logprobs(logprobs_BxT, entropy_BxT, mask, entropy_coef=entropy_coef,
                                  num_tokens=num_tokens)


def sft_loss_from_logprobs(
    logprobs: ArrayLike,
    entropy: ArrayLike,
    mask: ArrayLike,
    *,
    entropy_coef: float = 0.0,
    num_tokens: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`sft_loss` from the targets' log-probabilities and the entropies `[B, T]` (the train step
    computes them in chunks, never as `[B, T, V]` logits); same returns."""
    logprobs_BxT, entropy_BxT = logprobs, entropy
    mask_BxT = jnp.asarray(mask).astype(jnp.float32)
    nll = _masked_token_mean(-logprobs_BxT, mask_BxT, num_tokens)
    entropy = _masked_token_mean(entropy_BxT, mask_BxT, num_tokens)
    loss = nll - entropy_coef * entropy
    metrics = {
        "nll": nll,
        "entropy": entropy,
        "loss": loss,
        "num_tokens": jnp.sum(mask_BxT),
    }
    return loss, metrics
