"""relift_jax.sampler against transformers' greedy `generate`, `model.forward` and sampling properties.

Most tests share one prompt set, one budget of new tokens and therefore one set of compiled shapes
(rows bucket 8, prompt bucket 32): on two shared CPU cores compilation, not decoding, is the cost.

Shape key: B rows, T tokens, V vocab, N new tokens.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from f32 import EPS32, assert_close, assert_greedy_decided, decoder_ulps
from hf_fixtures import KINDS
from relift_jax import model, sampler

NEVER = -1  # an EOS id no token can equal, so rows run to max_new_tokens
LENGTHS = (3, 11, 17, 6, 25)  # -> rows bucket 8, prompt bucket 32
N = 32


def _prompts(vocab: int, lengths=LENGTHS, seed: int = 1) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, vocab, n).tolist() for n in lengths]


def _forward_logits(cfg, params, prompts: list[list[int]],
                    generated: list[list[int]]) -> list[np.ndarray]:
    """Row i: the logits [len(generated[i]), V] that predict generated[i], recomputed by one full
    forward pass (float64).

    The sequences are right-padded to 64 in one batch: `forward` is causal, so padding after a
    sequence leaves its logits unchanged, and one shape means one compilation.
    """
    T = max(64, max(len(p) + len(g) for p, g in zip(prompts, generated)))
    seqs_BxT = np.zeros((len(prompts), T), np.int32)
    for i, (p, g) in enumerate(zip(prompts, generated)):
        seqs_BxT[i, :len(p) + len(g)] = p + g
    logits_BxTxV = np.asarray(model.forward(cfg, params, seqs_BxT)).astype(np.float64)
    return [logits_BxTxV[i, len(p) - 1:len(p) + len(g) - 1]
            for i, (p, g) in enumerate(zip(prompts, generated))]


def _ulps(cfg) -> float:
    """How far, in eps32 * max|logits|, the sampler's cached-decode logits may be from `forward`'s:
    float32 rounding of the decoder over a cache of P + N = 64 slots."""
    return decoder_ulps(cfg, T=64)


def _scale(logits: list[np.ndarray]) -> float:
    return max(float(np.abs(x).max()) for x in logits)


@functools.lru_cache(maxsize=None)
def _standard(tiny_checkpoints, kind: str, temperature: float, seed: int = 0):
    """The shared call: LENGTHS prompts, N new tokens, no EOS (cached across tests)."""
    cfg, params = tiny_checkpoints.ours(kind)
    prompts = _prompts(cfg.vocab_size)
    out = sampler.generate(cfg, params, prompts, max_new_tokens=N, temperature=temperature,
                           eos_id=NEVER, seed=seed)
    if temperature == 0.0:
        # Tests compare these greedy tokens with other programs' (transformers, other sampling
        # settings, stop rules): that is sound only if rounding cannot flip any argmax.
        logits = _forward_logits(cfg, params, prompts, out.tokens)
        bound = _ulps(cfg) * EPS32 * _scale(logits)
        for i, (x, toks) in enumerate(zip(logits, out.tokens)):
            assert_greedy_decided(x, toks, bound=bound, err_msg=f"row {i}")
    return out


def _forward_logprobs(cfg, params, prompts: list[list[int]], generated: list[list[int]],
                      temperature: float = 1.0) -> tuple[list[np.ndarray], float]:
    """(log p(generated[i] | prompt, generated[:i]) per row, from `_forward_logits` in float64;
    max|logits / temperature|, the scale of their float32 rounding)."""
    logits = _forward_logits(cfg, params, prompts, generated)
    out = []
    for x, g in zip(logits, generated):
        x = x / temperature
        x = x - x.max(-1, keepdims=True)
        logp_NxV = x - np.log(np.exp(x).sum(-1, keepdims=True))
        out.append(logp_NxV[np.arange(len(g)), g])
    return out, _scale(logits) / temperature


def _assert_logprobs_are_policy(cfg, params, prompts, out, temperature: float = 1.0):
    assert len(out.tokens) == len(out.logprobs) == len(prompts)
    refs, scale = _forward_logprobs(cfg, params, prompts, out.tokens, temperature)
    for toks, logps, ref in zip(out.tokens, out.logprobs, refs):
        assert len(toks) == len(logps) > 0
        # log p = logit - logsumexp(logits): each term carries the logits' rounding error.
        assert_close(logps, ref, ulps=2 * _ulps(cfg), scale=scale)


# ----------------------------------------------------------------------------- vs transformers

@pytest.mark.hf_reference
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers_generate(tiny_checkpoints, kind):
    """One batched call of ours (left-padded inside) vs transformers per prompt, unpadded."""
    cfg, _ = tiny_checkpoints.ours(kind)
    hf_model = tiny_checkpoints.hf_model(kind)
    out = _standard(tiny_checkpoints, kind, 0.0)
    for prompt, ours in zip(_prompts(cfg.vocab_size), out.tokens):
        with torch.no_grad():
            # An explicit all-ones mask: else transformers masks prompt tokens equal to pad_token_id.
            ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                    do_sample=False, max_new_tokens=N, min_new_tokens=N,
                                    eos_token_id=None, pad_token_id=0)
        assert ours == ref[0, len(prompt):].tolist()
    assert out.lengths.tolist() == [N] * len(LENGTHS) and not out.stopped.any()


# ----------------------------------------------------------------------------- log-probabilities

@pytest.mark.parametrize("kind, temperature", [("qwen2_untied", 1.0), ("llama3", 1.0),
                                                ("llama3", 0.0)])
def test_logprobs_equal_forward(tiny_checkpoints, kind, temperature):
    """Temperature-1 sampling, and greedy decoding (whose log-probs are still the T=1 policy's)."""
    cfg, params = tiny_checkpoints.ours(kind)
    _assert_logprobs_are_policy(cfg, params, _prompts(cfg.vocab_size),
                                _standard(tiny_checkpoints, kind, temperature))


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (0.7, 20, 0.8)])
def test_logprobs_are_the_temperature_one_policy_under_filtered_sampling(
        tiny_checkpoints, temperature, top_k, top_p):
    cfg, params = tiny_checkpoints.ours("qwen2_untied")
    prompts = _prompts(cfg.vocab_size)
    out = sampler.generate(cfg, params, prompts, max_new_tokens=N, temperature=temperature,
                           top_k=top_k, top_p=top_p, eos_id=NEVER, seed=11)
    _assert_logprobs_are_policy(cfg, params, prompts, out)


