"""Set-up of a training run from plain configs: model, data, train state, the two jitted steps, and
the teacher that writes demonstrations when SFTConfig.demo_source = 'teacher'.

All validation of the data against the configs happens here, before any compilation; errors are
`ConfigError`s naming the binding and the rule.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from relift_jax import data, encoding, hf, model, rollout, rollout_policy, sharding
from relift_jax.batches import Packing, device_batch
from relift_jax.config import (ConfigError, DataConfig, ModelLoadConfig, RolloutConfig, RunConfig,
                               TeacherConfig)
from relift_jax.controller import Question
from relift_jax.demos import TeacherDemos
from relift_jax.heldout import example_level
from relift_jax.train_step import (TrainState, init_state, jit_step, make_optimizer, make_schedule,
                                   rl_train_step, sft_train_step)


# ----------------------------------------------------------------------------- model

def check_model_path(cfg: ModelLoadConfig) -> None:
    if cfg.path is not None and not os.path.exists(cfg.path):
        raise ConfigError(f"ModelLoadConfig.path = {cfg.path!r}: no such folder (models load "
                          f"from a local Hugging Face folder, never from a hub)")


def load_model(cfg: ModelLoadConfig, shardings_for: Callable | None = None
               ) -> tuple[model.ModelConfig, Any, Any, str | None]:
    """(config, params, tokenizer, model folder) from a Hugging Face folder, or a random init."""
    check_model_path(cfg)
    tok_path = cfg.tokenizer_path or cfg.path
    if tok_path == "toy":
        from relift_jax.toy.tokenizer import TOKENIZER_DIR
        tok_path = str(TOKENIZER_DIR)
    if not os.path.isdir(tok_path):
        raise ConfigError(f"ModelLoadConfig.tokenizer_path = {tok_path!r}: no such folder")
    tok = hf.load_tokenizer(tok_path, trust_remote_code=cfg.trust_remote_code)
    if cfg.path is None:  # a fresh random model (the toy base model starts here)
        fields = {"model_type": "qwen2", "qkv_bias": True, "vocab_size": len(tok), **cfg.random_init,
                  "param_dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype,
                  "remat": cfg.remat, "attention": cfg.attention}
        mc = model.ModelConfig(**fields)
        init = functools.partial(model.init_params, mc)
        # Created directly in their shardings: never whole on one device.
        init = jax.jit(init, out_shardings=shardings_for(mc)) if shardings_for else jax.jit(init)
        return mc, init(jax.random.key(0)), tok, None
    hf_cfg = hf.config_from_hf(hf.load_hf_config(cfg.path), source=cfg.path,
                               param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
    hf_cfg = hf_cfg.replace(remat=cfg.remat, attention=cfg.attention)
    shardings = shardings_for(hf_cfg) if shardings_for else None
    _, params = hf.load_checkpoint(cfg.path, dtype=jnp.dtype(cfg.param_dtype),
                                   compute_dtype=jnp.dtype(cfg.compute_dtype), shardings=shardings)
    return hf_cfg, params, tok, cfg.path


# ----------------------------------------------------------------------------- data

def make_questions(examples, tok, rollout: RolloutConfig, max_demo_len: int
                   ) -> tuple[list[Question], list[data.Example], int]:
    """Examples -> tokenised questions (prompts over max_prompt_len dropped or an error)."""
    enc = data.encode_prompts(tok, examples, max_prompt_len=rollout.max_prompt_len,
                              keep_system_prompt=rollout.keep_system_prompt,
                              think_prefix=rollout.think_prefix,
                              on_overflow="drop" if rollout.drop_long_prompts else "raise")
    qs, kept = [], []
    for ids, k in zip(enc.ids, enc.kept):
        ex = examples[k]
        demo = None
        if ex.demonstration:
            demo, _ = data.encode_demonstration(tok, ex.demonstration, max_len=max_demo_len,
                                                eos_id=tok.eos_token_id,
                                                think_prefix=rollout.think_prefix)
        qs.append(Question(ids, ex.ground_truth, demo, ex.reward, example_level(ex)))
        kept.append(ex)
    return qs, kept, enc.num_dropped


def resolve_data(spec: str, run_dir: str) -> str:
    """A data path, or a toy-task spec `toy:SPLIT:LEVELS:N_PER_LEVEL[:SEED]` (for example
    `toy:train:1,2,3,4,5:200`) written deterministically into `<run_dir>/data/`."""
    if not spec.startswith("toy:"):
        return spec
    parts = spec.split(":")
    if len(parts) not in (4, 5):
        raise ConfigError(f"data spec {spec!r}: expected toy:SPLIT:LEVELS:N_PER_LEVEL[:SEED]")
    from relift_jax.toy import task
    split, levels, n = parts[1], [int(x) for x in parts[2].split(",")], int(parts[3])
    seed = int(parts[4]) if len(parts) == 5 else 0
    path = os.path.join(run_dir, "data", spec.replace(":", "_").replace(",", "-") + ".jsonl")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        task.write_dataset(path + ".tmp", levels, n, seed=seed, split=split)
        os.replace(path + ".tmp", path)
    return path


def split_heldout(examples, dcfg: DataConfig, seed: int, run_dir: str):
    """(train, held-out) examples: the held-out file, or a seeded fraction of train."""
    if dcfg.heldout:
        return examples, data.load_examples(resolve_data(dcfg.heldout, run_dir))
    if dcfg.heldout_fraction <= 0:
        return examples, []
    perm = np.random.default_rng(seed).permutation(len(examples))
    n = max(1, int(len(examples) * dcfg.heldout_fraction))
    held = set(perm[:n].tolist())
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


@dataclasses.dataclass
class Data:
    questions: list[Question]
    heldout: list[data.Example]  # held-out rows that pass the prompt-length filter
    dropped: int                 # training prompts dropped as too long
    examples: list[data.Example] = dataclasses.field(default_factory=list)  # one per question


def load_data(c: RunConfig, tok, run_dir: str) -> Data:
    max_demo = c.sft.max_demo_len or c.rollout.max_response_len
    train_ex, held_ex = split_heldout(data.load_examples(resolve_data(c.data.train, run_dir)),
                                      c.data, c.train.seed, run_dir)
    questions, kept, dropped = make_questions(train_ex, tok, c.rollout, max_demo)
    if not questions:
        raise ConfigError(f"DataConfig.train = {c.data.train!r}: no usable question "
                          f"({dropped} dropped as longer than max_prompt_len)")
    n_demos = sum(q.demo_ids is not None for q in questions)
    if c.train.mode != "rl" and c.sft.demo_source == "column" and not n_demos:
        raise ConfigError(f"TrainConfig.mode = {c.train.mode!r} needs demonstrations but "
                          f"{c.data.train!r} has none")
    if c.train.mode == "relift_uniform" and c.sft.buffer_size > n_demos:
        raise ConfigError(f"SFTConfig.buffer_size = {c.sft.buffer_size}: relift_uniform draws "
                          f"that many distinct demonstrations but {c.data.train!r} has {n_demos}")
    held = make_questions(held_ex, tok, c.rollout, max_demo)[1] if held_ex else []
    if c.train.eval_questions:
        held = held[:c.train.eval_questions]
    return Data(questions, held, dropped, kept)


# ----------------------------------------------------------------------------- the teacher

def check_teacher_path(t: TeacherConfig) -> None:
    if t.path is not None and not os.path.exists(t.path):
        raise ConfigError(f"TeacherConfig.path = {t.path!r}: no such folder (teachers load from a "
                          f"local Hugging Face folder; TeacherConfig.build_gin builds one)")
    tok = t.tokenizer_path
    if tok not in (None, "toy") and not os.path.isdir(tok):
        raise ConfigError(f"TeacherConfig.tokenizer_path = {tok!r}: no such folder")


def make_teacher_demos(c: RunConfig, run_dir: str, examples: list[data.Example], student_tok,
                       scorer, mesh) -> TeacherDemos:
    """The teacher demonstration source: its model from TeacherConfig.path (its own parameters,
    placed in its sampler's layout over the run's devices), sampled with the run's sampler and its
    own tokenizer and stop ids, graded by the run's scorer, encoded for the student."""
    t = c.teacher
    check_teacher_path(t)
    load = ModelLoadConfig(path=t.path, tokenizer_path=t.tokenizer_path,
                           param_dtype=t.param_dtype, compute_dtype=t.compute_dtype)

    def shardings_for(cfg):  # loaded straight into the layout its sampler uses
        layout = rollout.DecodeLayout(cfg, mesh, t.decode_tensor, c.rollout.decode_attention)
        return layout.shardings or param_shardings_for(mesh)(cfg)
    cfg, params, tok, model_dir = load_model(load, shardings_for)
    stops = rollout_policy.stop_ids(tok, model_dir)
    # Slots: the most rows a request can hold, so that the engine's batch is a power-of-two bucket
    # of it, a handful of programs for the run, not one per number of hardest questions (the
    # draws do not depend on the slots).
    r = dataclasses.replace(c.rollout, temperature=t.temperature, top_p=1.0, top_k=0,
                            max_response_len=t.max_response_len or c.rollout.max_response_len,
                            decode_tensor=t.decode_tensor, decode_slots=c.rollout.decode_slots or
                            c.rollout.questions_per_iteration * t.tries)
    max_demo = c.sft.max_demo_len or c.rollout.max_response_len

    def prompt_fn(ex: data.Example) -> list[int] | None:
        text = encoding.render_prompt(tok, ex.messages, keep_system_prompt=r.keep_system_prompt,
                                      think_prefix=r.think_prefix)
        ids = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
        return ids if len(ids) <= r.max_prompt_len else None

    return TeacherDemos(
        run_dir=run_dir, examples=examples, params=params, prompt_fn=prompt_fn,
        sample_fn=rollout.make_sample_fn(cfg, r, stops, tok.pad_token_id, mesh),
        score_fn=rollout.make_score_fn(tok, scorer, stops, c.train.reward),
        text_fn=lambda ids: rollout_policy.response_text(tok, ids, stops),
        encode_fn=lambda text: encoding.encode_demonstration(
            student_tok, text, max_len=max_demo, eos_id=student_tok.eos_token_id,
            think_prefix=c.rollout.think_prefix)[0],
        tries=t.tries, seed=c.train.seed,
        think_prefix=encoding.THINK_PREFIX if c.rollout.think_prefix else "")


