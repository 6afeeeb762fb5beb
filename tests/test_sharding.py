"""relift_jax.sharding: the rules table, and sharded runs equal to unsharded ones on 8 fake CPU devices.

conftest.py asks XLA for 8 host devices before jax starts, so a 2x2x2 (data x fsdp x tensor) mesh is
real: arrays are split into per-device shards and XLA inserts the collectives.

Shape key: B batch, T tokens, V vocab, N new tokens.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from f32 import EPS32, assert_close, assert_greedy_decided, assert_trees_close, decoder_ulps
from relift_jax import hf, model, sampler, sharding

NEED = 8
needs_8 = pytest.mark.skipif(
    jax.device_count() < NEED,
    reason=f"needs {NEED} devices, found {jax.device_count()}: run pytest so that tests/conftest.py "
           f"sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts")

MESHES = {"2x2x2": sharding.MeshConfig(data=2, fsdp=2, tensor=2),
          "1x8x1": sharding.MeshConfig(data=1, fsdp=8, tensor=1)}


def _place(mesh, cfg, params):
    return jax.device_put(params, sharding.tree_shardings(mesh, model.param_axes(cfg), params))


def _tokens(cfg, shape, seed=0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, shape).astype(np.int32)


def _trajectory_logits(cfg, params, prompts, generated) -> list[np.ndarray]:
    """Row i: `forward`'s logits [len(generated[i]), V] that predict generated[i] (one right-padded
    batch: causality keeps the padding out)."""
    seqs_BxT = np.zeros((len(prompts), max(len(p) + len(g) for p, g in zip(prompts, generated))),
                        np.int32)
    for i, (p, g) in enumerate(zip(prompts, generated)):
        seqs_BxT[i, :len(p) + len(g)] = p + g
    logits_BxTxV = np.asarray(model.forward(cfg, params, seqs_BxT), np.float64)
    return [logits_BxTxV[i, len(p) - 1:len(p) + len(g) - 1]
            for i, (p, g) in enumerate(zip(prompts, generated))]


# ----------------------------------------------------------------------------- rules (no devices)

def test_logical_to_spec_uses_each_mesh_axis_once():
    assert sharding.logical_to_spec(("batch", "length", "act_embed")) == P(("data", "fsdp"), None,
                                                                            None)
    assert sharding.logical_to_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
    # fsdp already shards the batch dimension, so the embed dimension cannot use it again.
    assert sharding.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="no_such_axis"):
        sharding.logical_to_spec(("no_such_axis",))


def test_every_parameter_axis_has_a_rule():
    cfg = model.ModelConfig("llama", vocab_size=10, hidden_size=8, intermediate_size=8,
                            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, qkv_bias=True,
                            o_bias=True)
    for axes in jax.tree.leaves(model.param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)):
        sharding.logical_to_spec(axes)


def test_mesh_config_shapes():
    assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
    assert sharding.MeshConfig().shape(8) == (1, 8, 1)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.MeshConfig(data=3, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="8 devices"):
        sharding.MeshConfig(data=2, fsdp=2, tensor=1).shape(8)


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((4, 3))
    assert sharding.constrain(x, ("batch", None)) is x


# ----------------------------------------------------------------------------- on 8 devices

@needs_8
def test_params_are_really_sharded(tiny_checkpoints):
    cfg, params = tiny_checkpoints.ours("llama3")
    mesh = sharding.make_mesh(MESHES["2x2x2"])
    placed = _place(mesh, cfg, params)
    q = placed["layers"]["q"]  # [L, D, H*E] = (layers, embed, heads)
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    L, D, HE = q.shape
    assert {s.data.shape for s in q.addressable_shards} == {(L, D // 2, HE // 2)}
    assert len(q.addressable_shards) == 8
    assert placed["layers"]["down"].sharding.spec == P(None, "tensor", "fsdp")
    # vocab 97 is not divisible by tensor=2, so that axis is dropped rather than failing.
    assert placed["lm_head"].sharding.spec == P("fsdp", None)

    fsdp = _place(sharding.make_mesh(MESHES["1x8x1"]), cfg, params)
    assert fsdp["layers"]["gate"].sharding.spec[1] == "fsdp"  # (the tensor axis has size 1)
    assert {s.data.shape for s in fsdp["layers"]["gate"].addressable_shards} == {
        (cfg.num_layers, cfg.hidden_size // 8, cfg.intermediate_size)}


@needs_8
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("kind", ["qwen2_untied", "llama3"])
def test_sharded_logits_equal_unsharded(tiny_checkpoints, kind, mesh_name):
    cfg, params = tiny_checkpoints.ours(kind)
    tokens_BxT = _tokens(cfg, (8, 40))
    valid_BxT = np.ones(tokens_BxT.shape, bool)
    valid_BxT[::2, :13] = False  # left padding on every other row
    ref_fwd = np.asarray(model.forward(cfg, params, tokens_BxT))
    apply = jax.jit(model.apply, static_argnums=0)
    ref_apply = np.asarray(apply(cfg, params, tokens_BxT, valid_BxT))

    mesh = sharding.make_mesh(MESHES[mesh_name])
    placed = _place(mesh, cfg, params)
    batch = sharding.batch_sharding(mesh, 2)
    with jax.set_mesh(mesh):
        out_fwd = model.forward(cfg, placed, jax.device_put(tokens_BxT, batch))
        out_apply = apply(cfg, placed, jax.device_put(tokens_BxT, batch),
                          jax.device_put(valid_BxT, batch))
    # The activations were constrained: the logits come out split over the batch mesh axes.
    B = tokens_BxT.shape[0]
    assert out_fwd.sharding.shard_shape(out_fwd.shape)[0] == B // sharding.batch_divisor(mesh)
    # Sharded programs reorder and split the reductions: equal to float32 rounding, not bit-equal.
    assert_close(out_fwd, ref_fwd, ulps=decoder_ulps(cfg, T=40))
    assert_close(out_apply, ref_apply, ulps=decoder_ulps(cfg, T=40))


@needs_8
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_gradients_equal_unsharded(tiny_checkpoints, mesh_name):
    """What the train steps rely on: the same loss and gradients under the mesh."""
    cfg, params = tiny_checkpoints.ours("qwen2_tied")
    tokens_BxT = _tokens(cfg, (8, 24), seed=1)

    @jax.jit
    def loss_and_grad(p, t):
        def loss(p):
            logp = jax.nn.log_softmax(model.apply(cfg, p, t[:, :-1]))
            return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], axis=-1))
        return jax.value_and_grad(loss)(p)

    ref_loss, ref_grad = loss_and_grad(params, tokens_BxT)
    mesh = sharding.make_mesh(MESHES[mesh_name])
    placed = _place(mesh, cfg, params)
    with jax.set_mesh(mesh):
        loss, grad = loss_and_grad(placed, jax.device_put(tokens_BxT,
                                                          sharding.batch_sharding(mesh, 2)))
    # The gradients sum over the 8 x 23 tokens across devices, in another order than unsharded.
    assert_close(loss, ref_loss, ulps=decoder_ulps(cfg, T=23))
    assert_trees_close(grad, ref_grad, ulps=decoder_ulps(cfg, T=8 * 23, backward=True))


@needs_8
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_sampler_equals_unsharded(tiny_checkpoints, mesh_name):
    cfg, params = tiny_checkpoints.ours("llama3")
    prompts = [_tokens(cfg, (n,), seed=n).tolist() for n in (3, 11, 17, 6, 9)]
    kw = dict(max_new_tokens=16, eos_id=-1)
    ref_greedy = sampler.generate(cfg, params, prompts, temperature=0.0, **kw)
    ref_sampled = sampler.generate(cfg, params, prompts, temperature=1.0, seed=3, **kw)

    mesh = sharding.make_mesh(MESHES[mesh_name])
    placed = _place(mesh, cfg, params)
    with jax.set_mesh(mesh):
        greedy = sampler.generate(cfg, placed, prompts, temperature=0.0, mesh=mesh, **kw)
        sampled = sampler.generate(cfg, placed, prompts, temperature=1.0, seed=3, mesh=mesh, **kw)
    # Greedy tokens of two programs agree only where rounding cannot flip an argmax: check that
    # premise on the reference logits of the trajectory (also the scale of their rounding).
    logits = _trajectory_logits(cfg, params, prompts, ref_greedy.tokens)
    scale = max(float(np.abs(x).max()) for x in logits)
    ulps = decoder_ulps(cfg, T=32 + 16)  # cache: prompt bucket + new tokens
    for x, toks in zip(logits, ref_greedy.tokens):
        assert_greedy_decided(x, toks, bound=ulps * EPS32 * scale)
    assert greedy.tokens == ref_greedy.tokens
    for a, b in zip(greedy.logprobs, ref_greedy.logprobs):
        # log p = logit - logsumexp(logits): each term carries the logits' rounding error.
        assert_close(a, b, ulps=2 * ulps, scale=scale)
    # 5 rows pad to 8 both ways, so the random draws have the same shape and must agree exactly
    # (the draws depend on the padded row count, not on the device layout).
    assert sampled.tokens == ref_sampled.tokens


@needs_8
def test_load_checkpoint_places_params_on_the_mesh(tiny_checkpoints):
    path = tiny_checkpoints.paths["qwen2_untied"]
    cfg = hf.config_from_hf(hf.load_hf_config(path))
    mesh = sharding.make_mesh(MESHES["2x2x2"])
    shardings = sharding.tree_shardings(mesh, model.param_axes(cfg), model.param_shapes(cfg))
    cfg2, placed = hf.load_checkpoint(path, shardings=shardings)
    assert cfg2 == cfg
    assert placed["layers"]["gate"].sharding == shardings["layers"]["gate"]
    assert len(placed["layers"]["gate"].addressable_shards) == 8
    _, ref = tiny_checkpoints.ours("qwen2_untied")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 placed, ref)


def test_lockstep_check_names_the_process_that_differs(monkeypatch):
    """The multi-host lockstep check: equal hashes pass, a different one raises naming the process.
    (The real cross-process path runs in tests/test_multihost.py; here the gather is faked.)"""
    from jax.experimental import multihost_utils

    from relift_jax import sharding
    sharding.check_same_on_every_process("x", {"buffer": [1, 2]})  # one process: nothing to do
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    peers: list = []
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: np.stack([x] + [p(x) for p in peers]))
    peers[:] = [lambda x: x, lambda x: x]
    sharding.check_same_on_every_process("iteration 3: state", {"buffer": [1, 2]})
    peers[1] = lambda x: x + 1
    with pytest.raises(sharding.LockstepError, match=r"iteration 3: state differs.*\[2\]"):
        sharding.check_same_on_every_process("iteration 3: state", {"buffer": [1, 2]})


@needs_8
@pytest.mark.parametrize("tensor,engine_name", [(4, "continuous"), (4, "grouped")])
def test_decode_layout_samples_like_the_training_layout(tiny_checkpoints, tensor, engine_name):
    """rollout.DecodeLayout: the sampler's own mesh (data = 8 / T, tensor = T) over the same devices,
    weights copied there once per call: greedy rows equal the FSDP-layout run and the weights are
    split T ways where the shapes allow (never gathered per token)."""
    from relift_jax import rollout
    cfg, params = tiny_checkpoints.ours("llama3")
    prompts = [_tokens(cfg, (n,), seed=n).tolist() for n in (3, 11, 17, 6, 9)]
    kw = dict(max_new_tokens=16, eos_id=-1, num_samples=2, engine=engine_name)
    train_mesh = sharding.make_mesh(MESHES["1x8x1"])
    placed = _place(train_mesh, cfg, params)
    with jax.set_mesh(train_mesh):
        ref = sampler.generate(cfg, placed, prompts, temperature=0.0, mesh=train_mesh, **kw)
        ref_s = sampler.generate(cfg, placed, prompts, temperature=1.0, seed=3, mesh=train_mesh,
                                 **kw)
        layout = rollout.DecodeLayout(cfg, train_mesh, tensor)
        out = layout.generate(placed, prompts, temperature=0.0, **kw)
        out_s = layout.generate(placed, prompts, temperature=1.0, seed=3, **kw)
        q = layout(placed)["layers"]["q"]
    assert dict(zip(layout.mesh.axis_names, layout.mesh.axis_sizes)) == {
        "data": 8 // tensor, "fsdp": 1, "tensor": tensor}
    assert q.sharding.mesh.shape == layout.mesh.shape
    assert q.addressable_shards[0].data.shape[-1] == q.shape[-1] // tensor  # heads split T ways
    assert out.tokens == ref.tokens
    for a, b in zip(out.logprobs, ref.logprobs):
        assert_close(np.asarray(a), np.asarray(b), ulps=2 * decoder_ulps(cfg, T=48), scale=30.0)
    # Draws are keyed by (seed, row, token index): a sampled row differs only where rounding flips
    # a draw; count the rows that agree token for token.
    same = sum(a == b for a, b in zip(out_s.tokens, ref_s.tokens))
    assert same >= len(ref_s.tokens) - 1, (same, len(ref_s.tokens))


@needs_8
def test_engine_segment_gives_back_its_state_in_the_layout_it_took(tiny_checkpoints):
    """In a decode layout (vocabulary split over tensor) a segment's state comes out in the
    shardings it went in with, so the next segment reuses the program and the donated buffers."""
    from relift_jax import engine, rollout
    cfg, _ = tiny_checkpoints.ours("llama3")
    cfg = cfg.replace(vocab_size=128)  # divisible by tensor = 4 (97 is not: it would stay whole)
    params = model.init_params(cfg, jax.random.key(0))
    train_mesh = sharding.make_mesh(MESHES["1x8x1"])
    layout = rollout.DecodeLayout(cfg, train_mesh, 4)
    sp = sampler.SamplingParams(max_new_tokens=8, temperature=1.0, stop_ids=(1,))
    with jax.set_mesh(layout.mesh):
        p = layout(_place(train_mesh, cfg, params))
        state = engine._empty_state(cfg, 8, 64, engine._Placer(layout.mesh))
        compiled = engine._segment.lower(cfg, sp, 4, p, state, jax.random.key(0)).compile()
    assert "tensor" in str(state[1].sharding.spec), state[1].sharding  # vocabulary split
    for x, o in zip(jax.tree.leaves(state), jax.tree.leaves(compiled.output_shardings[0])):
        assert x.sharding.is_equivalent_to(o, x.ndim), (x.shape, x.sharding, o)
