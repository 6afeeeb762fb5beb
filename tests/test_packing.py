"""Memory at paper scale, checked on CPU: sequence packing (several sequences per row) gives the
unpacked losses and gradients; chunked log-probs give the unchunked ones; optimiser moments are
float32 and sharded like their parameters."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from f32 import EPS32, assert_close, decoder_ulps

from relift_jax import model, sharding
from relift_jax.batches import (Packing, pack_rl_batch, pack_sft_batch, padding_fraction,
                                plan_rows)
from relift_jax.config import RLConfig, SFTConfig
from relift_jax.train_step import (_accumulate, _rl_loss, _sft_loss, init_state, jit_step,
                                   make_optimizer, make_schedule, rl_train_step, token_logprobs)

CFG = model.ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)


def _rollouts(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, 97, rng.integers(2, 9))) for _ in range(n)]
    responses = [list(rng.integers(1, 97, rng.integers(1, 20))) for _ in range(n)]
    old = [list(-rng.uniform(0.5, 4.0, len(r))) for r in responses]
    adv = rng.normal(size=n).astype(np.float32)
    return prompts, responses, old, adv


def _device(batch):
    return jax.tree.map(jnp.asarray, batch)


def _grads_and_metrics(loss_fn, params, batch):
    g, m = jax.jit(functools.partial(_accumulate, loss_fn))(params, _device(batch))
    return g, {k: float(v) for k, v in m.items()}


def _assert_same_step(a, b, T: int):
    (ga, ma), (gb, mb) = a, b
    # Packed rows run the same tokens through different programs (other rows, other padding,
    # other reduction order): float32 rounding of a decoder's forward and backward.
    ulps = decoder_ulps(CFG, T, backward=True)
    for k in ma:
        assert_close(mb[k], ma[k], ulps=ulps, scale=max(abs(ma[k]), 1.0), err_msg=k)
    for (path, x), y in zip(jax.tree.leaves_with_path(ga), jax.tree.leaves(gb)):
        assert_close(y, x, ulps=ulps, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_packed_rl_loss_and_gradients_equal_unpacked(agg):
    params = model.init_params(CFG, jax.random.key(1), std=0.2)
    prompts, responses, old, adv = _rollouts(11)
    rl = RLConfig(agg=agg, entropy_coef=0.01, clip_low=0.2, clip_high=0.28)
    loss = functools.partial(_rl_loss, config=CFG, rl=rl, norm_len=24, chunk_len=0)
    plain = pack_rl_batch(prompts, responses, old, adv, Packing(4, 0, length_multiple=8))
    packed = pack_rl_batch(prompts, responses, old, adv,
                           Packing(4, 0, length_multiple=8, tokens_per_micro_batch=64))
    seg = packed.micro_batches.segment_ids_bxT
    assert seg.max() >= 3, "the test must really put several sequences in a row"
    assert plain.micro_batches.tokens_bxT.shape != packed.micro_batches.tokens_bxT.shape
    _assert_same_step(_grads_and_metrics(loss, params, plain),
                      _grads_and_metrics(loss, params, packed), plain.micro_batches.tokens_bxT.shape[-1])


def test_packed_sft_loss_and_gradients_equal_unpacked():
    params = model.init_params(CFG, jax.random.key(2), std=0.2)
    prompts, demos, _, _ = _rollouts(9, seed=3)
    loss = functools.partial(_sft_loss, config=CFG, sft=SFTConfig(entropy_coef=0.01), chunk_len=0)
    plain = pack_sft_batch(prompts, demos, Packing(3, 0, length_multiple=8))
    packed = pack_sft_batch(prompts, demos, Packing(3, 0, length_multiple=8,
                                                    tokens_per_micro_batch=48))
    assert packed.micro_batches.segment_ids_bxT.max() >= 2
    _assert_same_step(_grads_and_metrics(loss, params, plain),
                      _grads_and_metrics(loss, params, packed), plain.micro_batches.tokens_bxT.shape[-1])


def test_packing_layout_by_hand():
    """First fit, longest first: lengths 5, 3, 2, 6 into rows of 8 -> [6, 2], [5, 3]; one row per
    micro-batch (8 tokens)."""
    pk = Packing(4, 0, length_multiple=8, tokens_per_micro_batch=8)
    assert plan_rows([5, 3, 2, 6], pk) == ([[3, 2], [0, 1]], 1, 8)
    batch = pack_sft_batch([[1, 2], [3], [4], [5, 6]], [[7, 8, 9], [10, 11], [12], [13] * 4], pk)
    mb = jax.tree.map(lambda x: x[:, 0], batch.micro_batches)  # [M = 2, b = 1, T] -> rows
    np.testing.assert_array_equal(mb.tokens_bxT, [[5, 6, 13, 13, 13, 13, 4, 12],
                                                  [1, 2, 7, 8, 9, 3, 10, 11]])
    np.testing.assert_array_equal(mb.segment_ids_bxT, [[1] * 6 + [2] * 2, [1] * 5 + [2] * 3])
    np.testing.assert_array_equal(mb.positions_bxT, [[0, 1, 2, 3, 4, 5, 0, 1],
                                                     [0, 1, 2, 3, 4, 0, 1, 2]])
    np.testing.assert_array_equal(mb.loss_mask_bxT, [[0, 0, 1, 1, 1, 1, 0, 1],
                                                     [0, 0, 1, 1, 1, 0, 1, 1]])
    assert float(batch.num_tokens) == 10.0 and padding_fraction(batch) == 0.0
    # Two data shards: rows come in pairs, each of half the budget.
    assert plan_rows([5, 3, 2, 6], Packing(4, 0, batch_multiple=2, length_multiple=4,
                                           tokens_per_micro_batch=16))[1:] == (2, 8)


def _padding(prompt_lens, response_lens, pk):
    prompts = [[1] * n for n in prompt_lens]
    responses = [[2] * n for n in response_lens]
    return padding_fraction(pack_sft_batch(prompts, responses, pk))


def test_padding_under_ten_percent_on_the_toy_and_on_paper_like_lengths():
    rng = np.random.default_rng(0)
    # The toy main job: 16 x 8 rollouts of ~20-40-token prompts and ~10-48-token responses.
    toy_p, toy_r = rng.integers(20, 41, 64), rng.integers(10, 49, 64)  # one RL mini-batch of 64
    toy_plain = _padding(toy_p, toy_r, Packing(64, 0))
    toy_packed = _padding(toy_p, toy_r, Packing(64, 0, tokens_per_micro_batch=1024))
    # The paper's shapes: prompts up to 1,024, responses mean ~3,500 of at most 8,192; one RL
    # mini-batch is 512 rollouts.
    paper_r = np.minimum(rng.lognormal(np.log(3000), 0.55, 512).astype(int) + 1, 8192)
    paper_p = rng.integers(60, 1025, 512)
    assert 3000 < paper_r.mean() < 4000 and paper_r.max() == 8192
    paper_plain = _padding(paper_p, paper_r, Packing(4, 0))
    paper_packed = _padding(paper_p, paper_r, Packing(4, 0, tokens_per_micro_batch=4 * 9216))
    print(f"\npadding: toy {toy_plain:.1%} -> {toy_packed:.1%}; "
          f"paper-like {paper_plain:.1%} -> {paper_packed:.1%}")
    assert toy_packed < 0.10 and paper_packed < 0.10
    assert toy_plain > 0.2 and paper_plain > 0.4  # what packing saves


@pytest.mark.parametrize("chunk", [5, 7, 1000])
def test_chunked_logprobs_equal_unchunked_values_and_gradients(chunk):
    params = model.init_params(CFG, jax.random.key(3), std=0.2)
    tokens = jax.random.randint(jax.random.key(4), (3, 23), 1, 97)
    seg = jnp.ones((3, 23), jnp.int32).at[2, 17:].set(0)
    pos = jnp.broadcast_to(jnp.arange(23), (3, 23))

    def f(p, c):
        lp, ent = token_logprobs(CFG, p, tokens, seg, pos, chunk_len=c)
        return jnp.sum(lp * jnp.cos(jnp.arange(23))) + 0.3 * jnp.sum(ent), (lp, ent)

    (va, (lpa, ea)), ga = jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=1)(params, 0)
    (vb, (lpb, eb)), gb = jax.jit(jax.value_and_grad(f, has_aux=True),
                                  static_argnums=1)(params, chunk)
    # The same arithmetic on slices of the positions: only reduction order may differ.
    ulps = decoder_ulps(CFG, 3 * 23, backward=True)
    assert_close(lpb, lpa, ulps=ulps, err_msg="logprobs")
    assert_close(eb, ea, ulps=ulps, err_msg="entropy")
    for (path, x), y in zip(jax.tree.leaves_with_path(ga), jax.tree.leaves(gb)):
        assert_close(y, x, ulps=ulps, err_msg=jax.tree_util.keystr(path))
    assert abs(float(va) - float(vb)) <= ulps * EPS32 * max(1.0, abs(float(va)))


def test_chunked_step_never_builds_full_logits():
    """The compiled RL step's temporaries with chunking stay below one [b, T, V] float32 tensor,
    which the unchunked step needs (a vocabulary large against the model, as at 7B)."""
    cfg = CFG.replace(vocab_size=32768)
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    rl = RLConfig(micro_batch_size=2)
    tx = make_optimizer(rl.optim())
    state = jax.eval_shape(lambda p: init_state(p, tx, tx), params)
    batch = pack_rl_batch([[1] * 8] * 2, [[2] * 500] * 2, [[-1.0] * 500] * 2, np.ones(2),
                          Packing(2, 0))
    b, T = batch.micro_batches.tokens_bxT.shape[1:]
    temps = {}
    for chunk in (0, 64):
        step = jit_step(rl_train_step, config=cfg, rl=rl, tx=tx, schedule=make_schedule(rl.optim()),
                        norm_len=512, chunk_len=chunk)
        temps[chunk] = step.lower(state, _device(batch)).compile().memory_analysis().temp_size_in_bytes
    full_logits = b * T * cfg.vocab_size * 4
    print(f"\ntemporaries: unchunked {temps[0] / 2**20:.0f} MiB, chunk 64 {temps[64] / 2**20:.0f} "
          f"MiB; one [b, T, V] float32 = {full_logits / 2**20:.0f} MiB")
    assert temps[0] > full_logits > temps[64]


def test_optimizer_moments_float32_and_sharded_like_their_parameters():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = CFG.replace(param_dtype="bfloat16", hidden_size=64, intermediate_size=128)
    shardings = sharding.tree_shardings(mesh, model.param_axes(cfg), model.param_shapes(cfg))
    params = jax.jit(functools.partial(model.init_params, cfg), out_shardings=shardings)(
        jax.random.key(0))
    rl_tx = make_optimizer(RLConfig().optim())
    sft_tx = make_optimizer(SFTConfig().optim())
    with jax.set_mesh(mesh):
        state = init_state(params, rl_tx, sft_tx)
    checked = 0
    for opt in (state.rl_opt, state.sft_opt):
        adam = opt[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
        for moments in (adam.mu, adam.nu):
            for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(moments)):
                assert p.dtype == jnp.bfloat16 and m.dtype == jnp.float32
                assert m.sharding.is_equivalent_to(p.sharding, p.ndim), (m.sharding, p.sharding)
                assert not np.asarray(m).any()
                checked += 1
    assert checked == 4 * len(jax.tree.leaves(params))
    sharded_somewhere = [m for m in jax.tree.leaves(state.rl_opt[1][0].mu)
                         if not m.sharding.is_fully_replicated]
    assert sharded_somewhere, "the moments must really be split over the mesh"
