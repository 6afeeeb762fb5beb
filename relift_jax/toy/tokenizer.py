"""Character-level tokenizer for the toy arithmetic task, saved like a real Hugging Face tokenizer.

The toy model must go through exactly the same loading path as a real checkpoint
(`transformers.AutoTokenizer.from_pretrained(dir)` plus `apply_chat_template`), so this module builds
a genuine `tokenizers` BPE model with an empty merge list: every printable ASCII character and the
newline is one token, and the chat markers are single added tokens. With no merges and no
pre-tokenizer, encoding is a plain character split and `decode(encode(s)) == s` exactly for ASCII
text (the `Fuse` decoder joins pieces without inserting spaces).

Vocabulary (ids are fixed by construction, so they never depend on dict or set order):

    0 <|endoftext|>   padding (as in Qwen)
    1 <|im_start|>    chat turn start
    2 <|im_end|>      end of a chat turn; the EOS of assistant responses
    3 <think>         opening of the reasoning block (an added, non-special token, as in Qwen3)
    4 </think>        closing of the reasoning block (non-special: survives skip_special_tokens)
    5 <|unk|>         any character outside the vocabulary, so it is visible instead of dropped
    6 "\\n", then 7.. the printable ASCII characters " " .. "~" in code-point order

`python -m relift_jax.toy.tokenizer` rewrites the committed folder `TOKENIZER_DIR`.
"""

from __future__ import annotations

import os
import pathlib
import sys

import tokenizers
import transformers
from tokenizers import AddedToken, decoders, models

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
UNK_TOKEN = "<|unk|>"

# Tokens that mark structure and must never be generated or removed by accident: skipped by
# `decode(..., skip_special_tokens=True)`.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
# Reasoning markers: single tokens, but NOT special, because the reward reads "</think>" in the
# decoded text and would fail every response if decoding with skip_special_tokens dropped it.
THINK_TOKENS = (THINK_OPEN, THINK_CLOSE)

# Newline plus printable ASCII: covers the task, the chat template and ordinary English prompts
# (e.g. a system prompt), which keeps the vocabulary tiny (102 ids).
CHARACTERS = ("\n",) + tuple(chr(c) for c in range(0x20, 0x7F))

# Qwen-style ChatML. The think prefix ("<think>\n") is deliberately NOT part of the generation
# prompt: relift_jax.data appends it (configurably), exactly as for real Qwen checkpoints.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOKENIZER_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "tokenizer"


def vocabulary() -> dict[str, int]:
    """Returns token -> id for the whole vocabulary, in the fixed order documented above."""
    tokens = SPECIAL_TOKENS + THINK_TOKENS + (UNK_TOKEN,) + CHARACTERS
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Builds the toy tokenizer from scratch (no files read).

    Returns:
      A fast tokenizer with eos_token "<|im_end|>", pad_token "<|endoftext|>", no BOS, and the
      ChatML chat template.
    """
    vocab = vocabulary()
    # BPE with no merges == character split; unk_token makes foreign characters show up as
    # <|unk|> rather than vanish silently (the tokenizers default without unk is to drop them).
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()
    # Added tokens are matched in the raw text before the model splits it into characters, which
    # is what makes "<think>" one id instead of seven.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + (UNK_TOKEN,)]
    )
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if len(tokenizer) != len(vocab):
        raise AssertionError(f"tokenizer has {len(tokenizer)} ids, expected {len(vocab)}")
    return tokenizer


def save_tokenizer(path: str | os.PathLike[str] = TOKENIZER_DIR) -> pathlib.Path:
    """Writes the tokenizer files (tokenizer.json, tokenizer_config.json, chat template) to path."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(str(path))
    return path


def load_tokenizer(path: str | os.PathLike[str] = TOKENIZER_DIR) -> transformers.PreTrainedTokenizerBase:
    """Loads the saved tokenizer the way a real checkpoint's tokenizer is loaded."""
    return transformers.AutoTokenizer.from_pretrained(str(path))


if __name__ == "__main__":
    out = save_tokenizer(sys.argv[1] if len(sys.argv) > 1 else TOKENIZER_DIR)
    print(f"wrote {len(vocabulary())}-token toy tokenizer to {out}")
