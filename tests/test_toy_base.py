"""A reduced toy base-model recipe (gin/toy/base.gin) trains inside a test and exports a loadable
Hugging Face folder whose tokenizer round-trips the toy task."""
import json
import os

import numpy as np

from relift_jax import hf, main, model
from relift_jax.toy import task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reduced_base_recipe_trains_and_exports(tmp_path):
    run_dir = str(tmp_path / "base")
    main.main([f"--gin_file={REPO}/gin/toy/base.gin", f"--run_dir={run_dir}",
               "--gin.TrainConfig.iterations=40",
               "--gin.DataConfig.train='toy:train:1,2:200'",
               "--gin.DataConfig.heldout='toy:test:1:8'",
               "--gin.SFTConfig.buffer_size=32",
               "--gin.ModelLoadConfig.random_init={'hidden_size': 64, 'intermediate_size': 128, "
               "'num_layers': 2, 'num_heads': 4, 'num_kv_heads': 2, 'head_dim': 16, "
               "'tie_word_embeddings': True, 'max_position_embeddings': 256}"])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r["sft/loss"] for r in rows if "sft/loss" in r]
    assert len(losses) == 40
    # The SFT loss on demonstrations falls well below its random-init value (ln |V| ~ 4.6).
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), (losses[:3], losses[-5:])

    export = os.path.join(run_dir, "export", "final")
    cfg, params = hf.load_checkpoint(export)
    tok = hf.load_tokenizer(export)
    q = task.generate(1, 1, seed=0, split="train")[0]
    prompt = tok.apply_chat_template([{"role": "user", "content": q.question}], tokenize=False,
                                     add_generation_prompt=True)
    text = prompt + q.demonstration
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    # The exported weights are the trained ones: the demonstration is far likelier than at init.
    logits = np.asarray(model.forward(cfg, params, np.array([ids])))[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    token_nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    demo_nll = token_nll[n_prompt - 1:].mean()  # the demonstration tokens, as in the SFT loss
    assert demo_nll < 0.6 * np.mean(losses[:3]), (demo_nll, losses[:3])
