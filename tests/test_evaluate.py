"""Tests for relift_jax.evaluate: registry and grouping on the packaged data, pass@k aggregation,
grading of real ground truths through evaluate(), resume, and the CLI end to end on a tiny random
model with a character-level tokenizer built here.

Expected counts come from docs/relift.md and an independent pandas reading of the shared data;
expected pass@k values from the closed form with math.comb.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types

import numpy as np
import pytest

from hf_fixtures import CHATML_TEMPLATE, make_byte_tokenizer, make_qwen25_style_folder
from relift_jax import benchmarks as bm
from relift_jax import data, eval_summary, gsm8k
from relift_jax import evaluate as ev
from relift_jax import records as rec
from relift_jax.data import Example

SHARED = os.environ.get("RELIFT_SHARED_DATA", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"))
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"]


# ---------------------------------------------------------------------------------------------
# Fixtures: a character-level tokenizer and a tiny random checkpoint in one Hugging Face folder
# ---------------------------------------------------------------------------------------------


def _make_tokenizer():
    """Byte-level BPE without merges: every byte is one token (so ASCII text is character-level
    and nothing is ever unknown), plus the Qwen special tokens, "</think>" among them. Byte-level
    because transformers 5 loads a folder whose config.json says qwen2 as Qwen2Tokenizer, which
    imposes the byte-level pre-tokenizer and decoder; a plain character vocabulary would lose its
    spaces there."""
    return make_byte_tokenizer(SPECIALS, eos="<|im_end|>", pad="<|endoftext|>",
                               chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, tokenizer): a tiny random qwen2 model saved with its tokenizer."""
    import jax
    import transformers

    from relift_jax import hf
    from relift_jax.model import ModelConfig, init_params

    tok = _make_tokenizer()
    config = ModelConfig(model_type="qwen2", vocab_size=len(tok), hidden_size=32,
                         intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, qkv_bias=True)  # Qwen2 has q/k/v biases
    params = init_params(config, jax.random.key(0))
    path = str(tmp_path_factory.mktemp("ckpt") / "hf")
    hf.save_checkpoint(config, params, path, tokenizer=tok)
    loaded = transformers.AutoTokenizer.from_pretrained(path)
    text = "a</think>b $x$\n\n  Janet\u2019s"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text and len(ids) == len(text.encode()) - 8 + 1
    return path, loaded


@pytest.fixture(scope="module")
def tokenizer():
    return _make_tokenizer()


# ---------------------------------------------------------------------------------------------
# Registry and grouping on the packaged data
# ---------------------------------------------------------------------------------------------

EXPECTED_QUESTIONS = {"aime24": 30, "aime25": 30, "amc": 83, "math500": 500, "minerva": 272,
                      "olympiad": 675, "arc_c": 1172, "gpqa": 198, "gsm8k": 1319}


def test_registry_defaults():
    assert list(bm.BENCHMARKS) == list(EXPECTED_QUESTIONS)
    settings = ev.EvalSettings()
    assert {n: settings.samples_for(n) for n in bm.BENCHMARKS} == {
        "aime24": 32, "aime25": 32, "amc": 32, "math500": 1, "minerva": 1, "olympiad": 1,
        "arc_c": 1, "gpqa": 1, "gsm8k": 1}
    assert settings.samples_for("heldout") == 1
    assert {n: b.reward for n, b in bm.BENCHMARKS.items()} == {
        **{n: "math" for n in bm.BENCHMARKS}, "arc_c": "choice", "gpqa": "choice"}
    assert set(bm.MATH_BENCHMARKS) == {"aime24", "aime25", "amc", "math500", "minerva", "olympiad"}
    assert set(bm.OOD_BENCHMARKS) == {"arc_c", "gpqa"}
    # Overrides: an int for every suite, a mapping for some.
    assert ev.EvalSettings(samples=4).samples_for("aime24") == 4
    s = ev.EvalSettings(samples={"aime24": 8})
    assert (s.samples_for("aime24"), s.samples_for("amc"), s.samples_for("math500")) == (8, 32, 1)


