"""Decoder-only transformer of the Qwen2 / Qwen2.5 and Llama 2/3/3.1 families, as pure functions.

The parameters are ONE plain pytree (nested dicts of arrays); per-layer weights are stacked on a leading
`layers` axis and the stack runs under `lax.scan`, so compile time does not grow with depth. The same
pytree is what the train steps differentiate, what the sampler decodes with and what checkpoints hold.

Shape key: B batch, T tokens (queries), S key/value slots, D hidden, H query heads, K key/value heads,
R = H // K query heads per key/value head, E head dim, F MLP hidden, V vocab, L layers.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from relift_jax import sharding

Params = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 `llama3` RoPE frequency scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one decoder. Hashable: it is a static argument of jitted code."""

    model_type: str  # "qwen2" or "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    max_position_embeddings: int = 32768
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.model_type not in ("qwen2", "llama"):
            raise ValueError(f"model_type {self.model_type!r} is not supported (qwen2, llama)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads "
                             f"{self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {sorted(_DTYPES)}")

    @property
    def dtype(self) -> jnp.dtype:
        return _DTYPES[self.compute_dtype]

    @property
    def weight_dtype(self) -> jnp.dtype:
        return _DTYPES[self.param_dtype]

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(param_shapes(self)))


# ----------------------------------------------------------------------------- parameters

