"""One rule for where a rollout stops and which text of it is graded, shared by RL and evaluation.

Why: a reward that grades a rollout differently from the evaluation metric optimises the wrong
thing. Qwen2.5-Math-7B's tokenizer has EOS `<|endoftext|>`, but its chat template (and the
instruct models' generation_config.json) ends an assistant turn with `<|im_end|>`. A sampler that
stops on the tokenizer's EOS alone runs past `<|im_end|>` into a made-up next turn, and a decoder
that skips special tokens removes `</think>` wherever it is one (so every response fails the
format gate). Both the trainer and `relift_jax.evaluate` therefore call:

    stop_ids(tokenizer, model_dir)        the ids that end a rollout (EOS first)
    response_text(tokenizer, ids, stops)  the text that is graded and stored

The chat end-of-turn token is read off the tokenizer's own chat template (render an exchange
whose assistant content is a sentinel; what follows the sentinel is the end of turn), with the
well-known names as a fallback for tokenizers without a usable template.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

GENERATION_CONFIG = "generation_config.json"
# End-of-turn markers of common chat formats (ChatML/Qwen, Llama 3, Phi-3, Gemma), tried in this
# order when the chat template does not reveal one.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
_SENTINEL = "RELIFTSENTINEL"


def stop_ids(tokenizer: Any, model_dir: str | None = None) -> tuple[int, ...]:
    """The token ids that end a rollout.

    Args:
        tokenizer: a Hugging Face tokenizer.
        model_dir: the model folder; its generation_config.json (when present) adds every id of
            `eos_token_id` (an int or a list).

    Returns:
        The EOS first (the tokenizer's, else generation_config's first), then the generation
        config's EOS ids, then the chat template's end-of-turn token; deduplicated, order kept.

    Raises:
        ValueError: neither the tokenizer nor generation_config.json names an EOS (the message
            names the folder), or generation_config.json's eos_token_id is malformed.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids.append(int(eos))
    if model_dir is not None:
        ids += _generation_config_eos(model_dir)
    if not ids:
        where = model_dir or getattr(tokenizer, "name_or_path", "") or "(no model folder given)"
        raise ValueError(f"{where}: the tokenizer has no eos_token_id and no "
                         f"{GENERATION_CONFIG} names one; generation could never stop")
    end_of_turn = chat_end_of_turn_id(tokenizer)
    if end_of_turn is not None:
        ids.append(end_of_turn)
    return tuple(dict.fromkeys(ids))


def response_text(tokenizer: Any, ids: Sequence[int], stop_ids: Sequence[int]) -> str:
    """The text that is graded: `ids` without one trailing stop id, special tokens kept.

    Special tokens are kept (skip_special_tokens=False) because where "</think>" is a special
    token, skipping it would fail the format gate of every response; tokenization spaces are left
    as generated.
    """
    ids = [int(i) for i in ids]
    if ids and ids[-1] in set(int(s) for s in stop_ids):
        ids = ids[:-1]  # the stop token ends the response; it is not part of the answer
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def chat_end_of_turn_id(tokenizer: Any) -> int | None:
    """The id of the token that ends an assistant turn in the chat format, or None.

    Rendered from the chat template when it has one and the first token after the assistant's
    content is a special or added token; otherwise the first of KNOWN_END_OF_TURN in the vocab.
    """
    found = _end_of_turn_from_template(tokenizer)
    if found is not None:
        return found
    vocab = tokenizer.get_vocab()
    for name in KNOWN_END_OF_TURN:
        if name in vocab:
            return int(vocab[name])
    return None


def _end_of_turn_from_template(tokenizer: Any) -> int | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001  a template may refuse this exchange: use the fallback
        return None
    if not isinstance(rendered, str) or _SENTINEL not in rendered:
        return None
    after = rendered[rendered.rindex(_SENTINEL) + len(_SENTINEL):]
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    if not ids:
        return None
    marked = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return int(ids[0]) if ids[0] in marked else None


def _generation_config_eos(model_dir: str) -> list[int]:
    path = os.path.join(model_dir, GENERATION_CONFIG)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        value = json.load(f).get("eos_token_id")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{path}: eos_token_id must be an int >= 0 or a list of them, "
                         f"got {value!r}")
    return [int(v) for v in values]