def test_grouping_counts_on_packaged_data():
    suites = bm.resolve_suites(list(bm.BENCHMARKS))
    assert {n: len(qs) for n, qs in suites.items()} == EXPECTED_QUESTIONS
    for name, qs in suites.items():
        repeats = {q.repeats for q in qs}
        assert repeats == ({32} if name in ("aime24", "aime25", "amc") else {1}), name
        assert [q.qid for q in qs] == list(range(len(qs)))
        assert {q.example.reward for q in qs} == {bm.BENCHMARKS[name].reward}
    # limit keeps the first questions in file order.
    limited = bm.resolve_suites(["aime24", "gsm8k"], limit=3)
    assert [q.example for q in limited["aime24"]] == [q.example for q in suites["aime24"][:3]]
    assert len(limited["gsm8k"]) == 3


def test_grouping_against_independent_pandas_count():
    path = f"{SHARED}/benchmarks/math_eval.parquet"
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    import pandas as pd

    df = pd.read_parquet(path)
    key = df.prompt.map(lambda p: p[-1]["content"]) + "\x00" + df.reward_model.map(
        lambda r: str(r["ground_truth"]))
    unique = df.assign(key=key).groupby("data_source").key.nunique().to_dict()
    assert unique == {"aime": 30, "aime25": 30, "amc": 83, "math": 500, "minerva": 272,
                      "olympiad_bench": 675}
    for name, source in (("aime24", "aime"), ("amc", "amc"), ("olympiad", "olympiad_bench")):
        qs = bm.resolve_suites([name])[name]
        assert len(qs) == unique[source]
        assert sum(q.repeats for q in qs) == int((df.data_source == source).sum())


def test_packaged_files_equal_shared_data():
    pairs = [(f"benchmarks/{f}", f) for f in ("math_eval.parquet", "arc_c.parquet",
                                              "gpqa_diamond.parquet",
                                              "train_time_validation.parquet")]
    pairs += [("gsm8k/test.jsonl", "gsm8k_test.jsonl"), ("gsm8k/LICENSE", "LICENSE.gsm8k")]
    if not os.path.exists(SHARED):
        pytest.skip(f"{SHARED} not present")
    for shared, packaged in pairs:
        with open(f"{SHARED}/{shared}", "rb") as a, open(bm.benchmark_path(packaged), "rb") as b:
            assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest(), shared


def test_gsm8k_matches_data_converter(tmp_path):
    # gsm8k.convert_gsm8k is an independent implementation of the same conversion.
    dst = tmp_path / "gsm8k.jsonl"
    gsm8k.convert_gsm8k(bm.benchmark_path("gsm8k_test.jsonl"), str(dst))
    converted = data.load_examples(str(dst))
    ours = bm.load_benchmark("gsm8k")
    assert len(ours) == len(converted) == 1319
    for a, b in zip(ours, converted):
        assert (a.messages, a.ground_truth, a.reward) == (b.messages, b.ground_truth, b.reward)
    assert ours[146].ground_truth == "2125"  # "#### 2,125" in the file
    assert ours[0].messages[-1]["content"].endswith("within \\boxed{}.")


def test_unknown_benchmark_fails_before_loading_anything():
    with pytest.raises(ValueError, match=r"unknown benchmark.*'aime42'.*valid names: aime24"):
        bm.resolve_suites(["aime24", "aime42"])
    # The CLI checks names before it looks at the (missing) checkpoint.
    with pytest.raises(ValueError, match="aime42"):
        ev.main(["--checkpoint=/nonexistent", "--benchmarks=aime24,aime42"])


@pytest.mark.parametrize("kwargs,field", [
    (dict(samples=0), "samples"), (dict(samples={"aime24": -1}), "samples"),
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(batch_size=0), "batch_size"),
    (dict(limit=0), "limit"), (dict(pass_k=(0,)), "pass_k"), (dict(pass_k=()), "pass_k"),
    (dict(seed=-1), "seed"), (dict(reward_timeout_s=0), "reward_timeout_s"),
])
def test_settings_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"EvalSettings.{field}"):
        ev.EvalSettings(**kwargs)


