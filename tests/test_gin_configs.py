"""The real-model gin files (gin/experiments/*.gin, composed of gin/models and gin/topologies) build
their configs: parsed by the training entry point (`main.load_job`), the model's architecture built
as the AOT tool builds it (`aot.model_config`: random_init, no checkpoint), its parameter count
within 5% of the published one, and the mesh shape filling the topology named in the file name.
No compilation, no weights: fast.
"""
from __future__ import annotations

import glob
import os
import re

import pytest

from relift_jax import aot, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "gin", "experiments", "*.gin")))
MODELS = sorted(glob.glob(os.path.join(REPO, "gin", "models", "*.gin")))

# Published parameter counts (Hugging Face model cards: Qwen2.5-Math-1.5B 1.54B, Qwen2.5-Math-7B and
# Qwen2.5-7B 7.61B, Llama-3.1-8B 8.03B), by the model part of a file name.
PARAMS = {"qwen2.5_math_1.5b": 1.54e9, "qwen2.5_math_7b": 7.61e9, "qwen2.5_7b": 7.61e9,
          "llama3.1_8b": 8.03e9}
# Devices of each topology named in a file name (TPU names as relift_jax.aot reads them).
GPU_TOPOLOGIES = {"h100x8": 8}
TOPOLOGY_RE = re.compile(r"_(v\d+[a-z]*-\d+|h100x8)$")


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _model_name(stem: str) -> str | None:
    return next((m for m in sorted(PARAMS, key=len, reverse=True) if stem.startswith(m + "_")
                 or stem == m), None)


def _topology(stem: str) -> str | None:
    m = TOPOLOGY_RE.search(stem)
    return m.group(1) if m else None


def _num_devices(topology: str) -> int:
    if topology in GPU_TOPOLOGIES:
        return GPU_TOPOLOGIES[topology]
    return aot.parse_topology(topology).num_chips


def _load(path: str, tmp_path) -> main.Job:
    text = open(path).read()
    # Every file leaves the data (and the recipes the checkpoint) to the command line.
    bindings = ["DataConfig.train = '/data/train.parquet'"]
    if "random_init" not in text and "include 'models/" not in text:
        bindings.append("ModelLoadConfig.path = '/data/model'")
    return main.load_job([path], bindings, run_dir=str(tmp_path / "run"))


def test_every_model_and_topology_has_its_experiment():
    stems = {_stem(p) for p in EXPERIMENTS}
    topologies = [_stem(p) for p in glob.glob(os.path.join(REPO, "gin", "topologies", "*.gin"))]
    assert {_stem(p) for p in MODELS} == set(PARAMS)
    assert set(topologies) == {"v5p-64", "v6e-64", "h100x8"}
    missing = {f"{m}_{t}" for m in PARAMS for t in topologies} - stems
    assert not missing, f"no gin/experiments file for {sorted(missing)}"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=_stem)
def test_experiment_builds(path, tmp_path):
    stem = _stem(path)
    job = _load(path, tmp_path)
    cfg = job.configs
    assert job.run_dir == str(tmp_path / "run")
    model_name = _model_name(stem)
    if cfg.model.random_init is None:
        # A recipe for a checkpoint folder given on the command line (no architecture in gin).
        assert model_name is None, f"{stem}: a real-model file must describe its architecture"
        return
    model = aot.model_config(cfg.model)
    assert model.attention == cfg.model.attention and model.remat == cfg.model.remat
    if model_name is not None:
        n = model.num_params()
        assert abs(n / PARAMS[model_name] - 1) < 0.05, (stem, n)
        assert cfg.model.path and cfg.model.path.endswith(
            {"qwen2.5_math_1.5b": "Qwen2.5-Math-1.5B", "qwen2.5_math_7b": "Qwen2.5-Math-7B",
             "qwen2.5_7b": "Qwen2.5-7B", "llama3.1_8b": "Llama-3.1-8B"}[model_name])
    topology = _topology(stem)
    if topology is None:
        return
    n_dev = _num_devices(topology)
    shape = cfg.mesh.shape(n_dev)  # raises when data*fsdp*tensor does not fill the devices
    assert shape[0] * shape[1] * shape[2] == n_dev
    # One packed row per data shard per micro-batch, at least as long as the longest sequence.
    rows = shape[0] * shape[1]
    longest = cfg.rollout.max_prompt_len + cfg.rollout.max_response_len
    for c in (cfg.rl, cfg.sft):
        assert c.tokens_per_micro_batch % rows == 0, (stem, c.tokens_per_micro_batch, rows)
        assert c.tokens_per_micro_batch // rows >= longest, (stem, c.tokens_per_micro_batch)
    # The sampler's rows split evenly over the batch axes.
    assert (cfg.rollout.questions_per_iteration * cfg.rollout.group_size) % rows == 0
    # The RL mini-batches split the iteration's rollouts evenly.
    assert cfg.rollout.questions_per_iteration % cfg.rl.num_mini_batches == 0
    assert model.attention == ("cudnn" if topology in GPU_TOPOLOGIES else "splash")
    # The sampler's own weight layout splits the devices and the KV heads evenly (else the cache
    # would be replicated over the tensor axis).
    t = cfg.rollout.decode_tensor
    if t:
        assert n_dev % t == 0 and model.num_kv_heads % t == 0, (stem, t)
    assert cfg.rollout.engine == "continuous"
    if model.attention == "cudnn":
        assert model.compute_dtype in ("bfloat16", "float16")


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if _topology(_stem(p))], ids=_stem)
def test_experiment_header_has_its_commands(path):
    """Each model x topology file starts with how to run it (and, on TPUs, how to check it)."""
    stem, topology = _stem(path), _topology(_stem(path))
    header = []
    for line in open(path):
        if not line.startswith("#") and line.strip():
            break
        header.append(line)
    header = "".join(header)
    assert f"--gin_file=gin/experiments/{stem}.gin" in header
    assert "python -m relift_jax.main" in header
    assert "Should reach" in header
    if topology not in GPU_TOPOLOGIES:
        assert "tpu/run_all.sh" in header and "RELIFT_DISTRIBUTED=1" in header
        assert (f"python -m relift_jax.aot --gin_file=gin/experiments/{stem}.gin "
                f"--topology={topology}") in header


@pytest.mark.parametrize("path", MODELS, ids=_stem)
def test_model_file_alone(path):
    """A model file on its own gives the ModelLoadConfig of its model (no other config needed)."""
    from relift_jax.config import ModelLoadConfig
    model_cfg = main.configured_from(ModelLoadConfig, [path], [])
    cfg = aot.model_config(model_cfg)
    assert abs(cfg.num_params() / PARAMS[_stem(path)] - 1) < 0.05
    # the jitted programs take the config as a static argument: it must hash
    hash(cfg)
