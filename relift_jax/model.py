"""Decoder-only transformer of the Qwen2 / Qwen2.5 and Llama 2/3/3.1 families, as pure functions.

The parameters are ONE plain pytree (nested dicts of arrays); per-layer weights are stacked on a leading
`layers` axis and the stack runs under `lax.scan`, so compile time does not grow with depth. The same
pytree is what the train steps differentiate, what the sampler decodes with and what checkpoints hold.

Attention without a KV cache (training, scoring) is `ModelConfig.attention` (attention.py: dense
"xla", flash-style "blockwise", TPU "splash", GPU "cudnn") over padded or packed rows (segment ids);
with a cache it is the dense `attend`, except one-token steps with per-row positions (the rollout
engine's decode) under `ModelConfig.decode_attention = "ragged"`: attention.ragged_decode_attention,
a Pallas TPU kernel that reads each row's filled key blocks of the cache in place.
`ModelConfig.remat` names what each layer keeps for the backward pass (REMAT_POLICIES).

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
from jax.ad_checkpoint import checkpoint_name

from relift_jax import attention as attn_lib
from relift_jax import sharding
from relift_jax.attention import attend, attention_mask

Params = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The matmul outputs `_layer` names for the "save_matmuls" remat policy.
MATMUL_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What each layer keeps for the backward pass (None: everything autodiff saves, no recompute).
# "full" keeps only the layer's input and recomputes the layer; "save_matmuls" keeps the
# projections and the attention's residuals (output and logsumexp of blockwise/splash), so the
# backward recomputes only norms, RoPE, activations and, for "xla", the dense probabilities.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.save_only_these_names(*MATMUL_NAMES,
                                                                  attn_lib.RESIDUAL_NAME),
}


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
    remat: str = "none"  # a REMAT_POLICIES name; True/False are read as "full"/"none"
    attention: str = "xla"  # an attention.IMPLEMENTATIONS name, for everything but the KV cache
    attention_block_q: int = 512  # blockwise/splash query block
    attention_block_kv: int = 512  # blockwise/splash key/value block
    # One-token decode steps with per-row cache positions (the rollout engine): "xla" = dense
    # `attend` over the whole window; "ragged" = attention.ragged_decode_attention (a Pallas TPU
    # kernel reading only each row's filled key blocks).
    decode_attention: str = "xla"
    decode_attention_block: int = 512  # ragged: key slots per kernel block

    def __post_init__(self):
        if isinstance(self.remat, bool):  # the bool this field used to be
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)} "
                             f"(or a bool: True = 'full', False = 'none')")
        if self.attention not in attn_lib.IMPLEMENTATIONS:
            raise ValueError(f"attention {self.attention!r} is not one of "
                             f"{attn_lib.IMPLEMENTATIONS}")
        if self.decode_attention not in attn_lib.DECODE_IMPLEMENTATIONS:
            raise ValueError(f"decode_attention {self.decode_attention!r} is not one of "
                             f"{attn_lib.DECODE_IMPLEMENTATIONS}")
        for name in ("attention_block_q", "attention_block_kv", "decode_attention_block"):
            if getattr(self, name) <= 0 or getattr(self, name) % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got "
                                 f"{getattr(self, name)}")
        if self.attention == "cudnn" and self.compute_dtype == "float32":
            raise ValueError("attention 'cudnn' needs compute_dtype bfloat16 or float16, got "
                             "float32 (cuDNN's flash attention has no float32 kernel)")
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


def _dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    y = jnp.einsum("...d,df->...f", x, w.astype(x.dtype))
    return y if b is None else y + b.astype(x.dtype)


def _layer(config: ModelConfig, lp: Params, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array,
           segment_ids_BxT: jax.Array | None, mask_BxTxS: jax.Array | None, cache,
           cache_start) -> tuple[jax.Array, Any]:
    """One pre-norm block.

    Without a cache, attention is `config.attention` under the segment rule of `segment_ids_BxT`
    (attention.segment_mask). With `cache` = (k_all, v_all, layer) of shape [L, B, K, S, E], only
    this call's T new keys and values are written (at slots cache_start..) and the dense `attend`
    reads layer `layer` of the whole cache under `mask_BxTxS` (or, for one token per row at its
    own slot with config.decode_attention "ragged", the ragged kernel reads row b's slots
    0..cache_start[b] of it: rows are left-aligned, as the engine keeps them); the updated
    (k_all, v_all) are returned. Writing just the new slots, in a layout the attention dots read
    without a transpose, keeps a decode step's memory traffic small.

    Matmul outputs are named (MATMUL_NAMES) for the "save_matmuls" remat policy.
    """
    B, T, _ = x_BxTxD.shape
    H, K, E = config.num_heads, config.num_kv_heads, config.head_dim
    h = rms_norm(x_BxTxD, lp["attn_norm"], config.rms_norm_eps)
    q = checkpoint_name(_dense(h, lp["q"], lp.get("q_bias")), "q_proj").reshape(B, T, H, E)
    k = checkpoint_name(_dense(h, lp["k"], lp.get("k_bias")), "k_proj").reshape(B, T, K, E)
    v = checkpoint_name(_dense(h, lp["v"], lp.get("v_bias")), "v_proj").reshape(B, T, K, E)
    q = sharding.constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
    k_BxKxTxE = apply_rope(k, cos, sin).transpose(0, 2, 1, 3)
    v_BxKxTxE = v.transpose(0, 2, 1, 3)
    if cache is not None:
        k_all, v_all, i = cache
        if jnp.ndim(cache_start) == 1:  # ragged: row b's one new token goes to slot cache_start[b]
            rows_B = jnp.arange(B)
            k_all = k_all.at[i, rows_B, :, cache_start, :].set(k_BxKxTxE[:, :, 0].astype(k_all.dtype))
            v_all = v_all.at[i, rows_B, :, cache_start, :].set(v_BxKxTxE[:, :, 0].astype(v_all.dtype))
        else:
            at = (i, 0, 0, cache_start, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k_BxKxTxE[None].astype(k_all.dtype), at)
            v_all = jax.lax.dynamic_update_slice(v_all, v_BxKxTxE[None].astype(v_all.dtype), at)
        if jnp.ndim(cache_start) == 1 and config.decode_attention == "ragged":
            # Row b sees its slots 0..cache_start[b] (left-aligned rows: the engine's layout).
            attn = attn_lib.ragged_decode_attention(
                q[:, 0], k_all, v_all, i, cache_start + 1,
                block=config.decode_attention_block)[:, None]
        else:
            attn = attend(q, k_all[i].astype(q.dtype), v_all[i].astype(q.dtype), mask_BxTxS)
        cache = (k_all, v_all)
    else:
        attn = attn_lib.self_attention(config.attention, q, k_BxKxTxE, v_BxKxTxE, segment_ids_BxT,
                                       block_q=config.attention_block_q,
                                       block_kv=config.attention_block_kv)
    o_BxTxD = checkpoint_name(_dense(attn.reshape(B, T, H * E), lp["o"], lp.get("o_bias")),
                              "o_proj")
    x_BxTxD = x_BxTxD + o_BxTxD
    h = rms_norm(x_BxTxD, lp["mlp_norm"], config.rms_norm_eps)
    gate_BxTxF = sharding.constrain(checkpoint_name(_dense(h, lp["gate"]), "gate_proj"),
                                    ("batch", "length", "act_mlp"))
    up_BxTxF = checkpoint_name(_dense(h, lp["up"]), "up_proj")
    down_BxTxD = checkpoint_name(_dense(jax.nn.silu(gate_BxTxF) * up_BxTxF, lp["down"]),
                                 "down_proj")
    x_BxTxD = x_BxTxD + down_BxTxD
    return sharding.constrain(x_BxTxD, ("batch", "length", "act_embed")), cache


# ----------------------------------------------------------------------------- forward passes

def hidden_states(config: ModelConfig, params: Params, tokens_BxT: jax.Array,
                  positions_BxT: jax.Array, kv_valid_BxS: jax.Array, *, cache=None,
                  cache_start: jax.Array | int = 0, segment_ids_BxT: jax.Array | None = None):
    """Final-norm hidden states [B, T, D] (and the updated cache).

    Args:
      tokens_BxT, positions_BxT: int32 token ids and their RoPE positions.
      kv_valid_BxS: which key slots hold real tokens; without a cache S == T.
      cache: None, or dict(k=[L, B, K, S, E], v=...) into which this call writes its T tokens at
        slots cache_start..cache_start+T-1 before attending (densely) over all S slots.
        `cache_start` may be int32 [B] when T == 1: each row writes its token at its own slot.
      segment_ids_BxT: packed rows (no cache only): int32 ids, 0 = padding; each token attends
        to earlier-or-equal slots of its own nonzero segment. Tokens outside `kv_valid_BxS` count
        as padding. Default: one segment, the valid tokens.
    """
    dt = config.dtype
    T = tokens_BxT.shape[1]
    x = params["embed"].astype(dt)[tokens_BxT]
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    cos, sin = rope_cos_sin(config, positions_BxT)

    layer = functools.partial(_layer, config)
    policy = REMAT_POLICIES[config.remat]
    if policy is not None:
        layer = jax.checkpoint(layer, policy=policy)

    if cache is None:
        if kv_valid_BxS.shape[1] != T:
            raise ValueError(f"without a cache kv_valid_BxS must cover the {T} tokens, got "
                             f"shape {kv_valid_BxS.shape}")
        if segment_ids_BxT is None:
            segments = kv_valid_BxS.astype(jnp.int32)
        else:
            segments = jnp.where(kv_valid_BxS, segment_ids_BxT.astype(jnp.int32), 0)

        def body(x, lp):
            x, _ = layer(lp, x, cos, sin, segments, None, None, 0)
            return x, None
        x, _ = jax.lax.scan(body, x, params["layers"])
        new_cache = None
    else:
        if segment_ids_BxT is not None:
            raise ValueError("segment_ids_BxT is not supported with a KV cache (decoding is "
                             "one sequence per row)")
        mask = attention_mask(kv_valid_BxS, cache_start, T)

        # The whole cache is a loop carry, updated in place at (layer, new slots) only.
        def body(carry, lp_i):
            x, ck_all, cv_all = carry
            lp, i = lp_i
            x, (ck_all, cv_all) = layer(lp, x, cos, sin, None, mask, (ck_all, cv_all, i),
                                        cache_start)
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
          valid_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None,
          segment_ids_BxT: jax.Array | None = None) -> jax.Array:
    """float32 logits [B, T, V] of padded or packed rows.

    Args:
      tokens_BxT: int32 token ids.
      valid_BxT: real tokens (default: all, or the nonzero segment ids when those are given).
      positions_BxT: RoPE positions; default: the count of valid tokens before each token.
      segment_ids_BxT: packed rows: int32 ids, 0 = padding, one nonzero id per sequence; tokens
        attend causally within their own segment. Needs `positions_BxT`, restarting at 0 in each
        segment (the caller knows where segments start).
    """
    if segment_ids_BxT is not None:
        if positions_BxT is None:
            raise ValueError("segment_ids_BxT needs positions_BxT (restarting at 0 in each "
                             "segment); none were given")
        if valid_BxT is None:
            valid_BxT = segment_ids_BxT != 0
    if valid_BxT is None:
        valid_BxT = jnp.ones(tokens_BxT.shape, bool)
    if positions_BxT is None:
        positions_BxT = jnp.maximum(jnp.cumsum(valid_BxT, axis=1) - 1, 0)
    h, _ = hidden_states(config, params, tokens_BxT, positions_BxT, valid_BxT,
                         segment_ids_BxT=segment_ids_BxT)
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
