"""Causal grouped-query attention, four ways: dense XLA, blockwise (flash-style, plain JAX), Pallas
splash on TPU and cuDNN on GPU. `self_attention` picks one by name (`ModelConfig.attention`).

Why: a dense softmax materialises float32 scores [B, H, T, S]; for Qwen2.5-Math-7B (H = 28) at
T = S = 9,216 that is 9.5 GB per sequence per layer, and its backward keeps the probabilities too.
The other three never hold more than one block of scores per head at a time.

The mask rule, the same for all (`segment_mask`): query t sees key s iff s <= t (by slot), both
carry the same segment id and that id is nonzero. Segment 0 is padding; several sequences packed
in a row carry ids 1, 2, ... . The outputs at padding queries are don't-care values and differ
between the implementations (dense: the uniform average of all values; blockwise: 0; splash and
cuDNN: an average over earlier padding); callers mask them out of every loss.

Shape key: B batch, T queries, S key/value slots, H query heads, K key/value heads, R = H // K
query heads per key/value head, E head dim; q/k the query/key block sizes, n the number of blocks.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from relift_jax import sharding

IMPLEMENTATIONS = ("xla", "blockwise", "splash", "cudnn")
# The name under which blockwise and splash mark the residuals their backward needs (the output
# and the logsumexp), so a remat policy can save them instead of rerunning the attention.
RESIDUAL_NAME = "attention"
_NEG = -1e30  # finite, so that max and exp of a fully masked block stay NaN-free


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ----------------------------------------------------------------------------- masks and dense

def attention_mask(kv_valid_BxS: jax.Array, start: jax.Array | int, T: int) -> jax.Array:
    """Causal mask [B, T, S] for T queries that sit at slots start..start+T-1 of S key slots
    (`start` an int, or int32 [B]: each row's own start, for ragged decoding)."""
    S = kv_valid_BxS.shape[1]
    q_slot_BxT = jnp.reshape(start, (-1, 1)) + jnp.arange(T)[None, :]
    causal_BxTxS = jnp.arange(S)[None, None, :] <= q_slot_BxT[:, :, None]
    return causal_BxTxS & kv_valid_BxS[:, None, :]


def segment_mask(q_segment_ids_BxT: jax.Array, kv_segment_ids_BxS: jax.Array,
                 q_start: int = 0) -> jax.Array:
    """THE mask rule [B, T, S]: causal by slot, within one nonzero segment (module docstring)."""
    T = q_segment_ids_BxT.shape[1]
    same_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
    return attention_mask(kv_segment_ids_BxS != 0, q_start, T) & same_BxTxS


def attend(q_BxTxHxE: jax.Array, k_BxKxSxE: jax.Array, v_BxKxSxE: jax.Array,
           mask_BxTxS: jax.Array) -> jax.Array:
    """Dense grouped-query attention; softmax in float32. Returns [B, T, H, E].

    The reference for the others, and the KV-cache (decode) path, where T is 1 or a prompt.
    """
    B, T, H, E = q_BxTxHxE.shape
    K = k_BxKxSxE.shape[1]
    q = q_BxTxHxE.reshape(B, T, K, H // K, E)
    scores_BxKxRxTxS = jnp.einsum("btkre,bkse->bkrts", q, k_BxKxSxE,
                                  preferred_element_type=jnp.float32) / math.sqrt(E)
    scores_BxKxRxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxRxTxS, -1e30)
    probs = jax.nn.softmax(scores_BxKxRxTxS, axis=-1).astype(v_BxKxSxE.dtype)
    out = jnp.einsum("bkrts,bkse->btkre", probs, v_BxKxSxE)
    return out.reshape(B, T, H, E)


# ----------------------------------------------------------------------------- blockwise

def blockwise_attention(q_BxTxHxE: jax.Array, k_BxKxSxE: jax.Array, v_BxKxSxE: jax.Array,
                        q_segment_ids_BxT: jax.Array, kv_segment_ids_BxS: jax.Array, *,
                        q_start: int = 0, block_q: int = 512, block_kv: int = 512) -> jax.Array:
    """Flash-style attention in plain JAX: the `attend` of `segment_mask`, in blocks. [B, T, H, E].

    Forward: for each block of queries, an online softmax (running max, sum and float32 output)
    over the key blocks up to the causal diagonal; only one [B, K, R, q, k] block of scores lives
    at a time, and blocks above the diagonal are skipped. It keeps the output and the float32
    logsumexp [B, K, R, T] for the backward, which recomputes each block's probabilities from them
    (FlashAttention-2): per key block, a loop over the query blocks on or below the diagonal adds
    into dK, dV of that block and into one float32 dQ. So the backward holds q, k, v, the output,
    dQ and one block's scores, never [T, S].

    Grouped queries read their shared key/value head without copying it: q is viewed as
    [B, T, K, R, E]. T and S are padded up to the block sizes (padding carries segment 0).

    Args:
      q_BxTxHxE, k_BxKxSxE, v_BxKxSxE: queries and keys/values (compute dtype).
      q_segment_ids_BxT, kv_segment_ids_BxS: int32 segment ids, 0 = padding.
      q_start: the slot of query 0 among the S key slots (static; 0 for self-attention).
      block_q, block_kv: block sizes; each is cut to its length rounded up to 8 when longer.
    """
    B, T, H, E = q_BxTxHxE.shape
    K, S = k_BxKxSxE.shape[1], k_BxKxSxE.shape[2]
    bq, bk = min(block_q, _round_up(T, 8)), min(block_kv, _round_up(S, 8))
    Tp, Sp = _round_up(T, bq), _round_up(S, bk)
    q_pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0), (0, 0))
    q = jnp.pad(q_BxTxHxE.reshape(B, T, K, H // K, E), q_pad)
    kv_pad = ((0, 0), (0, 0), (0, Sp - S), (0, 0))
    k, v = jnp.pad(k_BxKxSxE, kv_pad), jnp.pad(v_BxKxSxE, kv_pad)
    q_seg = jnp.pad(q_segment_ids_BxT.astype(jnp.int32), ((0, 0), (0, Tp - T)))
    kv_seg = jnp.pad(kv_segment_ids_BxS.astype(jnp.int32), ((0, 0), (0, Sp - S)))
    out_BxTpxKxRxE = _blockwise(q, k, v, q_seg, kv_seg, q_start, bq, bk)
    return out_BxTpxKxRxE[:, :T].reshape(B, T, H, E)


def _block_mask(q_slot0, q_seg_Bxq: jax.Array, kv_slot0, kv_seg_Bxk: jax.Array) -> jax.Array:
    """`segment_mask` of one block, shaped [B, 1, 1, q, k] to broadcast over K and R."""
    q_slots = q_slot0 + jnp.arange(q_seg_Bxq.shape[1])
    kv_slots = kv_slot0 + jnp.arange(kv_seg_Bxk.shape[1])
    causal_qxk = kv_slots[None, :] <= q_slots[:, None]
    same_Bxqxk = (q_seg_Bxq[:, :, None] == kv_seg_Bxk[:, None, :]) & (kv_seg_Bxk[:, None, :] != 0)
    return (causal_qxk[None] & same_Bxqxk)[:, None, None]


def _scores(q_BxqxKxRxE, k_BxKxkxE, scale: float) -> jax.Array:
    s = jnp.einsum("bqkre,bkse->bkrqs", q_BxqxKxRxE, k_BxKxkxE, preferred_element_type=jnp.float32)
    return s * scale


def _kv_block(k, v, kv_seg, j, bk: int):
    """Key block j: (k [B, K, bk, E], v [B, K, bk, E], segment ids [B, bk])."""
    return (jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2),
            jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2),
            jax.lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1))


