"""Demonstration sources (relift_jax.demos) and the buffer rules that use them.

A fake teacher (injected sampler and scorer: question q's try t is accepted iff t >= first_ok(q))
pins down which demonstration is kept, the tries, the cache and its reuse; one test samples a tiny
random Hugging Face teacher (its own byte-level tokenizer, not the student's) through the real
sampler and grades it with a reward a random model sometimes earns (tests/reward_workers.py); the
controller tests reuse test_controller's stub harness; the end-to-end run is the tiny config with
a teacher, interrupted and resumed.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from relift_jax import demos
from relift_jax.batches import Packing
from relift_jax.config import (ConfigError, DataConfig, ModelLoadConfig, RLConfig, RolloutConfig,
                               RunConfig, SFTConfig, TeacherConfig, TrainConfig)
from relift_jax.controller import Controller, Rollouts
from relift_jax.data import Example
from test_controller import BASE, Harness, make_controller, make_questions, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 3  # tries of the fake teacher


def examples(n: int) -> list[Example]:
    return [Example(index=100 + q, messages=({"role": "user", "content": f"question {q}"},),
                    ground_truth=str(q), demonstration=None, data_source="t") for q in range(n)]


class FakeTeacher:
    """Question q's try t is right iff t >= first_ok(q) (first_ok(q) >= K: never right)."""

    def __init__(self, first_ok):
        self.first_ok = first_ok
        self.calls: list[tuple[list[int], int, int]] = []  # (questions, k, seed)

    def sample_fn(self, params, prompts, k, seed):
        qids = [p[0] for p in prompts]
        self.calls.append((qids, k, seed))
        tokens = [[q, t, seed % 97] for q in qids for t in range(k)]
        return Rollouts(tokens, [[0.0] * 3 for _ in tokens], np.ones(len(tokens), bool))

    def score_fn(self, token_lists, truths, names):
        assert [str(t[0]) for t in token_lists] == list(truths)
        return [float(t >= self.first_ok(q)) for q, t, _ in token_lists]

    def source(self, run_dir, n: int, *, write: bool = True) -> demos.TeacherDemos:
        return demos.TeacherDemos(
            run_dir=str(run_dir), examples=examples(n), params=None,
            prompt_fn=lambda ex: [ex.index - 100], sample_fn=self.sample_fn,
            score_fn=self.score_fn, text_fn=lambda ids: f"q{ids[0]} try {ids[1]} s{ids[2]}",
            encode_fn=lambda text: [BASE + 60 + len(text), 51, 2], tries=K, seed=5,
            think_prefix="<think>\n", write=write)


def read_cache(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, demos.CACHE_FILE)) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- the teacher, faked

def test_teacher_keeps_the_first_accepted_answer_and_caches_every_result(tmp_path):
    first_ok = lambda q: [0, 1, 5][q % 3]  # noqa: E731  (q % 3 == 2: never accepted)
    t = FakeTeacher(first_ok)
    src = t.source(tmp_path, 9)
    reply = src.request([4, 2, 3, 8, 0], iteration=7)
    (qids, k, seed), = t.calls
    assert qids == [4, 2, 3, 8, 0] and k == K and seed == demos.teacher_seed(5, 7)
    assert reply.ids == [4, 3, 0]  # the asked order, only the accepted
    assert (reply.requests, reply.accepted, reply.tries) == (5, 3, 2 + K + 1 + K + 1)
    for q in (4, 3, 0):
        text = f"<think>\nq{q} try {first_ok(q)} s{seed % 97}"
        assert src.results[q].demonstration == text
        assert src.get(q) == [BASE + 60 + len(text), 51, 2]
    with pytest.raises(KeyError):
        src.get(2)
    rows = read_cache(tmp_path)
    assert [r["question"] for r in rows] == [4, 2, 3, 8, 0]
    assert all(r["iteration"] == 7 and r["batch"] == 5 for r in rows)
    assert [r["row"] for r in rows] == [104, 102, 103, 108, 100]
    assert [r["text"] for r in rows] == [f"question {q}" for q in (4, 2, 3, 8, 0)]
    assert [r["tries"] for r in rows] == [2, K, 1, K, 1]
    assert [r["demonstration"] is None for r in rows] == [False, True, False, True, False]

    # Asked again (a later epoch): the cache answers, nothing is sampled, nothing counted anew.
    again = src.request([2, 4, 5], iteration=9)
    assert [c[0] for c in t.calls] == [[4, 2, 3, 8, 0], [5]]  # only the new question
    assert again.ids == [4] and (again.requests, again.accepted) == (1, 0)
    assert len(read_cache(tmp_path)) == 6


