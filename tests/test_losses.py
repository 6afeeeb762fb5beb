"""Tests for relift_jax.losses against independent float64 numpy references written here.

Shape key: B batch, T tokens, V vocab, N questions, G generations per question.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relift_jax import losses
from f32 import EPS32, assert_close, chain_ulps

# Every tolerance below is ulps * eps32 * scale (tests/f32.py), derived from the float32 operations
# of the computation under test against an (exact for our purposes) float64 numpy reference.
# XLA CPU's float32 exp/log: measured <= 0.7 eps32 * |exp| and <= 2.3 eps32 absolute near log(1)
# (AVX-512 Xeon); other vector paths are "a few ulp", and an ulp is at most eps32 * |value|.
U_EXP = 8
# Per-token ops of the policy loss before its reduction: exp, the log-ratio subtraction (an error of
# eps32 * |log_ratio| / 2 <= 1 eps32 of the ratio here), the float32 clip bound, the product with adv.
PG_ELEMENTWISE = U_EXP + 3
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
CLIPS = ((None, None), (0.2, 0.2), (0.2, 0.28))
B, T, V = 8, 12, 11
NORM_LEN = float(T)


# ----------------------------------------------------------------------------- numpy references


def np_group_advantages(rewards, g, scale_by_std, eps=1e-6):
    """verl compute_grpo_outcome_advantage / TRL nanstd: torch.std, i.e. Bessel-corrected."""
    out = np.empty(len(rewards), np.float64)
    for start in range(0, len(rewards), g):
        grp = np.asarray(rewards[start : start + g], np.float64)
        mean = sum(grp) / g
        adv = grp - mean
        if scale_by_std:
            # ddof=1; G=1 (undefined) is taken as std 0 as in TRL, so adv stays 0.
            std = np.sqrt(sum((grp - mean) ** 2) / (g - 1)) if g > 1 else 0.0
            adv = adv / (std + eps)
        out[start : start + g] = adv
    return out


def np_official_relift_pg_loss(logp, old, adv, mask, response_len, num_devices, max_tokens):
    """The official ReLIFT RL loss of one update, simulated step by step from its code.

    relift/verl/verl/relift/core_algos.py:compute_policy_loss, loss_remove_token_mean=True,
    loss_remove_clip=True: pg_loss = (pg_losses * eos_mask).sum() / eos_mask.shape[-1] per
    micro-batch. relift/verl/verl/relift/actor.py:update_policy: micro-batches by a token budget
    (use_dynamic_bsz), each backpropagates pg_loss / gradient_accumulation with
    gradient_accumulation = 1 at the official shapes; the gradients of a device add up; FSDP then
    averages over the devices. The sequences are dealt to devices in contiguous chunks
    (Dispatch.DP_COMPUTE_PROTO). Returns the loss whose gradient is the official update direction.
    """
    logp, old, adv, mask = (np.asarray(x, np.float64) for x in (logp, old, adv, mask))
    gradient_accumulation = 1
    per_device = []
    for dev in np.array_split(np.arange(len(logp)), num_devices):
        # Token-budget micro-batches (any partition gives the same sum: the loss has no mean).
        micro, cur, used = [], [], 0
        for i in dev:
            n = int(mask[i].sum())
            if cur and used + n > max_tokens:
                micro.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += n
        if cur:
            micro.append(cur)
        total = 0.0
        for mb in micro:
            ratio = np.exp(logp[mb] - old[mb])
            pg_losses = -adv[mb][:, None] * ratio
            pg_loss = (pg_losses * mask[mb]).sum() / response_len
            total += pg_loss / gradient_accumulation
        per_device.append(total)
    return float(np.mean(per_device))


def np_aggregate(loss, mask, agg, norm_len=None, num_tokens=None, num_seqs=None,
                 seq_denominator="num_seqs", num_devices=None):
    loss = np.asarray(loss, np.float64)
    mask = np.asarray(mask, np.float64)
    if agg == "token-mean":
        n = mask.sum() if num_tokens is None else num_tokens
        return (loss * mask).sum() / max(n, 1)
    total = 0.0
    count = 0
    for row_loss, row_mask in zip(loss, mask):
        k = row_mask.sum()
        if k > 0:
            count += 1
        s = (row_loss * row_mask).sum()
        if agg == "seq-mean-token-mean":
            total += s / k if k > 0 else 0.0
        else:
            total += s / norm_len
    if seq_denominator == "num_devices":
        return total / num_devices
    n = count if num_seqs is None else num_seqs
    return total / max(n, 1)


def np_policy_loss(logp, old, adv, mask, clip_low, clip_high, agg, **denoms):
    logp, old, adv = (np.asarray(x, np.float64) for x in (logp, old, adv))
    mask = np.asarray(mask, np.float64)
    ratio = np.exp(logp - old)
    unclipped = -adv[:, None] * ratio
    if clip_low is None:
        per_tok = unclipped
        clipped_active = np.zeros_like(ratio)
    else:
        lo, hi = 1.0 - clip_low, 1.0 + clip_high
        clipped = -adv[:, None] * np.minimum(np.maximum(ratio, lo), hi)
        per_tok = np.maximum(unclipped, clipped)
        clipped_active = (clipped > unclipped).astype(np.float64)
    n_tok = mask.sum() if denoms.get("num_tokens") is None else denoms["num_tokens"]
    n_tok = max(n_tok, 1)
    loss = np_aggregate(per_tok, mask, agg, **denoms)
    return loss, {
        "clip_frac": (clipped_active * mask).sum() / n_tok,
        "approx_kl": ((old - logp) * mask).sum() / n_tok,
        "ratio_mean": (ratio * mask).sum() / n_tok,
        "ratio_max": ratio[mask > 0].max(),
        "per_tok": per_tok,  # float64 terms, for the float32 bounds
        "log_ratio": logp - old,
        "ratio": ratio,
    }


def np_log_softmax(logits):
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def np_logprobs_entropy(logits, targets, temperature):
    logp = np_log_softmax(np.asarray(logits, np.float64) / temperature)
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    entropy = -(np.exp(logp) * logp).sum(axis=-1)
    return picked, entropy


# ----------------------------------------------------------------------------- inputs


def ragged_mask(rng, b=B, t=T):
    """Right-padded rows of random length; row 2 is all padding, row 0 is full."""
    lengths = rng.integers(1, t + 1, size=b)
    lengths[0] = t
    lengths[2] = 0
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


def pg_inputs(seed=0):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-2.0, 1.0, size=(B, T)).astype(np.float32)
    # Log-ratios of up to ~±0.6 so that both clip boundaries are crossed.
    old = (logp + rng.normal(0.0, 0.3, size=(B, T))).astype(np.float32)
    adv = rng.normal(0.0, 1.0, size=B).astype(np.float32)
    mask = ragged_mask(rng)
    # Garbage at padding must not leak into any result.
    logp[mask == 0] = 200.0  # exp(200 - old) overflows float32
    return logp, old, adv, mask


def denoms_of(mask):
    """The mini-batch denominators a train step would pass to each micro-batch."""
    return dict(num_tokens=float(mask.sum()), num_seqs=float((mask.sum(axis=1) > 0).sum()))


def assert_group_advantages_close(out, rewards, g, scale_by_std, err_msg=""):
    """Float32 mean, subtraction, (sum of squares, sqrt), division of G-term groups: chain_ulps(G, 4)
    of each group's max|r| / (std + eps) (max|r|: the size of the terms of the mean and of adv)."""
    r = np.asarray(rewards, np.float64).reshape(-1, g)
    std = r.std(axis=1, ddof=1, keepdims=True) if g > 1 else np.zeros((len(r), 1))
    size = np.abs(r).max(axis=1, keepdims=True)
    # A group of equal rewards has adv exactly 0 (checked exactly); its scale stays max|r|.
    scale = np.where(std > 0, size / (std + 1e-6), size) if scale_by_std else size
    assert_close_elementwise(out, np_group_advantages(rewards, g, scale_by_std),
                             ulps=chain_ulps(g, 4), scale=np.broadcast_to(scale, r.shape).ravel(),
                             err_msg=err_msg)


