"""Examples -> token ids: chat prompts for the policy and demonstrations for SFT.

Host-only: a Hugging Face tokenizer (with a chat template for prompts), no JAX. The prompt ends
like the official ReLIFT generation prompt, with "<think>\\n".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from relift_jax.data_sources import DataError

if TYPE_CHECKING:  # data imports this module; Example is only named in type hints here
    from relift_jax.data import Example

OVERFLOW_MODES = ("drop", "raise")
THINK_PREFIX = "<think>\n"


@dataclasses.dataclass(frozen=True)
class EncodedPrompts:
    """Prompt token ids for the examples that fit.

    Attributes:
        ids: token ids of each kept prompt, in the order of `kept`.
        kept: positions (into the `examples` argument) of the kept prompts, ascending.
        num_dropped: how many prompts were longer than `max_prompt_len` and left out.
    """

    ids: list[list[int]]
    kept: list[int]
    num_dropped: int


def render_prompt(tokenizer: Any, messages: Sequence[Mapping], *, keep_system_prompt: bool = True,
                  think_prefix: bool = True) -> str:
    """The text the policy continues: chat template with the generation prompt.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: chat messages.
        keep_system_prompt: False drops system messages (the evaluation protocol removes them).
        think_prefix: append "<think>\\n", as the official ReLIFT generation prompt ends with it;
            not appended twice if the template already ends with it.

    Returns:
        The prompt text.
    """
    msgs = [dict(m) for m in messages if keep_system_prompt or m.get("role") != "system"]
    if not msgs:
        raise ValueError("no messages left to render (only system messages, which were dropped)")
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if think_prefix and not text.endswith(THINK_PREFIX):
        text += THINK_PREFIX
    return text


def encode_prompts(tokenizer: Any, examples: Sequence[Example], *, max_prompt_len: int,
                   keep_system_prompt: bool = True, think_prefix: bool = True,
                   on_overflow: str = "drop") -> EncodedPrompts:
    """Render and tokenise prompts, leaving out those longer than `max_prompt_len`.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        examples: the examples to encode.
        max_prompt_len: the most prompt tokens allowed.
        keep_system_prompt, think_prefix: as in `render_prompt`.
        on_overflow: "drop" (count and skip over-long prompts) or "raise" (DataError).

    Returns:
        EncodedPrompts.
    """
    if on_overflow not in OVERFLOW_MODES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_MODES}, got {on_overflow!r}")
    if not isinstance(max_prompt_len, int) or max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be a positive int, got {max_prompt_len!r}")
    if not examples:
        return EncodedPrompts([], [], 0)
    texts = [render_prompt(tokenizer, ex.messages, keep_system_prompt=keep_system_prompt,
                           think_prefix=think_prefix) for ex in examples]
    # The chat template already holds whatever BOS the model wants; special tokens would double it.
    all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids, kept = [], []
    for pos, (ex, toks) in enumerate(zip(examples, all_ids)):
        if len(toks) > max_prompt_len:
            if on_overflow == "raise":
                raise DataError(f"row {ex.index} (example {pos}, data_source {ex.data_source!r}): "
                                f"prompt is {len(toks)} tokens, longer than max_prompt_len "
                                f"{max_prompt_len}")
            continue
        ids.append([int(t) for t in toks])
        kept.append(pos)
    return EncodedPrompts(ids, kept, len(examples) - len(kept))


def encode_demonstration(tokenizer: Any, text: str, *, max_len: int, eos_id: int,
                         think_prefix: bool = True) -> tuple[list[int], bool]:
    """Token ids of a demonstration used as the SFT response.

    A demonstration that does not fit with its EOS is cut to `max_len` tokens and gets no EOS: the
    official code writes EOS over the last kept token, teaching the model to stop mid-thought.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the demonstration.
        max_len: the most response tokens allowed (EOS included).
        eos_id: the end-of-sequence token id.
        think_prefix: the prompt ends with "<think>\\n", so a leading "<think>\\n" (or "<think>")
            is stripped from the demonstration rather than repeated.

    Returns:
        (ids, truncated): ids end with `eos_id` iff truncated is False; len(ids) <= max_len.
    """
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if think_prefix:
        for prefix in (THINK_PREFIX, "<think>"):
            if text.startswith(prefix):
                text = text[len(prefix):]
                break
    tokens = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if len(tokens) + 1 <= max_len:
        return tokens + [int(eos_id)], False
    return tokens[:max_len], True
