"""The rollout engine: prefix sharing, attention over the filled cache only, continuous batching.

`sampler.sample` runs here by default (`engine="continuous"`); the dense sampler in `sampler.py`
stays as the reference. What changes against it:

- **Prefix sharing.** Each distinct prompt is prefilled once; its cache and last logits are copied
  to the rows (samples) that continue it.
- **Left-aligned rows, ragged lengths.** Row b holds its prompt and response in cache slots
  0..len[b]-1 and writes its next token at slot len[b] (positions = slots). A row's cache never
  moves within its slot, whatever the other rows do.
- **Segments over a window.** Decoding runs in segments of `segment_len` steps. The cache array of a
  segment has W slots, W the power-of-two bucket of (longest row + segment_len + 1), so a decode
  step reads the filled part (up to 2x), not the prompt bucket + max new tokens.
- **Continuous batching.** `slots` rows decode at once; between segments finished rows leave and
  pending rows take their slots (prefill + insert); when no rows are pending the batch shrinks to a
  smaller bucket. All N x G rows of a call finish.
- **Length groups** (`length_groups=True`). The rows' caches live in one store of the largest
  window; every segment the live rows are grouped by the window they need (buckets 2^k and 1.5 x 2^k
  of their own length + segment_len + 1), and each group is gathered,
  decoded over its own window and scattered back. A decode step then reads about each row's own
  filled cache (at most 1.5x), not the
  longest row's, and finished rows cost nothing. Costs: one gather and one scatter of a group's
  cache per segment, and more (smaller) programs; on a mesh rows may change devices between segments.
- **Ragged decode attention** (`ModelConfig.decode_attention = "ragged"`, from
  RolloutConfig.decode_attention): on TPU each decode step's attention is a Pallas kernel that
  reads each row's own filled key blocks of the cache in place (attention.ragged_decode_attention),
  so a row costs its length, not the window; windows are then capped at a multiple of the
  kernel's block.
- **Randomness per (seed, row, token index).** A row's draws do not depend on its slot, on the batch
  size or on the other rows: outputs are the same for any `slots`.

Programs are compiled per (batch bucket, window bucket, prompt bucket): a handful per call shape.
Shape key: B slots, W window slots, P prompt bucket, U distinct prompts (bucketed), R rows inserted
(bucketed), V vocab, L layers, K kv heads, E head dim, n segment steps.
"""
from __future__ import annotations

import collections
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from relift_jax import sharding
from relift_jax.model import ModelConfig, Params, hidden_states, init_cache, logits_from_hidden

CACHE_AXES = ("cache_layers", "batch", "cache_kv_heads", "cache_slots", None)
# The state's next-token logits keep the LM head's layout (vocabulary split over `tensor` in a
# decode layout), in every program, so a segment's state comes out as it went in (donated in place).
LOGITS_AXES = ("batch", "act_vocab")
DEFAULT_SEGMENT_LEN = 32


def _constrain_cache(cache):
    return jax.tree.map(lambda c: sharding.constrain(c, CACHE_AXES), cache)


def _constrain_logits(logits_BxV):
    return sharding.constrain(logits_BxV, LOGITS_AXES)


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill_prompts(config: ModelConfig, params: Params, tokens_UxP, len_U):
    """Right-padded distinct prompts -> their cache [L, U, K, P, E] and next-token logits [U, V]."""
    U, Pb = tokens_UxP.shape
    cache = _constrain_cache(init_cache(config, U, Pb))
    slots_UxP = jnp.broadcast_to(jnp.arange(Pb)[None, :], (U, Pb))
    kv_valid_UxP = slots_UxP < len_U[:, None]
    h, cache = hidden_states(config, params, tokens_UxP, slots_UxP, kv_valid_UxP, cache=cache,
                             cache_start=0)
    last_UxD = jnp.take_along_axis(h, jnp.maximum(len_U - 1, 0)[:, None, None], axis=1)
    return cache, _constrain_logits(logits_from_hidden(config, params, last_UxD)[:, 0])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _rearrange(batch: int, window: int, state, src_B):
    """Row j of the result is row src_B[j] of `state` (-1: an empty, finished row); the cache keeps
    its first `window` slots (or is padded to them)."""
    cache, logits_BxV, len_B, gen_B, row_B, done_B = state
    keep = src_B >= 0
    src = jnp.maximum(src_B, 0)
    S = cache["k"].shape[3]

    def resize(c):
        c = c[:, src]
        if window <= S:
            return c[:, :, :, :window]
        return jnp.pad(c, ((0, 0), (0, 0), (0, 0), (0, window - S), (0, 0)))
    cache = _constrain_cache(jax.tree.map(resize, cache))
    return (cache, _constrain_logits(logits_BxV[src]), jnp.where(keep, len_B[src], 0),
            jnp.where(keep, gen_B[src], 0),
            jnp.where(keep, row_B[src], -1), jnp.where(keep, done_B[src], True))