# ----------------------------------------------------------------------------- float32 bounds


def assert_close_elementwise(actual, desired, *, ulps, scale, err_msg=""):
    """|actual - desired| <= ulps * eps32 * scale element by element (scale an array); where scale
    is 0 the value must be exact."""
    actual, desired, scale = (np.asarray(x, np.float64) for x in (actual, desired, scale))
    scale = np.broadcast_to(scale, desired.shape)
    zero = scale == 0
    np.testing.assert_array_equal(actual[zero], desired[zero], err_msg=err_msg)
    assert_close(actual[~zero] / scale[~zero], desired[~zero] / scale[~zero], ulps=ulps, scale=1.0,
                 err_msg=err_msg)


def agg_bound(terms, mask, agg, elementwise, **denoms):
    """(ulps, scale) of a float32 aggregate of per-token `terms` (float64, the reference's):
    scale = the same aggregate of |terms| (the sums cancel, their rounding does not); ulps = the
    per-term ops + the token/row reductions (at most mask.size terms, random walk) + the divisions."""
    terms = np.where(np.asarray(mask) > 0, np.abs(np.asarray(terms, np.float64)), 0.0)
    scale = np_aggregate(terms, mask, agg, **denoms)
    return elementwise + chain_ulps(np.asarray(mask).size, 2) + 2, scale


