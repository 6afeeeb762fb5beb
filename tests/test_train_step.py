"""Train steps on a tiny random model: the loss goes down, SFT leaves the RL state alone,
micro-batch accumulation is exact, the RL/SFT loss values match numpy recomputations, and host
packing puts every token, mask and old log-prob where the step expects it.

References are independent of the step: logits come from `model.forward` (positions 0..L-1, no
validity mask, no packing, no micro-batches) and everything after the logits is numpy float64.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from f32 import EPS32, assert_close, decoder_ulps
from relift_jax import model
from relift_jax.config import RLConfig, SFTConfig
from relift_jax.batches import Packing, pack_rl_batch, pack_sft_batch
from relift_jax.train_step import (init_state, jit_step, make_optimizer, make_schedule,
                                   rl_train_step, sft_train_step)

CFG = model.ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
PAD = 0
NORM_LEN = 16
# Float32 rounding (f32.py) of a log-prob, in eps32 * max|logits|: the decoder's on sequences of
# up to 24 tokens (the sampler's cache), twice, since log p = logit - logsumexp(logits). Of a
# gradient, per parameter in eps32 * max|gradient|: the backward chain over 8 x 16 tokens.
LOGP_ULPS = 2 * decoder_ulps(CFG, T=24)
GRAD_ULPS = decoder_ulps(CFG, T=8 * 16, backward=True)


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(0), std=0.2)


def _np_tree(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _copy(tree):
    """A fresh device copy: the jitted steps donate their state."""
    return jax.tree.map(lambda x: jnp.array(np.array(x)), tree)


def _rows(seed: int, n: int = 8):
    """n (prompt, response) pairs of different lengths, tokens in 1..63 (0 is padding)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 64, rng.integers(2, 6)).tolist() for _ in range(n)]
    responses = [rng.integers(1, 64, rng.integers(1, 9)).tolist() for _ in range(n)]
    return prompts, responses