# ----------------------------------------------------------------------------- state and steps

@dataclasses.dataclass
class Steps:
    rl: Callable      # (state, host RLBatch) -> (state, device metrics)
    sft: Callable     # (state, host SFTBatch) -> (state, device metrics)
    packing: Packing


def train_state(c: RunConfig, params) -> tuple[TrainState, Any, Any]:
    """(state, RL optimiser, SFT optimiser): params plus both AdamW states."""
    rl_tx, sft_tx = make_optimizer(c.rl.optim()), make_optimizer(c.sft.optim())
    if c.sft.share_optimizer:
        sft_tx = rl_tx
    return init_state(params, rl_tx, sft_tx, share_optimizer=c.sft.share_optimizer), rl_tx, sft_tx


def make_steps(c: RunConfig, cfg: model.ModelConfig, state: TrainState, rl_tx, sft_tx, tok,
               mesh) -> Steps:
    """The two jitted steps, fed host batches that cross to the device in one place."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    chunk = c.model.logits_chunk_len
    rl_step = jit_step(rl_train_step, shardings, config=cfg, rl=c.rl, tx=rl_tx,
                       schedule=make_schedule(c.rl.optim()),
                       norm_len=c.rl.norm_len or c.rollout.max_response_len, chunk_len=chunk)
    sft_step = jit_step(sft_train_step, shardings, config=cfg, sft=c.sft, tx=sft_tx,
                        schedule=make_schedule(c.sft.optim()), chunk_len=chunk)
    packing = Packing(micro_batch_size=c.rl.micro_batch_size, pad_id=tok.pad_token_id,
                      batch_multiple=sharding.batch_divisor(mesh),
                      tokens_per_micro_batch=c.rl.tokens_per_micro_batch)
    return Steps(rl=lambda s, b: rl_step(s, device_batch(b, mesh)),
                 sft=lambda s, b: sft_step(s, device_batch(b, mesh)), packing=packing)


def param_shardings_for(mesh) -> Callable:
    return lambda cfg: sharding.tree_shardings(mesh, model.param_axes(cfg), model.param_shapes(cfg))