def k3_scale(d):
    """Size of the terms of e^d - d - 1 (cancels to ~d^2/2): e^d, |d|, 1, and e^d * |d| for the
    float32 rounding of d = ref - logp (relative eps32 / 2, amplified by e^d). With ulps U_EXP + 2
    (exp, two subtractions)."""
    d = np.asarray(d, np.float64)
    return np.exp(d) * (1.0 + np.abs(d)) + np.abs(d) + 1.0


# log_softmax + picked + entropy, per vocab entry: x / temperature (eps32 |x|), x - max, the V-term
# sum of exp (sqrt(V) + U_EXP), its log (U_EXP; abs eps32 near log 1) and the last subtraction.
LOGSOFTMAX_ULPS = math.sqrt(V) + 2 * U_EXP + 3


def np_logsoftmax_scales(logits, temperature):
    """Float64 per-entry scale of the log-prob error, S_v = |x_v| + |x_v - max| + log(sum) + 1, and
    per-token scale of the entropy's error: sum_v p_v (1 + |logp_v|) S_v (the error of p_v log p_v
    from logp_v's) + sqrt(V) * entropy (its V-term sum). Both with ulps LOGSOFTMAX_ULPS."""
    x = np.asarray(logits, np.float64) / temperature
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    s_v = np.abs(x) + np.abs(x - m) + lse + 1.0
    logp = x - m - lse
    p = np.exp(logp)
    ent = -(p * logp).sum(-1)
    return s_v, (p * (1.0 + np.abs(logp)) * s_v).sum(-1) + math.sqrt(x.shape[-1]) * ent


# ----------------------------------------------------------------------------- group_advantages


@pytest.mark.parametrize("scale_by_std", [False, True])
def test_group_advantages(scale_by_std):
    rng = np.random.default_rng(1)
    g = 4
    rewards = rng.integers(0, 2, size=5 * g).astype(np.float32)
    rewards[0:g] = 1.0  # all correct
    rewards[g : 2 * g] = 0.0  # all wrong
    rewards[2 * g : 3 * g] = rng.normal(size=g)  # non-binary rewards too
    out = np.asarray(losses.group_advantages(rewards, g, scale_by_std=scale_by_std))
    assert out.dtype == np.float32 and out.shape == rewards.shape
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[: 2 * g], 0.0)
    assert_group_advantages_close(out, rewards, g, scale_by_std)


def test_group_advantages_std_is_unbiased():
    """ddof=1 as torch.std in verl and TRL: for G=8 the ddof=0 advantages were sqrt(8/7) larger."""
    rewards = np.array([1, 0, 0, 1, 0, 0, 0, 1], np.float32)
    out = np.asarray(losses.group_advantages(rewards, 8, scale_by_std=True))
    adv = rewards - rewards.mean()
    assert_group_advantages_close(out, rewards, 8, True)
    ddof0 = adv / (np.std(rewards, ddof=0) + 1e-6)  # float32 numpy, the same chain as `out`
    r64 = rewards.astype(np.float64)
    s0, s1 = np.std(r64, ddof=0), np.std(r64, ddof=1)
    # Two float32 chains of chain_ulps(8, 4) and the ratio's division; atol: eps=1e-6's own shift of
    # the ratio away from sqrt(8/7) (~1.4e-7, exact in float64).
    assert_close(ddof0[0] / out[0], np.sqrt(8 / 7), ulps=2 * chain_ulps(8, 4) + 1,
                 atol=abs((s1 + 1e-6) / (s0 + 1e-6) - s1 / s0))


@pytest.mark.parametrize("scale_by_std", [False, True])
def test_group_advantages_group_of_one_is_zero_not_nan(scale_by_std):
    rewards = np.array([1.0, 0.0, 0.5], np.float32)
    out = np.asarray(losses.group_advantages(rewards, 1, scale_by_std=scale_by_std))
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(np_group_advantages(rewards, 1, scale_by_std), 0.0)


def test_group_advantages_jax_input_and_jit():
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], jnp.float32)
    fn = jax.jit(functools.partial(losses.group_advantages, group_size=3, scale_by_std=True))
    assert_group_advantages_close(np.asarray(fn(rewards)), np.asarray(rewards), 3, True)


def test_group_advantages_not_divisible():
    with pytest.raises(ValueError, match="not divisible"):
        losses.group_advantages(np.zeros(10), 4, scale_by_std=False)


# ----------------------------------------------------------------------------- policy_loss