# ---------------------------------------------------------------------------------------------
# pass@k aggregation
# ---------------------------------------------------------------------------------------------


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_aggregation_matches_closed_form():
    assert closed_form(4, 1, 2) == 0.5
    # Four questions with 4 samples each: 1, 2, 0 and 4 correct.
    scores = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], float)
    m = eval_summary.suite_metrics(scores, np.full(scores.shape, 10),
                                   np.zeros(scores.shape, bool), pass_k=(1, 2, 3, 8))
    per_q = {k: [closed_form(4, c, k) for c in (1, 2, 0, 4)] for k in (1, 2, 3)}
    assert per_q[2] == [0.5, 5 / 6, 0.0, 1.0]
    for k in (1, 2, 3):
        assert m[f"pass@{k}"] == pytest.approx(np.mean(per_q[k]), abs=1e-12)
    assert "pass@8" not in m  # k > samples is not reported
    assert m["accuracy"] == m["avg@4"] == pytest.approx(7 / 16)
    assert m["pass@1"] == pytest.approx(m["accuracy"])
    assert (m["questions"], m["samples"], m["mean_length"], m["truncated_frac"]) == (4, 4, 10, 0)
    # Partial credit counts toward accuracy but not as a correct sample for pass@k.
    m = eval_summary.suite_metrics(np.array([[0.5, 1.0]]), np.ones((1, 2)),
                                   np.array([[True, False]]), (1, 2))
    assert (m["accuracy"], m["pass@1"], m["pass@2"], m["truncated_frac"]) == (0.75, 0.5, 1.0, 0.5)


def test_plan_batches_sorted_by_length():
    lens = [50, 10, 30, 10, 40]
    assert rec.plan_batches(lens, samples=2, batch_size=4) == [[1, 3], [2, 4], [0]]
    assert rec.plan_batches(lens, samples=32, batch_size=64) == [[1, 3], [2, 4], [0]]
    assert rec.plan_batches(lens, samples=64, batch_size=16) == [[1], [3], [2], [4], [0]]
    assert rec.batch_seed(0, "aime24", 3) == rec.batch_seed(0, "aime24", 3)
    assert len({rec.batch_seed(s, n, b) for s in (0, 1) for n in ("a", "b") for b in (0, 1)}) == 8


# ---------------------------------------------------------------------------------------------
# A fake sampler: answers looked up by prompt, tokenised with the real tokenizer
# ---------------------------------------------------------------------------------------------


class FakeGenerate:
    """generate_fn stand-in. `answer(prompt_ids, sample, seed) -> text`; counts calls; raises
    after `fail_after` calls to simulate an interruption."""

    def __init__(self, tokenizer, answer, fail_after: int | None = None):
        self.tokenizer, self.answer, self.fail_after = tokenizer, answer, fail_after
        self.calls, self.seeds = 0, []

    def __call__(self, config, params, prompts, *, max_new_tokens, temperature, top_p, top_k,
                 eos_id, stop_ids, seed, num_samples, pad_id, mesh):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.seeds.append(seed)
        tokens, stopped = [], []
        for p in prompts:
            for s in range(num_samples):
                ids = self.tokenizer(self.answer(tuple(p), s, seed),
                                     add_special_tokens=False)["input_ids"]
                ids = ids[:max_new_tokens - 1] + [eos_id]
                tokens.append(ids)
                stopped.append(True)
        return types.SimpleNamespace(tokens=tokens, lengths=np.array([len(t) for t in tokens]),
                                     stopped=np.array(stopped), logprobs=None)


def think(answer: str) -> str:
    return f"Let me work through it.\n</think>\n\n{answer}"


def boxed(x: str) -> str:
    return think(f"The final answer is $\\boxed{{{x}}}$.")


