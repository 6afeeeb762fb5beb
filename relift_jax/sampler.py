"""Batched autoregressive sampling with a KV cache, from the same parameter pytree that training updates.

A jitted prefill writes the left-padded prompts into a preallocated cache; a jitted `lax.while_loop`
decodes one token per step for every row, with the cache donated so XLA updates it in place. The
weights are an ordinary traced argument: there is no copy and no weight sync with training.
Prompt lengths and batch sizes are bucketed so repeated calls reuse compiled code.

Shape key: B rows (prompts x samples), P padded prompt length, N max new tokens, S = P + N cache slots,
V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from relift_jax import sharding
from relift_jax.model import ModelConfig, Params, hidden_states, init_cache, logits_from_hidden


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    logprob_temperature: float = 1.0  # the policy's temperature for the returned log-probs
    stop_ids: tuple[int, ...] = ()   # EOS first, then extra stop ids

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclasses.dataclass
class SampleOutput:
    """Generated continuations, row i for prompt i // num_samples."""

    tokens: list[list[int]]      # without the prompt; ends with the stop id when one was produced
    logprobs: list[list[float]]  # log p(token) under the policy at logprob_temperature
    lengths: np.ndarray          # [B] int32
    stopped: np.ndarray          # [B] bool: ended on a stop id (False = cut at max_new_tokens)
    num_compiles: int = 0        # how many new programs this call compiled (0 when cached)


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (>= minimum), so a few compiled shapes serve all lengths."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def _batch_bucket(n: int, multiple: int) -> int:
    b = bucket(n, minimum=1) if n <= 64 else -(-n // 64) * 64
    return -(-b // multiple) * multiple


def _filter_logits(logits_BxV: jax.Array, sp: SamplingParams) -> jax.Array:
    """Temperature, top-k and top-p (nucleus) filtering; filtered-out tokens get -inf."""
    logits = logits_BxV / sp.temperature
    neg = jnp.finfo(logits.dtype).min
    if sp.top_k > 0 and sp.top_k < logits.shape[-1]:
        kth_B = jax.lax.top_k(logits, sp.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_B, neg, logits)
    if sp.top_p < 1.0:
        sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sp.top_p
        threshold_B = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold_B, neg, logits)
    return logits


def _pick(logits_BxV: jax.Array, key: jax.Array, sp: SamplingParams) -> jax.Array:
    """Greedy, or an exact draw by inverting the CDF with ONE uniform per row: much cheaper than
    `jax.random.categorical`, which draws Gumbel noise for every vocabulary entry."""
    if sp.temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return _pick_with_uniforms(logits_BxV, jax.random.uniform(key, (logits_BxV.shape[0],)), sp)


def pick_per_row(logits_BxV: jax.Array, keys_B: jax.Array, sp: SamplingParams) -> jax.Array:
    """`_pick` with one key per row: a row's draw depends on its key only, not on its batch."""
    if sp.temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return _pick_with_uniforms(logits_BxV, jax.vmap(jax.random.uniform)(keys_B), sp)


def _pick_with_uniforms(logits_BxV: jax.Array, u_B: jax.Array, sp: SamplingParams) -> jax.Array:
    """The token whose CDF interval (of the filtered softmax) holds u_B in [0, 1)."""
    probs_BxV = jax.nn.softmax(_filter_logits(logits_BxV, sp).astype(jnp.float32), axis=-1)
    cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
    u_Bx1 = u_B[:, None] * cdf_BxV[:, -1:]
    tok_B = jnp.sum(cdf_BxV <= u_Bx1, axis=-1)
    # Float rounding can put u past the last nonzero-probability entry: step back to it.
    tok_B = jnp.minimum(tok_B, logits_BxV.shape[-1] - 1)
    return jnp.where(probs_BxV[jnp.arange(tok_B.shape[0]), tok_B] > 0, tok_B,
                     jnp.argmax(probs_BxV, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(config: ModelConfig, params: Params, tokens_BxP, pad_B, num_slots: int):
    B, P = tokens_BxP.shape
    cache = init_cache(config, B, num_slots)
    cache = jax.tree.map(lambda c: sharding.constrain(
        c, ("cache_layers", "batch", "cache_kv_heads", "cache_slots", None)), cache)
    kv_valid_BxS = jnp.arange(num_slots)[None, :] >= pad_B[:, None]
    positions_BxP = jnp.maximum(jnp.arange(P)[None, :] - pad_B[:, None], 0)
    h, cache = hidden_states(config, params, tokens_BxP, positions_BxP, kv_valid_BxS,
                             cache=cache, cache_start=0)
    last_logits_BxV = logits_from_hidden(config, params, h[:, -1:])[:, 0]
    return cache, last_logits_BxV


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _decode(config: ModelConfig, sp: SamplingParams, params: Params, cache, logits_BxV, pad_B,
            done_B, key):
    """The decode loop: sample from the current logits, then run the model on the sampled token."""
    B = logits_BxV.shape[0]
    S = cache["k"].shape[3]
    N = sp.max_new_tokens
    P = S - N
    kv_valid_BxS = jnp.arange(S)[None, :] >= pad_B[:, None]
    prompt_len_B = P - pad_B
    stop_ids = jnp.asarray(sp.stop_ids, jnp.int32) if sp.stop_ids else jnp.zeros((0,), jnp.int32)

    def cond(state):
        t, _, _, done_B, *_ = state
        return (t < N) & ~jnp.all(done_B)

    def body(state):
        t, cache, logits_BxV, done_B, tokens_BxN, logprobs_BxN, lengths_B = state
        tok_B = _pick(logits_BxV, jax.random.fold_in(key, t), sp)
        logp_BxV = jax.nn.log_softmax(logits_BxV / sp.logprob_temperature, axis=-1)
        logp_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
        live_B = ~done_B
        tokens_BxN = tokens_BxN.at[:, t].set(jnp.where(live_B, tok_B, 0))
        logprobs_BxN = logprobs_BxN.at[:, t].set(jnp.where(live_B, logp_B, 0.0))
        lengths_B = lengths_B + live_B.astype(jnp.int32)
        done_B = done_B | jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1)
        h, cache = hidden_states(config, params, tok_B[:, None], (prompt_len_B + t)[:, None],
                                 kv_valid_BxS, cache=cache, cache_start=P + t)
        logits_BxV = logits_from_hidden(config, params, h)[:, 0]
        return t + 1, cache, logits_BxV, done_B, tokens_BxN, logprobs_BxN, lengths_B

    state = (jnp.int32(0), cache, logits_BxV, done_B, jnp.zeros((B, N), jnp.int32),
             jnp.zeros((B, N), jnp.float32), jnp.zeros((B,), jnp.int32))
    _, cache, _, done_B, tokens_BxN, logprobs_BxN, lengths_B = jax.lax.while_loop(cond, body, state)
    # The cache is returned only so that its donated buffer aliases an output and is reused in place.
    return (tokens_BxN, logprobs_BxN, lengths_B, done_B), cache


def _cache_size() -> int:
    return _prefill._cache_size() + _decode._cache_size()


ENGINES = ("continuous", "grouped", "dense")


def sample(config: ModelConfig, params: Params, prompts: Sequence[Sequence[int]],
           sp: SamplingParams, *, seed: int = 0, num_samples: int = 1, pad_id: int = 0,
           mesh=None, engine: str = "continuous", slots: int = 0,
           segment_len: int = 32) -> SampleOutput:
    """Samples `num_samples` continuations of every prompt (rows ordered prompt by prompt).

    Args:
      prompts: token-id lists of any lengths.
      sp: sampling settings; `sp.stop_ids` end a row (the stop token is kept).
      seed: RNG seed; the same seed, prompts and params give the same samples.
      mesh: when given, rows are padded to a multiple of the mesh's batch axes.
      engine: "continuous" (`relift_jax.engine`: prefix sharing, a window over the filled cache,
        continuous batching; draws keyed by (seed, row, token index), so independent of `slots`),
        "grouped" (the same engine with length groups: each group of rows of similar length
        decodes over its own window; the same tokens) or "dense" (one batch of all rows left-padded into one cache of prompt bucket + max new
        tokens, decoded until the longest row ends: the reference).
      slots: continuous engine: rows decoded at once (0: all rows of the call).
      segment_len: continuous engine: decode steps between refills of finished slots.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine in ("continuous", "grouped"):
        from relift_jax import engine as engine_lib
        before = _cache_size() + engine_lib.cache_size()
        toks, logps, stopped = engine_lib.run(config, params, prompts, sp, seed=seed,
                                              num_samples=num_samples, mesh=mesh, slots=slots,
                                              segment_len=segment_len,
                                              length_groups=engine == "grouped")
        return SampleOutput(tokens=toks, logprobs=logps,
                            lengths=np.asarray([len(t) for t in toks], np.int32),
                            stopped=stopped,
                            num_compiles=_cache_size() + engine_lib.cache_size() - before)
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    n = len(rows)
    B = _batch_bucket(n, sharding.batch_divisor(mesh))
    P = bucket(max(len(r) for r in rows))
    tokens_BxP = np.full((B, P), pad_id, np.int32)
    pad_B = np.full((B,), P - 1, np.int32)
    for i, r in enumerate(rows):
        tokens_BxP[i, P - len(r):] = r
        pad_B[i] = P - len(r)
    done_B = np.arange(B) >= n  # padding rows start finished
    before = _cache_size()
    args = [tokens_BxP, pad_B, done_B]
    if mesh is not None:
        args = [sharding.host_to_global(a, sharding.batch_sharding(mesh, a.ndim)) for a in args]
    tokens_BxP, pad_B_dev, done_B = args
    cache, logits = _prefill(config, params, tokens_BxP, pad_B_dev, P + sp.max_new_tokens)
    out, cache = _decode(config, sp, params, cache, logits, pad_B_dev, done_B, jax.random.key(seed))
    del cache
    toks, logps, lengths, stopped = sharding.global_to_host(out)
    return SampleOutput(
        tokens=[toks[i, :lengths[i]].tolist() for i in range(n)],
        logprobs=[logps[i, :lengths[i]].tolist() for i in range(n)],
        lengths=np.asarray(lengths[:n]),
        stopped=np.asarray(stopped[:n]),
        num_compiles=_cache_size() - before,
    )


def generate(config: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
             eos_id: int | Sequence[int], seed: int = 0, stop_ids: Sequence[int] = (),
             num_samples: int = 1, logprob_temperature: float = 1.0, pad_id: int = 0,
             mesh=None, engine: str = "continuous", slots: int = 0,
             segment_len: int = 32) -> SampleOutput:
    """Public API: continuations of `prompts` (lists of token ids); `temperature=0` is greedy.

    Returns an object with `.tokens` (generated ids without the prompt, ending with EOS when one was
    produced), `.logprobs` (matching floats under the policy at `logprob_temperature`), `.lengths`
    and `.stopped`.
    """
    eos = [eos_id] if isinstance(eos_id, (int, np.integer)) else list(eos_id)
    sp = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                        top_p=float(top_p), top_k=int(top_k),
                        logprob_temperature=float(logprob_temperature),
                        stop_ids=tuple(int(i) for i in [*eos, *stop_ids]))
    return sample(config, params, prompts, sp, seed=seed, num_samples=num_samples, pad_id=pad_id,
                  mesh=mesh, engine=engine, slots=slots, segment_len=segment_len)