@pytest.mark.parametrize("clip", CLIPS, ids=["noclip", "clip0.2", "cliphigher"])
@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_matches_numpy(agg, clip):
    logp, old, adv, mask = pg_inputs()
    clip_low, clip_high = clip
    fn = jax.jit(
        functools.partial(
            losses.policy_loss, clip_low=clip_low, clip_high=clip_high, agg=agg, norm_len=NORM_LEN
        )
    )
    loss, metrics = fn(logp, old, adv, mask)
    ref_loss, ref = np_policy_loss(
        logp, old, adv, mask, clip_low, clip_high, agg, norm_len=NORM_LEN
    )
    assert loss.dtype == jnp.float32
    ulps, scale = agg_bound(ref["per_tok"], mask, agg, PG_ELEMENTWISE, norm_len=NORM_LEN)
    assert_close(float(loss), ref_loss, ulps=ulps, scale=scale, err_msg="loss")
    assert_close(float(metrics["pg_loss"]), ref_loss, ulps=ulps, scale=scale, err_msg="pg_loss")
    # The metrics are token-means: clip_frac a count (exact) / n; approx_kl of the log-ratios (one
    # subtraction each); ratio_mean of exp (+ the log-ratio's rounding); ratio_max one exp.
    assert_close(float(metrics["clip_frac"]), ref["clip_frac"], ulps=1, err_msg="clip_frac")
    for key, terms, elementwise in (("approx_kl", ref["log_ratio"], 1),
                                    ("ratio_mean", ref["ratio"], U_EXP + 1)):
        ulps, scale = agg_bound(terms, mask, "token-mean", elementwise)
        assert_close(float(metrics[key]), ref[key], ulps=ulps, scale=scale, err_msg=key)
    assert_close(float(metrics["ratio_max"]), ref["ratio_max"], ulps=U_EXP + 1, err_msg="ratio_max")
    if clip_low is None:
        assert float(metrics["clip_frac"]) == 0.0
    else:
        assert float(metrics["clip_frac"]) > 0.0  # the inputs really exercise clipping


def test_clip_higher_differs_from_symmetric_clip():
    logp, old, adv, mask = pg_inputs()
    sym, _ = losses.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, agg="token-mean")
    hi, _ = losses.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="token-mean")
    _, ref = np_policy_loss(logp, old, adv, mask, None, None, "token-mean")
    ulps, scale = agg_bound(ref["per_tok"], mask, "token-mean", PG_ELEMENTWISE)
    # A real difference: more than the rounding of both float32 values.
    assert abs(float(sym) - float(hi)) > 2 * ulps * EPS32 * scale


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_bf16_inputs_computed_in_float32(agg):
    logp, old, adv, mask = pg_inputs(seed=3)
    as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    loss, _ = losses.policy_loss(
        as_bf16(logp), as_bf16(old), as_bf16(adv), mask,
        clip_low=None, clip_high=None, agg=agg, norm_len=NORM_LEN,
    )
    # Reference on the same bf16-rounded values, upcast exactly to float64.
    rounded = [np.asarray(as_bf16(x).astype(jnp.float32)) for x in (logp, old, adv)]
    ref_loss, ref = np_policy_loss(*rounded, mask, None, None, agg, norm_len=NORM_LEN)
    assert loss.dtype == jnp.float32
    ulps, scale = agg_bound(ref["per_tok"], mask, agg, PG_ELEMENTWISE, norm_len=NORM_LEN)
    assert_close(float(loss), ref_loss, ulps=ulps, scale=scale)


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("num_micro", [2, 4])
@pytest.mark.parametrize("agg", AGGS + ("seq-mean-token-sum-norm/num_devices",))
def test_accumulation_identity(agg, num_micro):
    logp, old, adv, mask = pg_inputs(seed=5)
    agg, _, seq_denominator = agg.partition("/")
    seq_kw = dict(seq_denominator=seq_denominator, num_devices=8) if seq_denominator else {}
    kw = dict(clip_low=0.2, clip_high=0.28, agg=agg, norm_len=NORM_LEN, **seq_kw)
    full, full_metrics = losses.policy_loss(logp, old, adv, mask, **kw)
    denoms = denoms_of(mask)
    total = 0.0
    total_kl = 0.0
    for idx in np.array_split(np.arange(B), num_micro):
        part, part_metrics = losses.policy_loss(
            logp[idx], old[idx], adv[idx], mask[idx], **kw, **denoms
        )
        total += float(part)
        total_kl += float(part_metrics["approx_kl"])
    ref_full, ref = np_policy_loss(logp, old, adv, mask, 0.2, 0.28, agg, norm_len=NORM_LEN,
                                   **seq_kw)
    # Each float32 value (the full one; the micro-batches', whose scales add up to the full one's)
    # is within `ulps` of the exact value, so the two differ by twice that at most.
    ulps, scale = agg_bound(ref["per_tok"], mask, agg, PG_ELEMENTWISE + 1, norm_len=NORM_LEN,
                            **seq_kw)  # + 1: the micro-batch sum
    kl_ulps, kl_scale = agg_bound(ref["log_ratio"], mask, "token-mean", 2)
    assert_close(total, float(full), ulps=2 * ulps, scale=scale, err_msg="loss")
    assert_close(total_kl, float(full_metrics["approx_kl"]), ulps=2 * kl_ulps, scale=kl_scale,
                 err_msg="approx_kl")
    # Independently of the jax full-batch value, the sum also matches the numpy full batch.
    assert_close(total, ref_full, ulps=ulps, scale=scale, err_msg="numpy")