# Real ground truths from the packaged data; each with a right answer written differently from
# the ground truth where the form allows (equivalence is the checker's job) and a wrong one. Every
# question also gets a third sample: the right answer without "</think>" (the format gate: 0).
GRADING_TABLE = {
    "aime24": [("204", boxed("204"), boxed("240")), ("023", boxed("23"), boxed("32"))],
    "aime25": [("336^\\circ", boxed("336"), boxed("330"))],
    "amc": [("142.0", boxed("142"), boxed("141"))],
    "math500": [("\\left( 3, \\frac{\\pi}{2} \\right)", boxed("(3, \\pi/2)"), boxed("(3, \\pi)")),
                ("\\frac{14}{3}", boxed("\\dfrac{14}{3}"), boxed("\\frac{3}{14}")),
                ("3\\sqrt{13}", boxed("\\sqrt{117}"), boxed("3\\sqrt{11}")),
                ("(3,4]", boxed("(3, 4]"), boxed("[3,4]")),
                ("(-\\infty, 0]", boxed("(-\\infty,0]"), boxed("(-\\infty, 0)")),
                ("\\frac{270}7\\text{ degrees}", boxed("\\frac{270}{7}"), boxed("\\frac{7}{270}")),
                ("6 - 5i", boxed("6-5i"), boxed("6+5i"))],
    "minerva": [("0.006", boxed("0.006"), boxed("0.06")),
                ("1+\\sqrt{3} i", boxed("1 + i\\sqrt{3}"), boxed("1 - \\sqrt{3} i")),
                ("4.5e33", boxed("4.5e33"), boxed("4.6e33"))],
    "olympiad": [("$(-\\sqrt{11},-2)\\cup (\\sqrt{11},9)$",
                  boxed("(-\\sqrt{11},-2) \\cup (\\sqrt{11},9)"), boxed("(-\\sqrt{11},-2)")),
                 ("$(6,3),(9,3),(9,5),(54,5)$", boxed("(6,3),(9,3),(9,5),(54,5)"),
                  boxed("(6,3),(9,3),(9,5)")),
                 ("$\\frac{1}{2 n+2}$", boxed("\\frac{1}{2(n+1)}"), boxed("\\frac{1}{2n}"))],
    "arc_c": [("C", think("The answer is \\boxed{C}."), think("The answer is \\boxed{B}.")),
              ("2", think("The answer is (2)."), think("The answer is (3)."))],
    "gpqa": [("A", think("ANSWER: A"), think("ANSWER: D"))],
    "gsm8k": [("18", boxed("18"), boxed("20")), ("2125", boxed("2,125"), boxed("2,152"))],
}


def _grading_suites() -> dict[str, list[Example]]:
    """For each benchmark, the first question with each ground truth of GRADING_TABLE."""
    suites = {}
    for name, rows in GRADING_TABLE.items():
        questions = bm.resolve_suites([name])[name]
        picked = []
        for truth, _, _ in rows:
            match = [q.example for q in questions if q.example.ground_truth == truth]
            assert match, f"{name}: no question with ground truth {truth!r} in the packaged data"
            picked.append(match[0])
        suites[name] = picked
    return suites


def test_grading_table_of_real_ground_truths_through_evaluate(tokenizer):
    suites = _grading_suites()
    settings = ev.EvalSettings(samples=3, batch_size=64, max_prompt_len=4096, reward_workers=1)
    texts = {}  # (suite, ground truth) -> the three responses
    by_prompt = {}  # prompt ids -> the three responses
    for name, examples in suites.items():
        enc = data.encode_prompts(tokenizer, examples, max_prompt_len=4096,
                                  keep_system_prompt=False, think_prefix=True)
        assert enc.num_dropped == 0
        for ids, ex, (truth, right, wrong) in zip(enc.ids, examples, GRADING_TABLE[name]):
            texts[(name, truth)] = by_prompt[tuple(ids)] = (right, wrong,
                                                            right.replace("</think>", ""))
    fake = FakeGenerate(tokenizer, lambda p, s, seed: by_prompt[p][s])
    # scorer=None: evaluate builds the same RewardScorer (worker processes) the CLI uses.
    result = ev.evaluate(None, None, tokenizer, suites, settings, generate_fn=fake, progress=False)

    assert len(result.records) == 3 * sum(len(v) for v in GRADING_TABLE.values())
    for r in result.records:
        # The decoded response round-trips exactly, and only sample 0 is right.
        assert r["response"] == texts[(r["suite"], r["ground_truth"])][r["sample"]]
        assert r["score"] == (1.0 if r["sample"] == 0 else 0.0), (r["suite"], r["ground_truth"],
                                                                  r["response"])
        assert r["reward"] == bm.BENCHMARKS[r["suite"]].reward
    for name, rows in GRADING_TABLE.items():
        m = result.summary["suites"][name]
        assert m["questions"] == len(rows)
        assert m["accuracy"] == pytest.approx(1 / 3)
        assert m["pass@1"] == pytest.approx(1 / 3)
    assert all(q["correct"] == 1 and q["n"] == 3 for q in result.per_question)
    assert result.summary["math_avg"] == pytest.approx(1 / 3)
    assert result.summary["ood_avg"] == pytest.approx(1 / 3)


def test_official_rule_misses_scientific_notation_equivalents():
    # Documented limitation of the official rule (math-verify parses "4.5e33" as 4.5*e*33): a
    # Minerva answer is graded right only in the dataset's own "4.5e33" form.
    from relift_jax.reward import RewardScorer

    with RewardScorer(num_workers=0) as scorer:
        got = scorer.score([boxed("4.5e33"), boxed("4.5 \\times 10^{33}")], ["4.5e33"] * 2)
    assert got.tolist() == [1.0, 0.0]


