"""relift_jax.attention: blockwise (flash-style) attention against the dense `attend`, the model with
each attention and remat policy, packed rows, memory, and an ahead-of-time TPU compile of splash.

Shape key: B batch, T queries, S key/value slots, H query heads, K key/value heads, E head dim,
V vocab.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from f32 import EPS32, assert_close, assert_trees_close, chain_ulps, decoder_ulps
from relift_jax import attention, hlo_cost, model, sharding


def _segments(rows: list[list[tuple[int, int]]], T: int) -> np.ndarray:
    """[B, T] int32 segment ids from per-row (segment id, length) runs; the rest is padding (0)."""
    out = np.zeros((len(rows), T), np.int32)
    for b, runs in enumerate(rows):
        t = 0
        for seg, n in runs:
            out[b, t:t + n] = seg
            t += n
    return out


def _saved_residuals(f, *args) -> list[tuple[tuple[int, ...], str]]:
    """(shape, description) of what autodiff keeps for f's backward, from the public printer."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(f, *args)
    out = []
    for line in buf.getvalue().splitlines():
        dims = re.match(r"\w+\[([\d,]*)\]", line).group(1)
        out.append((tuple(int(d) for d in dims.split(",") if d), line))
    return out


# name: (H, K, E, T, S, q_start, block_q, block_kv, q segment runs, kv segment runs)
# T and S are not multiples of the blocks; blocks larger than T are cut.
CASES = {
    # Left padding (row 0), right padding (row 1), none (row 2); one head per key/value head.
    "padding_mha": (4, 4, 16, 37, 37, 0, 8, 16,
                    [[(0, 5), (1, 32)], [(1, 28)], [(1, 37)]], None),
    # Packed rows: three sequences and right padding; left padding then two sequences. R = 3.
    "packed_gqa": (6, 2, 16, 45, 45, 0, 16, 8,
                   [[(1, 12), (2, 20), (3, 10)], [(0, 4), (1, 30), (2, 11)]], None),
    # One key/value head for all queries, and blocks far larger than the sequence.
    "mqa_one_block": (4, 1, 16, 13, 13, 0, 512, 512, [[(1, 13)], [(0, 2), (1, 11)]], None),
    # T < S: 21 queries at slots 29..49 of 50 key slots (the prefill-into-cache geometry).
    "queries_after_keys": (4, 2, 16, 21, 50, 29, 8, 8, [[(1, 21)], [(1, 21)]],
                           [[(0, 3), (1, 47)], [(1, 50)]]),
}


def _inputs(case: str, seed: int = 0):
    H, K, E, T, S, q_start, bq, bk, q_runs, kv_runs = CASES[case]
    rng = np.random.RandomState(seed)
    B = len(q_runs)
    q = rng.randn(B, T, H, E).astype(np.float32)
    k = rng.randn(B, K, S, E).astype(np.float32)
    v = rng.randn(B, K, S, E).astype(np.float32)
    q_seg = _segments(q_runs, T)
    kv_seg = q_seg if kv_runs is None else _segments(kv_runs, S)
    return q, k, v, q_seg, kv_seg, q_start, bq, bk