def test_a_resumed_source_reads_the_cache_and_never_asks_again(tmp_path):
    t = FakeTeacher(lambda q: q % 4)  # q % 4 == 3: never
    a = t.source(tmp_path, 12)
    a.request([0, 1, 2, 3], 0)
    a.request([7, 6], 1)

    t2 = FakeTeacher(None)
    t2.sample_fn = None  # calling it would raise
    b = t2.source(tmp_path, 12)
    reply = b.request([3, 6, 1, 7], 1)  # iteration 1 replayed after a resume
    assert reply.ids == [6, 1]  # 3 and 7 cached failures stay failures
    assert (reply.requests, reply.accepted, reply.tries) == (2, 1, K + 3)  # 6 and 7 are iteration 1's
    for q in (0, 1, 2, 6):
        assert b.get(q) == a.get(q)
    assert len(read_cache(tmp_path)) == 6  # nothing appended


def test_a_torn_batch_is_dropped_and_sampled_again_identically(tmp_path):
    t = FakeTeacher(lambda q: q % 2)
    a = t.source(tmp_path / "a", 8)
    a.request([0, 1], 0)
    a.request([5, 2, 3], 1)
    whole = (tmp_path / "a" / demos.CACHE_FILE).read_text()

    # A process killed in the middle of iteration 1's write: its first line whole, the next torn.
    lines = whole.splitlines(keepends=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / demos.CACHE_FILE).write_text("".join(lines[:3]) + lines[3][:17])
    t_b = FakeTeacher(lambda q: q % 2)
    b = t_b.source(tmp_path / "b", 8)
    assert sorted(b.results) == [0, 1]  # iteration 1's incomplete batch is gone
    assert (tmp_path / "b" / demos.CACHE_FILE).read_text() == "".join(lines[:2])
    b.request([5, 2, 3], 1)
    assert t_b.calls == [([5, 2, 3], K, demos.teacher_seed(5, 1))]  # the same batch, same seed
    assert (tmp_path / "b" / demos.CACHE_FILE).read_text() == whole


def test_only_process_0_writes_and_a_cache_of_other_data_is_refused(tmp_path):
    t = FakeTeacher(lambda q: 0)
    t.source(tmp_path / "w", 4, write=False).request([1], 0)
    assert not os.path.exists(tmp_path / "w" / demos.CACHE_FILE)

    t.source(tmp_path, 4).request([1, 2], 0)
    with pytest.raises(ConfigError) as e:
        demos.TeacherDemos(run_dir=str(tmp_path), examples=examples(2), params=None,
                           prompt_fn=None, sample_fn=None, score_fn=None, text_fn=None,
                           encode_fn=lambda s: [1], tries=K, seed=0)
    assert "question 2" in str(e.value) and "\n" not in str(e.value)


def test_a_prompt_too_long_for_the_teacher_is_a_failure_without_tries(tmp_path):
    t = FakeTeacher(lambda q: 0)
    src = t.source(tmp_path, 4)
    src.prompt_fn = lambda ex: None if ex.index == 102 else [ex.index - 100]
    reply = src.request([1, 2, 3], 0)
    assert reply.ids == [1, 3] and t.calls[0][0] == [1, 3]
    assert src.results[2].tries == 0 and src.results[2].demonstration is None


# ----------------------------------------------------------------------------- the controller

def teacher_controller(run_dir, first_ok, correct, *, N, G, M, seed=0):
    """test_controller's harness with the fake teacher as the source; no column at all."""
    h, t = Harness(correct), FakeTeacher(first_ok)
    ctl = Controller(
        questions=make_questions(12, lambda q: False), train=TrainConfig(seed=seed),
        rollout=RolloutConfig(questions_per_iteration=N, group_size=G),
        rl=RLConfig(num_mini_batches=1), sft=SFTConfig(buffer_size=M, demo_source="teacher"),
        packing=Packing(micro_batch_size=4, pad_id=0, length_multiple=8),
        rl_step=h.rl_step, sft_step=h.sft_step, sample_fn=h.sample_fn, score_fn=h.score_fn,
        demos=t.source(run_dir, 12))
    return h, t, ctl


