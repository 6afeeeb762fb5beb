"""Tolerances that follow from float32 rounding, for tests that compare two computations.

Two different programs computing the same quantity (remat or not, sharded or not, cached decode or
full forward, micro-batched or not, JAX or PyTorch) round differently: XLA may reorder a reduction,
fuse differently, use FMA or not, and block a matmul by the CPU thread count. Float32 promises for a
sum of K terms an error of about eps32 * sqrt(K) times the size of the terms (random-walk rounding;
the worst case is eps32 * K), and each further stage of a computation adds its own share. So a
tolerance is `ulps * eps32 * scale`: `scale` the size of the compared values (or of the terms they
are made of, where they cancel), `ulps` from the reduction lengths and the number of stages.
A bare absolute number such as 1e-7 says nothing about either and fails on some machine.
"""
from __future__ import annotations

import math

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23 ~ 1.19e-7: the spacing of float32 just above 1


def chain_ulps(K: int, stages: int) -> float:
    """`stages * sqrt(K)`: the rounding error, in units of eps32 * scale, of `stages` reductions of
    at most K terms each, one feeding the next (errors added at full size, not as a random walk)."""
    return stages * math.sqrt(K)


def decoder_ulps(config, T: int, *, backward: bool = False) -> float:
    """`chain_ulps` of a decoder's logits (scale: max|logits|), or with `backward` of its gradients
    (scale: each parameter's max|gradient|).

    Six matmuls in series per layer (q/k/v, q.k, probs.v, o, gate/up, down) plus the head; K the
    longest contraction: hidden, intermediate or T (the attention sums over the sequence; a weight
    gradient over the batch's tokens, so pass T = B * T there). The backward pass runs the chain
    again in reverse.
    """
    K = max(config.hidden_size, config.intermediate_size, T)
    return (2 if backward else 1) * chain_ulps(K, 6 * config.num_layers + 1)


def assert_close(actual, desired, *, ulps: float, scale: float | None = None, atol: float = 0.0,
                 err_msg: str = "") -> None:
    """max|actual - desired| <= ulps * eps32 * scale + atol, scale defaulting to max|desired|
    (atol: a further float32 rounding the caller derives, e.g. of storing a sum).

    The message gives the error in units of eps32 * scale, so a near miss shows how near.
    """
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
    if scale is None:
        scale = float(np.abs(desired).max()) if desired.size else 0.0
    err = float(np.abs(actual - desired).max()) if desired.size else 0.0
    bound = ulps * EPS32 * scale + atol
    assert err <= bound, (f"{err_msg}: max error {err:.3g} = {err / (EPS32 * scale):.1f} eps32 * "
                          f"scale {scale:.3g}, allowed {ulps:.1f} (+ atol {atol:.3g})")


def assert_trees_close(actual, desired, *, ulps: float) -> None:
    """`assert_close` leaf by leaf, each leaf against its own scale (gradients of different
    parameters differ in size by orders of magnitude)."""
    assert jax.tree.structure(actual) == jax.tree.structure(desired)
    for (path, a), b in zip(jax.tree.flatten_with_path(actual)[0], jax.tree.leaves(desired)):
        assert_close(a, b, ulps=ulps, err_msg=jax.tree_util.keystr(path))


def assert_greedy_decided(logits_NxV, tokens_N, *, bound: float, err_msg: str = "") -> None:
    """Greedy tokens compared across programs agree only where float32 cannot flip the argmax.

    Asserts that `tokens_N` are the argmax of the reference logits at every position, with a gap
    to the runner-up of more than 2 * bound (bound: how far another program's logits may be from
    these), so any program within `bound` picks the same tokens. If this fails, the comparison
    that relies on it would depend on the machine: change the test's inputs, not the bound.
    """
    logits_NxV = np.asarray(logits_NxV, np.float64)
    top2_Nx2 = np.sort(logits_NxV, axis=-1)[:, -2:]
    np.testing.assert_array_equal(logits_NxV.argmax(-1), tokens_N, err_msg=err_msg)
    gap = float((top2_Nx2[:, 1] - top2_Nx2[:, 0]).min()) if len(tokens_N) else np.inf
    assert gap > 2 * bound, f"{err_msg}: smallest top-2 logit gap {gap:.3g} <= 2 * {bound:.3g}"