def _attention_ulps(q, k, S: int, E: int) -> float:
    """Rounding of q.k (E terms), the online softmax (S terms) and p.v (S terms), with the scores'
    largest size on top: exp turns an absolute error of a score into a relative one of p."""
    scores = np.einsum("bthe,bkse->bthks", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(E)
    return chain_ulps(max(S, E), 4) * max(1.0, float(np.abs(scores).max()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_blockwise_matches_dense_attend(case):
    """Values and gradients w.r.t. q, k, v at every real query (padding queries are don't-care:
    their outputs are masked out here and their cotangents are 0, as a loss mask makes them)."""
    q, k, v, q_seg, kv_seg, q_start, bq, bk = _inputs(case)
    B, T, H, E = q.shape
    S = k.shape[2]
    real_BxTx1x1 = (q_seg != 0)[:, :, None, None]
    cot = np.random.RandomState(1).randn(*q.shape).astype(np.float32) * real_BxTx1x1
    mask = attention.segment_mask(jnp.asarray(q_seg), jnp.asarray(kv_seg), q_start)

    def dense(q, k, v):
        return attention.attend(q, k, v, mask)

    def blockwise(q, k, v):
        return attention.blockwise_attention(q, k, v, q_seg, kv_seg, q_start=q_start, block_q=bq,
                                             block_kv=bk)

    ulps = _attention_ulps(q, k, S, E)
    want = np.asarray(jax.jit(dense)(q, k, v)) * real_BxTx1x1
    got = np.asarray(jax.jit(blockwise)(q, k, v)) * real_BxTx1x1
    assert_close(got, want, ulps=ulps, scale=float(np.abs(v).max()), err_msg=f"{case} output")

    def grads(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2)))(q, k, v)

    for name, g, g_ref in zip("qkv", grads(blockwise), grads(dense)):
        assert np.abs(np.asarray(g_ref)).max() > 0.1, name  # not vacuous
        # The backward runs the chain again (dS = P * (dP - D)), so twice the forward's rounding.
        assert_close(g, g_ref, ulps=2 * ulps, err_msg=f"{case} d{name}")


def test_blockwise_padding_queries_give_zeros_and_finite_gradients():
    """A query that sees no key (padding; here a whole padding row) yields 0, not NaN, and sends no
    gradient anywhere."""
    q, k, v, *_ = _inputs("padding_mha")
    seg = _segments([[(0, 37)], [(1, 20)], [(1, 37)]], 37)
    f = lambda q, k, v: attention.blockwise_attention(q, k, v, seg, seg, block_q=8, block_kv=8)  # noqa: E731
    out = np.asarray(f(q, k, v))
    assert np.all(out[0] == 0) and np.all(out[1, 20:] == 0) and np.isfinite(out).all()
    gq, gk, gv = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g in (gq, gk, gv):
        assert np.isfinite(np.asarray(g)).all()
    assert np.all(np.asarray(gq)[0] == 0) and np.all(np.asarray(gk)[0] == 0)


def test_blockwise_backward_keeps_no_scores():
    """What autodiff keeps for the backward: q, k, v, segment ids, the output and the logsumexp,
    none larger than q; plain autodiff through the block loops would keep every block's scores."""
    B, T, H, K, E = 2, 64, 4, 2, 8
    rng = np.random.RandomState(0)
    q = rng.randn(B, T, H, E).astype(np.float32)
    k = rng.randn(B, K, T, E).astype(np.float32)
    seg = np.ones((B, T), np.int32)

    def loss(q, k, v):
        return jnp.sum(attention.blockwise_attention(q, k, v, seg, seg, block_q=32, block_kv=32))

    saved = _saved_residuals(loss, q, k, k)
    sizes = [int(np.prod(shape)) for shape, _ in saved]
    assert max(sizes) <= q.size < B * H * 32 * 32, saved  # one block of scores is larger than q
    assert any("named 'attention'" in why for _, why in saved), saved


def test_blockwise_memory_is_far_below_the_dense_scores():
    """Compiled temporary memory of grad(attention) at T = 2,048 on CPU: the dense path holds float32
    [B, H, T, T] scores and probabilities; blockwise holds a few [B, H, 512, 512] blocks and dQ."""
    B, T, H, K, E = 1, 2048, 4, 2, 64
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def temp_bytes(impl: str) -> int:
        def loss(q, k, v, seg):
            return jnp.sum(attention.self_attention(impl, q, k, v, seg) ** 2)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        stats = grad.lower(f32(B, T, H, E), f32(B, K, T, E), f32(B, K, T, E), seg).compile()
        return stats.memory_analysis().temp_size_in_bytes

    scores = B * H * T * T * 4
    dense, blockwise = temp_bytes("xla"), temp_bytes("blockwise")
    print(f"\nT={T} H={H}: float32 scores {scores / 2**20:.0f} MiB; temp memory of grad(attention): "
          f"dense {dense / 2**20:.1f} MiB, blockwise {blockwise / 2**20:.1f} MiB")
    assert dense >= scores  # the measurement sees the dense scores
    assert blockwise < scores / 2


# ----------------------------------------------------------------------------- the model

CFG = model.ModelConfig("qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                        attention_block_q=8, attention_block_kv=8)


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(0), std=0.2)  # O(1) logits


def _tokens(seed: int, shape) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, CFG.vocab_size, shape).astype(np.int32)


def _logits_and_grads(cfg, params, tokens, valid, positions=None, segments=None):
    """Logits and the gradient of a loss over the real positions only."""
    w = np.random.RandomState(5).randn(*tokens.shape, cfg.vocab_size).astype(np.float32)
    w *= np.asarray(valid)[..., None]

    def loss(p):
        logits = model.apply(cfg, p, tokens, valid, positions, segments)
        return jnp.sum(logits * w) / tokens.size, logits

    (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), g


