"""The comparison and study runners: tables from run directories, the equal-demonstration SFT
baseline's bindings, and a real sweep on a tiny grid through `python -m relift_jax.main`."""
import json
import os

import numpy as np
import pytest

from relift_jax import stats
from relift_jax.toy import compare, studies

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_run(run_dir, all_acc, hardest, fired=3, m=32, curve=((0, 0.3), (8, 0.4))):
    os.makedirs(run_dir, exist_ok=True)
    levels = [{"bucket": "level 1", "base_acc": 0.6, "final_acc": all_acc + 0.1}]
    buckets = [{"bucket": b, "base_acc": 0.5, "final_acc": v} for b, v in
               (("Easy", 0.8), ("Medium", 0.5), ("Hard", 0.3), ("Hardest", hardest),
                ("All", all_acc))]
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"buckets": {"by_level": levels, "by_base_pass": buckets},
                   "counters": {"sft_fired": fired}, "demos_used": fired * m,
                   "demos_used_frac": fired * m / 2000}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step, acc in curve:
            f.write(json.dumps({"step": step, "eval/heldout/accuracy": acc}) + "\n")
    with open(os.path.join(run_dir, "operative_config.gin"), "w") as f:
        f.write(f"SFTConfig.buffer_size = {m}\nSFTConfig.learning_rate = 0.0003\n")


def test_table_means_intervals_and_paired_differences(tmp_path):
    runs = str(tmp_path / "runs")
    relift = [0.40, 0.45, 0.38]
    rl = [0.42, 0.46, 0.41]
    for s in range(3):
        _fake_run(compare.run_dir_of(runs, "main", "relift", s), relift[s], 0.1 + 0.01 * s)
        _fake_run(compare.run_dir_of(runs, "main", "rl", s), rl[s], 0.05, fired=0)
    results = compare.collect_all(["relift", "rl"], [0, 1, 2], "main", runs)
    summary = compare.summarize(results)
    assert summary["relift"]["accuracy"]["All"]["mean"] == pytest.approx(np.mean(relift))
    d = summary["rl"]["vs_relift"]["All"]
    want = stats.paired_difference(rl, relift)
    assert d["mean"] == pytest.approx(np.mean(np.subtract(rl, relift)))
    assert (d["lo"], d["hi"]) == pytest.approx((want.lo, want.hi))
    assert "vs_relift" not in summary["relift"]
    out = str(tmp_path / "out")
    md = compare.write_table(summary, results["relift"][0]["base"], out, "main")
    assert "| rl | 3 | " + stats.Interval(**summary["rl"]["accuracy"]["All"]).fmt() in md
    compare.plot(summary, results, out, "main")
    for name in ("table.md", "table.json", "final_accuracy.png", "heldout_accuracy.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0


def test_sft_equal_uses_relifts_demonstration_budget(tmp_path):
    run = str(tmp_path / "relift_s0")
    _fake_run(run, 0.4, 0.1, fired=7, m=16)
    b = compare.sft_equal_bindings(run)
    assert "TrainConfig.iterations = 7" in b and "SFTConfig.sft_questions_per_step = 16" in b
    _fake_run(run, 0.4, 0.1, fired=0)
    assert compare.sft_equal_bindings(run) is None
    assert compare._flag("SFTConfig.demo_source = 'teacher'") == \
        "--gin.SFTConfig.demo_source='teacher'"


def test_missing_runs_are_left_out(tmp_path, capsys):
    runs = str(tmp_path)
    _fake_run(compare.run_dir_of(runs, "main", "relift", 0), 0.4, 0.1)
    results = compare.collect_all(["relift"], [0, 1], "main", runs)
    assert list(results["relift"]) == [0]
    assert "missing" in capsys.readouterr().out


def test_sweep_on_a_tiny_grid(tmp_path, monkeypatch):
    """Two buffer sizes, real runs of gin/tests/tiny_e2e.gin at once (seed 1)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    study = studies.Study("SFTConfig.buffer_size", (2, 4), 4, label="M")
    runs, out = str(tmp_path / "runs"), str(tmp_path / "studies")
    extra = ("TrainConfig.bucket_samples = 2", "TrainConfig.iterations = 2",
             "TrainConfig.eval_every = 2", "TrainConfig.save_every = 0")
    studies.run_study(study, [1], runs, jobs=2, gin_file="gin/tests/tiny_e2e.gin",
                      extra=extra)
    # The default value's runs are the comparison's ReLIFT runs; the others sit under studies/.
    assert compare.done(compare.run_dir_of(runs, "main", "relift", 1))
    assert compare.done(studies.run_dir_of(runs, study, 2, 1))
    with open(os.path.join(studies.run_dir_of(runs, study, 2, 1), "operative_config.gin")) as f:
        text = f.read()
    assert "SFTConfig.buffer_size = 2" in text and "TrainConfig.seed = 1" in text
    rows = studies.summarize(study, [1], runs)
    assert list(rows) == ["2", "4"] and rows["2"]["seeds"] == [1]
    assert "vs_default" in rows["2"] and "vs_default" not in rows["4"]
    md = studies.write("buffer_size", study, rows, out)
    assert "| 4 (default) | 1 |" in md
    assert os.path.getsize(os.path.join(out, "buffer_size.png")) > 0
