"""The host-side ReLIFT loop with a stub sampler and scorer and recording fake steps.

Question q's prompt starts with token `20 + q`; a rollout's first two tokens are `20 + q` and
`1 + g` (g = the sample's index in its group), so the scorer knows which question and sample it
grades and the tests choose exactly how many of the G samples of each question are correct.
Expected buffers, SFT batches and metrics are worked out by hand from those choices. One test runs
the real jitted steps on a tiny model for the metric names that only the steps produce.
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import struct

from relift_jax.config import RLConfig, RolloutConfig, SFTConfig, TrainConfig
from relift_jax.controller import Controller, Question, Rollouts
from relift_jax.batches import Packing

BASE = 20


@struct.dataclass
class StubState:
    """Stands in for train_step.TrainState: counts the steps the controller dispatched."""

    params: object
    rl: int
    sft: int


def make_questions(n: int, with_demo=lambda q: True) -> list[Question]:
    return [Question(prompt_ids=[BASE + q, 3, 4 + q % 3], ground_truth=str(q),
                     demo_ids=[50 + q % 7, 51, 2] if with_demo(q) else None,
                     level=1 + q % 2) for q in range(n)]


class Harness:
    """The injected callables, recording every call."""

    def __init__(self, correct=lambda q: 0):
        self.correct = correct  # question -> how many of its G samples are right
        self.samples: list[tuple[list[int], int, int]] = []  # (question ids, G, seed)
        self.rl_batches: list[dict] = []
        self.sft_batches: list[dict] = []

    def sample_fn(self, params, prompts, G, seed):
        qids = [p[0] - BASE for p in prompts]
        self.samples.append((qids, G, seed))
        tokens = [[BASE + q, 1 + g] + [5] * ((q + g) % 4) for q in qids for g in range(G)]
        logprobs = [[-0.5] * len(t) for t in tokens]
        return Rollouts(tokens, logprobs, np.ones(len(tokens), bool))

    def score_fn(self, token_lists, truths, reward_names):
        out = []
        for toks, truth in zip(token_lists, truths):
            q, g = toks[0] - BASE, toks[1] - 1
            assert truth == str(q)  # ground truths travel with their rollouts
            out.append(1.0 if g < self.correct(q) else 0.0)
        return out

    def rl_step(self, state, batch):
        self.rl_batches.append(batch)
        return state.replace(rl=state.rl + 1), {"loss": 0.5, "clip_frac": 0.0, "entropy": 1.0,
                                                "grad_norm": 2.0, "lr": 1e-6}

    def sft_step(self, state, batch):
        self.sft_batches.append(batch)
        return state.replace(sft=state.sft + 1), {"loss": 1.5, "nll": 1.5, "entropy": 1.0,
                                                  "grad_norm": 3.0, "lr": 1e-6}

    def sft_ids(self, i: int) -> list[int]:
        """Question ids of SFT batch i, row by row, read back from the packed tokens."""
        toks = self.sft_batches[i].micro_batches.tokens_bxT.reshape(-1, self.sft_batches[i].micro_batches.tokens_bxT.shape[-1])
        valid = self.sft_batches[i].micro_batches.segment_ids_bxT.reshape(toks.shape)
        return [int(t[0]) - BASE for t, v in zip(toks, valid) if v.any()]


def make_controller(h: Harness, questions, *, mode="relift", N=4, G=2, M=6, seed=0,
                    rl: RLConfig | None = None, **sft_kw) -> Controller:
    return Controller(
        questions=questions, train=TrainConfig(mode=mode, seed=seed),
        rollout=RolloutConfig(questions_per_iteration=N, group_size=G),
        rl=rl or RLConfig(num_mini_batches=1), sft=SFTConfig(buffer_size=M, **sft_kw),
        packing=Packing(micro_batch_size=4, pad_id=0, length_multiple=8),
        rl_step=h.rl_step, sft_step=h.sft_step, sample_fn=h.sample_fn, score_fn=h.score_fn)


def run(ctl: Controller, iterations: int, state=None):
    state = state or StubState(params=None, rl=0, sft=0)
    ms = []
    for _ in range(iterations):
        state, m = ctl.step(state)
        ms.append(m)
    return state, ms


# ----------------------------------------------------------------------------- the buffer

def test_all_wrong_fills_buffer_and_fires_once_per_M_newest_first():
    h = Harness(correct=lambda q: 0)
    ctl = make_controller(h, make_questions(12), N=4, G=2, M=6)
    state, ms = run(ctl, 3)
    it = [s[0] for s in h.samples]  # question ids sampled at iterations 0, 1, 2
    assert sorted(it[0] + it[1] + it[2]) == list(range(12))  # one epoch, each question once
    assert [m["buffer/sft_fired"] for m in ms] == [0, 1, 1]
    assert [m["buffer/size"] for m in ms] == [4, 2, 0]
    assert [m["buffer/hardest_in_batch"] for m in ms] == [4, 4, 4]
    assert len(h.sft_batches) == 2 and state.sft == 2 and state.rl == 3
    # Newest first: iteration 1's four, then the first two of iteration 0's; the other two of
    # iteration 0 stay and go with iteration 2's four.
    assert h.sft_ids(0) == it[1] + it[0][:2]
    assert h.sft_ids(1) == it[2] + it[0][2:]
    assert ctl.counters["sft_fired"] == 2 and ctl.counters["sft_updates"] == 2
    assert [m["buffer/demos_used"] for m in ms] == [0, 6, 12]
    assert ms[2]["buffer/demos_used_frac"] == pytest.approx(1.0)
    assert "sft/loss" not in ms[0] and ms[1]["sft/loss"] == 1.5


def test_sft_batch_holds_prompt_then_demonstration():
    h = Harness(correct=lambda q: 0)
    qs = make_questions(8)
    ctl = make_controller(h, qs, N=4, G=2, M=4)
    run(ctl, 1)
    b = h.sft_batches[0]
    toks = b.micro_batches.tokens_bxT.reshape(-1, b.micro_batches.tokens_bxT.shape[-1])
    mask = b.micro_batches.loss_mask_bxT.reshape(toks.shape)
    for row, q in enumerate(h.sft_ids(0)):
        want = qs[q].prompt_ids + qs[q].demo_ids
        np.testing.assert_array_equal(toks[row, :len(want)], want)
        np.testing.assert_array_equal(np.nonzero(mask[row])[0],
                                      np.arange(len(qs[q].prompt_ids), len(want)))
    assert float(b.num_tokens) == sum(len(qs[q].demo_ids) for q in h.sft_ids(0))


def test_oldest_order_takes_the_oldest_first():
    h = Harness(correct=lambda q: 0)
    ctl = make_controller(h, make_questions(12), N=4, G=2, M=6, buffer_order="oldest")
    run(ctl, 2)
    it = [s[0] for s in h.samples]
    assert h.sft_ids(0) == it[0][::-1] + it[1][::-1][:2]
    assert ctl.buffer.items == it[1][:2]


def test_all_right_never_fires():
    h = Harness(correct=lambda q: 2)
    ctl = make_controller(h, make_questions(12), N=4, G=2, M=2)
    _, ms = run(ctl, 4)
    assert not h.sft_batches and len(ctl.buffer) == 0
    assert all(m["buffer/sft_fired"] == 0 and m["rollout/solve_all_frac"] == 1.0 for m in ms)


def test_questions_without_demonstrations_never_enter_the_buffer():
    h = Harness(correct=lambda q: 0)
    has_demo = lambda q: q % 3 != 0  # noqa: E731
    ctl = make_controller(h, make_questions(12, has_demo), N=4, G=2, M=100)
    _, ms = run(ctl, 6)  # two epochs, nothing flushed (M = 100)
    sampled = [q for s in h.samples for q in s[0]]
    assert ctl.buffer.items == [q for s in reversed(h.samples) for q in s[0] if has_demo(q)]
    assert all(has_demo(q) for q in ctl.buffer.items) and len(ctl.buffer) == 16
    assert [m["buffer/hardest_in_batch"] for m in ms] == [
        sum(has_demo(q) for q in s[0]) for s in h.samples]
    assert len(sampled) == 24


@pytest.mark.parametrize("threshold,expected",
                         [(0.0, [0]), (0.25, [0, 1, 2]), (0.375, [0, 1, 2, 3])])
def test_pass_rate_threshold(threshold, expected):
    # G = 8; question q solves min(q, 8) of them: pass rates 0, 1/8, 2/8, 3/8.
    h = Harness(correct=lambda q: q)
    ctl = make_controller(h, make_questions(4), N=4, G=8, M=100, hardest_max_pass_rate=threshold)
    _, ms = run(ctl, 1)
    assert sorted(ctl.buffer.items) == expected
    assert ms[0]["buffer/hardest_in_batch"] == len(expected)


# ----------------------------------------------------------------------------- modes

def test_mode_rl_never_calls_sft():
    h = Harness(correct=lambda q: 0)
    ctl = make_controller(h, make_questions(12), mode="rl", N=4, G=2, M=2)
    state, ms = run(ctl, 4)
    assert not h.sft_batches and state.sft == 0 and len(h.rl_batches) == 4
    assert len(ctl.buffer) == 0 and all(m["buffer/sft_fired"] == 0 for m in ms)


def test_mode_sft_never_samples():
    h = Harness()
    h.sample_fn = h.score_fn = None  # calling either would raise
    has_demo = lambda q: q % 2 == 0  # noqa: E731
    ctl = make_controller(h, make_questions(12, has_demo), mode="sft", M=4)
    state, ms = run(ctl, 3)
    assert state == StubState(params=None, rl=0, sft=3) and not h.rl_batches
    ids = [h.sft_ids(i) for i in range(3)]
    assert all(len(x) == 4 and len(set(x)) == 4 and all(has_demo(q) for q in x) for x in ids)
    # The demonstration cursor walks an epoch of the 6 demonstrated questions before repeating.
    assert sorted(ids[0] + ids[1][:2]) == [0, 2, 4, 6, 8, 10]
    assert all(m["buffer/sft_fired"] == 1 for m in ms)
    assert not any(k.startswith("rollout/") for m in ms for k in m)


def test_mode_sft_then_rl_switches_after_sft_iterations():
    h = Harness(correct=lambda q: 0)
    ctl = make_controller(h, make_questions(12), mode="sft_then_rl", M=3, sft_iterations=2)
    state, ms = run(ctl, 5)
    assert len(h.sft_batches) == 2 and state.sft == 2  # iterations 0 and 1 only
    assert len(h.samples) == 3 and len(h.rl_batches) == 3  # iterations 2, 3, 4
    assert [m["buffer/sft_fired"] for m in ms] == [1, 1, 0, 0, 0]
    assert ["rollout/reward_mean" in m for m in ms] == [False, False, True, True, True]
    assert len(ctl.buffer) == 0  # all wrong, but RL after SFT does not buffer


def test_mode_relift_uniform_fires_every_k_on_distinct_demonstrated_ids():
    h = Harness(correct=lambda q: 2)  # all right: a ReLIFT buffer would never fire
    has_demo = lambda q: q % 4 != 1  # noqa: E731
    ctl = make_controller(h, make_questions(16, has_demo), mode="relift_uniform", M=5,
                          uniform_every=3)
    _, ms = run(ctl, 9)
    assert [m["buffer/sft_fired"] for m in ms] == [0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert len(h.sft_batches) == 3 and len(ctl.buffer) == 0
    for i in range(3):
        ids = h.sft_ids(i)
        assert len(ids) == 5 and len(set(ids)) == 5 and all(has_demo(q) for q in ids)
    assert h.sft_ids(0) != h.sft_ids(1)  # random picks, not the same five each time


def test_mode_rl_with_sft_loss_attaches_demonstrations_to_every_rl_batch():
    h = Harness(correct=lambda q: 1)
    has_demo = lambda q: q % 2 == 0  # noqa: E731
    qs = make_questions(12, has_demo)
    ctl = make_controller(h, qs, mode="rl_with_sft_loss", N=4, G=2, M=2,
                          rl=RLConfig(num_mini_batches=2))
    run(ctl, 3)
    assert not h.sft_batches and len(h.rl_batches) == 6
    assert any(b.micro_batches.sft is not None for b in h.rl_batches)
    for i, b in enumerate(h.rl_batches):
        demo_qs = [q for q in h.samples[i // 2][0] if has_demo(q)]
        if not demo_qs:  # no demonstration among this iteration's questions: nothing to attach
            assert b.micro_batches.sft is None
            continue
        s = b.micro_batches.sft
        M = b.micro_batches.tokens_bxT.shape[0]
        assert s.tokens_bxT.shape[0] == M  # one slice of demonstrations per RL micro-batch
        toks = s.tokens_bxT.reshape(-1, s.tokens_bxT.shape[-1])
        valid = s.segment_ids_bxT.reshape(toks.shape)
        got = [int(t[0]) - BASE for t, v in zip(toks, valid) if v.any()]
        assert got == demo_qs
        assert float(b.sft_num_tokens) == sum(len(qs[q].demo_ids) for q in demo_qs)
        assert float(s.loss_mask_bxT.sum()) == float(b.sft_num_tokens)


def test_dynamic_filter_drops_all_equal_groups():
    # G = 4: q % 4 == 0 all wrong, 1 all right, 2 half right, 3 one right.
    solved = lambda q: [0, 4, 2, 1][q % 4]  # noqa: E731
    h = Harness(correct=solved)
    ctl = make_controller(h, make_questions(8), mode="rl", N=8, G=4,
                          rl=RLConfig(num_mini_batches=1, dynamic_filter=True))
    _, ms = run(ctl, 1)
    (b,) = h.rl_batches
    toks = b.micro_batches.tokens_bxT.reshape(-1, b.micro_batches.tokens_bxT.shape[-1])
    valid = b.micro_batches.segment_ids_bxT.reshape(toks.shape)
    rows_q = [int(t[0]) - BASE for t, v in zip(toks, valid) if v.any()]
    kept = [q for q in h.samples[0][0] if q % 4 in (2, 3)]
    assert len(kept) == 4 and rows_q == [q for q in kept for _ in range(4)]
    assert ms[0]["rollout/kept_frac"] == pytest.approx(0.5)
    # Dr.GRPO advantages of the kept groups: reward - group mean.
    adv_bxT = b.micro_batches.advantages_bxT.reshape(toks.shape)
    adv = [a[m > 0][0] for a, m in zip(adv_bxT, b.micro_batches.loss_mask_bxT.reshape(toks.shape))
           if m.any()]
    want = [(1.0 if g < solved(q) else 0.0) - solved(q) / 4 for q in kept for g in range(4)]
    np.testing.assert_allclose(adv, want, atol=1e-6)
    # Without the filter, every row trains.
    h2 = Harness(correct=solved)
    run(make_controller(h2, make_questions(8), mode="rl", N=8, G=4), 1)
    assert int((h2.rl_batches[0].micro_batches.segment_ids_bxT > 0).any(-1).sum()) == 32


def test_dynamic_filter_skips_the_update_when_every_group_is_uniform():
    h = Harness(correct=lambda q: 0)
    ctl = make_controller(h, make_questions(8), mode="relift", N=4, G=4, M=100,
                          rl=RLConfig(dynamic_filter=True))
    state, ms = run(ctl, 1)
    assert not h.rl_batches and state.rl == 0 and ms[0]["rollout/kept_frac"] == 0.0
    assert len(ctl.buffer) == 4  # the hardest are still buffered


# ----------------------------------------------------------------------------- checkpoint state

@pytest.mark.parametrize("mode", ["relift", "sft", "relift_uniform"])
def test_state_dict_round_trip_continues_identically(mode):
    correct = lambda q: [0, 0, 1, 2][q % 4]  # noqa: E731  (some hardest, some not)
    qs = make_questions(10, lambda q: q != 7)
    kw = dict(mode=mode, N=3, G=2, M=4, seed=3, uniform_every=2)

    def fresh():
        h = Harness(correct)
        return h, make_controller(h, qs, **kw)

    h_a, a = fresh()
    state_a, _ = run(a, 7)  # the uninterrupted reference: 7 iterations

    h_b, b = fresh()
    state_b, _ = run(b, 3)
    saved = json.loads(json.dumps(b.state_dict()))  # what a checkpoint stores
    if mode == "relift":
        assert saved["buffer"], "the round trip should carry a non-empty buffer"
    h_c, c = fresh()
    c.load_state_dict(saved)
    state_c, ms_c = run(c, 4, state=state_b)

    assert h_b.samples + h_c.samples == h_a.samples  # same questions, same seeds
    assert [h_b.sft_ids(i) for i in range(len(h_b.sft_batches))] + \
           [h_c.sft_ids(i) for i in range(len(h_c.sft_batches))] == \
           [h_a.sft_ids(i) for i in range(len(h_a.sft_batches))]
    assert c.state_dict() == a.state_dict() and state_c == state_a


# ----------------------------------------------------------------------------- metrics, real steps

def test_metrics_with_the_real_steps_on_a_tiny_model():
    from relift_jax import model
    from relift_jax.train_step import (init_state, jit_step, make_optimizer, make_schedule,
                                       rl_train_step, sft_train_step)
    cfg = model.ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32,
                            intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8)
    rl = RLConfig(learning_rate=1e-3, num_mini_batches=2, micro_batch_size=4)
    sft = SFTConfig(buffer_size=4, learning_rate=1e-3, micro_batch_size=4)
    rl_tx, sft_tx = make_optimizer(rl.optim()), make_optimizer(sft.optim())
    state = init_state(model.init_params(cfg, jax.random.key(0)), rl_tx, sft_tx)
    # G = 2; q % 4 == 0 none right (hardest), 1 one right, else both right.
    h = Harness(correct=lambda q: [0, 1, 2, 2][q % 4])
    ctl = Controller(
        questions=make_questions(8), train=TrainConfig(mode="relift"),
        rollout=RolloutConfig(questions_per_iteration=4, group_size=2, max_response_len=16),
        rl=rl, sft=sft, packing=Packing(micro_batch_size=4, pad_id=0),
        rl_step=jit_step(rl_train_step, config=cfg, rl=rl, tx=rl_tx,
                         schedule=make_schedule(rl.optim()), norm_len=16),
        sft_step=jit_step(sft_train_step, config=cfg, sft=sft, tx=sft_tx,
                          schedule=make_schedule(sft.optim())),
        sample_fn=h.sample_fn, score_fn=h.score_fn)
    ms = []
    for _ in range(4):  # two epochs of 8: four hardest questions in all, so SFT fires once
        state, m = ctl.step(state)
        ms.append(m)
    assert int(state.rl_steps) == 8 and int(state.sft_steps) == 1
    sizes, fired, size = [], [], 0
    for qids, _, _ in h.samples:  # the buffer by hand
        size += sum(q % 4 == 0 for q in qids)
        fired.append(int(size >= 4))
        size -= 4 * fired[-1]
        sizes.append(size)
    fire_at = fired.index(1)

    documented = ["rollout/reward_mean", "rollout/solve_all_frac", "rollout/solve_none_frac",
                  "rollout/response_len_mean", "rollout/response_len_max", "buffer/size",
                  "buffer/sft_fired", "buffer/demos_used", "buffer/demos_used_frac",
                  "rl/loss", "rl/clip_frac", "rl/entropy", "rl/grad_norm", "rl/lr",
                  "perf/time_sample_s", "perf/time_rl_s", "perf/time_sft_s",
                  "perf/sample_tokens_per_s", "perf/train_tokens_per_s"]
    for m in ms:
        missing = [k for k in documented if k not in m]
        assert not missing, missing
        # Step scalars stay on the device (the loop fetches them one iteration late); host ones
        # are plain numbers. Either way each is one finite scalar.
        assert all(isinstance(m[k], jax.Array) for k in m if k.startswith(("rl/", "sft/"))
                   and not k.endswith(("num_tokens", "num_seqs")))
        assert all(isinstance(v, (int, float)) for k, v in m.items()
                   if not k.startswith(("rl/", "sft/")))
        assert all(np.ndim(v) == 0 and np.isfinite(float(v)) for v in m.values())
    assert not any(k.startswith("sft/") for i, m in enumerate(ms) if i != fire_at for k in m)
    for k in ("sft/loss", "sft/nll", "sft/entropy", "sft/grad_norm", "sft/lr"):
        assert k in ms[fire_at], k
    assert ms[fire_at]["sft/lr"] == pytest.approx(1e-3) and ms[0]["rl/lr"] == pytest.approx(1e-3)
    assert [m["buffer/size"] for m in ms] == sizes
    assert [m["buffer/sft_fired"] for m in ms] == fired
    # The four SFT rows are questions 0 and 4 twice each: demos_used counts distinct questions.
    assert ms[-1]["buffer/demos_used"] == 2 and ms[-1]["buffer/demos_used_frac"] == 0.25

    # Rollout statistics, recomputed from what the stub sampled.
    for m, (qids, G, _) in zip(ms, h.samples):
        right = [[g < [0, 1, 2, 2][q % 4] for g in range(G)] for q in qids]
        lens = [2 + (q + g) % 4 for q in qids for g in range(G)]
        assert m["rollout/reward_mean"] == pytest.approx(np.mean(right))
        assert m["rollout/solve_all_frac"] == pytest.approx(np.mean([all(r) for r in right]))
        assert m["rollout/solve_none_frac"] == pytest.approx(np.mean([not any(r) for r in right]))
        assert m["rollout/response_len_mean"] == pytest.approx(np.mean(lens))
        assert m["rollout/response_len_max"] == max(lens)
        assert m["rl/grad_norm"] > 0 and m["rl/entropy"] > 0