def test_controller_buffers_only_questions_the_teacher_solved(tmp_path):
    first_ok = lambda q: 1 if q % 3 else K  # noqa: E731  (q % 3 == 0: the teacher fails)
    correct = lambda q: 0 if q < 8 else 2  # noqa: E731  (questions 0-7 are hardest)
    h, t, ctl = teacher_controller(tmp_path, first_ok, correct, N=4, G=2, M=100)
    state, ms = run(ctl, 6)  # two epochs
    assert sorted(q for c in t.calls for q in c[0]) == list(range(8))  # each asked once
    assert ctl.buffer.items == [q for s in reversed(h.samples) for q in s[0] if q < 8 and q % 3]
    assert ctl.counters["teacher_requests"] == 8
    assert ctl.counters["teacher_accepted"] == sum(1 for q in range(8) if q % 3)
    assert ctl.counters["teacher_tries"] == sum(2 if q % 3 else K for q in range(8))
    assert ctl.counters["hardest_without_demo"] == 2 * sum(q % 3 == 0 for q in range(8))
    for m, (qids, _, _) in zip(ms[:3], h.samples[:3]):
        asked = [q for q in qids if q < 8]
        assert m["demos/teacher_requests"] == len(asked)
        assert m["demos/teacher_accepted"] == sum(1 for q in asked if q % 3)
        assert m["buffer/hardest_without_demo"] == sum(q % 3 == 0 for q in asked)
        assert m["buffer/hardest_in_batch"] == sum(1 for q in asked if q % 3)
        if asked:
            assert m["demos/teacher_tries_mean"] == pytest.approx(
                np.mean([2 if q % 3 else K for q in asked]))
    assert all(m["demos/teacher_requests"] == 0 for m in ms[3:])  # epoch 2: all cached
    assert "perf/time_demos_s" in ms[0]
    assert not h.sft_batches  # M = 100


def test_sft_batch_holds_the_teachers_demonstration(tmp_path):
    h, t, ctl = teacher_controller(tmp_path, lambda q: 0, lambda q: 0, N=4, G=2, M=4)
    run(ctl, 1)
    b = h.sft_batches[0]
    toks = b.micro_batches.tokens_bxT.reshape(-1, b.micro_batches.tokens_bxT.shape[-1])
    for row, q in enumerate(h.sft_ids(0)):
        want = ctl.q[q].prompt_ids + ctl.demos.get(q)
        np.testing.assert_array_equal(toks[row, :len(want)], want)


def test_teacher_controller_resumes_exactly_from_its_state_and_cache(tmp_path):
    first_ok = lambda q: [0, 1, K][q % 3]  # noqa: E731
    correct = lambda q: [0, 0, 1, 2][q % 4]  # noqa: E731
    kw = dict(N=3, G=2, M=4, seed=3)
    h_a, t_a, a = teacher_controller(tmp_path / "a", first_ok, correct, **kw)
    state_a, _ = run(a, 9)

    h_b, t_b, b = teacher_controller(tmp_path / "b", first_ok, correct, **kw)
    state_b, _ = run(b, 4)
    saved = json.loads(json.dumps(b.state_dict()))
    run(b, 2)  # past the checkpoint: the cache holds these iterations' results too
    h_c, t_c, c = teacher_controller(tmp_path / "b", first_ok, correct, **kw)
    c.load_state_dict(saved)
    state_c, _ = run(c, 5, state=state_b)

    assert c.state_dict() == a.state_dict() and state_c == state_a
    assert c.counters["teacher_requests"] > 0 and c.counters["hardest_without_demo"] > 0
    assert [h_c.sft_ids(i) for i in range(len(h_c.sft_batches))] == \
        [h_a.sft_ids(i) for i in range(len(h_a.sft_batches))][-len(h_c.sft_batches):]
    assert read_cache(tmp_path / "a") == read_cache(tmp_path / "b")
    asked_c = [q for call in t_c.calls for q in call[0]]
    assert not set(asked_c) & {q for call in t_b.calls for q in call[0]}  # never asked twice


# ----------------------------------------------------------------------------- hardest_visits

