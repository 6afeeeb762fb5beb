"""relift_jax.hf: loading transformers' folders, exporting folders transformers loads, and errors.

Shape key: B batch, T tokens, V vocab.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jax
import jax.numpy as jnp
from f32 import assert_close, decoder_ulps
from hf_fixtures import KINDS, make_hf_model
from relift_jax import hf, model

pytestmark = pytest.mark.hf_reference


def _hf_logits(hf_model, tokens_BxT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(tokens_BxT, dtype=torch.long)).logits.float().numpy()


def _tokens(cfg: model.ModelConfig, seed: int = 0, shape=(2, 40)) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, shape).astype(np.int32)


def _perturbed_params(cfg: model.ModelConfig, seed: int) -> model.Params:
    """Random params where norms and biases are far from 1 and 0, so a mis-mapped name shows up."""
    params = model.init_params(cfg, jax.random.key(seed), std=0.08)
    leaves, treedef = jax.tree.flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "norm" in name or "bias" in name:
            x = x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def _copy(src: str, dst) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- export -> transformers

@pytest.mark.parametrize("kind", KINDS)
def test_save_loads_in_transformers_with_same_logits(tiny_checkpoints, tmp_path, kind):
    """Our own random weights (not ones transformers wrote) exported and read by from_pretrained."""
    cfg, _ = tiny_checkpoints.ours(kind)
    params = _perturbed_params(cfg, seed=5)
    out = str(tmp_path / "export")
    hf.save_checkpoint(cfg, params, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf_model.config.tie_word_embeddings == cfg.tie_word_embeddings
    tokens_BxT = _tokens(cfg, 1, (2, 48))
    ref = _hf_logits(hf_model, tokens_BxT)
    ours = np.asarray(model.forward(cfg, params, tokens_BxT))
    # Here and below, JAX vs PyTorch: the decoder's float32 rounding at the scale of the logits.
    assert_close(ours, ref, ulps=decoder_ulps(cfg, T=tokens_BxT.shape[1]))


def test_sharded_export_loads_in_transformers_and_back(tiny_checkpoints, tmp_path):
    cfg, _ = tiny_checkpoints.ours("llama3")
    params = _perturbed_params(cfg, seed=7)
    out = str(tmp_path / "sharded")
    hf.save_checkpoint(cfg, params, out, max_shard_bytes=40_000)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert len(shards) > 2, files
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens_BxT = _tokens(cfg, 2, (2, 64))
    assert_close(model.forward(cfg, params, tokens_BxT), _hf_logits(hf_model, tokens_BxT),
                 ulps=decoder_ulps(cfg, T=tokens_BxT.shape[1]))

    cfg2, params2 = hf.load_checkpoint(out)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, params2)


def test_load_reads_transformers_sharded_folder(tmp_path):
    """A sharded folder written by transformers itself (not by us) loads to the same logits."""
    hf_model = make_hf_model("qwen2_untied", seed=3)
    path = str(tmp_path / "hf_sharded")
    hf_model.save_pretrained(path, max_shard_size="30KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    cfg, params = hf.load_checkpoint(path)
    tokens_BxT = _tokens(cfg, 3)
    assert_close(model.forward(cfg, params, tokens_BxT), _hf_logits(hf_model, tokens_BxT),
                 ulps=decoder_ulps(cfg, T=tokens_BxT.shape[1]))


# ----------------------------------------------------------------------------- config spellings

def _v4_spelling(v5: dict, rope_key: str | None) -> dict:
    """The same config as transformers v4 wrote it: rope_theta / torch_dtype / rope_scaling."""
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(v5["rope_parameters"])
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["torch_dtype"] = v5.get("dtype", "float32")
    kind = rope.pop("rope_type")
    if kind != "default":
        v4["rope_scaling"] = {rope_key: kind, **rope}
    return v4


@pytest.mark.parametrize("kind, rope_key", [("qwen2_tied", None), ("llama3", "type"),
                                            ("llama3", "rope_type")])
def test_v4_config_spelling_gives_same_config(tiny_checkpoints, tmp_path, kind, rope_key):
    src = tiny_checkpoints.paths[kind]
    v5 = hf.load_hf_config(src)
    assert "rope_parameters" in v5 and "rope_scaling" not in v5  # transformers 5 wrote it
    v4 = _v4_spelling(v5, rope_key)
    assert "rope_parameters" not in v4
    path = _copy(src, tmp_path / "v4")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(v4, f)
    cfg_v4, params_v4 = hf.load_checkpoint(path)
    cfg_v5, params_v5 = tiny_checkpoints.ours(kind)
    assert cfg_v4 == cfg_v5
    # transformers reads the v4 spelling the same way (the reference for what v4 meant).
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokens_BxT = _tokens(cfg_v4, 4, (1, 80))
    assert_close(model.forward(cfg_v4, params_v4, tokens_BxT), _hf_logits(hf_model, tokens_BxT),
                 ulps=decoder_ulps(cfg_v4, T=tokens_BxT.shape[1]))


def test_config_roundtrip_through_hf_dict(tiny_checkpoints):
    for kind in KINDS:
        cfg, _ = tiny_checkpoints.ours(kind)
        assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


# ----------------------------------------------------------------------------- bfloat16

def test_bf16_load_of_float32_checkpoint(tiny_checkpoints):
    cfg32, params32 = tiny_checkpoints.ours("qwen2_untied")
    cfg16, params16 = hf.load_checkpoint(tiny_checkpoints.paths["qwen2_untied"], dtype=jnp.bfloat16)
    assert cfg16 == cfg32.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    tokens_BxT = _tokens(cfg32, 5)
    l32 = np.asarray(model.forward(cfg32, params32, tokens_BxT))
    l16 = np.asarray(model.forward(cfg16, params16, tokens_BxT))
    assert l16.dtype == np.float32
    # bf16 rounds to 8 significant bits (2**-8 relative per rounding): at most that per matmul in
    # series (6 per layer and the head), at the scale of the logits (O(3), so ~0.13); the greedy
    # choice agrees almost everywhere.
    bound = (6 * cfg32.num_layers + 1) * 2.0**-8 * np.abs(l32).max()
    err = np.abs(l16 - l32).max()
    assert 0 < err < bound, (err, bound)
    assert (l16.argmax(-1) == l32.argmax(-1)).mean() > 0.9
    # float32 weights with bfloat16 activations: also close, and the weights stay float32.
    cfg_mixed, params_mixed = hf.load_checkpoint(tiny_checkpoints.paths["qwen2_untied"],
                                                 compute_dtype=jnp.bfloat16)
    assert (cfg_mixed.param_dtype, cfg_mixed.compute_dtype) == ("float32", "bfloat16")
    assert params_mixed["layers"]["q"].dtype == jnp.float32
    err_mixed = np.abs(np.asarray(model.forward(cfg_mixed, params_mixed, tokens_BxT)) - l32).max()
    assert 0 < err_mixed < bound, (err_mixed, bound)


def test_bf16_stored_weights_load_exactly(tmp_path):
    """A folder transformers saved in bfloat16 loads bit-exactly (and into float32 exactly too)."""
    hf_model = make_hf_model("llama3", seed=4).to(torch.bfloat16)
    path = str(tmp_path / "bf16")
    hf_model.save_pretrained(path)
    cfg, params = hf.load_checkpoint(path, dtype=jnp.bfloat16)
    ref = hf_model.state_dict()["model.layers.1.self_attn.q_proj.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(params["layers"]["q"][1]).astype(np.float32), ref)
    assert params["layers"]["q"].dtype == jnp.bfloat16
    _, params32 = hf.load_checkpoint(path)
    np.testing.assert_array_equal(np.asarray(params32["layers"]["q"][1]), ref)
    # The logits of bf16 weights computed in float32 match transformers run in float32 on them.
    # (Reloaded rather than `hf_model.float()`: `.to(bfloat16)` also rounded its RoPE frequency
    # buffer, which `.float()` cannot undo.)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens_BxT = _tokens(cfg, 6)
    assert_close(model.forward(cfg.replace(param_dtype="float32", compute_dtype="float32"),
                               params32, tokens_BxT),
                 _hf_logits(ref_model, tokens_BxT), ulps=decoder_ulps(cfg, T=tokens_BxT.shape[1]))


def test_bf16_export_loads_in_transformers(tiny_checkpoints, tmp_path):
    cfg16, params16 = hf.load_checkpoint(tiny_checkpoints.paths["llama3"], dtype=jnp.bfloat16)
    out = str(tmp_path / "bf16_export")
    hf.save_checkpoint(cfg16, params16, out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(hf_model.parameters()).dtype == torch.bfloat16
    w = hf_model.state_dict()["model.layers.0.mlp.down_proj.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(params16["layers"]["down"][0]).astype(np.float32), w)


# ----------------------------------------------------------------------------- errors

def _rewrite_single_file(path: str, edit) -> str:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def test_missing_tensor_names_file_and_key(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints.paths["qwen2_untied"], tmp_path / "missing")
    key = "model.layers.1.self_attn.k_proj.bias"
    _rewrite_single_file(path, lambda t: t.pop(key))
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_checkpoint(path)
    assert key in str(e.value) and os.path.join(path, "model.safetensors") in str(e.value)


def test_missing_tensor_in_sharded_index_names_index_and_key(tiny_checkpoints, tmp_path):
    cfg, params = tiny_checkpoints.ours("qwen2_untied")
    path = str(tmp_path / "sharded")
    hf.save_checkpoint(cfg, params, path, max_shard_bytes=40_000)
    index_file = os.path.join(path, "model.safetensors.index.json")
    with open(index_file) as f:
        index = json.load(f)
    key = "model.layers.0.mlp.up_proj.weight"
    del index["weight_map"][key]
    with open(index_file, "w") as f:
        json.dump(index, f)
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_checkpoint(path)
    assert key in str(e.value) and index_file in str(e.value)


def test_wrong_shape_names_file_and_key(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints.paths["llama3"], tmp_path / "shape")
    key = "model.layers.0.mlp.gate_proj.weight"
    file = _rewrite_single_file(path, lambda t: t.update({key: t[key][:-1]}))
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_checkpoint(path)
    assert key in str(e.value) and file in str(e.value) and "shape" in str(e.value)


def test_unknown_model_type_names_file_and_field(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints.paths["llama3"], tmp_path / "mistral")
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["model_type"] = "mistral"
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_checkpoint(path)
    assert cfg_file in str(e.value) and "model_type" in str(e.value) and "mistral" in str(e.value)


def test_unsupported_rope_type_names_file_and_field(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints.paths["qwen2_tied"], tmp_path / "yarn")
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_checkpoint(path)
    assert cfg_file in str(e.value) and "yarn" in str(e.value)


def test_pickle_only_folder_is_refused(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints.paths["qwen2_tied"], tmp_path / "pickled")
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save({"x": torch.zeros(1)}, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_checkpoint(path)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "model.safetensors" in msg and path in msg


def test_missing_config_names_file(tmp_path):
    with pytest.raises(hf.CheckpointError, match="config.json"):
        hf.load_checkpoint(str(tmp_path))


def test_export_overwrites_atomically(tiny_checkpoints, tmp_path):
    """A second export to the same folder replaces it and leaves no temporary folder behind."""
    cfg, params = tiny_checkpoints.ours("qwen2_tied")
    out = str(tmp_path / "again")
    hf.save_checkpoint(cfg, params, out, max_shard_bytes=40_000)
    hf.save_checkpoint(cfg, params, out)
    assert sorted(os.listdir(tmp_path)) == ["again"]
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