def _blockwise_forward(q, k, v, q_seg, kv_seg, q_start: int, bq: int, bk: int):
    """(out [B, Tp, K, R, E] in q's dtype, logsumexp [B, K, R, Tp] float32) on padded inputs."""
    B, Tp, K, R, E = q.shape
    Sp = k.shape[2]
    nq, nk = Tp // bq, Sp // bk
    scale = 1.0 / math.sqrt(E)

    def q_block(i):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
        seg_i = jax.lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)

        def kv_step(j, carry):
            m_BxKxRxq, l_BxKxRxq, acc_BxKxRxqxE = carry
            k_j, v_j, seg_j = _kv_block(k, v, kv_seg, j, bk)
            mask = _block_mask(q_start + i * bq, seg_i, j * bk, seg_j)
            s = jnp.where(mask, _scores(q_i, k_j, scale), _NEG)
            m_new = jnp.maximum(m_BxKxRxq, s.max(axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m_BxKxRxq - m_new)
            l_new = l_BxKxRxq * correction + p.sum(axis=-1)
            pv = jnp.einsum("bkrqs,bkse->bkrqe", p.astype(v.dtype), v_j,
                            preferred_element_type=jnp.float32)
            return m_new, l_new, acc_BxKxRxqxE * correction[..., None] + pv

        # Key blocks past the one holding this query block's last slot are fully masked.
        n_kv = jnp.minimum(nk, (q_start + (i + 1) * bq - 1) // bk + 1)
        init = (jnp.full((B, K, R, bq), _NEG, jnp.float32), jnp.zeros((B, K, R, bq), jnp.float32),
                jnp.zeros((B, K, R, bq, E), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, n_kv, kv_step, init)
        seen = l > 0  # False only for queries that see no key (padding): output 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out.astype(q.dtype), lse

    outs_nxBxKxRxqxE, lses_nxBxKxRxq = jax.lax.map(q_block, jnp.arange(nq))
    out = outs_nxBxKxRxqxE.transpose(1, 0, 4, 2, 3, 5).reshape(B, Tp, K, R, E)
    lse = lses_nxBxKxRxq.transpose(1, 2, 3, 0, 4).reshape(B, K, R, Tp)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise(q, k, v, q_seg, kv_seg, q_start, bq, bk):
    return _blockwise_forward(q, k, v, q_seg, kv_seg, q_start, bq, bk)[0]


def _blockwise_fwd(q, k, v, q_seg, kv_seg, q_start, bq, bk):
    out, lse = _blockwise_forward(q, k, v, q_seg, kv_seg, q_start, bq, bk)
    out, lse = checkpoint_name(out, RESIDUAL_NAME), checkpoint_name(lse, RESIDUAL_NAME)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _blockwise_bwd(q_start, bq, bk, residuals, dout_BxTpxKxRxE):
    q, k, v, q_seg, kv_seg, out, lse_BxKxRxTp = residuals
    B, Tp, K, R, E = q.shape
    Sp = k.shape[2]
    nq, nk = Tp // bq, Sp // bk
    scale = 1.0 / math.sqrt(E)
    dout = dout_BxTpxKxRxE.astype(q.dtype)
    # D = rowsum(dO * O) = rowsum(dP * P): the softmax backward's per-query term.
    d_BxKxRxTp = jnp.einsum("btkre,btkre->bkrt", dout.astype(jnp.float32),
                            out.astype(jnp.float32))

    def kv_block(dq_BxTpxKxRxE, j):
        k_j, v_j, seg_j = _kv_block(k, v, kv_seg, j, bk)

        def q_step(i, carry):
            dq, dk_BxKxkxE, dv_BxKxkxE = carry
            q_i = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
            do_i = jax.lax.dynamic_slice_in_dim(dout, i * bq, bq, axis=1)
            seg_i = jax.lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)
            lse_i = jax.lax.dynamic_slice_in_dim(lse_BxKxRxTp, i * bq, bq, axis=3)
            d_i = jax.lax.dynamic_slice_in_dim(d_BxKxRxTp, i * bq, bq, axis=3)
            mask = _block_mask(q_start + i * bq, seg_i, j * bk, seg_j)
            s = _scores(q_i, k_j, scale)
            p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse_i[..., None]), 0.0)
            dv_BxKxkxE += jnp.einsum("bkrqs,bqkre->bkse", p.astype(v.dtype), do_i,
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkre,bkse->bkrqs", do_i, v_j, preferred_element_type=jnp.float32)
            ds = (p * (dp - d_i[..., None])).astype(q.dtype)
            dk_BxKxkxE += scale * jnp.einsum("bkrqs,bqkre->bkse", ds, q_i,
                                             preferred_element_type=jnp.float32)
            dq_i = scale * jnp.einsum("bkrqs,bkse->bqkre", ds, k_j,
                                      preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1) + dq_i, i * bq, axis=1)
            return dq, dk_BxKxkxE, dv_BxKxkxE

        # Query blocks before the one holding this key block's first slot cannot see it.
        i0 = jnp.maximum(0, (j * bk - q_start) // bq)
        zeros = jnp.zeros((B, K, bk, E), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(i0, nq, q_step, (dq_BxTpxKxRxE, zeros, zeros))
        return dq, (dk, dv)

    dq, (dks, dvs) = jax.lax.scan(kv_block, jnp.zeros((B, Tp, K, R, E), jnp.float32),
                                  jnp.arange(nk))
    # [n, B, K, k, E] -> [B, K, Sp, E]
    dk = dks.transpose(1, 2, 0, 3, 4).reshape(B, K, Sp, E)
    dv = dvs.transpose(1, 2, 0, 3, 4).reshape(B, K, Sp, E)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ----------------------------------------------------------------------------- TPU: splash

def _splash_specs(mesh, q_shape, kv_shape):
    """shard_map specs (q [B, H, T, E], k/v [B, K, S, E], segment ids [B, T]) from the logical
    rules, dropping mesh axes that do not divide their dimension: batch over the batch axes, heads
    over theirs only when they divide both H and K (splash maps query head h to key head h // R
    inside each shard, so both must be split alike). The sequence is never split."""
    P = jax.sharding.PartitionSpec
    axes = ("batch", "act_heads", None, None)
    q_spec = sharding.named_sharding(mesh, axes, q_shape).spec
    kv_spec = sharding.named_sharding(mesh, axes, kv_shape).spec
    batch = q_spec[0]
    heads = q_spec[1] if q_spec[1] == kv_spec[1] else None
    return P(batch, heads, None, None), P(batch, heads, None, None), P(batch, None)


def splash_attention(q_BxTxHxE: jax.Array, k_BxKxSxE: jax.Array, v_BxKxSxE: jax.Array,
                     segment_ids_BxT: jax.Array, *, block_q: int = 512,
                     block_kv: int = 512) -> jax.Array:
    """Self-attention (S == T) with the Pallas TPU splash kernel: a static causal mask and'ed
    with `SegmentIds` (padding is segment 0), grouped queries natively. TPU only. [B, T, H, E].

    Blocks are cut to T rounded up to 128 (the kernel's lane width) and T is padded to a
    multiple of both. Under a mesh (`jax.set_mesh`), the kernel runs per shard in a shard_map
    (a Pallas call cannot be partitioned by XLA): batch over the batch axes, heads over the
    tensor axis where it divides the key/value heads, the sequence never split.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    T, E = q_BxTxHxE.shape[1], q_BxTxHxE.shape[3]
    bq, bk = min(block_q, _round_up(T, 128)), min(block_kv, _round_up(T, 128))
    Tp = _round_up(T, math.lcm(bq, bk))
    # The kernel does not scale the scores: scale q, as the dense path divides q.k by sqrt(E).
    q = (q_BxTxHxE * (1.0 / math.sqrt(E))).astype(q_BxTxHxE.dtype).transpose(0, 2, 1, 3)
    pad = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
    q, k, v = jnp.pad(q, pad), jnp.pad(k_BxKxSxE, pad), jnp.pad(v_BxKxSxE, pad)
    seg = jnp.pad(segment_ids_BxT.astype(jnp.int32), ((0, 0), (0, Tp - T)))
    block_sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                                block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                                block_kv_dq=bk)

    def local(q_bxhxTxE, k_bxkxTxE, v_bxkxTxE, seg_bxT):
        causal = sm.CausalMask((Tp, Tp))
        kernel = sk.make_splash_mha(sm.MultiHeadMask([causal] * q_bxhxTxE.shape[1]),
                                    head_shards=1, q_seq_shards=1, block_sizes=block_sizes,
                                    residual_checkpoint_name=RESIDUAL_NAME)
        return jax.vmap(kernel)(q_bxhxTxE, k_bxkxTxE, v_bxkxTxE,
                                segment_ids=sk.SegmentIds(seg_bxT, seg_bxT))

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        q_spec, kv_spec, seg_spec = _splash_specs(mesh, q.shape, k.shape)
        local = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                              out_specs=q_spec, check_vma=False)
    out_BxHxTpxE = local(q, k, v, seg)
    return out_BxHxTpxE[:, :, :T].transpose(0, 2, 1, 3).astype(q_BxTxHxE.dtype)


# ----------------------------------------------------------------------------- GPU: cuDNN

def cudnn_attention(q_BxTxHxE: jax.Array, k_BxKxSxE: jax.Array, v_BxKxSxE: jax.Array,
                    segment_ids_BxT: jax.Array) -> jax.Array:
    """Self-attention with cuDNN's fused flash kernel via `jax.nn.dot_product_attention`. GPU,
    bfloat16/float16 only. [B, T, H, E].

    jax.nn.dot_product_attention takes no segment ids (only right-padding lengths), so the
    segment rule goes in as a boolean `mask` [B, 1, T, T], which it turns into an additive bias in
    the compute dtype (and cuDNN returns that bias's unused gradient): 2 bytes per (t, s) per row
    instead of the dense path's 4 * H float32 bytes per head, and no probabilities kept. With
    `is_causal`, cuDNN skips the blocks above the diagonal. T is padded to a multiple of 8.
    """
    T = q_BxTxHxE.shape[1]
    Tp = _round_up(T, 8)  # cuDNN's backward with a bias needs an even length
    seg = jnp.pad(segment_ids_BxT.astype(jnp.int32), ((0, 0), (0, Tp - T)))
    mask_Bx1xTxT = segment_mask(seg, seg)[:, None]
    pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
    out_BxTpxHxE = jax.nn.dot_product_attention(
        jnp.pad(q_BxTxHxE, pad), jnp.pad(k_BxKxSxE.transpose(0, 2, 1, 3), pad),
        jnp.pad(v_BxKxSxE.transpose(0, 2, 1, 3), pad), mask=mask_Bx1xTxT, is_causal=True,
        implementation="cudnn")
    return out_BxTpxHxE[:, :T]


# ----------------------------------------------------------------------------- decode: ragged

DECODE_IMPLEMENTATIONS = ("xla", "ragged")


def _pow2_divisor(S: int, at_most: int, at_least: int) -> int | None:
    """The largest power of two in [at_least, at_most] that divides S, or None."""
    b = 1 << (at_most.bit_length() - 1)
    while b >= at_least:
        if S % b == 0:
            return b
        b //= 2
    return None


def _decode_block(S: int, block: int) -> int:
    """The key block of `ragged_decode_attention`: S itself when S <= block, else the largest
    power of two <= block (and >= 8) that divides S, else S (one block, still correct)."""
    if S <= block:
        return S
    return _pow2_divisor(S, block, 8) or S


def _ragged_decode_local(q_BxKxRxE, k_all, v_all, layer_1, len_B, *, block: int,
                         interpret: bool):
    """The Pallas kernel on one shard: grid (row b, key block j); the block of K heads x `block`
    slots of layer `layer_1[0]` is fetched only while j * block < len_B[b] (the index map clamps j
    to the row's last block, and the pipeline skips a fetch whose block index repeats), so a row
    costs its own filled length, not the window. Online softmax in float32 VMEM scratch."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    L, B, K, S, E = k_all.shape
    R = q_BxKxRxE.shape[2]
    blk = _decode_block(S, block)
    n = S // blk
    scale = 1.0 / math.sqrt(E)

    def kv_index(b, j, len_ref, layer_ref):
        last = jax.lax.div(jnp.maximum(len_ref[b] - 1, 0), blk)
        return (layer_ref[0], b, 0, jnp.minimum(j, last), 0)

    def q_index(b, j, len_ref, layer_ref):
        return (b, 0, 0, 0)

    def kernel(len_ref, layer_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref):
        b, j = pl.program_id(0), pl.program_id(1)
        length = len_ref[b]

        @pl.when(j == 0)
        def _():
            m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
            l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        @pl.when(j * blk < length)
        def _():
            v_KxkxE = v_ref[...]
            s_KxRxk = jnp.einsum("kre,kse->krs", q_ref[...], k_ref[...],
                                 preferred_element_type=jnp.float32) * scale
            slot = j * blk + jax.lax.broadcasted_iota(jnp.int32, s_KxRxk.shape, 2)
            s_KxRxk = jnp.where(slot < length, s_KxRxk, _NEG)
            m_prev = m_ref[...]
            m_new = jnp.maximum(m_prev, s_KxRxk.max(axis=-1, keepdims=True))
            p_KxRxk = jnp.exp(s_KxRxk - m_new)
            corr = jnp.exp(m_prev - m_new)
            l_ref[...] = corr * l_ref[...] + p_KxRxk.sum(axis=-1, keepdims=True)
            acc_ref[...] = corr * acc_ref[...] + jnp.einsum(
                "krs,kse->kre", p_KxRxk.astype(v_KxkxE.dtype), v_KxkxE,
                preferred_element_type=jnp.float32)
            m_ref[...] = m_new

        @pl.when(j == n - 1)
        def _():
            o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)

    kv_spec = pl.BlockSpec((None, None, K, blk, E), kv_index)
    q_spec = pl.BlockSpec((None, K, R, E), q_index)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, n), in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((K, R, 1), jnp.float32), pltpu.VMEM((K, R, 1), jnp.float32),
                        pltpu.VMEM((K, R, E), jnp.float32)])
    itemsize = jnp.dtype(k_all.dtype).itemsize
    # What the kernel moves at most (every row's whole window of one layer); with ragged rows it
    # is each row's filled blocks. hlo_cost reads these numbers.
    cost = pl.CostEstimate(flops=4 * B * K * R * S * E, transcendentals=B * K * R * S,
                           bytes_accessed=2 * B * K * S * E * itemsize
                           + 2 * q_BxKxRxE.size * q_BxKxRxE.dtype.itemsize)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q_BxKxRxE.shape,
                                                                    q_BxKxRxE.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost, interpret=interpret)(len_B, layer_1, q_BxKxRxE, k_all, v_all)