def _ref_rows(p, prompts, responses):
    """float64 log-probs and entropies of each row's response tokens.

    One jitted `model.forward` over rows right-padded to 16 with token 0 and NO validity mask:
    causality alone keeps the padding out of positions < len(row), so this shares none of the
    step's masking, packing or micro-batching.
    """
    toks = np.zeros((len(prompts), 16), np.int32)
    for i, (pr, r) in enumerate(zip(prompts, responses)):
        toks[i, :len(pr) + len(r)] = pr + r
    logits = np.asarray(model.forward(CFG, p, toks), np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ent_all = -(np.exp(logp_all) * logp_all).sum(-1)
    out = []
    for i, (pr, r) in enumerate(zip(prompts, responses)):
        pos = np.arange(len(pr) - 1, len(pr) + len(r) - 1)  # positions predicting the response
        out.append((logp_all[i, pos, toks[i, pos + 1]], ent_all[i, pos]))
    return out


def _logit_scale(p, prompts, responses) -> float:
    """max|logits| of `_ref_rows`' forward pass: the size log-prob rounding is relative to."""
    toks = np.zeros((len(prompts), 16), np.int32)
    for i, (pr, r) in enumerate(zip(prompts, responses)):
        toks[i, :len(pr) + len(r)] = pr + r
    return float(np.abs(np.asarray(model.forward(CFG, p, toks))).max())


def _rl_inputs(p, seed: int = 1, n: int = 8):
    """Rows, old log-probs near the current ones (ratios != 1) and mixed-sign advantages."""
    prompts, responses = _rows(seed, n)
    rng = np.random.default_rng(seed + 100)
    old = [(logp + rng.normal(0, 0.1, len(logp))).tolist()
           for logp, _ in _ref_rows(p, prompts, responses)]
    adv = np.where(np.arange(n) % 2 == 0, 1.0, -0.7).astype(np.float32)
    return prompts, responses, old, adv


def _ref_rl_loss(p, prompts, responses, old, adv, rl: RLConfig, norm_len: int) -> float:
    """The RL loss in numpy: per-token -A * ratio (PPO-clipped when configured), aggregated by
    rl.agg, minus entropy_coef * the token-mean entropy."""
    terms, ents = [], []
    for (logp, ent), o, a in zip(_ref_rows(p, prompts, responses), old, adv):
        ratio = np.exp(logp - np.asarray(o, np.float64))
        loss = -a * ratio
        if rl.clip_low is not None:
            loss = np.maximum(loss, -a * np.clip(ratio, 1 - rl.clip_low, 1 + rl.clip_high))
        terms.append(loss)
        ents.append(ent)
    n_tok = sum(len(t) for t in terms)
    if rl.agg == "token-mean":
        pg = sum(t.sum() for t in terms) / n_tok
    elif rl.agg == "seq-mean-token-mean":
        pg = np.mean([t.mean() for t in terms])
    else:
        pg = np.mean([t.sum() / norm_len for t in terms])
    entropy = sum(e.sum() for e in ents) / n_tok
    return float(pg - rl.entropy_coef * entropy)


def _ref_sft_loss(p, prompts, demos, entropy_coef: float) -> tuple[float, float]:
    """(loss, nll): token-mean NLL over demonstration tokens only, minus the entropy bonus."""
    nll, ent, n = 0.0, 0.0, 0
    for logp, e in _ref_rows(p, prompts, demos):
        nll, ent, n = nll - logp.sum(), ent + e.sum(), n + len(logp)
    return nll / n - entropy_coef * ent / n, nll / n


# Each jitted step costs seconds to compile on CPU, so the steps are built once per module and
# shared; every test hands them a fresh copy of the state (they donate it).
RL_A = RLConfig(learning_rate=1e-2, agg="token-mean", micro_batch_size=8, entropy_coef=0.01)
SFT_B = SFTConfig(learning_rate=1e-2, entropy_coef=0.01, micro_batch_size=8)
PK = Packing(micro_batch_size=8, pad_id=PAD, length_multiple=16)


@pytest.fixture(scope="module")
def steps():
    rl_tx = make_optimizer(RL_A.optim())
    sft_tx = make_optimizer(SFT_B.optim())
    shared = dataclasses.replace(SFT_B, share_optimizer=True)
    return {
        "rl_tx": rl_tx, "sft_tx": sft_tx,
        "rl": jit_step(rl_train_step, config=CFG, rl=RL_A, tx=rl_tx,
                       schedule=make_schedule(RL_A.optim()), norm_len=NORM_LEN),
        "sft": jit_step(sft_train_step, config=CFG, sft=SFT_B, tx=sft_tx,
                        schedule=make_schedule(SFT_B.optim())),
        "sft_shared": jit_step(sft_train_step, config=CFG, sft=shared, tx=rl_tx,
                               schedule=make_schedule(shared.optim())),
    }


def _state(params, steps, share=False):
    return init_state(_copy(params), steps["rl_tx"], steps["sft_tx"], share_optimizer=share)


# ----------------------------------------------------------------------------- loss values, descent

def test_rl_step_matches_numpy_and_lowers_its_loss(params, steps):
    prompts, responses, old, adv = _rl_inputs(params)
    batch = pack_rl_batch(prompts, responses, old, adv, PK)
    state = _state(params, steps)
    seen = []
    for _ in range(3):
        state, m = steps["rl"](state, batch)
        seen.append({k: float(v) for k, v in m.items()})
    # Step 1 reports the loss at the initial params: token-mean, no clipping, entropy bonus.
    ref = _ref_rl_loss(params, prompts, responses, old, adv, RL_A, NORM_LEN)
    # Each token's -A * ratio moves by |A| * ratio (< 2) times its log-prob's rounding error.
    assert_close(seen[0]["loss"], ref, ulps=2 * LOGP_ULPS,
                 scale=np.abs(adv).max() * _logit_scale(params, prompts, responses))
    assert seen[0]["clip_frac"] == 0.0 and seen[0]["lr"] == pytest.approx(1e-2)
    # metrics["loss"] of step k is the loss at the params before step k: strictly decreasing.
    assert seen[1]["loss"] < seen[0]["loss"] - 1e-3, [s["loss"] for s in seen]
    assert seen[2]["loss"] < seen[1]["loss"], [s["loss"] for s in seen]
    assert int(state.rl_steps) == 3 and int(state.sft_steps) == 0


def test_sft_step_matches_numpy_and_lowers_its_loss(params, steps):
    prompts, demos = _rows(seed=2)
    batch = pack_sft_batch(prompts, demos, PK)
    state = _state(params, steps)
    ref_loss, ref_nll = _ref_sft_loss(params, prompts, demos, SFT_B.entropy_coef)
    state, m1 = steps["sft"](state, batch)
    scale = _logit_scale(params, prompts, demos)  # the NLL is a mean of log-probs
    assert_close(m1["loss"], ref_loss, ulps=LOGP_ULPS, scale=scale)
    assert_close(m1["nll"], ref_nll, ulps=LOGP_ULPS, scale=scale)
    state, m2 = steps["sft"](state, batch)
    assert float(m2["loss"]) < float(m1["loss"]) - 1e-3
    assert int(state.sft_steps) == 2 and int(state.rl_steps) == 0


def test_sampler_logprobs_are_the_steps_old_logprobs(params, steps):
    """Rollouts from the real sampler, packed as the controller packs them: before any update the
    step's recomputed log-probs equal the sampler's, so every ratio is 1 and approx_kl is 0."""
    from relift_jax import sampler
    prompts = [r[:4] for r in _rows(seed=6, n=4)[0]]
    out = sampler.generate(CFG, params, prompts, max_new_tokens=8, temperature=1.0, eos_id=63,
                           seed=0, num_samples=2, pad_id=PAD)
    assert [len(t) for t in out.tokens] == [len(lp) for lp in out.logprobs]
    rows = [prompts[i // 2] for i in range(8)]
    adv = np.where(np.arange(8) % 2 == 0, 1.0, -1.0).astype(np.float32)
    batch = pack_rl_batch(rows, out.tokens, out.logprobs, adv, PK)
    _, m = steps["rl"](_state(params, steps), batch)
    # Sampler (cached decode) and step (packed batch) are different programs: their log-probs
    # agree to rounding, so log ratio, approx_kl and (|A| = 1) the pg loss are that far from exact.
    scale = _logit_scale(params, rows, out.tokens)
    assert_close(m["approx_kl"], 0.0, ulps=LOGP_ULPS, scale=scale)
    assert_close(m["ratio_max"], 1.0, ulps=LOGP_ULPS, scale=scale)
    # With ratio 1 the token-mean pg loss is -sum(A * n_tokens) / total tokens.
    n = np.array([len(t) for t in out.tokens], np.float64)
    assert_close(m["pg_loss"], -(adv * n).sum() / n.sum(), ulps=LOGP_ULPS, scale=scale)


def test_recomputed_old_logprobs_make_the_first_ratio_one(params, steps):
    """RLConfig.old_logprobs = "recompute": the old log-probs are the training forward's
    (rollout.make_logprobs_fn, a separate no-gradient program), so the first mini-step's ratio is
    1: exactly, where both programs round alike, and always within the log-probs' rounding (the
    gradient program may fuse differently). The sampler's log-probs stay for the mismatch metric."""
    from relift_jax import rollout, sampler
    prompts = [r[:4] for r in _rows(seed=6, n=4)[0]]
    out = sampler.generate(CFG, params, prompts, max_new_tokens=8, temperature=1.0, eos_id=63,
                           seed=1, num_samples=2, pad_id=PAD)
    rows = [prompts[i // 2] for i in range(8)]
    adv = np.where(np.arange(8) % 2 == 0, 1.0, -1.0).astype(np.float32)
    batch = pack_rl_batch(rows, out.tokens, out.logprobs, adv, PK)
    train_lp = rollout.make_logprobs_fn(CFG)(params, batch)
    mb = batch.micro_batches
    mask = np.asarray(mb.loss_mask_bxT) != 0
    batch = batch.replace(micro_batches=mb.replace(
        old_logprobs_bxT=np.where(mask, train_lp, 0.0).astype(np.float32)))
    _, m = steps["rl"](_state(params, steps), batch)
    ratio_max, approx_kl = float(m["ratio_max"]), float(m["approx_kl"])
    print(f"\n[recompute] ratio_max - 1 = {ratio_max - 1:.3g}, approx_kl = {approx_kl:.3g}")
    scale = _logit_scale(params, rows, out.tokens)
    assert_close(ratio_max, 1.0, ulps=LOGP_ULPS, scale=scale)
    assert_close(approx_kl, 0.0, ulps=LOGP_ULPS, scale=scale)


# ----------------------------------------------------------------------------- state isolation

def _assert_tree_equal(a, b, what):
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


def _tree_differs(a, b) -> bool:
    return any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("share", [False, True], ids=["own_optimizer", "shared_optimizer"])
def test_each_step_touches_only_its_own_state(params, steps, share):
    """RL then SFT: each changes params, its optimiser state and its counter, nothing else."""
    state = _state(params, steps, share)
    prompts, responses, old, adv = _rl_inputs(params)
    s0 = _np_tree(state)
    state, _ = steps["rl"](state, pack_rl_batch(prompts, responses, old, adv, PK))
    s1 = _np_tree(state)
    assert _tree_differs(s0.params, s1.params) and _tree_differs(s0.rl_opt, s1.rl_opt)
    _assert_tree_equal(s0.sft_opt, s1.sft_opt, "sft_opt after an RL step")
    _assert_tree_equal(s0.sft_steps, s1.sft_steps, "sft_steps after an RL step")
    assert int(s1.rl_steps) == 1

    sft_step = steps["sft_shared" if share else "sft"]
    state, _ = sft_step(state, pack_sft_batch(*_rows(seed=3), PK))
    s2 = _np_tree(state)
    assert _tree_differs(s1.params, s2.params)
    _assert_tree_equal(s1.rl_steps, s2.rl_steps, "rl_steps after an SFT step")
    assert int(s2.sft_steps) == 1
    if share:
        assert s1.sft_opt == () and s2.sft_opt == ()
        assert _tree_differs(s1.rl_opt, s2.rl_opt)
        counts = [x for x in jax.tree.leaves(s2.rl_opt) if x.dtype == np.int32]
        assert counts and all(int(c) == 2 for c in counts)  # one RL + one SFT update
    else:
        _assert_tree_equal(s1.rl_opt, s2.rl_opt, "rl_opt after an SFT step")
        assert _tree_differs(s1.sft_opt, s2.sft_opt)


# ----------------------------------------------------------------------------- exact accumulation

@pytest.mark.parametrize("rl", [
    RLConfig(agg="token-mean", entropy_coef=0.01),
    RLConfig(agg="seq-mean-token-mean", entropy_coef=0.01, clip_low=0.05, clip_high=0.08),
    RLConfig(agg="seq-mean-token-sum-norm", entropy_coef=0.001, clip_low=0.05, clip_high=0.08),
], ids=lambda r: r.agg + ("-clipped" if r.clip_low else ""))
def test_micro_batches_accumulate_exactly(params, rl):
    """8 rows as 1 micro-batch of 8, or as 3 micro-batches of 3 (the last holds a padding row).

    Plain SGD with lr 1 makes the update the accumulated gradient itself (Adam would divide tiny
    rounding differences by tiny second moments and hide or amplify them).
    """
    prompts, responses, old, adv = _rl_inputs(params)
    tx = optax.sgd(1.0)
    results = []
    for mb in (8, 3):
        pk = dataclasses.replace(PK, micro_batch_size=mb)
        batch = pack_rl_batch(prompts, responses, old, adv, pk)
        assert batch.micro_batches.tokens_bxT.shape == ((1, 8, 16) if mb == 8 else (3, 3, 16))
        step = jit_step(rl_train_step, config=CFG, rl=rl, tx=tx,
                        schedule=make_schedule(rl.optim()), norm_len=NORM_LEN)
        state, m = step(init_state(_copy(params), tx, tx), batch)
        results.append((_np_tree(state.params), {k: float(v) for k, v in m.items()}))
    (p1, m1), (p3, m3) = results
    moved = max(float(np.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(_np_tree(params))))
    assert moved > 1e-4  # the gradient is not trivially zero
    # Micro-batching sums the gradient in another order, in another program. The update is the
    # gradient (SGD, lr 1), rounded at its own scale; storing p - g in float32 adds half an ulp
    # of |p| to each side.
    p0s = jax.tree.leaves(_np_tree(params))
    for a, b, p0 in zip(jax.tree.leaves(p1), jax.tree.leaves(p3), p0s):
        assert_close(b, a, ulps=GRAD_ULPS, scale=np.abs(a - p0).max(),
                     atol=EPS32 * np.abs(p0).max())
    scale = np.abs(adv).max() * _logit_scale(params, prompts, responses)
    for k in ("loss", "pg_loss", "ratio_max", "approx_kl"):  # |A| * ratio (< 2) * log-prob error
        assert_close(m3[k], m1[k], ulps=2 * LOGP_ULPS, scale=scale, err_msg=k)
    # dH = -sum p (1 + log p) dlog p: at most (1 + log V) times a log-prob's error.
    assert_close(m3["entropy"], m1["entropy"], ulps=(1 + np.log(CFG.vocab_size)) * LOGP_ULPS,
                 scale=scale)
    assert_close(m3["grad_norm"], m1["grad_norm"], ulps=GRAD_ULPS)
    # clip_frac counts tokens: one token's share for each ratio within rounding of a clip edge,
    # plus the rounding of adding 3 micro-batches' shares.
    n_edge, n_tok = _tokens_at_clip_edge(params, prompts, responses, old, rl,
                                         bound=2 * LOGP_ULPS * EPS32 * scale)
    assert_close(m3["clip_frac"], m1["clip_frac"], ulps=3, scale=1.0, atol=n_edge / n_tok)
    ref = _ref_rl_loss(params, prompts, responses, old, adv, rl, NORM_LEN)
    assert_close(m1["loss"], ref, ulps=2 * LOGP_ULPS, scale=scale)
    if rl.clip_low is not None:
        assert 0.0 < m1["clip_frac"] < 1.0  # the clipped branch really was exercised


def _tokens_at_clip_edge(p, prompts, responses, old, rl: RLConfig,
                         bound: float) -> tuple[int, int]:
    """(tokens whose ratio is within `bound` (relative) of a clip edge, all response tokens)."""
    ratios = np.concatenate([np.exp(logp - np.asarray(o)) for (logp, _), o in
                             zip(_ref_rows(p, prompts, responses), old)])
    if rl.clip_low is None:
        return 0, len(ratios)
    edges = np.array([1 - rl.clip_low, 1 + rl.clip_high])
    return int((np.abs(ratios[:, None] - edges) <= bound * edges).sum()), len(ratios)


# ----------------------------------------------------------------------------- packing

def test_pack_rl_batch_layout_by_hand():
    prompts = [[5, 6, 7], [5]]
    responses = [[8, 9], [10, 11, 12]]
    old = [[-0.1, -0.2], [-0.3, -0.4, -0.5]]
    b = pack_rl_batch(prompts, responses, old, np.array([1.5, -2.0], np.float32),
                      Packing(micro_batch_size=2, pad_id=63, length_multiple=8))
    assert b.micro_batches.tokens_bxT.shape == (1, 2, 8)
    np.testing.assert_array_equal(b.micro_batches.tokens_bxT[0], [[5, 6, 7, 8, 9, 63, 63, 63],
                                                   [5, 10, 11, 12, 63, 63, 63, 63]])
    np.testing.assert_array_equal(b.micro_batches.segment_ids_bxT[0], [[1, 1, 1, 1, 1, 0, 0, 0],
                                                        [1, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b.micro_batches.positions_bxT[0], [[0, 1, 2, 3, 4, 0, 0, 0],
                                                      [0, 1, 2, 3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b.micro_batches.loss_mask_bxT[0], [[0, 0, 0, 1, 1, 0, 0, 0],
                                                      [0, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_allclose(b.micro_batches.old_logprobs_bxT[0], [[0, 0, 0, -0.1, -0.2, 0, 0, 0],
                                                      [0, -0.3, -0.4, -0.5, 0, 0, 0, 0]])
    np.testing.assert_allclose(b.micro_batches.advantages_bxT[0], [[0, 0, 0, 1.5, 1.5, 0, 0, 0],
                                                    [0, -2, -2, -2, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b.micro_batches.seq_lens_bxT[0], [[0, 0, 0, 2, 2, 0, 0, 0],
                                                     [0, 3, 3, 3, 0, 0, 0, 0]])
    assert float(b.num_tokens) == 5.0 and float(b.num_seqs) == 2.0

    # One row per micro-batch: same rows, leading axis M = 2; a third, padding-only row when
    # the batch must be a multiple of 2 rows per micro-batch with 3 rows.
    b1 = pack_rl_batch(prompts, responses, old, np.array([1.5, -2.0]),
                       Packing(1, 63, length_multiple=8))
    assert b1.micro_batches.tokens_bxT.shape == (2, 1, 8)
    np.testing.assert_array_equal(b1.micro_batches.tokens_bxT.reshape(2, 8), b.micro_batches.tokens_bxT[0])
    b3 = pack_rl_batch(prompts + [[4]], responses + [[3]], old + [[-1.0]], np.ones(3),
                       Packing(2, 63, batch_multiple=2, length_multiple=8))
    assert b3.micro_batches.tokens_bxT.shape == (2, 2, 8)
    assert not b3.micro_batches.segment_ids_bxT[1, 1].any()
    assert b3.micro_batches.loss_mask_bxT[1, 1].sum() == 0
    assert not b3.micro_batches.advantages_bxT[1, 1].any() and float(b3.num_seqs) == 3.0


def test_pack_sft_batch_masks_only_the_demonstration():
    b = pack_sft_batch([[5, 6], [7, 8, 9]], [[1, 2, 3], [4]], Packing(4, 0, length_multiple=8))
    np.testing.assert_array_equal(b.micro_batches.loss_mask_bxT[0], [[0, 0, 1, 1, 1, 0, 0, 0],
                                                      [0, 0, 0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b.micro_batches.tokens_bxT[0], [[5, 6, 1, 2, 3, 0, 0, 0],
                                                   [7, 8, 9, 4, 0, 0, 0, 0]])
    assert float(b.num_tokens) == 4.0