def param_axes(config: ModelConfig) -> Params:
    """Logical axis names of every parameter (same tree as the params); sharding.py maps them."""
    layers = {
        "attn_norm": ("layers", "norm"),
        "q": ("layers", "embed", "heads"),
        "k": ("layers", "embed", "kv_heads"),
        "v": ("layers", "embed", "kv_heads"),
        "o": ("layers", "heads", "embed"),
        "mlp_norm": ("layers", "norm"),
        "gate": ("layers", "embed", "mlp"),
        "up": ("layers", "embed", "mlp"),
        "down": ("layers", "mlp", "embed"),
    }
    if config.qkv_bias:
        layers.update(q_bias=("layers", "heads"), k_bias=("layers", "kv_heads"),
                      v_bias=("layers", "kv_heads"))
    if config.o_bias:
        layers["o_bias"] = ("layers", "norm")
    axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("norm",)}
    if not config.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(config: ModelConfig) -> Params:
    """ShapeDtypeStructs of every parameter."""
    L, D, F, V = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    HE, KE = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {
        "attn_norm": (L, D), "q": (L, D, HE), "k": (L, D, KE), "v": (L, D, KE), "o": (L, HE, D),
        "mlp_norm": (L, D), "gate": (L, D, F), "up": (L, D, F), "down": (L, F, D),
        "q_bias": (L, HE), "k_bias": (L, KE), "v_bias": (L, KE), "o_bias": (L, D),
    }
    axes = param_axes(config)
    dt = config.weight_dtype
    tree = {"embed": (V, D), "final_norm": (D,), "lm_head": (D, V),
            "layers": {k: shapes[k] for k in axes["layers"]}}
    tree = {k: v for k, v in tree.items() if k in axes}
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt), tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def init_params(config: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random parameters (normal(std) matrices, unit norms, zero biases), for tests and toy models."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, s), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            out.append(jnp.ones(s.shape, s.dtype))
        elif "bias" in name:
            out.append(jnp.zeros(s.shape, s.dtype))
        else:
            out.append((std * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype))
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- building blocks

def rms_norm(x_BxTxD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 (as Hugging Face does), returned in the input dtype."""
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return weight_D.astype(x_BxTxD.dtype) * x.astype(x_BxTxD.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [E/2], with Llama 3.1 scaling when configured (host numpy)."""
    E = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, E, 2, dtype=np.float64) / E))
    rs = config.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
              / (rs.high_freq_factor - rs.low_freq_factor))
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(config: ModelConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    freqs_BxTxE2 = positions_BxT.astype(jnp.float32)[..., None] * rope_inv_freq(config)
    emb_BxTxE = jnp.concatenate([freqs_BxTxE2, freqs_BxTxE2], axis=-1)
    return jnp.cos(emb_BxTxE), jnp.sin(emb_BxTxE)


def apply_rope(x_BxTxNxE: jax.Array, cos_BxTxE: jax.Array, sin_BxTxE: jax.Array) -> jax.Array:
    """Hugging Face `rotate_half` convention, in float32."""
    x = x_BxTxNxE.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BxTxE[:, :, None, :] + rotated * sin_BxTxE[:, :, None, :]
    return out.astype(x_BxTxNxE.dtype)


def attention_mask(kv_valid_BxS: jax.Array, start: jax.Array | int, T: int) -> jax.Array:
    """Causal mask [B, T, S] for T queries that sit at slots start..start+T-1 of S key slots."""
    S = kv_valid_BxS.shape[1]
    q_slot_T = start + jnp.arange(T)
    causal_TxS = jnp.arange(S)[None, :] <= q_slot_T[:, None]
    return causal_TxS[None] & kv_valid_BxS[:, None, :]


def attend(q_BxTxHxE: jax.Array, k_BxKxSxE: jax.Array, v_BxKxSxE: jax.Array,
           mask_BxTxS: jax.Array) -> jax.Array:
    """Grouped-query attention; softmax in float32. Returns [B, T, H, E]."""
    B, T, H, E = q_BxTxHxE.shape
    K = k_BxKxSxE.shape[1]
    q = q_BxTxHxE.reshape(B, T, K, H // K, E)
    scores_BxKxRxTxS = jnp.einsum("btkre,bkse->bkrts", q, k_BxKxSxE,
                                  preferred_element_type=jnp.float32) / math.sqrt(E)
    scores_BxKxRxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxRxTxS, -1e30)
    probs = jax.nn.softmax(scores_BxKxRxTxS, axis=-1).astype(v_BxKxSxE.dtype)
    out = jnp.einsum("bkrts,bkse->btkre", probs, v_BxKxSxE)
    return out.reshape(B, T, H, E)


def _dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    y = jnp.einsum("...d,df->...f", x, w.astype(x.dtype))
    return y if b is None else y + b.astype(x.dtype)


def _layer(config: ModelConfig, lp: Params, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array,
           mask_BxTxS: jax.Array, cache, cache_start) -> tuple[jax.Array, Any]:
    """One pre-norm block.

    With `cache` = (k_all, v_all, layer) of shape [L, B, K, S, E], only this call's T new keys and
    values are written (at slots cache_start..) and attention reads layer `layer` of the whole
    cache; the updated (k_all, v_all) are returned. Writing just the new slots, in a layout the
    attention dots read without a transpose, keeps a decode step's memory traffic small.
    """
    B, T, _ = x_BxTxD.shape
    H, K, E = config.num_heads, config.num_kv_heads, config.head_dim
    h = rms_norm(x_BxTxD, lp["attn_norm"], config.rms_norm_eps)
    q = _dense(h, lp["q"], lp.get("q_bias")).reshape(B, T, H, E)
    k = _dense(h, lp["k"], lp.get("k_bias")).reshape(B, T, K, E)
    v = _dense(h, lp["v"], lp.get("v_bias")).reshape(B, T, K, E)
    q = sharding.constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
    k_BxKxTxE = apply_rope(k, cos, sin).transpose(0, 2, 1, 3)
    v_BxKxTxE = v.transpose(0, 2, 1, 3)
    if cache is not None:
        k_all, v_all, i = cache
        at = (i, 0, 0, cache_start, 0)
        k_all = jax.lax.dynamic_update_slice(k_all, k_BxKxTxE[None].astype(k_all.dtype), at)
        v_all = jax.lax.dynamic_update_slice(v_all, v_BxKxTxE[None].astype(v_all.dtype), at)
        k_BxKxTxE, v_BxKxTxE, cache = k_all[i], v_all[i], (k_all, v_all)
    attn = attend(q, k_BxKxTxE.astype(q.dtype), v_BxKxTxE.astype(q.dtype), mask_BxTxS)
    x_BxTxD = x_BxTxD + _dense(attn.reshape(B, T, H * E), lp["o"], lp.get("o_bias"))
    h = rms_norm(x_BxTxD, lp["mlp_norm"], config.rms_norm_eps)
    gate_BxTxF = sharding.constrain(_dense(h, lp["gate"]), ("batch", "length", "act_mlp"))
    up_BxTxF = _dense(h, lp["up"])
    x_BxTxD = x_BxTxD + _dense(jax.nn.silu(gate_BxTxF) * up_BxTxF, lp["down"])
    return sharding.constrain(x_BxTxD, ("batch", "length", "act_embed")), cache


# ----------------------------------------------------------------------------- forward passes

def hidden_states(config: ModelConfig, params: Params, tokens_BxT: jax.Array,
                  positions_BxT: jax.Array, kv_valid_BxS: jax.Array, *, cache=None,
                  cache_start: jax.Array | int = 0):
    """Final-norm hidden states [B, T, D] (and the updated cache).

    Args:
      tokens_BxT, positions_BxT: int32 token ids and their RoPE positions.
      kv_valid_BxS: which key slots hold real tokens; without a cache S == T.
      cache: None, or dict(k=[L, B, K, S, E], v=...) into which this call writes its T tokens at
        slots cache_start..cache_start+T-1 before attending over all S slots.
    """
    dt = config.dtype
    x = params["embed"].astype(dt)[tokens_BxT]
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    cos, sin = rope_cos_sin(config, positions_BxT)
    mask = attention_mask(kv_valid_BxS, cache_start, tokens_BxT.shape[1])

    layer = functools.partial(_layer, config)
    if config.remat:
        layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)

    if cache is None:
        def body(x, lp):
            x, _ = layer(lp, x, cos, sin, mask, None, 0)
            return x, None
        x, _ = jax.lax.scan(body, x, params["layers"])
        new_cache = None
    else:
        # The whole cache is a loop carry, updated in place at (layer, new slots) only.
        def body(carry, lp_i):
            x, ck_all, cv_all = carry
            lp, i = lp_i
            x, (ck_all, cv_all) = layer(lp, x, cos, sin, mask, (ck_all, cv_all, i), cache_start)
            return (x, ck_all, cv_all), None
        (x, ck, cv), _ = jax.lax.scan(body, (x, cache["k"], cache["v"]),
                                      (params["layers"], jnp.arange(config.num_layers)))
        new_cache = {"k": ck, "v": cv}
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    return x, new_cache


