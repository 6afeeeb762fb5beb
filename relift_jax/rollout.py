"""RL rollouts: sample with the model's stop ids, turn ids into the graded text, score, and the
frozen reference's log-probs. The controller gets these as plain callables.

Stopping and decoding follow `rollout_policy`, the same rules `relift_jax.evaluate` uses, so a
response gets the same reward in RL as in evaluation.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import jax
import numpy as np

from relift_jax import model, rollout_policy, sampler, sharding
from relift_jax.batches import RLBatch, device_batch
from relift_jax.config import RolloutConfig
from relift_jax.controller import Rollouts
from relift_jax.model import ModelConfig
from relift_jax.train_step import token_logprobs


class DecodeLayout:
    """Where the sampler's weights live: the training layout, or its own.

    tensor = 0: the training parameters as they are (on an FSDP mesh every decode step then gathers
    each layer's weights). tensor = T > 0: a sampler mesh over the same devices, `data` = n / T
    rows-parallel by `tensor` = T weights-parallel (heads, MLP and vocabulary split T ways, replicated
    across `data`); `__call__` copies the parameters into it once per call, in the compute dtype, so
    no weight moves inside the decode loop. The copy is (params bytes / T) per device.
    """

    def __init__(self, cfg: ModelConfig, train_mesh, tensor: int = 0, attention: str = "xla"):
        # `attention`: the decode steps' attention (ModelConfig.decode_attention) of this sampler.
        self.cfg, self.tensor = cfg.replace(decode_attention=attention), tensor
        self.mesh = train_mesh
        self.shardings = None
        if tensor and train_mesh is not None:
            from relift_jax.sharding import MeshConfig, make_mesh, tree_shardings
            self.mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=tensor),
                                  list(train_mesh.devices.flat))
            self.shardings = tree_shardings(self.mesh, model.param_axes(cfg),
                                            model.param_shapes(cfg))

    def __call__(self, params):
        """The parameters in the sampler's layout (the same arrays without a layout of its own)."""
        if self.shardings is None:
            return params
        dt = self.cfg.dtype
        return jax.device_put(jax.tree.map(lambda x: x.astype(dt), params), self.shardings)

    def generate(self, params, prompts, **kw):
        """sampler.generate on this layout's mesh (inside the training mesh's context)."""
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return sampler.generate(self.cfg, self(params), prompts, mesh=self.mesh, **kw)


def make_sample_fn(cfg: ModelConfig, rollout: RolloutConfig, stop_ids: Sequence[int],
                   pad_id: int, mesh) -> Callable:
    """(params, prompt ids, G, seed) -> Rollouts of N*G rows, question by question."""
    layout = DecodeLayout(cfg, mesh, rollout.decode_tensor, rollout.decode_attention)

    def sample(params, prompts, G: int, seed: int) -> Rollouts:
        out = layout.generate(params, prompts, max_new_tokens=rollout.max_response_len,
                              temperature=rollout.temperature, top_p=rollout.top_p,
                              top_k=rollout.top_k, eos_id=list(stop_ids), seed=seed,
                              num_samples=G, pad_id=pad_id, engine=rollout.engine,
                              slots=rollout.decode_slots, segment_len=rollout.segment_len)
        return Rollouts(out.tokens, out.logprobs, out.stopped)
    return sample


def make_score_fn(tokenizer, scorer, stop_ids: Sequence[int], math_reward: str) -> Callable:
    """(response ids, ground truths, reward names) -> rewards; 'math' means `math_reward`."""
    def score(token_lists, truths, reward_names):
        texts = [rollout_policy.response_text(tokenizer, ids, stop_ids) for ids in token_lists]
        names = [math_reward if r == "math" else r for r in reward_names]
        return scorer.score(texts, truths, names)
    return score


def make_logprobs_fn(cfg: ModelConfig, chunk_len: int = 0, mesh=None
                     ) -> Callable[[Any, RLBatch], np.ndarray]:
    """(params, batch) -> the training forward's token-aligned log-probs [M, b, T] of the batch's
    tokens: the frozen reference's (KL penalty), or the current policy's ("recompute" old
    log-probs, truncated importance sampling, the sampler/trainer mismatch)."""
    @jax.jit
    def logprobs(params, tokens_MxbxT, segment_ids_MxbxT, positions_MxbxT):
        return jax.lax.map(lambda x: token_logprobs(cfg, params, *x, chunk_len=chunk_len)[0],
                           (tokens_MxbxT, segment_ids_MxbxT, positions_MxbxT))

    def fn(params, batch: RLBatch) -> np.ndarray:
        mb = batch.micro_batches
        inputs = device_batch((mb.tokens_bxT, mb.segment_ids_bxT, mb.positions_bxT), mesh)
        return np.asarray(sharding.global_to_host(logprobs(params, *inputs)))
    return fn

