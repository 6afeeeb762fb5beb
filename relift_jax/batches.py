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
    tokens_bxT: jax.Array       # int32 prompt + demonstration (several per row when packed)
    segment_ids_bxT: jax.Array  # int32: k >= 1 for the k-th sequence of the row, 0 at padding
    positions_bxT: jax.Array    # int32 RoPE positions, restarting at 0 in every sequence
    loss_mask_bxT: jax.Array    # float32, 1 on demonstration tokens


@struct.dataclass
class SFTBatch:
    micro_batches: SFTMicroBatch  # leaves [M, b, T]
    num_tokens: jax.Array         # scalar: demonstration tokens in the whole batch


@struct.dataclass
class RLMicroBatch:
    tokens_bxT: jax.Array
    segment_ids_bxT: jax.Array
    positions_bxT: jax.Array
    loss_mask_bxT: jax.Array        # 1 on response tokens
    old_logprobs_bxT: jax.Array     # log-probs of the sampled tokens under the sampling policy
    advantages_bxT: jax.Array       # each response token carries its sequence's advantage
    seq_lens_bxT: jax.Array         # each response token carries its response's length
    ref_logprobs_bxT: jax.Array | None = None  # only with a KL penalty
    is_weights_bxT: jax.Array | None = None    # only with truncated importance sampling
    sft: SFTMicroBatch | None = None            # mode rl_with_sft_loss: a slice of demonstrations


@struct.dataclass
class RLBatch:
    micro_batches: RLMicroBatch   # leaves [M, b, T]
    num_tokens: jax.Array         # scalar: response tokens in the whole batch
    num_seqs: jax.Array           # scalar: non-empty responses in the whole batch
    sft_num_tokens: jax.Array | None = None  # scalar: demonstration tokens (rl_with_sft_loss)


@dataclasses.dataclass(frozen=True)
class Packing:
    """How sequences become micro-batches.

    Without a token budget every row holds one sequence and a micro-batch `micro_batch_size` rows.
    With `tokens_per_micro_batch` (sequence packing) a micro-batch is `batch_multiple` rows (one
    per data shard) of tokens_per_micro_batch / batch_multiple tokens (at least the longest
    sequence), filled first-fit-decreasing with whole sequences (segment ids keep them apart in
    attention; positions restart in each), so padding is small whatever the lengths.
    """

    micro_batch_size: int
    pad_id: int
    batch_multiple: int = 1  # rows per micro-batch must split over the mesh's batch axes
    length_multiple: int = 16  # T is rounded up to this: few compiled shapes, little padding
    tokens_per_micro_batch: int | None = None

    def __post_init__(self):
        if self.tokens_per_micro_batch is not None and self.tokens_per_micro_batch <= 0:
            raise ValueError(f"tokens_per_micro_batch must be > 0, got {self.tokens_per_micro_batch}")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def plan_rows(lengths: Sequence[int], pk: Packing) -> tuple[list[list[int]], int, int]:
    """(sequence indices of each row, rows per micro-batch b, row length T).

    Bucketed (T to `length_multiple`, b to the mesh's batch divisor) to limit recompiles.
    """
    n, bm = len(lengths), pk.batch_multiple
    if pk.tokens_per_micro_batch is None:
        rows = [[i] for i in range(n)]
        T = _round_up(max(lengths), pk.length_multiple)
        return rows, max(bm, _round_up(min(pk.micro_batch_size, n), bm)), T
    # Packed rows are long (one per data shard of the budget), so a row's slack is small against
    # its length; never shorter than the longest sequence.
    T = _round_up(max(max(lengths), pk.tokens_per_micro_batch // bm), pk.length_multiple)
    rows, free = [], []
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):  # first fit, longest first
        for r, f in enumerate(free):
            if lengths[i] <= f:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(T - lengths[i])
    b = max(bm, (pk.tokens_per_micro_batch // T) // bm * bm)
    return rows, min(b, _round_up(len(rows), bm)), T


def _pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pk: Packing,
          per_token: Sequence[Sequence[float]] | None = None,
          per_seq: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Sequences (prompt + response) into [M, b, T] arrays.

    `per_token` values go on the response tokens; `per_seq` values (one per sequence) are spread
    over its response tokens, and so is each response's length (`seq_lens`).
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    rows, b, T = plan_rows(lengths, pk)
    R = _round_up(len(rows), b)
    a = {"tokens": np.full((R, T), pk.pad_id, np.int32), "segment_ids": np.zeros((R, T), np.int32),
         "positions": np.zeros((R, T), np.int32), "loss_mask": np.zeros((R, T), np.float32),
         "per_token": np.zeros((R, T), np.float32), "per_seq": np.zeros((R, T), np.float32),
         "seq_lens": np.zeros((R, T), np.float32)}
    for r, seqs in enumerate(rows):
        at = 0
        for k, i in enumerate(seqs, start=1):
            p, resp = prompts[i], responses[i]
            L, end_p = lengths[i], at + len(p)
            a["tokens"][r, at:at + L] = list(p) + list(resp)
            a["segment_ids"][r, at:at + L] = k
            a["positions"][r, at:at + L] = np.arange(L)
            a["loss_mask"][r, end_p:at + L] = 1.0
            a["seq_lens"][r, end_p:at + L] = len(resp)
            if per_token is not None:
                a["per_token"][r, end_p:at + L] = per_token[i]
            if per_seq is not None:
                a["per_seq"][r, end_p:at + L] = per_seq[i]
            at += L
    return {k: v.reshape(R // b, b, T) for k, v in a.items()}


def padding_fraction(batch) -> float:
    """Share of the batch's token slots that hold no token (packing's figure of merit)."""
    seg = np.asarray(batch.micro_batches.segment_ids_bxT)
    return float(1.0 - (seg > 0).sum() / seg.size)


def pack_rl_batch(prompts, responses, old_logprobs, advantages, pk: Packing) -> RLBatch:
    """Rollouts -> an RL batch of micro-batches, plus the whole batch's denominators."""
    a = _pack(prompts, responses, pk, per_token=old_logprobs, per_seq=advantages)
    mb = RLMicroBatch(tokens_bxT=a["tokens"], segment_ids_bxT=a["segment_ids"],
                      positions_bxT=a["positions"], loss_mask_bxT=a["loss_mask"],
                      old_logprobs_bxT=a["per_token"], advantages_bxT=a["per_seq"],
                      seq_lens_bxT=a["seq_lens"])
    return RLBatch(micro_batches=mb, num_tokens=np.float32(a["loss_mask"].sum()),
                   num_seqs=np.float32(sum(1 for r in responses if len(r))))


def pack_sft_batch(prompts, demonstrations, pk: Packing) -> SFTBatch:
    """(prompt ids, demonstration ids) -> an SFT batch; the loss covers demonstration tokens only."""
    a = _pack(prompts, demonstrations, pk)
    mb = SFTMicroBatch(tokens_bxT=a["tokens"], segment_ids_bxT=a["segment_ids"],
                       positions_bxT=a["positions"], loss_mask_bxT=a["loss_mask"])
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