@functools.partial(jax.jit, donate_argnums=(0,))
def _insert(state, prompt_cache, prompt_logits_UxV, prompt_len_U, dst_R, src_R, row_R):
    """Starts rows row_R in slots dst_R (out of range: ignored) from distinct prompt src_R."""
    cache, logits_BxV, len_B, gen_B, row_B, done_B = state
    Pb = prompt_cache["k"].shape[3]

    def put(c, p):
        return c.at[:, dst_R, :, :Pb].set(p[:, src_R].astype(c.dtype), mode="drop")
    cache = _constrain_cache(jax.tree.map(put, cache, prompt_cache))
    return (cache, _constrain_logits(logits_BxV.at[dst_R].set(prompt_logits_UxV[src_R],
                                                              mode="drop")),
            len_B.at[dst_R].set(prompt_len_U[src_R], mode="drop"),
            gen_B.at[dst_R].set(0, mode="drop"), row_B.at[dst_R].set(row_R, mode="drop"),
            done_B.at[dst_R].set(False, mode="drop"))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def _segment(config: ModelConfig, sp, steps: int, params: Params, state, key):
    """Up to `steps` decode steps of every live row (fewer when all are done).

    Returns the new state and the segment's tokens and log-probs [B, steps] (-1 / 0 where a row
    made no token).
    """
    from relift_jax.sampler import pick_per_row  # the sampler owns the sampling rule
    cache, logits_BxV, len_B, gen_B, row_B, done_B = state
    B, W = logits_BxV.shape[0], cache["k"].shape[3]
    stop_ids = jnp.asarray(sp.stop_ids or (-1,), jnp.int32)
    all_slots_BxW = jnp.ones((B, W), bool)  # the causal rule at each row's own slot masks the rest

    def cond(c):
        return (c[0] < steps) & ~jnp.all(c[1][5])

    def body(c):
        t, (cache, logits_BxV, len_B, gen_B, row_B, done_B), toks_Bxn, logps_Bxn = c
        keys_B = jax.vmap(lambda r, g: jax.random.fold_in(jax.random.fold_in(key, r), g))(
            jnp.maximum(row_B, 0), gen_B)
        tok_B = pick_per_row(logits_BxV, keys_B, sp)
        logp_BxV = jax.nn.log_softmax(logits_BxV / sp.logprob_temperature, axis=-1)
        logp_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
        live_B = ~done_B
        toks_Bxn = toks_Bxn.at[:, t].set(jnp.where(live_B, tok_B, -1))
        logps_Bxn = logps_Bxn.at[:, t].set(jnp.where(live_B, logp_B, 0.0))
        gen_B = gen_B + live_B
        done_B = done_B | jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1) | (
            gen_B >= sp.max_new_tokens)
        slot_B = jnp.minimum(len_B, W - 1)  # finished rows rewrite a slot nobody reads
        h, cache = hidden_states(config, params, tok_B[:, None], slot_B[:, None], all_slots_BxW,
                                 cache=cache, cache_start=slot_B)
        logits_BxV = _constrain_logits(logits_from_hidden(config, params, h)[:, 0])
        len_B = len_B + live_B
        return t + 1, (cache, logits_BxV, len_B, gen_B, row_B, done_B), toks_Bxn, logps_Bxn

    init = (jnp.int32(0), state, jnp.full((B, steps), -1, jnp.int32),
            jnp.zeros((B, steps), jnp.float32))
    _, state, toks_Bxn, logps_Bxn = jax.lax.while_loop(cond, body, init)
    return state, toks_Bxn, logps_Bxn