def test_logprob_temperature_is_applied(tiny_checkpoints):
    cfg, params = tiny_checkpoints.ours("qwen2_untied")
    prompts = _prompts(cfg.vocab_size)
    out = sampler.generate(cfg, params, prompts, max_new_tokens=N, temperature=0.6, eos_id=NEVER,
                           logprob_temperature=0.6, seed=2)
    _assert_logprobs_are_policy(cfg, params, prompts, out, temperature=0.6)


# ----------------------------------------------------------------------------- stopping

def _stop_token_for_some_rows(free: list[list[int]]) -> tuple[int, set[int]]:
    """A token that some rows of an unstopped greedy run produce and at least one never does."""
    for tok in free[0][2:]:
        absent = {i for i, row in enumerate(free) if tok not in row}
        if absent:
            return tok, absent
    pytest.fail(f"no token suits a per-row stop test in {free}")


def _expected_after_stop(free_row: list[int], stops: set[int]) -> list[int]:
    for i, tok in enumerate(free_row):
        if tok in stops:
            return free_row[:i + 1]
    return free_row


@pytest.mark.parametrize("as_stop_id", [False, True])
def test_rows_stop_independently_at_eos_or_stop_ids(tiny_checkpoints, as_stop_id):
    """Greedy is deterministic, so an unstopped run predicts exactly where each row must stop."""
    cfg, params = tiny_checkpoints.ours("llama3")
    free = _standard(tiny_checkpoints, "llama3", 0.0).tokens
    tok, never_stop = _stop_token_for_some_rows(free)
    kw = dict(eos_id=NEVER, stop_ids=(tok,)) if as_stop_id else dict(eos_id=tok)
    out = sampler.generate(cfg, params, _prompts(cfg.vocab_size), max_new_tokens=N,
                           temperature=0.0, **kw)
    for i, row in enumerate(free):
        want = _expected_after_stop(row, {tok})
        assert out.tokens[i] == want
        assert out.lengths[i] == len(want) == len(out.logprobs[i])
        assert out.stopped[i] == (tok in row)
    assert out.stopped.any() and not out.stopped[sorted(never_stop)].any()
    assert all(out.tokens[i][-1] == tok for i in np.flatnonzero(out.stopped))