def test_a_question_enters_the_buffer_on_its_second_hardest_visit():
    h = Harness(correct=lambda q: 0 if q % 2 else 2)  # odd questions always fail
    ctl = make_controller(h, make_questions(8), N=4, G=2, M=100, hardest_visits=2)
    _, ms = run(ctl, 2)  # one epoch: every odd question hardest once
    assert len(ctl.buffer) == 0 and all(m["buffer/hardest_in_batch"] == 0 for m in ms)
    assert ctl.state_dict()["hardest_visits"] == [[q, 1] for q in (1, 3, 5, 7)]
    _, ms = run(ctl, 2)  # the second epoch: each enters at its second hardest visit
    assert ctl.buffer.items == [q for s in reversed(h.samples[2:]) for q in s[0] if q % 2]
    assert [m["buffer/hardest_in_batch"] for m in ms] == [
        sum(q % 2 for q in s[0]) for s in h.samples[2:]]

    saved = json.loads(json.dumps(ctl.state_dict()))
    h2 = Harness(correct=lambda q: 0 if q % 2 else 2)
    again = make_controller(h2, make_questions(8), N=4, G=2, M=100, hardest_visits=2)
    again.load_state_dict(saved)
    assert again.state_dict() == ctl.state_dict()
    assert again.hardest_visits == {q: 2 for q in (1, 3, 5, 7)}


def test_hardest_visits_1_keeps_todays_state_and_old_checkpoints_load():
    h = Harness(correct=lambda q: 0)
    ctl = make_controller(h, make_questions(8), N=4, G=2, M=100)
    run(ctl, 1)
    d = ctl.state_dict()
    assert "hardest_visits" not in d and d["counters"]["hardest_without_demo"] == 0
    old = json.loads(json.dumps(d))
    del old["counters"]["hardest_without_demo"]  # a checkpoint written before the counter
    fresh = make_controller(Harness(), make_questions(8), N=4, G=2, M=100)
    fresh.load_state_dict(old)
    assert fresh.state_dict() == d


# ----------------------------------------------------------------------------- config errors

def _one_line(e) -> str:
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in msg, msg
    return msg


def _run_config(**kw) -> RunConfig:
    return RunConfig(model=ModelLoadConfig(path="m"), data=DataConfig(train="t"), **kw)


@pytest.mark.parametrize("make,names", [
    (lambda: SFTConfig(demo_source="oracle"), ("SFTConfig.demo_source", "oracle", "column")),
    (lambda: SFTConfig(hardest_visits=0), ("SFTConfig.hardest_visits = 0",)),
    (lambda: TeacherConfig(tries=0), ("TeacherConfig.tries = 0",)),
    (lambda: TeacherConfig(temperature=-1.0), ("TeacherConfig.temperature",)),
    (lambda: TeacherConfig(max_response_len=0), ("TeacherConfig.max_response_len",)),
    (lambda: TeacherConfig(decode_tensor=-1), ("TeacherConfig.decode_tensor",)),
    (lambda: TeacherConfig(param_dtype="int8"), ("TeacherConfig.param_dtype", "int8")),
    (lambda: _run_config(sft=SFTConfig(demo_source="teacher"), teacher=TeacherConfig(path="x"),
                         train=TrainConfig(mode="sft")),
     ("SFTConfig.demo_source = 'teacher'", "TrainConfig.mode 'relift'", "'sft'")),
    (lambda: _run_config(sft=SFTConfig(demo_source="teacher")),
     ("SFTConfig.demo_source = 'teacher'", "TeacherConfig.path")),
    (lambda: _run_config(sft=SFTConfig(hardest_visits=2), train=TrainConfig(mode="rl")),
     ("SFTConfig.hardest_visits = 2", "TrainConfig.mode 'relift'", "'rl'")),
])
def test_config_errors_name_the_binding(make, names):
    with pytest.raises(ConfigError) as e:
        make()
    msg = _one_line(e)
    assert all(n in msg for n in names), msg


def test_config_errors_from_the_command_line(tmp_path, capsys):
    from relift_jax import main

    def error(*bindings) -> str:
        with pytest.raises(SystemExit) as e:
            main.main([f"--gin_file={REPO}/gin/tests/tiny_e2e.gin",
                       f"--run_dir={tmp_path}/never", *bindings])
        assert e.value.code == 2 and not os.path.exists(tmp_path / "never")
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    assert "TeacherConfig.path" in error("--gin.SFTConfig.demo_source='teacher'")
    assert "TeacherConfig.tries = 0" in error("--gin.TeacherConfig.tries=0")
    msg = error("--gin.SFTConfig.demo_source='teacher'",
                f"--gin.TeacherConfig.path='{tmp_path}/absent'")
    assert "TeacherConfig.path" in msg and "absent" in msg