def cache_size() -> int:
    """Compiled programs held (for counting compiles)."""
    fns = (_prefill_prompts, _rearrange, _insert, _segment, _gather_rows, _scatter_rows)
    return sum(f._cache_size() for f in fns if hasattr(f, "_cache_size"))


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


class _Placer:
    """Host arrays onto the mesh: batch arrays split over the batch axes, the rest replicated."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.multiple = sharding.batch_divisor(mesh)

    def batch(self, x):
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        return sharding.host_to_global(x, sharding.batch_sharding(self.mesh, x.ndim, x.shape))

    def replicated(self, x):
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        return sharding.host_to_global(x, NamedSharding(self.mesh, P()))


def run(config: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], sp, *, seed: int,
        num_samples: int, mesh=None, slots: int = 0, segment_len: int = DEFAULT_SEGMENT_LEN,
        length_groups: bool = False):
    """Samples `num_samples` continuations of every prompt; returns per-row tokens, log-probs and
    whether the row stopped on a stop id. Row i continues prompt i // num_samples.

    slots: rows decoded at once (0: all rows of the call). segment_len: decode steps between
    refills (also how far past the longest row the window reaches). length_groups: decode the
    rows in groups of similar length, each over its own window (module docstring).
    """
    if length_groups:
        return _run_grouped(config, params, prompts, sp, seed=seed, num_samples=num_samples,
                            mesh=mesh, slots=slots, segment_len=segment_len)
    n = len(prompts) * num_samples
    multiple = sharding.batch_divisor(mesh)
    max_slots = -(-(slots or n) // multiple) * multiple
    put = _Placer(mesh)
    key = jax.random.key(seed)
    out = _Rows(n, sp.stop_ids)
    pending = collections.deque(range(n))
    slot_row: list[int] = []                # host mirror: the row in each slot (-1: free)
    slot_len: list[int] = []                # host mirror: filled cache slots of each row
    state, window, batch = None, 0, max_slots
    window_cap = _window_cap(prompts, sp, config)
    while True:
        live = [j for j, r in enumerate(slot_row) if r >= 0]
        take = min(len(pending), max_slots - len(live))
        incoming = [pending.popleft() for _ in range(take)]
        if not live and not incoming:
            break
        prompt_of = {r: r // num_samples for r in incoming}
        distinct = sorted(set(prompt_of.values()))
        longest = max([slot_len[j] for j in live] + [len(prompts[u]) for u in distinct])
        # Windows only grow and batches only shrink within a call: few distinct programs.
        window = max(window, min(_bucket(longest + segment_len + 1, 64), window_cap),
                     _bucket(max([len(prompts[u]) for u in distinct], default=1), 16))
        batch = min(batch, _batch_size(len(live) + len(incoming), max_slots, multiple))
        src = np.full(batch, -1, np.int32)
        src[:len(live)] = live
        if state is None:
            state = _empty_state(config, batch, window, put)
        elif (batch, window) != (len(slot_row), state[0]["k"].shape[3]) or \
                live != list(range(len(live))):
            state = _rearrange(batch, window, state, put.replicated(src))
        slot_row = [slot_row[j] for j in live] + [-1] * (batch - len(live))
        slot_len = [slot_len[j] for j in live] + [0] * (batch - len(live))
        if incoming:
            state = _start_rows(config, params, state, prompts, distinct, prompt_of, incoming,
                                range(len(live), len(live) + len(incoming)), put)
            for j, r in enumerate(incoming, start=len(live)):
                slot_row[j], slot_len[j] = r, len(prompts[prompt_of[r]])
        state, toks, lps = _segment(config, sp, segment_len, params, state, key)
        toks, lps, done = sharding.global_to_host((toks, lps, state[5]))
        for j, r in enumerate(slot_row):
            if r >= 0:
                slot_len[j] += out.add(r, toks[j], lps[j], done[j])
                slot_row[j] = -1 if done[j] else r
    return out.tokens, out.logps, out.stopped


class _Rows:
    """The call's result, row by row: tokens, log-probs and whether the row ended on a stop id."""

    def __init__(self, n: int, stop_ids: Sequence[int]):
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logps: list[list[float]] = [[] for _ in range(n)]
        self.stopped = np.zeros(n, bool)
        self.stop_set = set(stop_ids)

    def add(self, row: int, toks, lps, done: bool) -> int:
        """Appends one segment's tokens of `row` (-1: none made); returns how many it made."""
        made = [int(t) for t in toks if t >= 0]
        self.tokens[row] += made
        self.logps[row] += [float(x) for x in lps[:len(made)]]
        if done:
            self.stopped[row] = bool(self.tokens[row]) and self.tokens[row][-1] in self.stop_set
        return len(made)


