"""`run()`: one training run, top to bottom (mesh, model, data, steps, checkpoint, loop, export).

Gin configures `run` and the config dataclasses at the edge (main.py); everything below takes
plain values.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from relift_jax import checkpoint, data, hf, losses, metrics, model, sampler, sharding
from relift_jax.config import (DataConfig, ModelLoadConfig, RLConfig, RolloutConfig, SFTConfig,
                               TrainConfig)
from relift_jax.controller import Controller, Question, Rollouts
from relift_jax.train_step import (Packing, device_batch, init_state, jit_step, make_optimizer,
                                   make_schedule, rl_train_step, sft_train_step)


# ----------------------------------------------------------------------------- model

def build_base(cfg: ModelLoadConfig) -> None:
    """Runs `cfg.build_gin` in a fresh process (gin state is global) to create `cfg.path`."""
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "relift_jax.main", f"--gin_file={cfg.build_gin}"]
    if cfg.build_run_dir:
        cmd.append(f"--run_dir={cfg.build_run_dir}")
    print(f"{cfg.path} is absent: building it with {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True)
    if not os.path.exists(cfg.path):
        raise FileNotFoundError(f"ModelLoadConfig.build_gin = {cfg.build_gin!r} ran but did not "
                                f"create ModelLoadConfig.path = {cfg.path!r}")


def load_model(cfg: ModelLoadConfig, shardings_for=None) -> tuple[model.ModelConfig, Any, Any]:
    """(config, params, tokenizer) from a Hugging Face folder (built first when configured so)."""
    if cfg.path is not None and not os.path.exists(cfg.path):
        if not cfg.build_gin:
            raise FileNotFoundError(f"ModelLoadConfig.path = {cfg.path!r}: no such folder (models "
                                    f"load from a local Hugging Face folder, never from a hub)")
        build_base(cfg)
    tok_path = cfg.tokenizer_path or cfg.path
    if tok_path == "toy":
        from relift_jax.toy.tokenizer import TOKENIZER_DIR
        tok_path = str(TOKENIZER_DIR)
    if not os.path.isdir(tok_path):
        raise FileNotFoundError(f"ModelLoadConfig.tokenizer_path = {tok_path!r}: no such folder")
    tok = hf.load_tokenizer(tok_path, trust_remote_code=cfg.trust_remote_code)
    if cfg.path is None:  # a fresh random model (the toy base model starts here)
        fields = {"model_type": "qwen2", "qkv_bias": True, "vocab_size": len(tok), **cfg.random_init,
                  "param_dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype,
                  "remat": cfg.remat}
        mc = model.ModelConfig(**fields)
        params = model.init_params(mc, jax.random.key(0))
        if shardings_for:
            params = jax.tree.map(jax.device_put, params, shardings_for(mc))
        return mc, params, tok
    hf_cfg = hf.config_from_hf(hf.load_hf_config(cfg.path), source=cfg.path,
                               param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
    hf_cfg = hf_cfg.replace(remat=cfg.remat)
    shardings = shardings_for(hf_cfg) if shardings_for else None
    _, params = hf.load_checkpoint(cfg.path, dtype=jnp.dtype(cfg.param_dtype),
                                   compute_dtype=jnp.dtype(cfg.compute_dtype), shardings=shardings)
    return hf_cfg, params, tok


# ----------------------------------------------------------------------------- data

def _level(ex: data.Example) -> int | None:
    lv = ex.extra.get("level") if isinstance(ex.extra, dict) else None
    return int(lv) if lv is not None else None


def make_questions(examples, tok, rollout: RolloutConfig, max_demo_len: int
                   ) -> tuple[list[Question], list[data.Example], int]:
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
        qs.append(Question(ids, ex.ground_truth, demo, ex.reward, _level(ex)))
        kept.append(ex)
    return qs, kept, enc.num_dropped


def resolve_data(spec: str, run_dir: str) -> str:
    """A data file path, or a toy-task spec `toy:SPLIT:LEVELS:N_PER_LEVEL[:SEED]` (for example
    `toy:train:1,2,3,4,5:200`) written deterministically into `<run_dir>/data/`."""
    if not spec.startswith("toy:"):
        return spec
    parts = spec.split(":")
    if len(parts) not in (4, 5):
        raise ValueError(f"data spec {spec!r}: expected toy:SPLIT:LEVELS:N_PER_LEVEL[:SEED]")
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
    if dcfg.heldout:
        return examples, data.load_examples(resolve_data(dcfg.heldout, run_dir))
    if dcfg.heldout_fraction <= 0:
        return examples, []
    perm = np.random.default_rng(seed).permutation(len(examples))
    n = max(1, int(len(examples) * dcfg.heldout_fraction))
    held = set(perm[:n].tolist())
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


# ----------------------------------------------------------------------------- run

@gin.configurable
def run(run_dir: str = gin.REQUIRED, *, stop_after: int | None = None) -> dict:
    """Trains with the gin-bound configs; returns the final held-out summary.

    Args:
      run_dir: TensorBoard events, checkpoints, exports and the operative config go here. A run
        directory with a checkpoint resumes from it (TrainConfig.resume).
      stop_after: end this process after that many iterations (for tests of resumption).
    """
    # --- mesh: set for this run only, so a second run in the same process starts clean
    mesh = sharding.make_mesh(sharding.MeshConfig())
    with jax.set_mesh(mesh):
        return _train(run_dir, stop_after, mesh)


def _train(run_dir: str, stop_after: int | None, mesh) -> dict:
    train, rollout, rl, sft = TrainConfig(), RolloutConfig(), RLConfig(), SFTConfig()
    mcfg, dcfg = ModelLoadConfig(), DataConfig()
    os.makedirs(run_dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "operative_config.gin"), "w") as f:
            f.write(gin.operative_config_str())

    # --- model and data (all validation happens here, before any compilation)
    def param_shardings(cfg):
        return sharding.tree_shardings(mesh, model.param_axes(cfg), model.param_shapes(cfg))
    cfg, params, tok = load_model(mcfg, param_shardings)
    max_demo = sft.max_demo_len or rollout.max_response_len
    train_ex, held_ex = split_heldout(
        data.load_examples(resolve_data(dcfg.train, run_dir)), dcfg, train.seed, run_dir)
    questions, _, dropped = make_questions(train_ex, tok, rollout, max_demo)
    if not questions:
        raise ValueError(f"DataConfig.train = {dcfg.train!r}: no usable question "
                         f"({dropped} dropped as longer than max_prompt_len)")
    n_demos = sum(q.demo_ids is not None for q in questions)
    if train.mode != "rl" and not n_demos:
        raise ValueError(f"TrainConfig.mode = {train.mode!r} needs demonstrations but "
                         f"{dcfg.train!r} has none")
    if train.mode == "relift_uniform" and sft.buffer_size > n_demos:
        raise ValueError(f"SFTConfig.buffer_size = {sft.buffer_size}: relift_uniform draws that "
                         f"many distinct demonstrations but {dcfg.train!r} has {n_demos}")
    # Held-out rows pass the same prompt-length filter as training; only the Examples are kept.
    _, held_kept, _ = make_questions(held_ex, tok, rollout, max_demo) if held_ex else ([], [], 0)
    if train.eval_questions:
        held_kept = held_kept[:train.eval_questions]

    # --- train state and the two steps
    rl_opt, sft_opt = rl.optim(), sft.optim()
    rl_tx, sft_tx = make_optimizer(rl_opt), make_optimizer(sft_opt)
    if sft.share_optimizer:
        sft_tx = rl_tx
    state = init_state(params, rl_tx, sft_tx, share_optimizer=sft.share_optimizer)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    norm_len = rl.norm_len or rollout.max_response_len
    rl_step = jit_step(rl_train_step, state_shardings, config=cfg, rl=rl, tx=rl_tx,
                       schedule=make_schedule(rl_opt), norm_len=norm_len)
    sft_step = jit_step(sft_train_step, state_shardings, config=cfg, sft=sft, tx=sft_tx,
                        schedule=make_schedule(sft_opt))
    packing = Packing(micro_batch_size=rl.micro_batch_size, pad_id=tok.pad_token_id,
                      batch_multiple=sharding.batch_divisor(mesh))

    ref_logprobs_fn = None
    if rl.kl_coef > 0:  # a frozen copy of the initial policy; never loaded otherwise
        ref_params = jax.tree.map(jnp.copy, params)

        @jax.jit
        def _ref(p, tokens_MxbxT, valid_MxbxT):
            def one(tv):
                logits = model.apply(cfg, p, tv[0][:, :-1], tv[1][:, :-1])
                lp, _ = losses.token_logprobs_and_entropy(logits, tv[0][:, 1:])
                return jnp.pad(lp, ((0, 0), (1, 0)))
            return jax.lax.map(one, (tokens_MxbxT, valid_MxbxT))
        ref_logprobs_fn = lambda b: np.asarray(_ref(ref_params, b["tokens"], b["valid"]))

    def on_device(step):
        def f(state, batch):
            return step(state, device_batch(batch, mesh))
        return f

    eos_ids = [tok.eos_token_id]

    def sample_fn(p, prompts, G, seed):
        out = sampler.generate(cfg, p, prompts, max_new_tokens=rollout.max_response_len,
                               temperature=rollout.temperature, top_p=rollout.top_p,
                               top_k=rollout.top_k, eos_id=eos_ids, seed=seed, num_samples=G,
                               pad_id=tok.pad_token_id, mesh=mesh)
        return Rollouts(out.tokens, out.logprobs, out.stopped)

    from relift_jax.reward import RewardScorer
    scorer = RewardScorer(train.reward, num_workers=train.reward_workers,
                          timeout_s=train.reward_timeout_s,
                          require_think_close=train.require_think_close)

    def score_fn(token_lists, truths, reward_names):
        texts = tok.batch_decode(token_lists, skip_special_tokens=True)
        names = [train.reward if r == "math" else r for r in reward_names]
        return scorer.score(texts, truths, names)

    ctl = Controller(questions=questions, train=train, rollout=rollout, rl=rl, sft=sft,
                     packing=packing, rl_step=on_device(rl_step), sft_step=on_device(sft_step),
                     sample_fn=sample_fn, score_fn=score_fn, ref_logprobs_fn=ref_logprobs_fn,
                     shuffle=dcfg.shuffle)

    # --- checkpoint: resume when the run directory has one
    ckpt = checkpoint.Checkpointer(run_dir, keep=train.keep_checkpoints)
    best = {"score": -1.0, "iteration": -1}
    latest = ckpt.latest() if train.resume else None
    if latest is not None:
        state, ctl_state = ckpt.restore(latest, state)
        ctl.load_state_dict(ctl_state["controller"])
        best = ctl_state["best"]
        print(f"resumed from {ckpt.dir}/{latest} (iteration {ctl.iteration})")

    writer = metrics.MetricsWriter(run_dir)
    writer.scalars(ctl.iteration, {"data/train_questions": len(questions),
                                   "data/with_demonstration": sum(q.demo_ids is not None
                                                                  for q in questions),
                                   "data/dropped_long_prompts": dropped})

    # --- held-out evaluation (the same code as `python -m relift_jax.evaluate`)
    level_of = {ex.index: _level(ex) for ex in held_kept}

    def evaluate_heldout(params, samples: int, temperature: float, out_dir: str | None = None):
        from relift_jax import evaluate
        settings = evaluate.EvalSettings(
            samples=samples, temperature=temperature, pass_k=(1, samples),
            max_new_tokens=rollout.max_response_len, max_prompt_len=rollout.max_prompt_len,
            keep_system_prompt=rollout.keep_system_prompt, think_prefix=rollout.think_prefix,
            require_think_close=train.require_think_close, seed=train.seed,
            batch_size=max(64, samples))
        return evaluate.evaluate(cfg, params, tok, {"heldout": held_kept}, settings,
                                 scorer=scorer, progress=False, mesh=mesh, output_dir=out_dir)

    def run_eval(it: int) -> dict[str, float]:
        if not held_kept:
            return {}
        res = evaluate_heldout(state["params"], train.eval_samples, train.eval_temperature)
        out = res.metrics("eval")
        # A timing, not a score: keep it with the other perf/ scalars.
        out["perf/eval_tokens_per_s"] = out.pop("eval/tokens_per_s", 0.0)
        levels: dict[int, list[float]] = {}
        for pq in res.per_question:
            lv = level_of.get(pq["source_index"])
            if lv is not None:
                levels.setdefault(lv, []).append(pq["correct"] / pq["n"])
        for lv, accs in sorted(levels.items()):
            out[f"eval/heldout/level{lv}"] = float(np.mean(accs))
        for rec in res.records[:train.log_rollouts]:
            writer.text(it, "eval/rollout", json.dumps(rec, indent=1))
        return out

    def bucket_counts(params, name: str) -> list[tuple[int, int]]:
        """(correct, n) per held-out question, cached in the run dir so a resumed run reuses it."""
        path = os.path.join(run_dir, f"bucket_eval_{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                return [tuple(x) for x in json.load(f)]
        res = evaluate_heldout(params, train.bucket_samples, 1.0)
        counts = [(pq["correct"], pq["n"]) for pq in res.per_question]
        if jax.process_index() == 0:
            with open(path, "w") as f:
                json.dump(counts, f)
        return counts

    base_counts = None
    if train.bucket_samples and held_kept:
        base_counts = bucket_counts(state["params"], "start")

    def export(name: str, info: dict) -> None:
        checkpoint.export_hf(cfg, state["params"], os.path.join(run_dir, "export", name),
                             tokenizer=tok, info=info)

    def eval_score(m: dict) -> float:
        return float(m.get("eval/heldout/accuracy", -1.0))

    # --- the loop
    start = ctl.iteration
    end = train.iterations if stop_after is None else min(train.iterations, start + stop_after)
    bar = tqdm(total=train.iterations, initial=start, desc=f"{train.mode}", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    last_eval: dict[str, float] = {}
    if start == 0 and train.eval_every and held_kept:  # the starting point of every eval curve
        writer.scalars(0, run_eval(0))
    while ctl.iteration < end:
        t0 = time.perf_counter()
        state, m = ctl.step(state)
        it = ctl.iteration  # iterations done
        m["perf/iteration_s"] = time.perf_counter() - t0
        m["perf/reward_timeouts"] = scorer.num_timeouts
        if train.eval_every and it % train.eval_every == 0 or it == train.iterations:
            last_eval = run_eval(it)
            m.update(last_eval)
            score = eval_score(last_eval)
            if train.export_best and score > best["score"]:
                best = {"score": score, "iteration": it}
                export("best", {"iteration": it, "heldout_score": score})
        writer.scalars(it, m)
        if train.save_every and it % train.save_every == 0 or it == train.iterations:
            ckpt.save(it, state, {"controller": ctl.state_dict(), "best": best})
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{m[k]:.3g}" for k in
                         ("rollout/reward_mean", "buffer/size", "rl/loss", "sft/loss",
                          "eval/heldout/accuracy") if k in m})
    bar.close()
    summary: dict[str, Any] = {"iterations": ctl.iteration, "eval": last_eval, "best": best}
    if ctl.iteration >= train.iterations:
        export("final", {"iteration": ctl.iteration})
        if base_counts is not None:
            from relift_jax import analysis
            final_counts = bucket_counts(state["params"], "final")
            levels = [_level(ex) for ex in held_kept]
            rows = analysis.bucket_rows(base_counts, final_counts, levels)
            table = analysis.to_markdown(rows)
            summary.update(buckets=rows, counters=ctl.counters,
                           demos_used=len(ctl.demos_used),
                           demos_used_frac=len(ctl.demos_used) / len(questions))
            if jax.process_index() == 0:
                with open(os.path.join(run_dir, "summary.md"), "w") as f:
                    f.write(table)
                with open(os.path.join(run_dir, "summary.json"), "w") as f:
                    json.dump(summary, f, indent=1)
                print(f"\n{train.mode}: held-out accuracy, {train.bucket_samples} samples per "
                      f"question (start = the policy before training)\n\n{table}")
    writer.close()
    ckpt.close()
    scorer.close()
    metrics.plot_curves(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "curves.png"),
                        ("rollout/reward_mean", "eval/heldout/avg@1", "buffer/size",
                         "buffer/sft_fired", "rl/entropy", "rollout/response_len_mean"))
    return summary
