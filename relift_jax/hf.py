"""Hugging Face folders <-> (ModelConfig, params).

Reads `config.json` in both the transformers v4 spelling (`rope_theta`, `torch_dtype`, `rope_scaling`)
and the v5 spelling (`rope_parameters`, `dtype`), single-file or sharded safetensors
(`model.safetensors.index.json`) in float32 or bfloat16. Writes folders that `transformers` loads.
Weights load from safetensors only: pickled `.bin` files are refused (they can run code on load).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from relift_jax import sharding
from relift_jax.model import ModelConfig, Params, RopeScaling, param_shapes

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
_LAYER_KEYS = {  # ours -> (Hugging Face name inside model.layers.{i}., transpose)
    "attn_norm": ("input_layernorm.weight", False),
    "q": ("self_attn.q_proj.weight", True),
    "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True),
    "o": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "o_bias": ("self_attn.o_proj.bias", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
}
_TOP_KEYS = {"embed": ("model.embed_tokens.weight", False), "final_norm": ("model.norm.weight", False),
             "lm_head": ("lm_head.weight", True)}


class CheckpointError(ValueError):
    """A Hugging Face folder that cannot be loaded; the message names the file and key."""


# ----------------------------------------------------------------------------- config

def config_from_hf(hf: dict[str, Any], *, source: str = "config.json",
                   param_dtype: str = "float32", compute_dtype: str | None = None) -> ModelConfig:
    """ModelConfig from a Hugging Face config dict (v4 or v5 spelling)."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {mt!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    kind = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = None
    if kind == "llama3":
        src = {**legacy, **rope}
        try:
            scaling = RopeScaling(float(src["factor"]), float(src["low_freq_factor"]),
                                  float(src["high_freq_factor"]),
                                  int(src["original_max_position_embeddings"]))
        except KeyError as e:
            raise CheckpointError(f"{source}: llama3 rope scaling lacks {e.args[0]!r}") from None
    elif kind != "default":
        raise CheckpointError(f"{source}: rope type {kind!r} is not supported (default, llama3)")
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        model_type=mt,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if mt == "qwen2" else bias,
        o_bias=False if mt == "qwen2" else bias,
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        param_dtype=param_dtype,
        compute_dtype=compute_dtype or param_dtype,
    )


