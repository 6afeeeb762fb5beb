"""Tiny random Hugging Face checkpoints made offline with transformers + torch (the reference)."""
from __future__ import annotations

import torch
import transformers

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

KINDS = ("qwen2_tied", "qwen2_untied", "llama3")


def make_hf_model(kind: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random float32 model of the given kind; weights scaled up so logits are not all ~0."""
    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    if kind.startswith("qwen2"):
        cfg = transformers.Qwen2Config(**kw, tie_word_embeddings=(kind == "qwen2_tied"),
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "llama3":
        cfg = transformers.LlamaConfig(
            **kw, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval().float()


def save_hf_model(kind: str, path, **kw) -> transformers.PreTrainedModel:
    model = make_hf_model(kind, **kw)
    model.save_pretrained(str(path))
    return model