def test_model_blockwise_matches_xla(params):
    """Left- and right-padded rows of 20 tokens (3 blocks of 8): logits at real tokens and every
    parameter's gradient agree with the dense attention."""
    T = 20
    tokens = _tokens(0, (3, T))
    valid = np.ones((3, T), bool)
    valid[0, :6] = False
    valid[1, 13:] = False
    logits_x, g_x = _logits_and_grads(CFG, params, tokens, valid)
    logits_b, g_b = _logits_and_grads(CFG.replace(attention="blockwise"), params, tokens, valid)
    assert np.abs(logits_x[valid]).max() > 1.0
    assert_close(logits_b[valid], logits_x[valid], ulps=decoder_ulps(CFG, T))
    assert_trees_close(g_b, g_x, ulps=decoder_ulps(CFG, 3 * T, backward=True))


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_packed_row_matches_sequences_run_separately(params, impl):
    """Two sequences packed in one row (segment ids 1, 2, positions restarting at 0, padding after)
    give each sequence's own logits."""
    cfg = CFG.replace(attention=impl)
    a, b = _tokens(1, (7,)), _tokens(2, (11,))
    T = 21
    tokens = np.zeros((1, T), np.int32)
    tokens[0, :7], tokens[0, 7:18] = a, b
    segments = _segments([[(1, 7), (2, 11)]], T)
    positions = np.zeros((1, T), np.int32)
    positions[0, :7], positions[0, 7:18] = np.arange(7), np.arange(11)
    packed = np.asarray(jax.jit(model.apply, static_argnums=0)(
        cfg, params, tokens, None, positions, segments))[0]
    for seq, span in ((a, slice(0, 7)), (b, slice(7, 18))):
        alone = np.asarray(model.forward(CFG, params, seq[None]))[0]
        assert_close(packed[span], alone, ulps=decoder_ulps(CFG, T), err_msg=f"{impl} {span}")
    # Without the segment ids, b would see a: the check above is not vacuous.
    unpacked = np.asarray(model.apply(cfg, params, tokens, segments > 0, positions))[0]
    assert np.abs(unpacked[7:18] - packed[7:18]).max() > 1e-2


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_remat_policies_give_the_same_loss_and_gradients(params, impl):
    tokens = _tokens(3, (2, 16))
    valid = np.ones((2, 16), bool)
    valid[1, 10:] = False

    def run(remat):
        return _logits_and_grads(CFG.replace(attention=impl, remat=remat), params, tokens, valid)

    logits0, g0 = run("none")
    for remat in ("full", "save_matmuls"):
        logits, g = run(remat)
        assert_close(logits[valid], logits0[valid], ulps=decoder_ulps(CFG, 16), err_msg=remat)
        assert_trees_close(g, g0, ulps=decoder_ulps(CFG, 2 * 16, backward=True))


def test_save_matmuls_keeps_the_named_projections_and_attention_residuals(params):
    """One layer under each policy: "full" keeps only its inputs; "save_matmuls" keeps the named
    projections the backward needs (down_proj is not: the residual add is linear) and the
    blockwise output + logsumexp, and no other activation."""
    cfg = CFG.replace(attention="blockwise")
    layer_params = jax.tree.map(lambda a: a[0], params["layers"])
    x_BxTxD = jnp.ones((1, 16, cfg.hidden_size))
    cos, sin = model.rope_cos_sin(cfg, jnp.arange(16)[None])
    segments = jnp.ones((1, 16), jnp.int32)

    def saved(remat):
        layer = jax.checkpoint(functools.partial(model._layer, cfg),
                               policy=model.REMAT_POLICIES[remat])

        def loss(lp, x):
            return jnp.sum(layer(lp, x, cos, sin, segments, None, None, 0)[0])
        return [why for _, why in _saved_residuals(loss, layer_params, x_BxTxD)
                if "from the argument" not in why and "from a constant" not in why]

    assert saved("full") == []
    names = sorted(re.search(r"named '(\w+)'", why).group(1) for why in saved("save_matmuls"))
    assert names == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            attention.RESIDUAL_NAME, attention.RESIDUAL_NAME]), names


