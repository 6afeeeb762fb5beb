"""The rollout engine (relift_jax.engine, sampler engine "continuous") against the dense sampler and
`model.forward`, and the properties that make it an RL engine: draws independent of the slot count,
prefix sharing, a window over the filled cache only, finished slots refilled.

Also the sampler/trainer correction of the RL step: "recompute" old log-probs and truncated
importance sampling against numpy.

Shape key: B rows, N new tokens, V vocab.
"""
from __future__ import annotations

import numpy as np
import pytest

from f32 import EPS32, assert_close, decoder_ulps
from relift_jax import attention, engine, losses, model, sampler

LENGTHS = (3, 11, 17, 6, 25, 9)   # mixed prompt lengths
N = 40
G = 3


def _setup(tiny_checkpoints):
    cfg, params = tiny_checkpoints.ours("qwen2_untied")
    rng = np.random.RandomState(5)
    prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in LENGTHS]
    # Several stop ids so rows end at spread-out lengths (the engine's refills matter).
    stops = rng.choice(cfg.vocab_size, 6, replace=False).tolist()
    return cfg, params, prompts, stops


def _run(cfg, params, prompts, stops, **kw):
    kw = {"max_new_tokens": N, "eos_id": stops, "num_samples": G, "seed": 11, **kw}
    return sampler.generate(cfg, params, prompts, **kw)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_do_not_depend_on_slots_or_segments(tiny_checkpoints, temperature):
    """Greedy and sampled rows are the same for any slot count and segment length, with or without
    length groups: each row's draws are keyed by (seed, row, token index), and its cache never
    moves within its slot."""
    cfg, params, prompts, stops = _setup(tiny_checkpoints)
    ref = _run(cfg, params, prompts, stops, temperature=temperature)
    assert len(set(ref.lengths.tolist())) > 3, "lengths should spread (else refills go untested)"
    for engine_name, slots, seg in (("continuous", 4, 8), ("continuous", 7, 5),
                                    ("continuous", 18, 64), ("grouped", 0, 32),
                                    ("grouped", 5, 4), ("grouped", 7, 8)):
        out = _run(cfg, params, prompts, stops, temperature=temperature, slots=slots,
                   segment_len=seg, engine=engine_name)
        assert out.tokens == ref.tokens, (engine_name, slots, seg)
        np.testing.assert_array_equal(out.stopped, ref.stopped)
        for a, b in zip(out.logprobs, ref.logprobs):
            # The same row at another batch size: float32 rounding of the same decode only.
            assert_close(np.asarray(a), np.asarray(b), ulps=decoder_ulps(cfg, T=128), scale=30.0)


def test_greedy_equals_the_dense_sampler(tiny_checkpoints):
    cfg, params, prompts, stops = _setup(tiny_checkpoints)
    dense = _run(cfg, params, prompts, stops, temperature=0.0, engine="dense")
    # "ragged": the Pallas decode kernel (interpret mode here), 16-slot blocks so rows span several.
    ragged = cfg.replace(decode_attention="ragged", decode_attention_block=16)
    for engine_name, slots, c in (("continuous", 0, cfg), ("continuous", 5, cfg),
                                  ("grouped", 5, cfg), ("continuous", 5, ragged),
                                  ("grouped", 0, ragged)):
        ours = _run(c, params, prompts, stops, temperature=0.0, slots=slots, segment_len=8,
                    engine=engine_name)
        assert ours.tokens == dense.tokens
        np.testing.assert_array_equal(ours.stopped, dense.stopped)
        np.testing.assert_array_equal(ours.lengths, dense.lengths)


@pytest.mark.parametrize("engine_name,decode_attention", [("continuous", "xla"),
                                                          ("grouped", "xla"),
                                                          ("continuous", "ragged"),
                                                          ("grouped", "ragged_gpu")])