def config_to_hf(config: ModelConfig, *, dtype: str = "float32", **extra) -> dict[str, Any]:
    """A config.json dict in the transformers v5 spelling that also carries v4's `rope_theta`."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        rope.update(rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings)
    hf = {
        "architectures": ["Qwen2ForCausalLM" if config.model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_sliding_window": False,
    }
    if config.model_type == "llama":
        hf["attention_bias"] = config.o_bias
        hf["mlp_bias"] = False
    hf.update(extra)
    return hf


# ----------------------------------------------------------------------------- load

def _weight_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file, from an index or a single model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map' object")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    if os.path.exists(single):
        with safe_open(single, framework="numpy") as f:
            return {k: single for k in f.keys()}
    pickled = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
    hint = (f" (found pickled {pickled}: convert them to safetensors; pickles are never loaded)"
            if pickled else "")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def load_hf_config(path: str) -> dict[str, Any]:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise CheckpointError(f"{cfg_file}: not found (is {path!r} a Hugging Face model folder?)")
    with open(cfg_file) as f:
        return json.load(f)


def load_checkpoint(path: str, dtype=jnp.float32, *, compute_dtype=None,
                    shardings: Any = None) -> tuple[ModelConfig, Params]:
    """Loads a Hugging Face folder.

    Args:
      path: folder with config.json and safetensors weights.
      dtype: parameter dtype (float32 or bfloat16).
      compute_dtype: activation dtype; defaults to `dtype`.
      shardings: optional pytree of NamedShardings (as sharding.tree_shardings gives) to place
        each parameter directly on the mesh.
    Returns:
      (config, params).
    """
    dt_name = jnp.dtype(dtype).name
    cd_name = jnp.dtype(compute_dtype).name if compute_dtype is not None else dt_name
    config = config_from_hf(load_hf_config(path), source=os.path.join(path, "config.json"),
                            param_dtype=dt_name, compute_dtype=cd_name)
    files = _weight_files(path)
    # Where a missing tensor should have been listed: the index when sharded, else the single file.
    index_file = os.path.join(path, "model.safetensors.index.json")
    listing = index_file if os.path.exists(index_file) else os.path.join(path, "model.safetensors")
    np_dtype = ml_dtypes.bfloat16 if dt_name == "bfloat16" else np.dtype(dt_name)
    handles: dict[str, Any] = {}

    def read(name: str, transpose: bool, expect: tuple[int, ...]) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{listing}: tensor {name!r} is missing from the checkpoint")
        file = files[name]
        if file not in handles:
            if not os.path.exists(file):
                raise CheckpointError(f"{file}: listed in the index but not found")
            handles[file] = safe_open(file, framework="numpy")
        try:
            x = handles[file].get_tensor(name)
        except Exception as e:  # a key in the index but not in the file
            raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from None
        x = x.T if transpose else x
        if x.shape != expect:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(x.shape)} "
                                  f"(as stored{', transposed' if transpose else ''}), expected "
                                  f"{expect} from config.json")
        return np.asarray(x).astype(np.float32).astype(np_dtype)

    shapes = param_shapes(config)
    params: Params = {"layers": {}}
    for ours, (name, tr) in _TOP_KEYS.items():
        if ours in shapes:
            params[ours] = read(name, tr, shapes[ours].shape)
    for ours, (name, tr) in _LAYER_KEYS.items():
        if ours in shapes["layers"]:
            per_layer = shapes["layers"][ours].shape[1:]
            params["layers"][ours] = np.stack(
                [read(f"model.layers.{i}.{name}", tr, per_layer) for i in range(config.num_layers)])
    if shardings is None:
        params = jax.tree.map(jnp.asarray, params)
    else:
        params = jax.tree.map(jax.device_put, params, shardings)
    return config, params


# ----------------------------------------------------------------------------- save

def to_hf_tensors(config: ModelConfig, params: Params, dtype=None) -> dict[str, np.ndarray]:
    """Flat {Hugging Face name: numpy array} (gathers sharded arrays to the host)."""
    host = jax.tree.map(np.asarray, sharding.global_to_host(params))  # every process joins
    out: dict[str, np.ndarray] = {}

    def put(name, x, tr):
        x = x.T if tr else x
        out[name] = np.ascontiguousarray(x if dtype is None else x.astype(dtype))

    for ours, (name, tr) in _TOP_KEYS.items():
        if ours in host:
            put(name, host[ours], tr)
    for ours, (name, tr) in _LAYER_KEYS.items():
        if ours in host["layers"]:
            for i in range(config.num_layers):
                put(f"model.layers.{i}.{name}", host["layers"][ours][i], tr)
    if config.model_type == "qwen2" and not config.qkv_bias:
        # Hugging Face Qwen2 always has q/k/v biases: zeros compute the same function.
        dt = host["layers"]["q"].dtype
        widths = {"q": config.num_heads * config.head_dim, "k": config.num_kv_heads * config.head_dim,
                  "v": config.num_kv_heads * config.head_dim}
        for i in range(config.num_layers):
            for p, width in widths.items():
                out[f"model.layers.{i}.self_attn.{p}_proj.bias"] = np.zeros((width,), dtype or dt)
    return out


def save_checkpoint(config: ModelConfig, params: Params, path: str, *,
                    max_shard_bytes: int = 4 << 30, tokenizer=None) -> None:
    """Writes a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Weights are saved in the parameter dtype; files over `max_shard_bytes` are split with an index.
    Written to a temporary folder then renamed, so a crash never leaves a half-written export.
    """
    if jax.process_index() != 0:
        to_hf_tensors(config, params)  # every process joins the gather
        return
    tensors = to_hf_tensors(config, params)
    tmp = path.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if size and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(x.nbytes for x in tensors.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config_to_hf(config, dtype=config.param_dtype), f, indent=1)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
        import shutil
        shutil.rmtree(path)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """`transformers.AutoTokenizer` from a folder, with its chat template; no remote code unless asked."""
    import transformers

    # transformers 5 picks the class from config.json's model_type when one sits beside the
    # tokenizer (a qwen2 folder -> Qwen2Tokenizer, byte-level), which would mangle a plain
    # `tokenizers` vocabulary such as the toy one; the class the folder itself names wins.
    cls = transformers.AutoTokenizer
    tok_cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(tok_cfg):
        with open(tok_cfg) as f:
            named = json.load(f).get("tokenizer_class")
        if named in ("TokenizersBackend", "PreTrainedTokenizerFast") and hasattr(transformers, named):
            cls = getattr(transformers, named)
    tok = cls.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