def test_several_eos_ids_and_stop_ids(tiny_checkpoints):
    cfg, params = tiny_checkpoints.ours("qwen2_tied")
    free = _standard(tiny_checkpoints, "qwen2_tied", 0.0).tokens
    a, b = free[0][3], free[1][5]
    out = sampler.generate(cfg, params, _prompts(cfg.vocab_size), max_new_tokens=N,
                           temperature=0.0, eos_id=[NEVER, a], stop_ids=[b])
    for i, row in enumerate(free):
        assert out.tokens[i] == _expected_after_stop(row, {a, b})
    assert out.stopped[:2].all()


def test_all_rows_stopping_at_once(tiny_checkpoints):
    """Every row's first greedy token is a stop id: one token each, and the loop ends early."""
    cfg, params = tiny_checkpoints.ours("qwen2_tied")
    free = _standard(tiny_checkpoints, "qwen2_tied", 0.0).tokens
    firsts = sorted({row[0] for row in free})
    out = sampler.generate(cfg, params, _prompts(cfg.vocab_size), max_new_tokens=N,
                           temperature=0.0, eos_id=firsts)
    assert out.tokens == [[row[0]] for row in free]
    assert out.lengths.tolist() == [1] * len(free) and out.stopped.all()


# ----------------------------------------------------------------------------- sampling properties

def test_num_samples_repeats_each_prompt(tiny_checkpoints):
    cfg, params = tiny_checkpoints.ours("qwen2_untied")
    all_prompts = _prompts(cfg.vocab_size)
    prompts = [all_prompts[0], all_prompts[4]]  # 2 x 3 rows: the same buckets as the shared call
    greedy = _standard(tiny_checkpoints, "qwen2_untied", 0.0).tokens
    rep = sampler.generate(cfg, params, prompts, max_new_tokens=N, temperature=0.0, eos_id=NEVER,
                           num_samples=3)
    assert rep.tokens == [greedy[0]] * 3 + [greedy[4]] * 3
    sampled = sampler.generate(cfg, params, prompts, max_new_tokens=N, temperature=1.0,
                               eos_id=NEVER, num_samples=3, seed=0)
    assert len(sampled.tokens) == 6 and sampled.lengths.shape == (6,)
    for p in range(2):  # the samples of one prompt are different draws, each scored on its prompt
        group = sampled.tokens[3 * p:3 * p + 3]
        assert len({tuple(g) for g in group}) == 3
    _assert_logprobs_are_policy(cfg, params, [q for q in prompts for _ in range(3)], sampled)


def test_seed_determines_samples(tiny_checkpoints):
    first = _standard(tiny_checkpoints, "qwen2_untied", 1.0, seed=0).tokens
    again = _standard.__wrapped__(tiny_checkpoints, "qwen2_untied", 1.0, seed=0).tokens
    other = _standard(tiny_checkpoints, "qwen2_untied", 1.0, seed=1).tokens
    assert first == again
    assert first != other
    assert sum(a != b for a, b in zip(first, other)) >= 4  # a new seed changes (almost) every row


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6)])
def test_degenerate_filters_equal_greedy(tiny_checkpoints, filters):
    cfg, params = tiny_checkpoints.ours("llama3")
    greedy = _standard(tiny_checkpoints, "llama3", 0.0).tokens
    for seed in (0, 1):
        out = sampler.generate(cfg, params, _prompts(cfg.vocab_size), max_new_tokens=N,
                               temperature=1.0, eos_id=NEVER, seed=seed, **filters)
        assert out.tokens == greedy


def _first_token_draws(cfg, params, prompt, n, **kw) -> tuple[np.ndarray, np.ndarray]:
    """n one-token samples of one prompt, and the temperature-1 probabilities they come from."""
    out = sampler.generate(cfg, params, [prompt], max_new_tokens=1, eos_id=NEVER, num_samples=n,
                           **kw)
    logits_V = np.asarray(model.forward(cfg, params, np.array([prompt], np.int32)))[0, -1]
    probs_V = np.exp(logits_V.astype(np.float64) - logits_V.max())
    return np.array([t[0] for t in out.tokens]), probs_V / probs_V.sum()


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def test_temperature_sampling_follows_the_softmax(tiny_checkpoints):
    """1024 first-token draws at temperature 0.5 are as close to softmax(logits / 0.5) as exact
    multinomial draws are (99.9th percentile of total variation, simulated with numpy)."""
    cfg, params = tiny_checkpoints.ours("qwen2_untied")
    prompt = _prompts(cfg.vocab_size, (6,))[0]
    n = 1024
    draws, p1 = _first_token_draws(cfg, params, prompt, n, temperature=0.5, seed=4)
    p_half = p1 ** 2 / (p1 ** 2).sum()  # softmax(logits / 0.5)
    rng = np.random.default_rng(0)
    tv_null = [_tv(rng.multinomial(n, p_half) / n, p_half) for _ in range(1000)]
    threshold = np.percentile(tv_null, 99.9)
    # The test has power: exact draws at the wrong temperature (1.0) are always beyond it.
    tv_wrong = [_tv(rng.multinomial(n, p1) / n, p_half) for _ in range(1000)]
    assert min(tv_wrong) > threshold
    assert _tv(np.bincount(draws, minlength=cfg.vocab_size) / n, p_half) < threshold