# The GPU kernel's key block: a [64, E] tile of K and of V per loop step (Triton tiles are powers
# of two; 64 x 128 float32 is 32 KB) and at least 16 query rows per dot (Triton's minimum).
_GPU_DECODE_BLOCK = 64
_GPU_MIN_ROWS = 16


def _gpu_decode_block(S: int, E: int) -> int | None:
    """The GPU kernel's key block for a window of S slots and head dim E: the largest power of two
    <= _GPU_DECODE_BLOCK (and >= 16) that divides S, or None where there is none or E is not a
    power of two (then the dense attention runs instead)."""
    if E & (E - 1) or E < 16:
        return None
    return _pow2_divisor(S, _GPU_DECODE_BLOCK, 16)


def _ragged_decode_gpu_local(q_BxKxRxE, k_all, v_all, layer_1, len_B, *, interpret: bool):
    """The same ragged decode attention as a Pallas GPU (Triton) kernel: grid (row b, key/value
    head h); each program reads its query heads, then loops over only ceil(len_B[b] / block) key
    blocks of layer `layer_1[0]` of the stacked cache, addressed in place (the layer index is a
    runtime scalar the kernel adds to its pointer, so no per-layer slice is copied first). Online
    softmax in float32 registers. Query heads are padded to 16 rows for Triton's dot.

    Tested against `attend` in Pallas interpret mode on CPU (tests/test_attention.py); compiled
    by Triton only on a GPU, which none of this project's test machines has."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    L, B, K, S, E = k_all.shape
    R = q_BxKxRxE.shape[2]
    blk = _gpu_decode_block(S, E)
    Rp = max(_GPU_MIN_ROWS, 1 << (R - 1).bit_length())
    q_BxKxRpxE = jnp.pad(q_BxKxRxE, ((0, 0), (0, 0), (0, Rp - R), (0, 0)))
    scale = 1.0 / math.sqrt(E)
    exact = jnp.dtype(k_all.dtype) == jnp.float32  # no TF32 for float32 caches

    def kernel(len_ref, layer_ref, q_ref, k_ref, v_ref, o_ref):
        length = len_ref[...]
        layer = layer_ref[...]
        q_RpxE = q_ref[...]

        def body(j, carry):
            acc_RpxE, m_Rp, l_Rp = carry
            start = pl.multiple_of(j * blk, blk)
            k_kxE = k_ref[layer, pl.ds(start, blk), :]
            v_kxE = v_ref[layer, pl.ds(start, blk), :]
            s_Rpxk = plgpu.dot(q_RpxE.astype(k_kxE.dtype), k_kxE, trans_b=True,
                               allow_tf32=not exact) * scale
            slot = start + jnp.arange(blk)
            s_Rpxk = jnp.where((slot < length)[None, :], s_Rpxk, _NEG)
            m_new = jnp.maximum(m_Rp, s_Rpxk.max(axis=-1))
            p_Rpxk = jnp.exp(s_Rpxk - m_new[:, None])
            corr = jnp.exp(m_Rp - m_new)
            l_Rp = corr * l_Rp + p_Rpxk.sum(axis=-1)
            acc_RpxE = corr[:, None] * acc_RpxE + plgpu.dot(
                p_Rpxk.astype(v_kxE.dtype), v_kxE, allow_tf32=not exact)
            return acc_RpxE, m_new, l_Rp

        init = (jnp.zeros((Rp, E), jnp.float32), jnp.full((Rp,), _NEG, jnp.float32),
                jnp.zeros((Rp,), jnp.float32))
        n = jnp.minimum(pl.cdiv(length, blk), S // blk)
        acc_RpxE, _, l_Rp = jax.lax.fori_loop(0, n, body, init)
        o_ref[...] = (acc_RpxE / jnp.maximum(l_Rp, 1e-30)[:, None]).astype(o_ref.dtype)

    row = pl.BlockSpec((None, None, Rp, E), lambda b, h: (b, h, 0, 0))
    cache = pl.BlockSpec((L, None, None, S, E), lambda b, h: (0, b, h, 0, 0))
    out = pl.pallas_call(
        kernel, grid=(B, K),
        in_specs=[pl.BlockSpec((None,), lambda b, h: (b,)),
                  pl.BlockSpec((None,), lambda b, h: (0,)), row, cache, cache],
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct(q_BxKxRpxE.shape, q_BxKxRxE.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="ragged_decode_gpu",
    )(len_B, layer_1, q_BxKxRpxE, k_all, v_all)
    return out[:, :, :R]


def ragged_decode_attention(q_BxHxE: jax.Array, k_all: jax.Array, v_all: jax.Array,
                            layer: jax.Array | int, len_B: jax.Array, *,
                            block: int = 512) -> jax.Array:
    """One decode step's attention of each row over its own first len_B[b] cache slots. [B, H, E].

    Reads layer `layer` of the whole cache k_all/v_all [L, B, K, S, E] in place (no per-layer
    slice, no transpose) with a Pallas TPU kernel that fetches only the key blocks a row has
    filled: a row of length n costs ceil(n / block) blocks, whatever the window S. Grouped
    queries: each kernel step serves a key/value head's R query heads. Equal to `attend` with the
    mask `slot < len_B[b]` (tests/test_attention.py).

    Where it runs: TPU (and an ahead-of-time compile for a TPU topology): the Mosaic kernel. CUDA
    GPUs: `_ragged_decode_gpu_local`, a Pallas Triton kernel of the same design (key blocks of
    64, where one divides the window and the head dim is a power of two; else the dense
    attention); tested in interpret mode, never yet compiled on a GPU. CPU: the TPU kernel in
    Pallas interpret mode (tests; slow). Elsewhere: the dense masked `attend` over the layer (same
    result). Under a mesh the kernel runs per shard in a shard_map:
    rows over the batch axes, key/value heads over the tensor axis where it divides them, cache
    slots never split.
    """
    B, H, E = q_BxHxE.shape
    L, _, K, S, _ = k_all.shape
    q_BxKxRxE = q_BxHxE.reshape(B, K, H // K, E)
    layer_1 = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    len_B = len_B.astype(jnp.int32)

    def local(q, k, v, lay, lens):
        def dense(q, k, v, lay, lens):
            k_l, v_l = k[lay[0]].astype(q.dtype), v[lay[0]].astype(q.dtype)
            mask_Bx1xS = (jnp.arange(k.shape[3])[None, :] < lens[:, None])[:, None]
            out = attend(q.reshape(q.shape[0], 1, -1, E), k_l, v_l, mask_Bx1xS)
            return out.reshape(q.shape)
        kernel = functools.partial(_ragged_decode_local, block=block)
        gpu = dense
        if _gpu_decode_block(k.shape[3], E) is not None:
            gpu = functools.partial(_ragged_decode_gpu_local, interpret=False)
        return jax.lax.platform_dependent(
            q, k, v, lay, lens, default=dense, cuda=gpu,
            tpu=lambda *a: kernel(a[0], a[1], a[2], a[3], a[4], interpret=False),
            cpu=lambda *a: kernel(a[0], a[1], a[2], a[3], a[4], interpret=True))

    run = local
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        P = jax.sharding.PartitionSpec
        from relift_jax.engine import CACHE_AXES
        cache_spec = sharding.named_sharding(mesh, CACHE_AXES, k_all.shape).spec
        cache_spec = tuple(cache_spec) + (None,) * (5 - len(cache_spec))
        if cache_spec[0] is not None or cache_spec[3] is not None:
            raise ValueError(f"ragged decode attention needs the cache's layers and slots unsplit; "
                             f"the rules give {cache_spec}")
        batch, heads = cache_spec[1], cache_spec[2]
        q_spec = P(batch, heads, None, None)
        run = jax.shard_map(local, mesh=mesh,
                            in_specs=(q_spec, P(None, batch, heads, None, None),
                                      P(None, batch, heads, None, None), P(), P(batch)),
                            out_specs=q_spec, check_vma=False)
    out_BxKxRxE = run(q_BxKxRxE, k_all, v_all, layer_1, len_B)
    return out_BxKxRxE.reshape(B, H, E)


# ----------------------------------------------------------------------------- dispatch

def self_attention(implementation: str, q_BxTxHxE: jax.Array, k_BxKxTxE: jax.Array,
                   v_BxKxTxE: jax.Array, segment_ids_BxT: jax.Array, *, block_q: int = 512,
                   block_kv: int = 512) -> jax.Array:
    """Causal self-attention of one packed/padded batch under `segment_mask`. Returns [B, T, H, E].

    Args:
      implementation: one of IMPLEMENTATIONS.
      segment_ids_BxT: int32, 0 = padding, equal nonzero ids = one sequence.
      block_q, block_kv: block sizes of blockwise and splash.
    """
    seg = segment_ids_BxT
    if implementation == "xla":
        return attend(q_BxTxHxE, k_BxKxTxE, v_BxKxTxE, segment_mask(seg, seg))
    if implementation == "blockwise":
        return blockwise_attention(q_BxTxHxE, k_BxKxTxE, v_BxKxTxE, seg, seg, block_q=block_q,
                                   block_kv=block_kv)
    if implementation == "splash":
        return splash_attention(q_BxTxHxE, k_BxKxTxE, v_BxKxTxE, seg, block_q=block_q,
                                block_kv=block_kv)
    if implementation == "cudnn":
        return cudnn_attention(q_BxTxHxE, k_BxKxTxE, v_BxKxTxE, seg)
    raise ValueError(f"attention {implementation!r} is not one of {IMPLEMENTATIONS}")
