"""relift_jax.model against Hugging Face transformers (PyTorch) and against its own full forward pass.

Shape key: B batch, T tokens, S cache slots, V vocab.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp
from f32 import EPS32, assert_close, assert_trees_close, decoder_ulps
from hf_fixtures import KINDS
from relift_jax import model

pytestmark = pytest.mark.hf_reference


def _hf_logits(hf_model, tokens_BxT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(tokens_BxT), dtype=torch.long)).logits.numpy()


def _random_tokens(seed: int, shape: tuple[int, ...], vocab: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


# ----------------------------------------------------------------------------- logits vs transformers

@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(tiny_checkpoints, kind):
    """T=80 > original_max_position_embeddings=32, so llama3 frequency scaling is exercised."""
    cfg, params = tiny_checkpoints.ours(kind)
    tokens_BxT = _random_tokens(0, (3, 80), cfg.vocab_size)
    ours_BxTxV = np.asarray(model.forward(cfg, params, tokens_BxT))
    ref_BxTxV = _hf_logits(tiny_checkpoints.hf_model(kind), tokens_BxT)
    assert ours_BxTxV.dtype == np.float32 and ours_BxTxV.shape == ref_BxTxV.shape
    # The logits are O(1) (the fixture scales the weights up), so agreement to float32 rounding
    # (~1e-4 at these sizes) is far tighter than any mistake in the architecture.
    assert np.abs(ref_BxTxV).max() > 1.0
    assert_close(ours_BxTxV, ref_BxTxV, ulps=decoder_ulps(cfg, T=80))


def test_fixture_kinds_cover_the_architecture_variants(tiny_checkpoints):
    """Guards the meaning of the test above: tied/untied, q/k/v biases, GQA and llama3 scaling."""
    tied, _ = tiny_checkpoints.ours("qwen2_tied")
    untied, untied_params = tiny_checkpoints.ours("qwen2_untied")
    llama, _ = tiny_checkpoints.ours("llama3")
    assert tied.tie_word_embeddings and not untied.tie_word_embeddings
    assert untied.qkv_bias and np.abs(np.asarray(untied_params["layers"]["q_bias"])).max() > 0.01
    assert untied.num_kv_heads < untied.num_heads
    assert llama.rope_scaling is not None and not llama.qkv_bias


def test_llama3_scaling_changes_logits(tiny_checkpoints):
    """Without the frequency scaling the logits must differ from transformers by far more than 1e-4."""
    cfg, params = tiny_checkpoints.ours("llama3")
    tokens_BxT = _random_tokens(1, (2, 80), cfg.vocab_size)
    ref = _hf_logits(tiny_checkpoints.hf_model("llama3"), tokens_BxT)
    unscaled = np.asarray(model.forward(cfg.replace(rope_scaling=None), params, tokens_BxT))
    assert np.abs(unscaled - ref).max() > 1e-2


def test_llama3_inverse_frequencies_match_transformers(tiny_checkpoints):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg, _ = tiny_checkpoints.ours("llama3")
    hf_config = transformers.AutoConfig.from_pretrained(tiny_checkpoints.paths["llama3"])
    ref_inv, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = model.rope_inv_freq(cfg)
    assert attention_factor == 1.0
    assert ours.shape == tuple(ref_inv.shape) == (cfg.head_dim // 2,)
    # transformers computes in float32 (pow <= 1 ulp, a correctly rounded reciprocal; exponents i/16
    # and factor 8 are exact), we in float64 then round once: a few eps apart, 16 eps allowed.
    np.testing.assert_allclose(ours, ref_inv.numpy(), rtol=16 * EPS32, atol=0)
    # Some but not all frequencies are rescaled with these settings (else the check is vacuous).
    plain = model.rope_inv_freq(cfg.replace(rope_scaling=None))
    changed = ~np.isclose(ours, plain, rtol=1e-6)
    assert changed.any() and not changed.all()


@pytest.mark.parametrize("kind", KINDS)
def test_param_count_matches_transformers(tiny_checkpoints, kind):
    cfg, params = tiny_checkpoints.ours(kind)
    hf_count = sum(p.numel() for p in tiny_checkpoints.hf_model(kind).parameters())
    assert cfg.num_params() == hf_count == sum(x.size for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- padding and KV cache

@pytest.mark.parametrize("kind", ["qwen2_untied", "llama3"])
def test_apply_left_padded_matches_unpadded_forward(tiny_checkpoints, kind):
    """Left padding + valid mask + default positions gives each row's unpadded logits."""
    cfg, params = tiny_checkpoints.ours(kind)
    lengths = [5, 23, 40]
    T = max(lengths)
    rows = [_random_tokens(10 + i, (n,), cfg.vocab_size) for i, n in enumerate(lengths)]
    tokens_BxT = np.full((len(rows), T), 7, np.int32)  # pad id 7: a real token, so masking matters
    valid_BxT = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        tokens_BxT[i, T - len(r):] = r
        valid_BxT[i, T - len(r):] = True
    padded = np.asarray(jax.jit(model.apply, static_argnums=0)(cfg, params, tokens_BxT, valid_BxT))
    for i, r in enumerate(rows):
        full = np.asarray(model.forward(cfg, params, r[None]))[0]
        assert_close(padded[i, T - len(r):], full, ulps=decoder_ulps(cfg, T))


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_decode_matches_full_forward(tiny_checkpoints, kind):
    """Prefill a left-padded batch into a cache, then teacher-force one token at a time: every step's
    logits equal `forward` on the whole unpadded sequence at that position."""
    cfg, params = tiny_checkpoints.ours(kind)
    prompt_lens = [3, 12, 7]
    steps = 10
    B, P = len(prompt_lens), max(prompt_lens)
    S = P + steps
    seqs = [_random_tokens(20 + i, (n + steps,), cfg.vocab_size) for i, n in enumerate(prompt_lens)]
    full = [np.asarray(model.forward(cfg, params, s[None]))[0] for s in seqs]  # [n + steps, V]

    pad_B = np.array([P - n for n in prompt_lens], np.int32)
    tokens_BxP = np.zeros((B, P), np.int32)
    for i, n in enumerate(prompt_lens):
        tokens_BxP[i, P - n:] = seqs[i][:n]
    positions_BxP = np.maximum(np.arange(P)[None] - pad_B[:, None], 0).astype(np.int32)
    kv_valid_BxS = np.arange(S)[None] >= pad_B[:, None]

    @jax.jit
    def step(params, cache, tokens, positions, start):
        h, cache = model.hidden_states(cfg, params, tokens, positions, kv_valid_BxS, cache=cache,
                                       cache_start=start)
        return model.logits_from_hidden(cfg, params, h), cache

    cache = model.init_cache(cfg, B, S)
    logits_BxPxV, cache = step(params, cache, tokens_BxP, positions_BxP, 0)
    for i, n in enumerate(prompt_lens):  # the prompt's real positions
        assert_close(logits_BxPxV[i, P - n:], full[i][:n], ulps=decoder_ulps(cfg, S))

    for t in range(steps):
        tok_Bx1 = np.array([[s[n + t]] for s, n in zip(seqs, prompt_lens)], np.int32)
        pos_Bx1 = np.array([[n + t] for n in prompt_lens], np.int32)
        logits_Bx1xV, cache = step(params, cache, tok_Bx1, pos_Bx1, P + t)
        for i, n in enumerate(prompt_lens):
            assert_close(logits_Bx1xV[i, 0], full[i][n + t], ulps=decoder_ulps(cfg, S),
                         err_msg=f"row {i} decode step {t}")


