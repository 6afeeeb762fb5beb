"""End to end through the real entry point (`python -m relift_jax.main`) on gin/tests/tiny_e2e.gin.

Runs, each in its own process (gin and `jax.set_mesh` are process-global; a fresh process is also
what a user runs), from the repository root, with the test session's environment (8 fake CPU
devices, so the mesh, sharded steps and sharded checkpoint restore are all exercised):
  A  6 iterations, checkpoints every 3, uninterrupted;
  B  the same flags into another directory, stopped after 3 iterations (`run.stop_after=3`), then
     started again without it, so it resumes from the checkpoint at 3.
A also serves as the smoke run: its artifacts, export and timing are checked and printed. A
compiles from scratch and fills a JAX compilation cache private to this test session, which B's
two processes then read (about 35 s -> 9 s each on 2 cores): the programs are the same, only
their compile time is saved.
Configuration errors are checked in-process: they must fail before any work.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN = "gin/tests/tiny_e2e.gin"
FLAGS = ["--gin.TrainConfig.iterations=6", "--gin.TrainConfig.save_every=3",
         "--gin.TrainConfig.keep_checkpoints=3"]


def _start(run_dir: str, cache_dir: str, *extra: str) -> tuple[subprocess.Popen, float, str]:
    log = run_dir + ".log"
    cmd = [sys.executable, "-m", "relift_jax.main", f"--gin_file={GIN}", f"--run_dir={run_dir}",
           *FLAGS, *extra]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    f = open(log, "w")
    return (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT),
            time.time(), log)


def _wait(job, timeout: float = 300) -> float:
    proc, t0, log = job
    rc = proc.wait(timeout=timeout)
    wall = time.time() - t0
    if rc != 0:
        with open(log) as f:
            pytest.fail(f"{' '.join(proc.args)} exited {rc}:\n{f.read()[-4000:]}")
    return wall


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    a, b, cache = str(root / "A"), str(root / "B"), str(root / "jax_cache")
    wall_a = _wait(_start(a, cache))
    wall_b1 = _wait(_start(b, cache, "--gin.run.stop_after=3"))
    with open(b + ".log") as f:
        first_log = f.read()
    wall_b2 = _wait(_start(b, cache))
    print(f"\n[e2e wall time] A (6 iterations, cold compile): {wall_a:.1f}s; "
          f"B1 (3 iterations, cached compile): {wall_b1:.1f}s; B2 (resume, 3 iterations, "
          f"cached compile): {wall_b2:.1f}s")
    return {"A": a, "B": b, "first_log": first_log, "wall_a": wall_a}


def _rows(run_dir: str) -> dict[int, dict]:
    """metrics.jsonl rows of the iterations (rows with rollout metrics), by step."""
    from relift_jax.metrics import read_jsonl
    out = {}
    for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if "rollout/reward_mean" in r:
            assert r["step"] not in out, f"iteration {r['step']} logged twice"
            out[r["step"]] = r
    return out


# ----------------------------------------------------------------------------- the smoke run

def test_run_writes_events_checkpoints_export_and_metrics(runs):
    a = runs["A"]
    events = glob.glob(os.path.join(a, "tensorboard", "events.*"))
    assert events and all(os.path.getsize(e) > 0 for e in events)
    assert sorted(int(d) for d in os.listdir(os.path.join(a, "checkpoints"))) == [3, 6]
    final = os.path.join(a, "export", "final")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(final, name)), name
    assert os.path.isfile(os.path.join(a, "operative_config.gin"))

    rows = _rows(a)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for r in rows.values():
        for k in ("rollout/reward_mean", "buffer/size", "buffer/sft_fired", "rl/loss",
                  "rl/entropy", "rl/grad_norm", "rl/lr", "perf/iteration_s"):
            assert k in r and np.isfinite(r[k]), k
    # Every toy question has a demonstration, so the buffer follows the ReLIFT rule exactly:
    # it gains this iteration's hardest questions and fires (taking M = 4) once it holds 4.
    # A random model solves almost nothing, so SFT fires at the first iteration.
    size = 0
    for step in sorted(rows):
        r = rows[step]
        size += r["buffer/hardest_in_batch"]
        fired = size >= 4
        assert r["buffer/sft_fired"] == fired and ("sft/loss" in r) == fired, step
        size -= 4 * fired
        assert r["buffer/size"] == size, step
    assert rows[1]["buffer/sft_fired"] == 1
    assert all(any(k.startswith("eval/") for k in rows[s]) for s in (2, 4, 6))
    assert not any(k.startswith("eval/") for s in (1, 3, 5) for k in rows[s])
    print(f"\n[e2e] smoke run A wall time {runs['wall_a']:.1f}s")


def test_export_loads_in_relift_jax_and_transformers(runs):
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from relift_jax import hf, model
    final = os.path.join(runs["A"], "export", "final")
    cfg, params = hf.load_checkpoint(final)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (64, 2, 4, 2)
    tok = hf.load_tokenizer(final)
    from relift_jax.toy.tokenizer import TOKENIZER_DIR
    ref_tok = hf.load_tokenizer(str(TOKENIZER_DIR))
    text = "<think>\n12+34=46</think> 46"
    assert tok.encode(text) == ref_tok.encode(text) and len(tok) == cfg.vocab_size

    # The export holds the trained weights, not the initial ones: they differ from a fresh init.
    import jax
    fresh = model.init_params(cfg, jax.random.key(0))
    assert not np.allclose(np.asarray(fresh["embed"]), np.asarray(params["embed"]))
    assert set(load_file(os.path.join(final, "model.safetensors")))  # readable safetensors

    tokens = np.array([tok.encode("3+4=")], np.int32)
    ours = np.asarray(model.forward(cfg, params, jnp.asarray(tokens)))
    torch = pytest.importorskip("torch")
    import transformers
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    from f32 import assert_close, decoder_ulps  # two programs: float32 rounding of a decoder
    assert_close(ours, theirs, ulps=decoder_ulps(cfg, tokens.shape[1]))


# ----------------------------------------------------------------------------- resumption

def test_killed_and_resumed_run_matches_the_uninterrupted_one(runs):
    from relift_jax import hf
    a, b = runs["A"], runs["B"]
    assert "resumed from" not in runs["first_log"]
    with open(b + ".log") as f:
        second_log = f.read()
    assert "resumed from" in second_log and "(iteration 3)" in second_log

    _, pa = hf.load_checkpoint(os.path.join(a, "export", "final"))
    _, pb = hf.load_checkpoint(os.path.join(b, "export", "final"))
    import jax
    la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    ra, rb = _rows(a), _rows(b)
    assert sorted(ra) == sorted(rb) == [1, 2, 3, 4, 5, 6]
    # Timings differ between runs: perf/*, and the evaluation's throughput.
    timing = lambda k: k.startswith("perf/") or k.endswith("tokens_per_s")  # noqa: E731
    for step in (4, 5, 6):
        ka = {k for k in ra[step] if not timing(k)}
        kb = {k for k in rb[step] if not timing(k)}
        assert ka == kb, (step, ka ^ kb)
        diff = {k: (ra[step][k], rb[step][k]) for k in ka if ra[step][k] != rb[step][k]}
        assert not diff, (step, diff)
    # The first half of B matched A too (same seed, same data): a sanity check of the comparison.
    assert ra[1]["rl/loss"] == rb[1]["rl/loss"]


# ----------------------------------------------------------------------------- config errors

def _main_error(tmp_path, capsys, *bindings) -> str:
    """Runs main in-process; asserts exit status 2 and one line on stderr; returns that line."""
    from relift_jax import main
    run_dir = str(tmp_path / "never")
    with pytest.raises(SystemExit) as e:
        main.main([f"--gin_file={os.path.join(REPO, GIN)}", f"--run_dir={run_dir}", *bindings])
    assert e.value.code == 2
    assert not os.path.exists(run_dir), "failed after starting work"
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_misspelled_binding_fails_first_and_names_it(tmp_path, capsys):
    msg = _main_error(tmp_path, capsys, "--gin.RLConfig.learnin_rate=1")
    assert "learnin_rate" in msg


def test_invalid_value_fails_first_and_names_the_field(tmp_path, capsys):
    msg = _main_error(tmp_path, capsys, '--gin.TrainConfig.mode="bogus"')
    assert "TrainConfig.mode" in msg and "bogus" in msg


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    """A model path that does not exist (and no recipe to build it) names the binding."""
    msg = _main_error(tmp_path, capsys, f"--gin.ModelLoadConfig.path='{tmp_path}/absent'")
    assert "ModelLoadConfig.path" in msg and "absent" in msg


def test_bucket_url_as_run_dir_is_a_config_error(tmp_path, capsys):
    """relift_jax writes through the file system: a gs:// run_dir would land on local disk."""
    from relift_jax import main
    with pytest.raises(SystemExit) as e:
        main.main([f"--gin_file={os.path.join(REPO, GIN)}", "--run_dir=gs://bucket/runs/x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "gs://bucket/runs/x" in err and "gcsfuse" in err and "\n" not in err


def test_data_that_contradicts_the_mode_is_a_config_error(tmp_path, capsys):
    """Validation that needs the data (here M larger than the demonstrations) still exits 2."""
    from relift_jax import main
    with pytest.raises(SystemExit) as e:
        main.main([f"--gin_file={os.path.join(REPO, GIN)}", f"--run_dir={tmp_path}/r",
                   "--gin.TrainConfig.mode='relift_uniform'", "--gin.SFTConfig.buffer_size=999"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "SFTConfig.buffer_size = 999" in err and "\n" not in err


def test_config_error_from_the_command_line_exits_2_without_a_traceback(tmp_path):
    cmd = [sys.executable, "-m", "relift_jax.main", f"--gin_file={GIN}",
           f"--run_dir={tmp_path}/r", "--gin.RLConfig.learnin_rate=1"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "learnin_rate" in lines[0], p.stderr


def test_kl_penalty_to_a_frozen_reference_runs(tmp_path):
    """RLConfig.kl_coef > 0 loads a frozen copy of the start policy; the KL is logged, >= 0
    (low_var_kl is non-negative) and exactly 0 on an update whose policy still equals the reference."""
    from relift_jax import main
    from relift_jax.metrics import read_jsonl

    run_dir = str(tmp_path / "kl")
    main.main([f"--gin_file={REPO}/gin/tests/tiny_e2e.gin", f"--run_dir={run_dir}",
               "--gin.RLConfig.kl_coef=0.1", "--gin.RLConfig.num_mini_batches=1",
               "--gin.TrainConfig.iterations=2", "--gin.TrainConfig.eval_every=0"])
    rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "rl/kl" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["rl/kl"] == 0.0  # one update per iteration: the first sees the reference itself
    assert rows[1]["rl/kl"] > 0.0 and np.isfinite(rows[1]["rl/kl"])
    import jax
    assert jax.sharding.get_abstract_mesh().empty  # the run's mesh does not leak into the caller


def test_bindings_do_not_outlive_the_run(tmp_path, capsys):
    """The configs are read from gin once, at the edge; gin is clear again afterwards."""
    import gin

    from relift_jax import main
    from relift_jax.config import RLConfig

    with pytest.raises(SystemExit):
        main.main([f"--gin_file={REPO}/gin/tests/tiny_e2e.gin", f"--run_dir={tmp_path}",
                   "--gin.RLConfig.kl_coef=0.1", f"--gin.ModelLoadConfig.path='{tmp_path}/absent'"])
    assert RLConfig().kl_coef == 0.0
    assert "kl_coef" not in gin.config_str()