def test_an_absent_teacher_is_built_first_by_its_recipe(tmp_path, monkeypatch):
    from relift_jax import main, train
    teacher = tmp_path / "teacher"
    runs = []

    def fake_run(run_dir, configs, **kw):
        runs.append(run_dir)
        if run_dir == str(teacher):
            os.makedirs(teacher / "export" / "final")
        return {}
    monkeypatch.setattr(train, "run", fake_run)
    job = main.load_job([f"{REPO}/gin/tests/tiny_e2e.gin"], [
        "SFTConfig.demo_source = 'teacher'", f"TeacherConfig.path = '{teacher}/export/final'",
        f"TeacherConfig.build_gin = '{REPO}/gin/tests/tiny_e2e.gin'",
        f"TeacherConfig.build_run_dir = '{teacher}'"], run_dir=str(tmp_path / "r"))
    main.run_job(job)
    assert runs == [str(teacher), str(tmp_path / "r")]


# ----------------------------------------------------------------------------- the real teacher

def test_real_teacher_sampled_with_our_sampler_gives_only_verified_demonstrations(tmp_path):
    """A tiny random Qwen2.5-style teacher (byte-level tokenizer; the student's is the toy one)
    sampled by the rollout engine; the fifths reward (tests/reward_workers.py) accepts about one
    answer in five, so some questions get a demonstration and some do not."""
    from hf_fixtures import make_qwen25_style_folder
    from reward_workers import fifths_reward

    from relift_jax import build, encoding, hf, sharding
    from relift_jax.reward import RewardScorer
    from relift_jax.toy.tokenizer import TOKENIZER_DIR

    folder = make_qwen25_style_folder(tmp_path / "teacher")
    c = RunConfig(
        model=ModelLoadConfig(path="unused"), data=DataConfig(train="unused"),
        train=TrainConfig(seed=2, reward="reward_workers:fifths_reward"),
        rollout=RolloutConfig(max_prompt_len=64, max_response_len=12, group_size=2),
        sft=SFTConfig(demo_source="teacher"), teacher=TeacherConfig(path=folder, tries=4))
    student_tok = hf.load_tokenizer(str(TOKENIZER_DIR))
    exs = examples(10)
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
    import jax
    with jax.set_mesh(mesh), RewardScorer(c.train.reward, num_workers=0) as scorer:
        src = build.make_teacher_demos(c, str(tmp_path / "run"), exs, student_tok, scorer, mesh)
        reply = src.request(list(range(10)), iteration=3)
        # Independently: the same draws again, graded here, the first accepted kept.
        ro = src.sample_fn(src.params, [src.prompt_fn(ex) for ex in exs], 4,
                           demos.teacher_seed(2, 3))
    teacher_tok = hf.load_tokenizer(folder)
    assert 0 < len(reply.ids) < 10, reply  # both outcomes occur
    for q, ex in enumerate(exs):
        texts = [src.text_fn(ro.tokens[q * 4 + t]) for t in range(4)]
        ok = [fifths_reward(x, ex.ground_truth) == 1.0 for x in texts]
        r = src.results[q]
        if any(ok):
            first = ok.index(True)
            assert q in reply.ids and r.tries == first + 1
            assert r.demonstration == "<think>\n" + texts[first]
            assert fifths_reward(r.demonstration[len("<think>\n"):], ex.ground_truth) == 1.0
            want, _ = encoding.encode_demonstration(student_tok, r.demonstration, max_len=12,
                                                    eos_id=student_tok.eos_token_id)
            assert src.get(q) == want  # encoded for the student, with the student's EOS
        else:
            assert q not in reply.ids and r.tries == 4 and r.demonstration is None
    # The teacher's prompts are its own ChatML rendering, not the student's.
    assert src.prompt_fn(exs[0]) == teacher_tok(encoding.render_prompt(
        teacher_tok, exs[0].messages), add_special_tokens=False)["input_ids"]
    assert [r["question"] for r in read_cache(tmp_path / "run")] == list(range(10))


# ----------------------------------------------------------------------------- end to end