def test_default_aime_samples_are_32_per_question(tokenizer):
    settings = ev.EvalSettings(limit=3, max_prompt_len=4096)
    fake = FakeGenerate(tokenizer, lambda p, s, seed: boxed(str(s)))
    from relift_jax.reward import RewardScorer

    with RewardScorer(num_workers=0) as scorer:
        result = ev.evaluate(None, None, tokenizer, ["aime24"], settings, generate_fn=fake,
                             scorer=scorer, progress=False)
    m = result.summary["suites"]["aime24"]
    assert (m["questions"], m["samples"]) == (3, 32)
    assert sorted(k for k in m if k.startswith("pass@")) == ["pass@1", "pass@16", "pass@32",
                                                             "pass@8"]
    assert len(result.records) == 96
    assert fake.calls == 2  # batch_size 64 // 32 samples = 2 questions per sampler call


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def _synthetic_suites() -> dict[str, list[Example]]:
    def ex(i: int, q: str, gt: str, source: str) -> Example:
        return Example(i, ({"role": "system", "content": "sys"}, {"role": "user", "content": q}),
                       gt, None, source, "math", {})

    a = [ex(i, f"What is {i} + {i * 3}?" + " pad" * (i % 3), str(4 * i), "toy") for i in range(7)]
    # The trainer's held-out split may hold repeated rows: they are one question.
    b = [ex(i, f"Double {i}.", str(2 * i), "toy2") for i in range(5)] + \
        [ex(9, "Double 1.", "2", "toy2")]
    return {"heldout": a, "other": b}


def _strip_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "timing"}


def test_resume_equals_uninterrupted_run(tokenizer, tmp_path):
    from relift_jax.reward import RewardScorer

    def answer(p, s, seed):
        # Correct for some (seed, prompt, sample) combinations: the answer is the ground truth
        # read back from the prompt for the "heldout" questions.
        text = tokenizer.decode(list(p))
        h = hashlib.sha256(f"{seed}/{p}/{s}".encode()).digest()[0]
        if "What is" in text and h % 3:
            a, b = text.split("What is ")[1].split("?")[0].split(" + ")
            return boxed(str(int(a) + int(b)))
        return boxed("-1")

    suites = _synthetic_suites()
    settings = ev.EvalSettings(samples={"heldout": 2, "other": 3}, batch_size=4, seed=5,
                               pass_k=(1, 2, 3))
    run = dict(progress=False)
    with RewardScorer(num_workers=0) as scorer:
        full_fake = FakeGenerate(tokenizer, answer)
        full = ev.evaluate(None, None, tokenizer, suites, settings, scorer=scorer,
                           output_dir=str(tmp_path / "full"), generate_fn=full_fake, **run)
        # heldout: 7 questions, 2 per batch -> 4 batches; other: 5 questions, 1 per batch -> 5.
        assert full_fake.calls == 9
        assert full.summary["suites"]["other"]["questions"] == 5
        acc = full.summary["suites"]["heldout"]["accuracy"]
        assert 0 < acc < 1  # the fake makes a mix of right and wrong

        out = str(tmp_path / "resumed")
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate(None, None, tokenizer, suites, settings, scorer=scorer, output_dir=out,
                        generate_fn=FakeGenerate(tokenizer, answer, fail_after=2), **run)
        with open(os.path.join(out, rec.RESPONSES_FILE)) as f:
            lines = f.readlines()
        assert len(lines) == 2 * 2 * 2  # two whole batches of 2 questions x 2 samples
        with open(os.path.join(out, rec.RESPONSES_FILE), "a") as f:
            f.write('{"suite": "heldout", "batch": 2, "quest')  # torn write of a crash

        fake = FakeGenerate(tokenizer, answer)
        resumed = ev.evaluate(None, None, tokenizer, suites, settings, scorer=scorer,
                              output_dir=out, generate_fn=fake, **run)
        assert fake.calls == 9 - 2  # finished batches are not regenerated
        assert fake.seeds == full_fake.seeds[2:]
        assert resumed.summary["timing"]["batches_resumed"] == 2

        assert _strip_timing(resumed.summary) == _strip_timing(full.summary)
        assert resumed.table_md == full.table_md
        assert resumed.records == full.records
        assert resumed.per_question == full.per_question
        for name in (rec.SUMMARY_JSON, rec.SUMMARY_MD, rec.RESPONSES_FILE):
            assert os.path.exists(os.path.join(out, name))
        with open(os.path.join(out, rec.SUMMARY_JSON)) as f:
            on_disk = json.load(f)
        with open(tmp_path / "full" / rec.SUMMARY_JSON) as f:
            assert _strip_timing(on_disk) == _strip_timing(json.load(f))
        with open(os.path.join(out, rec.RESPONSES_FILE)) as f:
            resumed_lines = sorted(f.readlines())
        with open(tmp_path / "full" / rec.RESPONSES_FILE) as f:
            assert resumed_lines == sorted(f.readlines())

        # A finished run resumes completely; a different evaluation is refused, not mixed in.
        again = FakeGenerate(tokenizer, answer)
        ev.evaluate(None, None, tokenizer, suites, settings, scorer=scorer, output_dir=out,
                    generate_fn=again, **run)
        assert again.calls == 0
        with pytest.raises(ValueError, match="settings.temperature: 0.6 -> 0.7"):
            ev.evaluate(None, None, tokenizer, suites, dataclasses.replace(settings,
                        temperature=0.7), scorer=scorer, output_dir=out, generate_fn=again, **run)