def test_config_remat_and_attention_fields():
    assert CFG.replace(remat=True).remat == "full" and CFG.replace(remat=False).remat == "none"
    assert CFG.replace(remat=True) == CFG.replace(remat="full")  # one spelling, one jit cache key
    with pytest.raises(ValueError, match="remat 'some'"):
        CFG.replace(remat="some")
    with pytest.raises(ValueError, match="attention 'flash'"):
        CFG.replace(attention="flash")
    with pytest.raises(ValueError, match="cudnn.*float32"):
        CFG.replace(attention="cudnn")
    with pytest.raises(ValueError, match="attention_block_q"):
        CFG.replace(attention_block_q=100)


def test_segment_ids_need_positions_and_no_cache(params):
    tokens = _tokens(0, (1, 8))
    seg = np.ones((1, 8), np.int32)
    with pytest.raises(ValueError, match="positions_BxT"):
        model.apply(CFG, params, tokens, segment_ids_BxT=seg)
    with pytest.raises(ValueError, match="KV cache"):
        model.hidden_states(CFG, params, tokens, np.zeros((1, 8), np.int32), np.ones((1, 8), bool),
                            cache=model.init_cache(CFG, 1, 8), segment_ids_BxT=seg)


# ----------------------------------------------------------------------------- accelerators

@pytest.mark.skipif(jax.device_count() < 8, reason="needs tests/conftest.py's 8 CPU devices")
def test_splash_shard_map_specs_follow_the_rules_table():
    """Batch over (data, fsdp), heads over tensor only where it divides the key/value heads too
    (query head h reads key head h // R inside each shard), never the sequence."""
    P = jax.sharding.PartitionSpec
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    q_spec, kv_spec, seg_spec = attention._splash_specs(mesh, (4, 28, 512, 128), (4, 4, 512, 128))
    assert q_spec == kv_spec == P(("data", "fsdp"), "tensor", None, None)
    assert seg_spec == P(("data", "fsdp"), None)
    # One key/value head cannot be split over tensor = 2: neither are the query heads; a batch of
    # 2 is split over data only.
    q_spec, kv_spec, _ = attention._splash_specs(mesh, (2, 28, 512, 128), (2, 1, 512, 128))
    assert q_spec == kv_spec == P("data", None, None, None)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 'jax[tpu]')")