# The tiny end-to-end config with a teacher, trimmed for compile time: a one-layer student, one
# RL step per iteration, no mismatch forward, no held-out evaluation; a reward a random model
# sometimes earns, so some questions are hardest and some of those get a teacher demonstration.
E2E = ["--gin.ModelLoadConfig.random_init={'hidden_size': 32, 'intermediate_size': 64, "
       "'num_layers': 1, 'num_heads': 2, 'num_kv_heads': 1, 'head_dim': 16, "
       "'tie_word_embeddings': True, 'max_position_embeddings': 256}",
       "--gin.TrainConfig.iterations=4", "--gin.TrainConfig.save_every=2",
       "--gin.TrainConfig.eval_every=0", "--gin.TrainConfig.export_best=False",
       "--gin.TrainConfig.reward='reward_workers:fifths_reward'",
       "--gin.TrainConfig.reward_workers=0", "--gin.DataConfig.heldout=None",
       "--gin.RLConfig.num_mini_batches=1", "--gin.RLConfig.log_logprob_mismatch=False",
       "--gin.RolloutConfig.max_response_len=16",
       "--gin.SFTConfig.demo_source='teacher'", "--gin.SFTConfig.buffer_size=2"]


def _controller_state(run_dir, step: int) -> dict:
    with open(os.path.join(run_dir, "checkpoints", str(step), "controller", "metadata")) as f:
        return json.load(f)["controller"]


@pytest.fixture
def compile_cache(tmp_path):
    """A persistent compilation cache for this test only: the three runs in this process build
    the same programs, so the second and third read them back instead of compiling again (the
    executables are the same, as test_e2e relies on across processes)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    cc.reset_cache()


def test_teacher_run_interrupted_and_resumed_equals_the_uninterrupted_one(tmp_path, compile_cache):
    import time

    from hf_fixtures import make_qwen25_style_folder
    from safetensors.numpy import load_file

    from relift_jax import main
    folder = make_qwen25_style_folder(tmp_path / "teacher")

    def go(run_dir, *extra):
        t0 = time.time()
        main.main([f"--gin_file={REPO}/gin/tests/tiny_e2e.gin", f"--run_dir={run_dir}", *E2E,
                   f"--gin.TeacherConfig.path='{folder}'", *extra])
        return time.time() - t0
    a, b = tmp_path / "a", tmp_path / "b"
    walls = [go(a), go(b, "--gin.run.stop_after=3"), go(b)]  # B1: checkpoint at 2, stops after 3
    print(f"\n[teacher e2e wall time] A {walls[0]:.1f}s, B1 {walls[1]:.1f}s, B2 {walls[2]:.1f}s")

    state = _controller_state(a, 4)
    assert _controller_state(b, 4) == state
    assert state["counters"]["teacher_requests"] > 0 and state["counters"]["sft_fired"] > 0
    cache = read_cache(a)
    assert cache == read_cache(b)  # the resumed run asked the teacher nothing twice
    assert len({r["question"] for r in cache}) == len(cache) == state["counters"]["teacher_requests"]
    assert {r["demonstration"] is None for r in cache} == {True, False}
    pa = load_file(os.path.join(a, "export", "final", "model.safetensors"))
    pb = load_file(os.path.join(b, "export", "final", "model.safetensors"))
    assert sorted(pa) == sorted(pb)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)  # same programs, same machine


def test_toy_teacher_recipes_parse():
    """gin/toy/teacher.gin: base.gin's model and tokenizer, trained on every level of the main
    job; gin/toy/relift_teacher.gin: the main job with that teacher, built when absent."""
    from relift_jax import main
    base, teacher, job, relift = (main.load_job([f"{REPO}/gin/toy/{name}.gin"]).configs for name
                                  in ("base", "teacher", "relift_teacher", "relift"))
    assert teacher.model == base.model and teacher.train.mode == "sft"
    levels = lambda spec: spec.split(":")[2]  # noqa: E731
    assert levels(teacher.data.train) == levels(relift.data.train) == "1,2,3,6,7"
    assert levels(teacher.data.heldout) == levels(relift.data.heldout)
    assert job.sft.demo_source == "teacher" and job.teacher.tries == 4
    assert job.teacher.path == "runs/toy/teacher/export/final"
    assert job.teacher.build_gin == "toy/teacher.gin" and job.teacher.build_run_dir == "runs/toy/teacher"
    assert main.load_job([f"{REPO}/gin/toy/teacher.gin"]).run_dir == job.teacher.build_run_dir
    assert dataclasses.replace(job, sft=relift.sft, teacher=relift.teacher) == relift