def test_remat_gives_same_logits_and_gradients(tiny_checkpoints):
    cfg, params = tiny_checkpoints.ours("qwen2_untied")
    tokens_BxT = _random_tokens(3, (2, 16), cfg.vocab_size)

    def loss(c, p):
        return jnp.mean(jax.nn.log_softmax(model.apply(c, p, tokens_BxT))[..., 0])

    v0, g0 = jax.value_and_grad(lambda p: loss(cfg, p))(params)
    v1, g1 = jax.value_and_grad(lambda p: loss(cfg.replace(remat=True), p))(params)
    # Different XLA programs (remat recomputes the forward inside the backward pass), so equal to
    # float32 rounding relative to each gradient's own scale, not to an absolute 1e-7.
    assert_close(v1, v0, ulps=decoder_ulps(cfg, T=16))
    assert_trees_close(g1, g0, ulps=decoder_ulps(cfg, T=2 * 16, backward=True))


def test_init_params_matches_param_shapes():
    cfg = model.ModelConfig("llama", vocab_size=50, hidden_size=32, intermediate_size=48,
                            num_layers=3, num_heads=4, num_kv_heads=1, head_dim=8, qkv_bias=True)
    params = model.init_params(cfg, jax.random.key(0))
    shapes = model.param_shapes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    jax.tree.map(lambda p, s: (p.shape, p.dtype) == (s.shape, s.dtype) or pytest.fail(str(s)),
                 params, shapes)
    # Every parameter has one logical axis name per dimension (sharding relies on it).
    axes = model.param_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(shapes)
    jax.tree.map(lambda ax, s: len(ax) == len(s.shape) or pytest.fail(f"{ax} vs {s}"), axes, shapes,
                 is_leaf=is_axes)
    logits = model.forward(cfg, params, np.zeros((1, 4), np.int32))
    assert logits.shape == (1, 4, 50) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("field, value, match", [
    ("model_type", "mistral", "model_type"),
    ("num_kv_heads", 3, "num_kv_heads"),
    ("head_dim", 7, "head_dim"),
    ("compute_dtype", "float64", "compute_dtype"),
    ("hidden_size", 0, "hidden_size"),
])
def test_config_validation(field, value, match):
    kw = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1,
              num_heads=4, num_kv_heads=2, head_dim=4)
    kw[field] = value
    with pytest.raises(ValueError, match=match):
        model.ModelConfig(**kw)