def window_multiple(config: ModelConfig) -> int:
    """What the window cap is rounded up to: 64 slots, or the ragged decode kernel's block (so
    the block divides every window)."""
    ragged = getattr(config, "decode_attention", "xla") == "ragged"  # (tests pass no config)
    return config.decode_attention_block if ragged else 64


def window_cap(longest_prompt: int, max_new_tokens: int, multiple: int) -> int:
    """No row outgrows its prompt + max new tokens (+1: the slot a finished row rewrites)."""
    return -(-(longest_prompt + max_new_tokens + 1) // multiple) * multiple


def _window_cap(prompts, sp, config: ModelConfig) -> int:
    return window_cap(max(len(p) for p in prompts), sp.max_new_tokens, window_multiple(config))


def _run_grouped(config: ModelConfig, params: Params, prompts, sp, *, seed: int,
                 num_samples: int, mesh, slots: int, segment_len: int):
    """`run` with length groups: one store of `max_slots` rows x the largest window; each segment,
    every group of live rows of similar length is gathered, decoded over its window, put back."""
    n = len(prompts) * num_samples
    multiple = sharding.batch_divisor(mesh)
    max_slots = -(-(slots or n) // multiple) * multiple
    put = _Placer(mesh)
    key = jax.random.key(seed)
    out = _Rows(n, sp.stop_ids)
    pending = collections.deque(range(n))
    store_window = max(_window_cap(prompts, sp, config), _bucket(max(len(p) for p in prompts), 16))
    store = _empty_state(config, max_slots, store_window, put)
    slot_row = [-1] * max_slots              # host mirror: the row in each slot (-1: free)
    slot_len = [0] * max_slots               # host mirror: filled cache slots of each row
    while pending or any(r >= 0 for r in slot_row):
        free = [j for j, r in enumerate(slot_row) if r < 0]
        incoming = [pending.popleft() for _ in range(min(len(pending), len(free)))]
        if incoming:
            prompt_of = {r: r // num_samples for r in incoming}
            distinct = sorted(set(prompt_of.values()))
            dst = free[:len(incoming)]
            store = _start_rows(config, params, store, prompts, distinct, prompt_of, incoming,
                                dst, put)
            for j, r in zip(dst, incoming):
                slot_row[j], slot_len[j] = r, len(prompts[prompt_of[r]])
        live = [j for j, r in enumerate(slot_row) if r >= 0]
        results = []
        for window, members in _length_groups(live, slot_len, segment_len, store_window,
                                              min_rows=max(1, max_slots // 8)):
            batch = min(max_slots, -(-_fine_bucket(len(members), 1) // multiple) * multiple)
            idx = np.full(batch, -1, np.int32)
            idx[:len(members)] = members
            idx = put.replicated(idx)
            group = _gather_rows(window, store, idx)
            group, toks, lps = _segment(config, sp, segment_len, params, group, key)
            store = _scatter_rows(store, group, idx)
            results.append((members, toks, lps, group[5]))
        for members, toks, lps, done in results:   # fetched after every group is dispatched
            toks, lps, done = sharding.global_to_host((toks, lps, done))
            for i, j in enumerate(members):
                slot_len[j] += out.add(slot_row[j], toks[i], lps[i], done[i])
                slot_row[j] = -1 if done[i] else slot_row[j]
    return out.tokens, out.logps, out.stopped


def _length_groups(live: list[int], slot_len: list[int], segment_len: int, cap: int,
                   min_rows: int) -> list[tuple[int, list[int]]]:
    """Live slots grouped by the window bucket a segment needs (their length + segment_len + 1);
    a group of fewer than `min_rows` slots joins the next longer one (fewer, fuller programs)."""
    by_window: dict[int, list[int]] = collections.defaultdict(list)
    for j in live:
        by_window[min(_window_bucket(slot_len[j] + segment_len + 1), cap)].append(j)
    groups, carry = [], []
    windows = sorted(by_window)
    for k, w in enumerate(windows):
        carry += by_window[w]
        if len(carry) >= min_rows or k == len(windows) - 1:
            groups.append((w, carry))
            carry = []
    return groups


def _fine_bucket(n: int, minimum: int) -> int:
    """The smallest 2^k or 1.5 x 2^k (at least `minimum`) that holds n: at most 1.5x n."""
    w = _bucket(n, minimum)
    return w * 3 // 4 if w * 3 // 4 >= max(n, minimum) and w % 4 == 0 else w


def _window_bucket(n: int) -> int:
    """A group's window: 64, 96, 128, 192, 256, 384, ... slots, at most 1.5x its longest need."""
    return _fine_bucket(n, 64)


@functools.partial(jax.jit, static_argnums=(0,))
def _gather_rows(window: int, store, idx_G):
    """The group of store rows idx_G (-1: an empty, finished row), cache cut to `window` slots."""
    cache, logits_SxV, len_S, gen_S, row_S, done_S = store
    keep = idx_G >= 0
    src = jnp.maximum(idx_G, 0)
    cache = _constrain_cache(jax.tree.map(lambda c: c[:, src, :, :window], cache))
    return (cache, _constrain_logits(logits_SxV[src]), jnp.where(keep, len_S[src], 0),
            jnp.where(keep, gen_S[src], 0), jnp.where(keep, row_S[src], -1),
            jnp.where(keep, done_S[src], True))


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_rows(store, group, idx_G):
    """Writes the group back into its store rows (the first `window` cache slots of each)."""
    dst = jnp.where(idx_G >= 0, idx_G, 1 << 30)   # out of range: dropped
    W = group[0]["k"].shape[3]
    cache = jax.tree.map(lambda c, g: c.at[:, dst, :, :W].set(g, mode="drop"), store[0], group[0])
    logits, *rest = (s.at[dst].set(g, mode="drop") for s, g in zip(store[1:], group[1:]))
    return (_constrain_cache(cache), _constrain_logits(logits), *rest)


def _batch_size(rows: int, max_slots: int, multiple: int) -> int:
    """All slots while rows are pending or many run; a smaller bucket for the last few rows."""
    b = min(max_slots, max(_bucket(rows, 1), max_slots // 16))
    return -(-b // multiple) * multiple


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _empty_cache(config: ModelConfig, batch: int, window: int):
    """An empty cache and logits state, in the engine's layouts."""
    return (_constrain_cache(init_cache(config, batch, window)),
            _constrain_logits(jnp.zeros((batch, config.vocab_size), jnp.float32)))


def _empty_state(config: ModelConfig, batch: int, window: int, put: _Placer):
    cache, logits = _empty_cache(config, batch, window)  # compiled once per shape, not per call
    return (cache, logits,
            put.batch(np.zeros(batch, np.int32)), put.batch(np.zeros(batch, np.int32)),
            put.batch(np.full(batch, -1, np.int32)), put.batch(np.ones(batch, bool)))


def _start_rows(config, params, state, prompts, distinct, prompt_of, incoming, dst, put):
    """Prefills the distinct prompts once (prefix sharing) and inserts their rows."""
    U = -(-_bucket(len(distinct), 1) // put.multiple) * put.multiple
    Pb = _bucket(max(len(prompts[u]) for u in distinct), 16)
    tokens_UxP = np.zeros((U, Pb), np.int32)
    len_U = np.ones(U, np.int32)
    for i, u in enumerate(distinct):
        tokens_UxP[i, :len(prompts[u])] = prompts[u]
        len_U[i] = len(prompts[u])
    pcache, plogits = _prefill_prompts(config, params, put.batch(tokens_UxP), put.batch(len_U))
    R = _bucket(len(incoming), 1)
    index = {u: i for i, u in enumerate(distinct)}
    dst_R = np.full(R, 1 << 30, np.int32)   # out of range: dropped
    src_R = np.zeros(R, np.int32)
    row_R = np.full(R, -1, np.int32)
    dst_R[:len(incoming)] = list(dst)
    src_R[:len(incoming)] = [index[prompt_of[r]] for r in incoming]
    row_R[:len(incoming)] = incoming
    return _insert(state, pcache, plogits, put.replicated(len_U), put.replicated(dst_R),
                   put.replicated(src_R), put.replicated(row_R))
