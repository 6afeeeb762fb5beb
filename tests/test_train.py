"""The trainer's edges: plain configs in (gin only in main), several runs in one process, the base
model built in-process, one rollout policy shared with evaluation, and loud failure on NaN.

Each run is the tiny end-to-end config (gin/tests/tiny_e2e.gin) for 2-3 iterations.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from relift_jax import main
from relift_jax.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN = os.path.join(REPO, "gin", "tests", "tiny_e2e.gin")
SHORT = ["--gin.TrainConfig.iterations=2", "--gin.TrainConfig.eval_every=0",
         "--gin.TrainConfig.save_every=0", "--gin.TrainConfig.export_best=False"]
TIMING = ("perf/",)


def _argv(run_dir, *extra):
    return [f"--gin_file={GIN}", f"--run_dir={run_dir}", *SHORT, *extra]


def _result(run_dir):
    """(exported parameters, metrics without timings) of a finished run."""
    from safetensors.numpy import load_file
    params = load_file(os.path.join(run_dir, "export", "final", "model.safetensors"))
    rows = [{k: v for k, v in r.items() if not k.startswith(TIMING)}
            for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]
    return params, rows


def _assert_same(a, b):
    pa, ra = a
    pb, rb = b
    assert sorted(pa) == sorted(pb)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)  # same program, same machine
    assert ra == rb


# Two runs that differ in mode, seed and KL (a frozen reference), so a leak of any of them
# between runs would show.
RUN_X = ["--gin.RLConfig.kl_coef=0.1", "--gin.TrainConfig.seed=1"]
RUN_Y = ["--gin.TrainConfig.mode='rl'", "--gin.RolloutConfig.temperature=0.7"]


def test_two_runs_in_one_process_equal_separate_processes(tmp_path):
    for name, extra in (("x", RUN_X), ("y", RUN_Y)):
        subprocess.run([sys.executable, "-m", "relift_jax.main",
                        *_argv(tmp_path / f"sep_{name}", *extra)],
                       cwd=REPO, check=True, capture_output=True, timeout=300)
    main.main(_argv(tmp_path / "one_x", *RUN_X))
    main.main(_argv(tmp_path / "one_y", *RUN_Y))
    _assert_same(_result(tmp_path / "one_x"), _result(tmp_path / "sep_x"))
    _assert_same(_result(tmp_path / "one_y"), _result(tmp_path / "sep_y"))
    # ... and the two runs did differ (so the comparison could fail).
    assert _result(tmp_path / "one_x")[1] != _result(tmp_path / "one_y")[1]


def test_train_run_takes_plain_configs_without_gin(tmp_path):
    """The library path: configs built by hand, no gin anywhere; the operative gin is optional."""
    import gin

    from relift_jax import train
    from relift_jax.config import (DataConfig, ModelLoadConfig, RLConfig, RolloutConfig,
                                   RunConfig, SFTConfig, TrainConfig)
    configs = RunConfig(
        model=ModelLoadConfig(tokenizer_path="toy", random_init={
            "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
            "num_kv_heads": 1, "head_dim": 16, "max_position_embeddings": 128}),
        data=DataConfig(train="toy:train:1:8"),
        train=TrainConfig(iterations=1, eval_every=0, save_every=0, reward_workers=1),
        rollout=RolloutConfig(questions_per_iteration=2, group_size=2, max_prompt_len=64,
                              max_response_len=8),
        rl=RLConfig(micro_batch_size=4), sft=SFTConfig(buffer_size=2, micro_batch_size=4))
    gin.clear_config()
    summary = train.run(str(tmp_path / "r"), configs)
    assert summary["iterations"] == 1
    assert not os.path.exists(tmp_path / "r" / "operative_config.gin")
    assert os.path.isfile(tmp_path / "r" / "export" / "final" / "config.json")


def test_base_model_is_built_in_the_same_process(tmp_path, monkeypatch):
    """ModelLoadConfig.build_gin runs the recipe in this process (no subprocess), then trains."""
    base = tmp_path / "base"
    monkeypatch.setattr(subprocess, "run", None)  # any subprocess would fail the test
    monkeypatch.setattr(subprocess, "Popen", None)
    main.main(_argv(tmp_path / "rl", f"--gin.ModelLoadConfig.path='{base}/export/final'",
                    f"--gin.ModelLoadConfig.build_gin='{GIN}'",
                    f"--gin.ModelLoadConfig.build_run_dir='{base}'"))
    assert os.path.isfile(base / "export" / "final" / "config.json")
    built = read_jsonl(str(base / "metrics.jsonl"))
    assert max(r["step"] for r in built) == 4  # the recipe's own 4 iterations, not the outer 2
    assert max(r["step"] for r in read_jsonl(str(tmp_path / "rl" / "metrics.jsonl"))) == 2


# ----------------------------------------------------------------------------- one rollout policy

def test_rl_rollouts_stop_at_the_chat_end_of_turn(tmp_path):
    """A Qwen2.5-style folder (EOS <|endoftext|>, chat end <|im_end|>, generation_config listing
    both) whose model always emits <|im_end|>: every RL rollout is that one token."""
    from hf_fixtures import make_qwen25_style_folder
    folder = make_qwen25_style_folder(tmp_path / "qwen", always_emit="<|im_end|>")
    run_dir = tmp_path / "r"
    main.main(_argv(run_dir, f"--gin.ModelLoadConfig.path='{folder}'",
                    "--gin.ModelLoadConfig.tokenizer_path=None",
                    "--gin.ModelLoadConfig.random_init=None", "--gin.TrainConfig.mode='rl'",
                    "--gin.TrainConfig.require_think_close=False"))
    rows = [r for r in read_jsonl(str(run_dir / "metrics.jsonl")) if "rollout/reward_mean" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["rollout/response_len_mean"] == 1.0 and r["rollout/response_len_max"] == 1.0
        assert r["rollout/truncated_frac"] == 0.0


def test_same_response_same_reward_in_rl_and_evaluation(tmp_path):
    """The RL scorer and relift_jax.evaluate grade the same ids identically (stop id stripped,
    special tokens such as <|im_end|> and </think> handled the same way)."""
    from hf_fixtures import make_qwen25_style_folder

    from relift_jax import evaluate, hf, rollout, rollout_policy
    from relift_jax.data import Example
    from relift_jax.reward import RewardScorer
    from relift_jax.sampler import SampleOutput

    folder = make_qwen25_style_folder(tmp_path / "qwen")
    tok = hf.load_tokenizer(folder)
    stops = rollout_policy.stop_ids(tok, folder)
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    texts = ["<think>\n1+1=2\n</think>\n\\boxed{2}", "\\boxed{2}", "<think>\nno\n</think>\n\\boxed{3}",
             "<think>\nx\n</think>\n\\boxed{2}"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = [ids[0] + [im_end], ids[1] + [eos], ids[2] + [im_end], ids[3]]  # last one: cut short
    stopped = np.array([True, True, True, False])
    ex = Example(index=0, messages=[{"role": "user", "content": "1+1?"}], ground_truth="2",
                 demonstration=None, data_source="t", reward="math", extra={})

    def fake_generate(*args, num_samples=1, **kw):
        return SampleOutput(tokens=[list(x) for x in ids], logprobs=[[0.0] * len(x) for x in ids],
                            lengths=np.array([len(x) for x in ids]), stopped=stopped)

    with RewardScorer("math", num_workers=1) as scorer:
        rl = rollout.make_score_fn(tok, scorer, stops, "math")(ids, ["2"] * 4, ["math"] * 4)
        settings = evaluate.EvalSettings(samples=4, max_new_tokens=8, batch_size=4, pass_k=(1,))
        res = evaluate.evaluate(None, None, tok, {"s": [ex]}, settings, scorer=scorer,
                                progress=False, stop_ids=stops, generate_fn=fake_generate)
    ev = [r["score"] for r in sorted(res.records, key=lambda r: r["sample"])]
    assert list(rl) == ev
    assert ev[0] == 1.0 and ev[2] == 0.0  # the comparison can fail both ways


# ----------------------------------------------------------------------------- fail loudly

@pytest.mark.parametrize("kind", ["rl", "sft"])
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, kind):
    """An absurd learning rate overflows the weights: the run stops at the first iteration whose
    loss or gradient norm is not finite, names it and the step, and never saves over the good
    state."""
    from relift_jax.train import NonFiniteError
    run_dir = tmp_path / "r"
    cfg = "RLConfig" if kind == "rl" else "SFTConfig"
    with pytest.raises(NonFiniteError) as e:
        main.main([f"--gin_file={GIN}", f"--run_dir={run_dir}", f"--gin.TrainConfig.mode='{kind}'",
                   f"--gin.{cfg}.learning_rate=1e30", f"--gin.{cfg}.entropy_coef=1.0",
                   "--gin.RLConfig.num_mini_batches=1",  # one update per iteration
                   "--gin.TrainConfig.iterations=6", "--gin.TrainConfig.save_every=1",
                   "--gin.TrainConfig.eval_every=0"])
    msg = str(e.value)
    rows = [r for r in read_jsonl(str(run_dir / "metrics.jsonl")) if f"{kind}/loss" in r]
    bad = len(rows) + 1  # every written iteration was finite; the next one was not
    assert all(np.isfinite(r[f"{kind}/loss"]) and np.isfinite(r[f"{kind}/grad_norm"]) for r in rows)
    assert f"iteration {bad}:" in msg and f"{kind.upper()} step" in msg and "tokens" in msg, msg
    saved = sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())
    assert saved and max(saved) == bad - 1, (saved, msg)
    assert f"last good checkpoint (iteration {bad - 1})" in msg