# ----------------------------------------------------------------------------- official scale


@pytest.mark.parametrize("num_micro", [1, 3, 8])
def test_num_devices_scale_matches_official_code_and_accumulates(num_micro):
    """The official ReLIFT loss at its shapes: 64 prompts x 8 samples = 512 sequences per update
    on 8 devices, summed per device over token-budget micro-batches / the padded response length,
    averaged over devices. Ours, accumulated over any micro-batch split, gives the same value and
    gradient, 512 / 8 = 64 times the num_seqs (TRL dr_grpo) scale."""
    rng = np.random.default_rng(11)
    b, t, devices = 512, 16, 8
    logp = rng.normal(-2.0, 1.0, size=(b, t)).astype(np.float32)
    old = (logp + rng.normal(0.0, 0.3, size=(b, t))).astype(np.float32)
    adv = rng.normal(0.0, 1.0, size=b).astype(np.float32)
    lengths = rng.integers(1, t + 1, size=b)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    official = np_official_relift_pg_loss(logp, old, adv, mask, t, devices, max_tokens=200)

    kw = dict(clip_low=None, clip_high=None, agg="seq-mean-token-sum-norm", norm_len=float(t),
              seq_denominator="num_devices", num_devices=devices)

    def accumulated(lp):
        total = 0.0
        for idx in np.array_split(np.arange(b), num_micro):
            # The train step passes the whole batch's num_seqs; the official scale ignores it.
            part, _ = losses.policy_loss(lp[idx], old[idx], adv[idx], mask[idx], **kw,
                                         **denoms_of(mask))
            total = total + part
        return total

    value, grad = jax.value_and_grad(accumulated)(jnp.asarray(logp))
    ratio = np.exp(logp.astype(np.float64) - old.astype(np.float64))
    official_grad = -adv[:, None].astype(np.float64) * ratio * mask / (t * devices)
    # 8192 mixed-sign terms: scale sum|terms| / (t * devices), summed in any order (sqrt(K)), then
    # num_micro float32 additions of the parts, the per-term ops and the two divisions.
    scale = float(np.abs(official_grad).sum())
    ulps = chain_ulps(b * t, 1) + num_micro + PG_ELEMENTWISE + 2
    assert_close(float(value), official, ulps=ulps, scale=scale, err_msg="value")
    # Each gradient entry is one chain (exp, subtraction, * adv, / t, / devices); padding exactly 0.
    assert_close_elementwise(np.asarray(grad), official_grad, ulps=U_EXP + 4,
                             scale=np.abs(official_grad), err_msg="grad")

    per_seq, _ = losses.policy_loss(logp, old, adv, mask, **dict(kw, seq_denominator="num_seqs"))
    # Both values are within ulps * eps32 * their scale of exact, so their ratio within the sum of
    # the relative bounds (scales / |values|) times 64, plus the division.
    assert_close(float(value) / float(per_seq), b / devices, ulps=2 * ulps * scale / abs(official) + 1)
    assert b / devices == 64


@pytest.mark.parametrize("agg", AGGS)
def test_seq_denominator_num_devices_matches_numpy(agg):
    logp, old, adv, mask = pg_inputs(seed=12)
    kw = dict(clip_low=0.2, clip_high=0.28, agg=agg, norm_len=NORM_LEN)
    if agg != "seq-mean-token-sum-norm":
        with pytest.raises(ValueError, match="num_devices"):
            losses.policy_loss(logp, old, adv, mask, **kw, seq_denominator="num_devices",
                               num_devices=4)
        return
    loss, _ = losses.policy_loss(logp, old, adv, mask, **kw, seq_denominator="num_devices",
                                 num_devices=4)
    ref, terms = np_policy_loss(logp, old, adv, mask, 0.2, 0.28, agg, norm_len=NORM_LEN,
                                seq_denominator="num_devices", num_devices=4)
    ulps, scale = agg_bound(terms["per_tok"], mask, agg, PG_ELEMENTWISE, norm_len=NORM_LEN,
                            seq_denominator="num_devices", num_devices=4)
    assert_close(float(loss), ref, ulps=ulps, scale=scale)