def test_splash_and_blockwise_compile_for_tpu_ahead_of_time():
    """Lowers and compiles grad(loss) for a fake 4-chip TPU v5p (no TPU needed) on a 2 (fsdp) x 2
    (tensor) mesh with packed rows and T = 2,000 (not a multiple of the 512 blocks): splash becomes
    Pallas kernels inside a shard_map, and both use less temporary memory than dense attention."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # tests beside this one may hold it
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2), devices=topo.devices)
    base = model.ModelConfig("qwen2", vocab_size=256, hidden_size=256, intermediate_size=512,
                             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=128,
                             qkv_bias=True, param_dtype="bfloat16", compute_dtype="bfloat16",
                             remat="save_matmuls")
    B, T = 4, 2000
    shapes = model.param_shapes(base)
    shardings = sharding.tree_shardings(mesh, model.param_axes(base), shapes)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
    ints = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding.batch_sharding(mesh, 2, (B, T)))

    def compiled(impl):
        cfg = base.replace(attention=impl)

        def loss(p, tokens, segments, positions):
            logits = model.apply(cfg, p, tokens, positions_BxT=positions, segment_ids_BxT=segments)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        with jax.set_mesh(mesh):
            return jax.jit(jax.value_and_grad(loss)).lower(params, ints, ints, ints).compile()

    runs = {impl: compiled(impl) for impl in ("xla", "blockwise", "splash")}
    assert "tpu_custom_call" in runs["splash"].as_text()
    temp = {impl: c.memory_analysis().temp_size_in_bytes for impl, c in runs.items()}
    print(f"\nTPU v5p AOT, T={T}, B={B}, H={base.num_heads} over 4 chips, per-chip temp memory: "
          + ", ".join(f"{n} {b / 2**20:.1f} MiB" for n, b in temp.items()))
    assert temp["splash"] < temp["xla"] and temp["blockwise"] < temp["xla"]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_blockwise_on_gpu():
    """bfloat16 on a GPU: cuDNN against blockwise (both take the segment rule), values and
    gradients, on packed and padded rows. Tolerance: bfloat16 rounding of the inputs and output."""
    q, k, v, seg, _, _, _, _ = _inputs("packed_gqa")
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    E = q.shape[-1]
    q, k, v = (jnp.pad(x, [(0, 0)] * 3 + [(0, 64 - E)]) for x in (q, k, v))  # cuDNN: E % 8 == 0
    real = (seg != 0)[:, :, None, None]
    cot = jnp.asarray(np.random.RandomState(1).randn(*q.shape) * real, jnp.bfloat16)

    def run(impl):
        f = lambda q, k, v: attention.self_attention(impl, q, k, v, jnp.asarray(seg))  # noqa: E731
        out = jax.jit(f)(q, k, v)
        g = jax.jit(jax.grad(lambda *a: jnp.sum((f(*a) * cot).astype(jnp.float32)),
                             argnums=(0, 1, 2)))(q, k, v)
        return [np.asarray(x, np.float32) for x in (out * real, *g)]

    eps_bf16 = float(jnp.finfo(jnp.bfloat16).eps)
    for name, got, want in zip(["out", "dq", "dk", "dv"], run("cudnn"), run("blockwise")):
        err = np.abs(got - want).max()
        assert err <= 8 * eps_bf16 * np.abs(want).max(), (name, err, np.abs(want).max())


# ----------------------------------------------------------------------------- ragged decode

def _decode_inputs(L=3, B=5, K=2, R=3, S=96, E=16, seed=0):
    rng = np.random.RandomState(seed)
    q = rng.randn(B, K * R, E).astype(np.float32)
    k_all = rng.randn(L, B, K, S, E).astype(np.float32)
    v_all = rng.randn(L, B, K, S, E).astype(np.float32)
    return q, k_all, v_all


@pytest.mark.parametrize("S,block", [(96, 32), (96, 512), (64, 16)])
def test_ragged_decode_matches_dense_attend(S, block):
    """The Pallas kernel (interpret mode on CPU) against `attend` under the mask slot < len[b], for
    lengths 1, a block edge, one past it, mid-block and the whole window, R = 3 query heads per
    key/value head, on layer 1 of 3 (read in place)."""
    q, k_all, v_all = _decode_inputs(S=S)
    lens = np.array([1, block if block < S else S // 2, min(block + 1, S), 37, S], np.int32)
    got = jax.jit(functools.partial(attention.ragged_decode_attention, block=block))(
        q, k_all, v_all, 1, lens)
    mask_Bx1xS = (np.arange(S)[None, :] < lens[:, None])[:, None]
    want = attention.attend(q[:, None], k_all[1], v_all[1], mask_Bx1xS)[:, 0]
    assert got.shape == want.shape
    assert_close(np.asarray(got), np.asarray(want), ulps=_attention_ulps(q[:, None], k_all[1], S,
                                                                         q.shape[-1]))


@pytest.mark.parametrize("S,R", [(96, 3), (128, 1), (48, 7)])
def test_ragged_decode_gpu_kernel_matches_dense_attend(S, R):
    """The GPU (Triton) form of the kernel, run in Pallas interpret mode on CPU, against `attend`
    under slot < len[b]: key blocks of 32 or 64 or 16 (the largest power of two <= 64 dividing
    S), lengths 1, a block edge, one past it, mid-block and the whole window, R query heads per
    key/value head padded to Triton's 16 rows, layer 1 of 3 read in place. On a GPU the same
    test runs the compiled kernel through `ragged_decode_attention` (bench/gpu_check.sh)."""
    q, k_all, v_all = _decode_inputs(R=R, S=S, E=32)
    blk = attention._gpu_decode_block(S, 32)
    lens = np.array([1, blk, blk + 1, 37 % S + 1, S], np.int32)
    B, H, E = q.shape
    if jax.default_backend() == "gpu":
        f = jax.jit(attention.ragged_decode_attention)
        got = f(q, k_all, v_all, 1, lens)
    else:
        f = jax.jit(functools.partial(attention._ragged_decode_gpu_local, interpret=True))
        got = f(q.reshape(B, 2, R, E), k_all, v_all, np.array([1], np.int32), lens)
    mask_Bx1xS = (np.arange(S)[None, :] < lens[:, None])[:, None]
    want = attention.attend(q[:, None], k_all[1], v_all[1], mask_Bx1xS)[:, 0]
    assert_close(np.asarray(got).reshape(want.shape), np.asarray(want),
                 ulps=_attention_ulps(q[:, None], k_all[1], S, E))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_ragged_decode_lowers_to_one_triton_kernel_for_cuda(dtype):
    """Without a GPU: a Qwen2.5-7B-shaped decode step's ragged attention (28 query / 4 key-value
    heads, E = 128, a 2,048-slot window of a 28-layer cache) lowers for CUDA through Pallas's
    Triton lowering to one Triton kernel whose operands are the whole stacked cache (read in
    place: no slice of a layer's window first). What is left to a GPU: Triton's own compile."""
    L, B, K, H, S, E = 28, 16, 4, 28, 2048, 128
    sds = jax.ShapeDtypeStruct
    args = (sds((B, H, E), dtype), sds((L, B, K, S, E), dtype), sds((L, B, K, S, E), dtype),
            sds((), jnp.int32), sds((B,), jnp.int32))
    text = jax.jit(attention.ragged_decode_attention).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 1
    window = f"tensor<{B}x{K}x{S}x{E}x"
    assert not [ln for ln in text.splitlines() if "dynamic_slice" in ln and window in ln]


def test_ragged_decode_gpu_block_choice():
    assert attention._gpu_decode_block(96, 128) == 32     # largest power of two <= 64 dividing S
    assert attention._gpu_decode_block(2048, 128) == 64
    assert attention._gpu_decode_block(48, 64) == 16
    assert attention._gpu_decode_block(40, 64) is None    # none >= 16 divides: dense attention
    assert attention._gpu_decode_block(64, 96) is None    # head dim not a power of two: dense


def test_ragged_decode_block_choice():
    assert attention._decode_block(96, 512) == 96        # the whole window: one block
    assert attention._decode_block(1536, 512) == 512
    assert attention._decode_block(1536 + 64, 512) == 64  # largest power of two dividing S
    assert attention._decode_block(1000, 512) == 8
    assert attention._decode_block(1001, 512) == 1001     # nothing divides: one block


@pytest.mark.skipif(jax.device_count() < 8, reason="needs tests/conftest.py's 8 CPU devices")
def test_ragged_decode_sharded_equals_unsharded():
    """Under a 2 (data) x 2 (fsdp) x 2 (tensor) mesh the kernel runs per shard (rows over data x
    fsdp, key/value heads over tensor): the same result as on one device."""
    q, k_all, v_all = _decode_inputs(B=8, K=2, S=64)
    lens = np.array([1, 5, 16, 17, 33, 64, 2, 40], np.int32)
    f = jax.jit(functools.partial(attention.ragged_decode_attention, block=16))
    want = np.asarray(f(q, k_all, v_all, 2, lens))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        def put(x, axes):
            return jax.device_put(x, sharding.named_sharding(mesh, axes, x.shape))
        cache_axes = ("cache_layers", "batch", "cache_kv_heads", "cache_slots", None)
        got = f(put(q, ("batch", "act_heads", None)), put(k_all, cache_axes),
                put(v_all, cache_axes), 2, put(lens, ("batch",)))
    assert_close(np.asarray(got), want, ulps=4)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 'jax[tpu]')")
def test_ragged_decode_compiles_for_tpu_ahead_of_time():
    """A Qwen2.5-7B-shaped decode step's attention (28 query / 4 key-value heads, E = 128, bf16, a
    2,048-slot window of a 28-layer cache) lowers to one Mosaic kernel (tpu_custom_call) for a fake
    v5p chip, reading the cache in place: no copy of a cache-sized array."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    one = jax.sharding.SingleDeviceSharding(topo.devices[0])
    L, B, K, H, S, E = 28, 16, 4, 28, 2048, 128
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=one)  # noqa: E731
    args = (sds((B, H, E), jnp.bfloat16), sds((L, B, K, S, E), jnp.bfloat16),
            sds((L, B, K, S, E), jnp.bfloat16), sds((), jnp.int32), sds((B,), jnp.int32))
    text = jax.jit(attention.ragged_decode_attention).lower(*args).compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 1
    cache_shape = f"bf16[{L},{B},{K},{S},{E}]"
    copies = [ln for ln in text.splitlines() if " copy(" in ln and cache_shape in ln.split("=")[1]
              .split("copy(")[0]]
    assert not copies, copies
    # hlo_cost counts the kernel's own estimate (one layer's window of K and V, q and the output),
    # not its operands (the whole 28-layer cache, 28x more).
    window_bytes = 2 * B * K * S * E * 2
    counted = hlo_cost.analyse(text).bytes
    assert window_bytes <= counted < 1.1 * window_bytes, (counted, window_bytes)
