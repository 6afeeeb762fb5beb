"""Tests for relift_jax.rollout_policy: which ids end a rollout (Qwen2.5-style folder, Llama 3
template, the toy tokenizer, generation_config.json as an int or a list, tokenizers without a
template) and which text is graded (one trailing stop id dropped, "</think>" kept).

Expected ids are read off each tokenizer's vocabulary by name, never derived with the code under
test.
"""

from __future__ import annotations

import json

import pytest

from hf_fixtures import (CHATML_TEMPLATE, LLAMA3_TEMPLATE, QWEN_SPECIALS, make_byte_tokenizer,
                         make_qwen25_style_folder)
from relift_jax import rollout_policy as rp

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>")


def ids_of(tok, *names: str) -> tuple[int, ...]:
    vocab = tok.get_vocab()
    return tuple(vocab[n] for n in names)


def qwen_tokenizer(**kw):
    """Qwen2.5-Math-7B's layout: EOS <|endoftext|>, turns end with <|im_end|>."""
    kw = {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "chat_template": CHATML_TEMPLATE, **kw}
    return make_byte_tokenizer(QWEN_SPECIALS, **kw)


def write_generation_config(folder, eos_token_id) -> str:
    folder.mkdir(exist_ok=True)
    (folder / rp.GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": eos_token_id}))
    return str(folder)


# ---------------------------------------------------------------------------------------------
# stop_ids
# ---------------------------------------------------------------------------------------------


def test_qwen25_style_folder_stops_on_eos_then_im_end(tmp_path):
    import transformers

    from relift_jax import hf

    path = make_qwen25_style_folder(tmp_path / "qwen")
    with open(f"{path}/{rp.GENERATION_CONFIG}") as f:
        listed = json.load(f)["eos_token_id"]
    for tok in (hf.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)):
        eos, im_end = ids_of(tok, "<|endoftext|>", "<|im_end|>")
        assert tok.eos_token_id == eos and listed == [im_end, eos]  # the folder lists im_end first
        assert rp.stop_ids(tok, path) == (eos, im_end)  # EOS first all the same
        assert rp.stop_ids(tok) == (eos, im_end)  # the chat template alone finds <|im_end|>
        assert rp.chat_end_of_turn_id(tok) == im_end


def test_llama3_template_gives_eot_id():
    tok = make_byte_tokenizer(LLAMA3_SPECIALS, eos="<|end_of_text|>", bos="<|begin_of_text|>",
                              chat_template=LLAMA3_TEMPLATE)
    assert rp.stop_ids(tok) == ids_of(tok, "<|end_of_text|>", "<|eot_id|>")
    # The template decides, not the list of known names: with <|im_end|> also in the vocab (tried
    # first by the fallback), a Llama 3 template still ends turns with <|eot_id|>.
    both = make_byte_tokenizer(LLAMA3_SPECIALS + ("<|im_end|>",), eos="<|end_of_text|>",
                               bos="<|begin_of_text|>", chat_template=LLAMA3_TEMPLATE)
    assert rp.stop_ids(both) == ids_of(both, "<|end_of_text|>", "<|eot_id|>")


def test_toy_tokenizer():
    from relift_jax.toy.tokenizer import IM_END, TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer(TOKENIZER_DIR)
    assert tok.eos_token == IM_END
    # EOS and end of turn are the same token: listed once. The folder has no generation config.
    assert rp.stop_ids(tok) == rp.stop_ids(tok, str(TOKENIZER_DIR)) == ids_of(tok, IM_END)


def test_generation_config_eos_as_int_and_as_list(tmp_path):
    tok = qwen_tokenizer()
    eos, im_end = ids_of(tok, "<|endoftext|>", "<|im_end|>")
    assert rp.stop_ids(tok, write_generation_config(tmp_path / "int", 7)) == (eos, 7, im_end)
    assert rp.stop_ids(tok, write_generation_config(tmp_path / "list", [im_end, 7, eos])) == (
        eos, im_end, 7)
    assert rp.stop_ids(tok, write_generation_config(tmp_path / "null", None)) == (eos, im_end)
    with pytest.raises(ValueError, match=r"bad.*generation_config.json.*eos_token_id.*'2'"):
        rp.stop_ids(tok, write_generation_config(tmp_path / "bad", "2"))


def test_without_chat_template_known_names_are_the_fallback():
    tok = qwen_tokenizer(chat_template=None)
    assert rp.stop_ids(tok) == ids_of(tok, "<|endoftext|>", "<|im_end|>")
    plain = make_byte_tokenizer(("<|endoftext|>",), eos="<|endoftext|>")
    assert rp.stop_ids(plain) == ids_of(plain, "<|endoftext|>")


@pytest.mark.parametrize("template", [
    # Turns end in plain text: nothing special to stop on.
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}",
    # Refuses an assistant turn.
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ raise_exception('no assistant') }}{% endif %}{{ m['content'] }}{% endfor %}",
])
def test_unusable_template_falls_back(template):
    tok = make_byte_tokenizer(("<|endoftext|>", "<|eot_id|>"), eos="<|endoftext|>",
                              chat_template=template)
    assert rp.stop_ids(tok) == ids_of(tok, "<|endoftext|>", "<|eot_id|>")


def test_no_eos_at_all_names_the_folder(tmp_path):
    tok = qwen_tokenizer(eos=None)
    assert tok.eos_token_id is None
    with pytest.raises(ValueError, match=f"{tmp_path}.*no eos_token_id"):
        rp.stop_ids(tok, str(tmp_path))
    # generation_config.json supplies the EOS when the tokenizer has none.
    eos, im_end = ids_of(tok, "<|endoftext|>", "<|im_end|>")
    assert rp.stop_ids(tok, write_generation_config(tmp_path / "g", [eos])) == (eos, im_end)


# ---------------------------------------------------------------------------------------------
# response_text
# ---------------------------------------------------------------------------------------------


def test_response_text_drops_one_trailing_stop_and_keeps_special_think_close():
    tok = make_byte_tokenizer(QWEN_SPECIALS + ("<think>", "</think>"), eos="<|endoftext|>",
                              pad="<|endoftext|>", chat_template=CHATML_TEMPLATE)
    eos, im_end, think_close = ids_of(tok, "<|endoftext|>", "<|im_end|>", "</think>")
    assert tok.added_tokens_decoder[think_close].special  # the case skip_special_tokens breaks
    stops = rp.stop_ids(tok)
    body = tok.encode("Let me see.\n</think>\n\n  $\\boxed{2}$", add_special_tokens=False)
    assert think_close in body
    text = "Let me see.\n</think>\n\n  $\\boxed{2}$"
    assert tok.decode(body, skip_special_tokens=True) != text  # what training used to grade
    assert rp.response_text(tok, body + [im_end], stops) == text
    assert rp.response_text(tok, body + [eos], stops) == text
    assert rp.response_text(tok, body, stops) == text  # truncated: nothing to drop
    # Exactly one: a second stop id, or one in the middle, is part of the text.
    assert rp.response_text(tok, body + [im_end, im_end], stops) == text + "<|im_end|>"
    assert rp.response_text(tok, [im_end] + body, stops) == "<|im_end|>" + text
    assert rp.response_text(tok, [im_end], stops) == ""
    assert rp.response_text(tok, [], stops) == ""
    # Only the given stop ids are dropped.
    assert rp.response_text(tok, body + [im_end], (eos,)) == text + "<|im_end|>"