def test_seq_denominator_errors():
    loss = np.zeros((2, 3), np.float32)
    mask = np.ones((2, 3), np.float32)
    agg = "seq-mean-token-sum-norm"
    with pytest.raises(ValueError, match="seq_denominator"):
        losses.aggregate(loss, mask, agg, norm_len=3.0, seq_denominator="num_gpus")
    with pytest.raises(ValueError, match="num_devices >= 1"):
        losses.aggregate(loss, mask, agg, norm_len=3.0, seq_denominator="num_devices")
    with pytest.raises(ValueError, match="num_devices >= 1"):
        losses.aggregate(loss, mask, agg, norm_len=3.0, seq_denominator="num_devices",
                         num_devices=0)


@pytest.mark.parametrize("num_micro", [2, 4])
def test_sft_accumulation_identity(num_micro):
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    mask = ragged_mask(rng)
    full, _ = losses.sft_loss(logits, targets, mask, entropy_coef=0.001)
    n = mask.sum()
    total = sum(
        float(losses.sft_loss(logits[i], targets[i], mask[i], entropy_coef=0.001, num_tokens=n)[0])
        for i in np.array_split(np.arange(B), num_micro)
    )
    # Two float32 token-means of nll - 0.001 * entropy (terms: logsoftmax scales), each within
    # LOGSOFTMAX_ULPS + the reduction + the subtraction + the division of exact.
    s_v, ent_scale = np_logsoftmax_scales(logits, 1.0)
    picked = np.take_along_axis(s_v, targets[..., None], axis=-1)[..., 0]
    scale = float(((picked + 0.001 * ent_scale) * mask).sum() / n)
    assert_close(total, float(full), ulps=2 * (LOGSOFTMAX_ULPS + chain_ulps(B * T, 1) + 3),
                 scale=scale)


# ----------------------------------------------------------------------------- aggregate edge cases


def test_aggregate_default_num_seqs_skips_empty_rows():
    loss = np.ones((3, 4), np.float32)
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    # Two non-empty rows, each with per-token mean 1.
    # 2/2, 4/4 and (1 + 1)/2 are exact; 1 ulp allowed for the final division.
    assert_close(float(losses.aggregate(loss, mask, "seq-mean-token-mean")), 1.0, ulps=1)
    # Caller-supplied num_seqs overrides: count the padding row too.
    # (1 + 1) / 3: one rounding of the division.
    assert_close(float(losses.aggregate(loss, mask, "seq-mean-token-mean", num_seqs=3)), 2.0 / 3.0,
                 ulps=1)


def test_aggregate_all_empty_is_zero_not_nan():
    loss = np.full((2, 3), np.nan, np.float32)
    mask = np.zeros((2, 3), np.float32)
    for agg in AGGS:
        assert float(losses.aggregate(loss, mask, agg, norm_len=3.0)) == 0.0


def test_aggregate_errors():
    loss = np.zeros((2, 3), np.float32)
    mask = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="token-sum"):
        losses.aggregate(loss, mask, "token-sum")
    with pytest.raises(ValueError, match="norm_len"):
        losses.aggregate(loss, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="clip_low"):
        losses.policy_loss(
            loss, loss, np.zeros(2), mask, clip_low=0.2, clip_high=None, agg="token-mean"
        )


# ----------------------------------------------------------------------------- gradient


def test_policy_loss_gradient_no_clip_token_mean():
    logp, old, adv, mask = pg_inputs(seed=7)

    def loss_fn(lp):
        loss, _ = losses.policy_loss(
            lp, old, adv, mask, clip_low=None, clip_high=None, agg="token-mean"
        )
        return loss

    grad = np.asarray(jax.grad(loss_fn)(jnp.asarray(logp)))
    assert np.all(np.isfinite(grad))  # the garbage logprob 200 at padding must not give inf * 0
    m = mask.astype(np.float64)
    ratio = np.exp(logp.astype(np.float64) - old.astype(np.float64))
    expected = np.where(m > 0, -adv[:, None].astype(np.float64) * ratio * m / m.sum(), 0.0)
    # Per entry: exp, the log-ratio subtraction, * adv, * mask, / n; padding exactly 0.
    assert_close_elementwise(grad, expected, ulps=U_EXP + 4, scale=np.abs(expected))


# ----------------------------------------------------------------------------- kl_penalty


