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


# ---------------------------------------------------------------------------------------------
# Offline tokenizers and a Qwen2.5-style folder (EOS <|endoftext|>, turns end with <|im_end|>)
# ---------------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def make_byte_tokenizer(specials, *, eos: str | None, pad: str | None = None,
                        bos: str | None = None, chat_template: str | None = None,
                        added=()) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE without merges (every byte one token: ids 0..255, nothing is ever unknown,
    and it survives transformers 5 loading a qwen2 folder as the byte-level Qwen2Tokenizer), then
    `specials` (special added tokens) and `added` (non-special added tokens), in order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in added])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos,
        clean_up_tokenization_spaces=False)
    fast.chat_template = chat_template
    return fast


def make_qwen25_style_folder(path, *, always_emit: str | None = None) -> str:
    """A Hugging Face folder shaped like Qwen2.5-Math-7B's: tiny random Qwen2 (untied lm_head), a
    tokenizer whose EOS is <|endoftext|> with <|im_start|>/<|im_end|> special tokens and a ChatML
    template, and generation_config.json with eos_token_id [<|im_end|>, <|endoftext|>].

    always_emit: a token the model then emits with probability ~1 at every position (at
    temperature 1): every o_proj and down_proj is zero, so the last hidden state is the token's
    embedding; every embedding row holds 10 in dimension 0 (the final RMSNorm maps it to about
    sqrt(hidden)), and lm_head is zero except that token's row, 10 at dimension 0: a logit of
    about 80 against 0 for every other token.
    """
    tok = make_byte_tokenizer(QWEN_SPECIALS, eos="<|endoftext|>", pad="<|endoftext|>",
                              chat_template=CHATML_TEMPLATE)
    model = make_hf_model("qwen2_untied", vocab_size=len(tok))
    if always_emit is not None:
        target = tok.convert_tokens_to_ids(always_emit)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.embed_tokens.weight[:, 0] = 10.0
            model.model.norm.weight.fill_(1.0)
            model.lm_head.weight.zero_()
            model.lm_head.weight[target, 0] = 10.0
    ids = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ids[1], eos_token_id=ids, pad_token_id=ids[1])
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)