# ---------------------------------------------------------------------------------------------
# Stopping: a Qwen2.5-style folder (EOS <|endoftext|>) whose model always says <|im_end|>
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def im_end_folder(tmp_path_factory):
    """(folder, config, params, tokenizer) of a model that emits <|im_end|> at every position."""
    from relift_jax import hf

    path = make_qwen25_style_folder(tmp_path_factory.mktemp("qwen25") / "hf",
                                    always_emit="<|im_end|>")
    config, params = hf.load_checkpoint(path)
    return path, config, params, hf.load_tokenizer(path)


def test_evaluate_stops_at_the_chat_end_of_turn(im_end_folder):
    from relift_jax import rollout_policy
    from relift_jax.reward import RewardScorer

    path, config, params, tok = im_end_folder
    eos, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert tok.eos_token_id == eos
    suites = {"heldout": _synthetic_suites()["heldout"][:3]}
    settings = ev.EvalSettings(samples=2, max_new_tokens=5, temperature=1.0, batch_size=8,
                               pass_k=(1,), require_think_close=False)
    run = dict(progress=False)
    with RewardScorer(num_workers=0, require_think_close=False) as scorer:
        by_default = ev.evaluate(config, params, tok, suites, settings, scorer=scorer, **run)
        from_folder = ev.evaluate(config, params, tok, suites, settings, scorer=scorer,
                                  stop_ids=rollout_policy.stop_ids(tok, path), **run)
        eos_only = ev.evaluate(config, params, tok, suites, settings, scorer=scorer,
                               stop_ids=(eos,), **run)
    for result in (by_default, from_folder):
        assert len(result.records) == 6
        for r in result.records:
            assert (r["length"], r["truncated"], r["response"]) == (1, False, "")
        assert result.summary["suites"]["heldout"]["truncated_frac"] == 0.0
    # What RL rollouts did before the shared policy: EOS only, so they ran past <|im_end|>.
    for r in eos_only.records:
        assert (r["length"], r["truncated"], r["response"]) == (5, True, "<|im_end|>" * 5)


def test_cli_uses_the_model_folders_stop_ids(im_end_folder, tmp_path, capsys):
    path = im_end_folder[0]
    out = str(tmp_path / "eval")
    assert ev.main([f"--checkpoint={path}", "--benchmarks=gsm8k", "--limit=2", "--samples=2",
                    "--max_new_tokens=4", f"--output_dir={out}", "--dtype=float32",
                    "--gin.EvalSettings.reward_workers=0", "--no_progress"]) == 0
    capsys.readouterr()
    with open(os.path.join(out, rec.RESPONSES_FILE)) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 4
    assert all((r["length"], r["truncated"], r["response"]) == (1, False, "") for r in records)
    with open(os.path.join(out, rec.FINGERPRINT_FILE)) as f:
        assert json.load(f)["stop_ids"] == [im_end_folder[3].eos_token_id,
                                            im_end_folder[3].convert_tokens_to_ids("<|im_end|>")]