def np_k3_unclamped(logp, ref):
    """TRL GRPOTrainer._compute_loss: exp(ref - logp) - (ref - logp) - 1, no clamp."""
    d = np.asarray(ref, np.float64) - np.asarray(logp, np.float64)
    return np.exp(d) - d - 1.0


def np_low_var_kl(logp, ref):
    """verl core_algos.kl_penalty_forward 'low_var_kl' / 'k3'."""
    kl = np.clip(np.asarray(ref, np.float64) - np.asarray(logp, np.float64), -20.0, 20.0)
    return np.clip(np.exp(kl) - kl - 1.0, -10.0, 10.0)


def np_low_var_kl_relift_fork(logp, ref):
    """The official ReLIFT fork's older verl kl_penalty 'low_var_kl': only the output clamp."""
    with np.errstate(over="ignore"):
        kl = np.asarray(ref, np.float64) - np.asarray(logp, np.float64)
        return np.clip(np.exp(kl) - kl - 1.0, -10.0, 10.0)


def test_kl_penalty():
    rng = np.random.default_rng(8)
    logp = rng.normal(-2.0, 1.0, size=(B, T)).astype(np.float32)
    ref = (logp + rng.normal(0.0, 0.5, size=(B, T))).astype(np.float32)
    lp64, ref64 = logp.astype(np.float64), ref.astype(np.float64)
    # k1: one float32 subtraction, half an ulp of |logp - ref|.
    assert_close_elementwise(np.asarray(losses.kl_penalty(logp, ref, "k1")), lp64 - ref64, ulps=1,
                             scale=np.abs(lp64 - ref64), err_msg="k1")
    out = np.asarray(losses.kl_penalty(logp, ref, "k3_unclamped"))
    k3_bound = dict(ulps=U_EXP + 2, scale=k3_scale(ref64 - lp64))  # e^d - d - 1 cancels
    assert_close_elementwise(out, np_k3_unclamped(logp, ref), **k3_bound, err_msg="k3_unclamped")
    assert np.all(out >= 0)
    # Small deviations: both k3 versions agree.
    assert_close_elementwise(np.asarray(losses.kl_penalty(logp, ref, "low_var_kl")),
                             np_low_var_kl(logp, ref), **k3_bound, err_msg="low_var_kl")
    assert_close_elementwise(out, np_low_var_kl(logp, ref), **k3_bound, err_msg="k3 vs low_var_kl")
    with pytest.raises(ValueError, match="k2"):
        losses.kl_penalty(logp, ref, "k2")


def test_kl_penalty_extreme_values():
    """Where the peers' k3 versions differ: large |ref - logp|."""
    diffs = np.array([-100.0, -30.0, -20.5, -11.5, -10.5, -1.0, 0.0, 2.0, 2.7, 5.0, 30.0, 100.0])
    logp = np.zeros_like(diffs, np.float32)
    ref = diffs.astype(np.float32)
    low = np.asarray(losses.kl_penalty(logp, ref, "low_var_kl"))
    # d = ref - 0 is exact here; terms of e^d - d - 1 at the inner clamp's d (clamped ones: exact).
    low_bound = dict(ulps=U_EXP + 2, scale=k3_scale(np.clip(diffs, -20.0, 20.0)))
    assert_close_elementwise(low, np_low_var_kl(logp, ref), **low_bound, err_msg="low_var_kl")
    # The fork's version without the inner clamp gives the same values (its clamp binds first).
    assert_close_elementwise(low, np_low_var_kl_relift_fork(logp, ref), **low_bound,
                             err_msg="fork")
    np.testing.assert_array_equal(low[[0, 1, 2, 3, 8, 9, 10, 11]], 10.0)  # the clamp is exact
    # Unclamped: TRL's k3 grows without bound; finite in float32 up to exp(88).
    unclamped = np.asarray(losses.kl_penalty(logp[:-1], ref[:-1], "k3_unclamped"))
    assert_close_elementwise(unclamped, np_k3_unclamped(logp[:-1], ref[:-1]), ulps=U_EXP + 2,
                             scale=k3_scale(diffs[:-1]), err_msg="k3_unclamped")
    # 142.4 (clamped: 10). Tight-ish: (U_EXP + 2) eps32 * (e^5 + 6) = 1.8e-4, while exp's few ulps
    # of 148 and two subtractions measure ~2 eps32 * 148 = 3.5e-5.
    assert_close(unclamped[-2], np.exp(5.0) - 6.0, ulps=U_EXP + 2, scale=np.exp(5.0) + 6.0)
    # The clamped gradient is finite everywhere and 0 where the clamp binds.
    grad = np.asarray(jax.grad(lambda lp: losses.kl_penalty(lp, ref, "low_var_kl").sum())(
        jnp.asarray(logp)))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[[0, 1, 2, 3, 8, 9, 10, 11]], 0.0)
    # d/dlogp (e^d - d - 1) with d = ref - logp is 1 - e^d.
    # exp and one subtraction from 1; the terms are e^d and 1.
    assert_close_elementwise(grad[[4, 5, 6, 7]], 1.0 - np.exp(diffs[[4, 5, 6, 7]]), ulps=U_EXP + 1,
                             scale=np.exp(diffs[[4, 5, 6, 7]]) + 1.0)