def test_sampled_logprobs_equal_forward(tiny_checkpoints, engine_name, decode_attention,
                                        monkeypatch):
    """Every sampled token's log-prob equals a full forward pass over prompt + response (also with
    the ragged decode kernel, which reads each row's filled blocks only: its TPU form, and its GPU
    (Triton) form put in its place, both in Pallas interpret mode here)."""
    cfg, params, prompts, stops = _setup(tiny_checkpoints)
    if decode_attention == "ragged_gpu":
        monkeypatch.setattr(attention, "_ragged_decode_local",
                            lambda q, k, v, lay, lens, block, interpret:
                            attention._ragged_decode_gpu_local(q, k, v, lay, lens,
                                                               interpret=True))
        decode_attention = "ragged"
    sample_cfg = cfg.replace(decode_attention=decode_attention, decode_attention_block=16)
    out = _run(sample_cfg, params, prompts, stops, temperature=1.0, slots=5, segment_len=8,
               engine=engine_name)
    rows = [i for i in range(len(out.tokens)) if out.tokens[i]]
    T = 128
    seqs = np.zeros((len(rows), T), np.int32)
    for k, i in enumerate(rows):
        seq = prompts[i // G] + out.tokens[i]
        seqs[k, :len(seq)] = seq
    logits = np.asarray(model.forward(cfg, params, seqs)).astype(np.float64)
    for k, i in enumerate(rows):
        P, n = len(prompts[i // G]), len(out.tokens[i])
        lg = logits[k, P - 1:P + n - 1]
        lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - lg.max(-1, keepdims=True)
        want = lp[np.arange(n), out.tokens[i]]
        assert_close(np.asarray(out.logprobs[i]), want, ulps=decoder_ulps(cfg, T=T),
                     scale=float(np.abs(lg).max()), err_msg=f"row {i}")


def test_prefix_sharing_and_windows(tiny_checkpoints, monkeypatch):
    """Each distinct prompt is prefilled once (not G times); decode windows stay below the dense
    cache (prompt bucket + N) while rows are short; freed slots take pending rows."""
    cfg, params, prompts, stops = _setup(tiny_checkpoints)
    prefills, windows = [], []
    real_prefill, real_segment = engine._prefill_prompts, engine._segment

    def prefill(config, params_, tokens_UxP, len_U):
        prefills.append(int((np.asarray(len_U) > 1).sum()))  # real prompts (padding has len 1)
        return real_prefill(config, params_, tokens_UxP, len_U)

    def segment(config, sp, steps, params_, state, key):
        windows.append(state[0]["k"].shape[3])
        return real_segment(config, sp, steps, params_, state, key)
    monkeypatch.setattr(engine, "_prefill_prompts", prefill)
    monkeypatch.setattr(engine, "_segment", segment)
    _run(cfg, params, prompts, stops, temperature=1.0, slots=6, segment_len=8)
    assert sum(prefills) <= len(prompts) + len(prefills), prefills  # a group split at most once
    assert len(prefills) > 1, "with 6 slots for 18 rows, pending rows are inserted later"
    dense_slots = sampler.bucket(max(LENGTHS)) + N
    assert min(windows) < dense_slots and max(windows) <= sampler.bucket(max(LENGTHS) + N + 9, 64)


def test_truncated_is_weights_against_numpy():
    rng = np.random.default_rng(0)
    train, samp = rng.normal(-2, 1, (3, 7)), rng.normal(-2, 1, (3, 7))
    mask = rng.random((3, 7)) > 0.3
    got = np.asarray(losses.truncated_is_weights(train, samp, mask, 2.0))
    want = np.where(mask, np.minimum(np.exp(train - samp), 2.0), 1.0)
    np.testing.assert_allclose(got, want, rtol=4 * EPS32)
    assert got.max() <= 2.0 and (got[~mask] == 1).all()


def test_is_weights_scale_each_tokens_policy_loss():
    """policy_loss with weights w equals the numpy loss sum_t w_t * (-A * ratio_t) / norm."""
    rng = np.random.default_rng(1)
    B, T = 4, 6
    lp, old = rng.normal(-2, 0.3, (B, T)), rng.normal(-2, 0.3, (B, T))
    adv, mask = rng.normal(0, 1, B), (rng.random((B, T)) > 0.2).astype(np.float32)
    w = rng.uniform(0.5, 2.0, (B, T))
    loss, _ = losses.policy_loss(lp, old, adv, mask, clip_low=None, clip_high=None,
                                 agg="token-mean", is_weights=w)
    want = (w * -adv[:, None] * np.exp(lp - old) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(loss), want, rtol=64 * EPS32)


def test_length_groups_decode_each_group_over_its_own_window(tiny_checkpoints, monkeypatch):
    """With length groups, a segment's rows are grouped by the window they need: every group's
    window covers its rows (length + segment + 1) and is at most 1.5x the longest need (or the
    64-slot minimum), finished rows are never decoded, and segments hold several windows at once."""
    cfg, params, prompts, stops = _setup(tiny_checkpoints)
    calls = []
    real_segment = engine._segment

    def segment(config, sp, steps, params_, state, key):
        lens, done = np.asarray(state[2]), np.asarray(state[5])
        calls.append((state[0]["k"].shape[3], lens[~done], steps))
        return real_segment(config, sp, steps, params_, state, key)
    monkeypatch.setattr(engine, "_segment", segment)
    kw = dict(temperature=1.0, segment_len=4, max_new_tokens=160, eos_id=stops[:2])
    ref = _run(cfg, params, prompts, stops, **kw)
    calls.clear()
    out = _run(cfg, params, prompts, stops, engine="grouped", **kw)
    assert out.tokens == ref.tokens
    cap = max(LENGTHS) + 160 + 1
    windows = set()
    for window, live_lens, steps in calls:
        assert len(live_lens) > 0, "a group of finished rows only was decoded"
        need = live_lens.max() + steps + 1
        assert min(need, cap) <= window <= max(64, 1.5 * need), (window, need)
        windows.add(window)
    assert len(windows) >= 2 and max(len(t) for t in ref.tokens) > 64, windows
