"""Typed batches of the two train steps, and host-side packing of rollouts and demonstrations.

A batch is a stack of M micro-batches (the step scans over them and sums gradients) plus the WHOLE
batch's denominators (token and sequence counts), so that accumulation is exact: the sum of the
micro-batch losses equals the loss of the whole batch.

Shape key: M micro-batches, b rows per micro-batch, T tokens (prompt + response, right-padded).
Micro-batch fields are named with their per-micro-batch shape (`tokens_bxT`); in a batch they are
stacked along a leading M axis. Token-aligned arrays: `loss_mask_bxT[:, t]` and
`old_logprobs_bxT[:, t]` describe token t, predicted from tokens < t.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from relift_jax import sharding


@struct.dataclass
class SFTMicroBatch:
    tokens_bxT: jax.Array       # int32 prompt + demonstration
    valid_bxT: jax.Array        # bool, False at padding
    loss_mask_bxT: jax.Array    # float32, 1 on demonstration tokens


@struct.dataclass
class SFTBatch:
    micro_batches: SFTMicroBatch  # leaves [M, b, T]
    num_tokens: jax.Array         # scalar: demonstration tokens in the whole batch


@struct.dataclass
class RLMicroBatch:
    tokens_bxT: jax.Array
    valid_bxT: jax.Array
    loss_mask_bxT: jax.Array        # 1 on response tokens
    old_logprobs_bxT: jax.Array     # log-probs of the sampled tokens under the sampling policy
    advantages_b: jax.Array         # one per row; 0 for padding rows
    ref_logprobs_bxT: jax.Array | None = None  # only with a KL penalty
    sft: SFTMicroBatch | None = None            # mode rl_with_sft_loss: a slice of demonstrations


@struct.dataclass
class RLBatch:
    micro_batches: RLMicroBatch   # leaves [M, b, T] (advantages [M, b])
    num_tokens: jax.Array         # scalar: response tokens in the whole batch
    num_seqs: jax.Array           # scalar: non-empty responses in the whole batch
    sft_num_tokens: jax.Array | None = None  # scalar: demonstration tokens (rl_with_sft_loss)


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
          values: Sequence[Sequence[float]] | None = None) -> dict[str, np.ndarray]:
    """Rows of prompt + response, right-padded, as [M, b, T] arrays; `values` go on the response."""
    M, b, T = _layout(len(prompts), max(len(p) + len(r) for p, r in zip(prompts, responses)), pk)
    tokens = np.full((M * b, T), pk.pad_id, np.int32)
    valid = np.zeros((M * b, T), bool)
    loss_mask = np.zeros((M * b, T), np.float32)
    vals = np.zeros((M * b, T), np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        L = len(p) + len(r)
        tokens[i, :L] = list(p) + list(r)
        valid[i, :L] = True
        loss_mask[i, len(p):L] = 1.0
        if values is not None:
            vals[i, len(p):L] = values[i]
    shape = (M, b, T)
    return {"tokens": tokens.reshape(shape), "valid": valid.reshape(shape),
            "loss_mask": loss_mask.reshape(shape), "values": vals.reshape(shape)}


def pack_rl_batch(prompts, responses, old_logprobs, advantages, pk: Packing) -> RLBatch:
    """Rollouts -> an RL batch of micro-batches, plus the whole batch's denominators."""
    a = _pack(prompts, responses, pk, old_logprobs)
    M, b, _ = a["tokens"].shape
    adv = np.zeros((M * b,), np.float32)
    adv[:len(advantages)] = advantages
    mb = RLMicroBatch(tokens_bxT=a["tokens"], valid_bxT=a["valid"], loss_mask_bxT=a["loss_mask"],
                      old_logprobs_bxT=a["values"], advantages_b=adv.reshape(M, b))
    return RLBatch(micro_batches=mb, num_tokens=np.float32(a["loss_mask"].sum()),
                   num_seqs=np.float32(sum(1 for r in responses if len(r))))


def pack_sft_batch(prompts, demonstrations, pk: Packing) -> SFTBatch:
    """(prompt ids, demonstration ids) -> an SFT batch; the loss covers demonstration tokens only."""
    a = _pack(prompts, demonstrations, pk)
    mb = SFTMicroBatch(tokens_bxT=a["tokens"], valid_bxT=a["valid"], loss_mask_bxT=a["loss_mask"])
    return SFTBatch(micro_batches=mb, num_tokens=np.float32(a["loss_mask"].sum()))


def attach_sft(rl_batch: RLBatch, sft_batch: SFTBatch) -> RLBatch:
    """Mode rl_with_sft_loss: give each RL micro-batch an equal slice of the SFT batch's rows."""
    M = rl_batch.micro_batches.tokens_bxT.shape[0]
    Ms, bs, T = sft_batch.micro_batches.tokens_bxT.shape
    rows = Ms * bs
    per = -(-rows // M)

    def reslice(x):
        flat = np.asarray(x).reshape(rows, T)
        flat = np.concatenate([flat, np.zeros((M * per - rows, T), flat.dtype)])
        return flat.reshape(M, per, T)

    sft = jax.tree.map(reslice, sft_batch.micro_batches)
    return rl_batch.replace(micro_batches=rl_batch.micro_batches.replace(sft=sft),
                            sft_num_tokens=sft_batch.num_tokens)


def with_ref_logprobs(batch: RLBatch, ref_logprobs_MxbxT) -> RLBatch:
    return batch.replace(micro_batches=batch.micro_batches.replace(
        ref_logprobs_bxT=np.asarray(ref_logprobs_MxbxT, np.float32)))


def device_batch(batch, mesh):
    """Host arrays -> device arrays; on a mesh, rows (axis 1 of [M, b, ...]) split over the batch axes."""
    def put(x):
        x = np.asarray(x)
        if mesh is None or x.ndim < 2:
            return jnp.asarray(x)
        spec = sharding.logical_to_spec((None, "batch") + (None,) * (x.ndim - 2))
        return sharding.host_to_global(x, jax.sharding.NamedSharding(mesh, spec))
    return jax.tree.map(put, batch)