# ---------------------------------------------------------------------------------------------
# CLI end to end on a tiny random model
# ---------------------------------------------------------------------------------------------


def test_resolve_checkpoint_run_directory(tmp_path):
    run = tmp_path / "run"
    for name in ("final", "best"):
        (run / "export" / name).mkdir(parents=True)
        (run / "export" / name / "config.json").write_text("{}")
    assert ev.resolve_checkpoint(str(run)) == (str(run / "export" / "best"),
                                               str(run / "eval" / "best"))
    os.remove(run / "export" / "best" / "config.json")
    assert ev.resolve_checkpoint(str(run))[0] == str(run / "export" / "final")
    assert ev.resolve_checkpoint(str(run / "export" / "final")) == (
        str(run / "export" / "final"), str(run / "export" / "final" / "eval"))
    with pytest.raises(FileNotFoundError, match="export/best"):
        ev.resolve_checkpoint(str(tmp_path))


def test_cli_end_to_end_every_benchmark(checkpoint, tmp_path, capsys):
    path, tok = checkpoint
    gin_file = tmp_path / "eval.gin"
    gin_file.write_text("EvalSettings.temperature = 0.9\nEvalSettings.top_k = 20\n")
    out = str(tmp_path / "eval")
    argv = [f"--checkpoint={path}", "--limit=2", "--max_new_tokens=8", "--samples=2",
            f"--output_dir={out}", "--dtype=float32", f"--gin_file={gin_file}",
            "--temperature=1.0", "--gin.EvalSettings.reward_workers=1",
            "--gin.EvalSettings.max_prompt_len=4096", "--no_progress"]
    _run_cli_and_check(argv, out, capsys)


def _run_cli_and_check(argv, out, capsys):
    assert ev.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("summary.json", "summary.md", "responses.jsonl"):
        assert os.path.exists(os.path.join(out, name))
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    # Flags override gin, gin overrides the defaults.
    assert (summary["settings"]["temperature"], summary["settings"]["top_k"]) == (1.0, 20)
    assert summary["settings"]["max_new_tokens"] == 8
    assert list(summary["suites"]) == list(bm.BENCHMARKS)
    for name, m in summary["suites"].items():
        assert (m["questions"], m["samples"], m["dropped"]) == (2, 2, 0), name
        assert 0.0 <= m["accuracy"] <= 1.0 and 1 <= m["mean_length"] <= 8
    with open(os.path.join(out, "responses.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 9 * 2 * 2
    for r in records:
        assert 0.0 <= r["score"] <= 1.0 and 1 <= r["length"] <= 8
        if r["truncated"]:
            assert r["length"] == 8
    assert summary["timing"]["generated_tokens"] == sum(r["length"] for r in records)
    assert summary["timing"]["tokens_per_s"] > 0
    with open(os.path.join(out, "summary.md")) as f:
        table = f.read()
    assert table in printed and "| aime24 | 2 | 2 |" in table and "math avg" in table

    # Rerunning the same command resumes everything and gives the same summary.
    assert ev.main(argv) == 0
    with open(os.path.join(out, "summary.json")) as f:
        again = json.load(f)
    assert again["timing"]["batches_resumed"] == 9 and again["timing"]["generated_tokens"] == 0
    assert _strip_timing(again) == _strip_timing(summary)


# ---------------------------------------------------------------------------------------------
# Gin files and the `python -m` entry point
# ---------------------------------------------------------------------------------------------

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


def test_gin_eval_files_parse():
    import gin

    smoke = ev._gin_settings([os.path.join(GIN_DIR, "eval", "smoke.gin")],
                             ["EvalSettings.seed = 3"])
    assert smoke == dataclasses.replace(ev.EvalSettings(), limit=8, samples=4, max_new_tokens=1024,
                                        seed=3)
    # Found through the search path too; and no binding outlives the call.
    assert ev._gin_settings(["eval/smoke.gin"], []).limit == 8
    assert gin.config_str() == ""


def test_module_entry_point_rejects_unknown_benchmark():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "relift_jax.evaluate", "--checkpoint=/nope",
                           "--benchmarks=aime24,mmlu"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown benchmark(s) ['mmlu']" in proc.stderr and "gsm8k" in proc.stderr
    assert "already exists" not in proc.stderr  # gin registered EvalSettings once