def logits_from_hidden(config: ModelConfig, params: Params, h_BxTxD: jax.Array) -> jax.Array:
    """float32 logits [B, T, V]."""
    w_DxV = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    logits = jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV.astype(h_BxTxD.dtype),
                        preferred_element_type=jnp.float32)
    return sharding.constrain(logits, ("batch", "length", "act_vocab"))


def apply(config: ModelConfig, params: Params, tokens_BxT: jax.Array,
          valid_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None) -> jax.Array:
    """Logits for padded sequences: `valid_BxT` marks real tokens; positions default to their count."""
    if valid_BxT is None:
        valid_BxT = jnp.ones(tokens_BxT.shape, bool)
    if positions_BxT is None:
        positions_BxT = jnp.maximum(jnp.cumsum(valid_BxT, axis=1) - 1, 0)
    h, _ = hidden_states(config, params, tokens_BxT, positions_BxT, valid_BxT)
    return logits_from_hidden(config, params, h)


def forward(config: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Public API: logits float32 [B, T, V] for unpadded int32 tokens [B, T] at positions 0..T-1."""
    return _forward_jit(config, params, jnp.asarray(tokens, jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(config, params, tokens_BxT):
    return apply(config, params, tokens_BxT)


def init_cache(config: ModelConfig, batch: int, slots: int, dtype=None) -> dict[str, jax.Array]:
    """Zeroed KV cache dict(k, v) of shape [L, B, K, S, E] in the compute dtype."""
    shape = (config.num_layers, batch, config.num_kv_heads, slots, config.head_dim)
    dtype = dtype or config.dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