def test_kl_k3_is_ambiguous_and_rejected():
    assert "k3" not in losses.KL_KINDS
    x = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="low_var_kl.*k3_unclamped"):
        losses.kl_penalty(x, x, "k3")


# ----------------------------------------------------------------------------- RLConfig


def test_rl_config_validates_loss_options():
    from relift_jax.config import RLConfig

    assert RLConfig().seq_norm_denominator == "num_seqs"
    cfg = RLConfig(seq_norm_denominator="num_devices")
    assert cfg.seq_norm_num_devices == 8  # the official 8 GPUs
    with pytest.raises(ValueError, match=r"^RLConfig.kl_kind = 'k3': .*'low_var_kl'.*'k3_unclamped'"):
        RLConfig(kl_kind="k3")
    assert RLConfig(kl_kind="k3_unclamped").kl_kind == "k3_unclamped"
    with pytest.raises(ValueError, match="seq_norm_denominator"):
        RLConfig(seq_norm_denominator="official")
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        RLConfig(seq_norm_denominator="num_devices", agg="token-mean")
    with pytest.raises(ValueError, match="seq_norm_num_devices"):
        RLConfig(seq_norm_num_devices=0)


# ----------------------------------------------------------------------------- SFT side


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy(temperature):
    rng = np.random.default_rng(9)
    logits = (3.0 * rng.normal(size=(B, T, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    logp, ent = losses.token_logprobs_and_entropy(logits, targets, temperature=temperature)
    ref_logp, ref_ent = np_logprobs_entropy(logits, targets, temperature)
    assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
    s_v, ent_scale = np_logsoftmax_scales(logits, temperature)
    picked = np.take_along_axis(s_v, targets[..., None], axis=-1)[..., 0]
    assert_close_elementwise(np.asarray(logp), ref_logp, ulps=LOGSOFTMAX_ULPS, scale=picked,
                             err_msg="logp")
    assert_close_elementwise(np.asarray(ent), ref_ent, ulps=LOGSOFTMAX_ULPS, scale=ent_scale,
                             err_msg="entropy")


def test_entropy_with_minus_inf_logits_is_finite():
    logits = np.array([[[0.0, -np.inf, 0.0]]], np.float32)
    _, ent = losses.token_logprobs_and_entropy(logits, np.zeros((1, 1), np.int32))
    # logp = -log 2 (log), p = 1/2 (exp), two products and their sum.
    assert_close(np.asarray(ent), [[np.log(2.0)]], ulps=2 * U_EXP + 3)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.001])
def test_sft_loss(entropy_coef):
    rng = np.random.default_rng(10)
    logits = (2.0 * rng.normal(size=(B, T, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    mask = ragged_mask(rng)
    loss, metrics = jax.jit(functools.partial(losses.sft_loss, entropy_coef=entropy_coef))(
        logits, targets, mask
    )
    ref_logp, ref_ent = np_logprobs_entropy(logits, targets, 1.0)
    n = mask.sum()
    nll = -(ref_logp * mask).sum() / n
    ent = (ref_ent * mask).sum() / n
    # Token-means of the log-softmax terms: their scales, the reduction and the division.
    s_v, ent_scale = np_logsoftmax_scales(logits, 1.0)
    nll_scale = float((np.take_along_axis(s_v, targets[..., None], -1)[..., 0] * mask).sum() / n)
    ent_scale = float((ent_scale * mask).sum() / n)
    ulps = LOGSOFTMAX_ULPS + chain_ulps(B * T, 1) + 2  # + 1 more for nll - coef * ent
    assert_close(float(metrics["nll"]), nll, ulps=ulps, scale=nll_scale, err_msg="nll")
    assert_close(float(metrics["entropy"]), ent, ulps=ulps, scale=ent_scale, err_msg="entropy")
    loss_scale = nll_scale + entropy_coef * ent_scale
    assert_close(float(loss), nll - entropy_coef * ent, ulps=ulps + 1, scale=loss_scale)
    assert_close(float(metrics["loss"]), nll - entropy_coef * ent, ulps=ulps + 1, scale=loss_scale)
    assert float(metrics["num_tokens"]) == n