def test_top_k_and_top_p_restrict_the_support(tiny_checkpoints):
    cfg, params = tiny_checkpoints.ours("qwen2_untied")
    prompt = _prompts(cfg.vocab_size, (6,))[0]
    draws, p = _first_token_draws(cfg, params, prompt, 1024, temperature=1.0, top_k=3, seed=5)
    order = np.argsort(-p)
    assert set(draws) == set(order[:3])
    # Nucleus: the smallest prefix of the sorted probabilities whose mass reaches top_p.
    nucleus = set(order[:int(np.searchsorted(np.cumsum(p[order]), 0.1)) + 1])
    assert 1 < len(nucleus) < 10
    draws, _ = _first_token_draws(cfg, params, prompt, 1024, temperature=1.0, top_p=0.1, seed=6)
    assert set(draws) == nucleus


# ----------------------------------------------------------------------------- compilation

def test_compiles_once_per_bucket(tiny_checkpoints):
    cfg, params = tiny_checkpoints.ours("qwen2_tied")
    kw = dict(max_new_tokens=9, temperature=1.0, eos_id=NEVER)  # 9: shapes no other test uses
    first = sampler.generate(cfg, params, _prompts(cfg.vocab_size, (5, 9), seed=1), **kw)
    assert first.num_compiles > 0
    # Different prompt lengths and content, same length bucket (16) and row bucket (2).
    second = sampler.generate(cfg, params, _prompts(cfg.vocab_size, (14, 2), seed=2), seed=7, **kw)
    assert second.num_compiles == 0
    assert [len(t) for t in second.tokens] == [9, 9]


def test_bucket_sizes():
    assert [sampler.bucket(n) for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 128]
    assert sampler._batch_bucket(3, 1) == 4 and sampler._batch_bucket(65, 1) == 128
    assert sampler._batch_bucket(3, 8) == 8


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(top_k=-1)])
def test_invalid_sampling_arguments(tiny_checkpoints, bad):
    cfg, params = tiny_checkpoints.ours("qwen2_tied")
    kw = {**dict(max_new_tokens=2, temperature=1.0), **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        sampler.generate(cfg, params, [[1]], eos_id=0, **kw)


def test_empty_prompt_is_refused(tiny_checkpoints):
    cfg, params = tiny_checkpoints.ours("qwen2_tied")
    with pytest.raises(ValueError, match="prompt"):
        sampler.generate(cfg, params, [[1], []], max_new_tokens=2, temperature=0.0, eos_id=0)


def test_pick_draws_from_the_filtered_softmax():
    """The inverse-CDF draw matches the (temperature, top-k, top-p filtered) softmax in frequency."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from relift_jax.sampler import SamplingParams, _pick

    logits = np.log(np.array([0.05, 0.4, 0.0001, 0.25, 0.2, 0.0999], np.float32))
    B = 20000
    logits_BxV = jnp.asarray(np.tile(logits, (B, 1)))
    cases = [
        (SamplingParams(max_new_tokens=1, temperature=1.0), None),
        (SamplingParams(max_new_tokens=1, temperature=0.5), None),
        (SamplingParams(max_new_tokens=1, temperature=1.0, top_k=3), [1, 3, 4]),
        (SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.7), [1, 3, 4]),
    ]
    for sp, keep in cases:
        p = np.exp(logits / sp.temperature)
        if keep is not None:
            p = np.where(np.isin(np.arange(len(p)), keep), p, 0.0)
        p = p / p.sum()
        toks = np.asarray(_pick(logits_BxV, jax.random.key(3), sp))
        freq = np.bincount(toks, minlength=len(p)) / B
        # 5 binomial standard deviations per entry (the draws are fixed by the key; a new RNG
        # would fail with probability ~1e-5), plus one draw for float32 rounding of the CDF.
        assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / B) + 1 / B).all(), (sp, freq, p)
        if keep is not None:
            assert set(np.unique(toks)) <= set(keep)
