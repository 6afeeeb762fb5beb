"""Answer grading rules: the official ReLIFT math rule, multiple-choice letters, the registry.

Plain Python on the host; no JAX. Rewards are 0/1 floats per response.

- `math_reward`: the official ReLIFT rule (a `</think>` format gate, math-verify on the text after).
- `choice_reward`: the option label (A-J, or 1-9 for the few ARC-c rows numbered that way).
- `REWARD_FNS` / `register_reward` / `get_reward_fn`: rewards by name; a name may also be an
  importable path `"package.module:function"`, so gin configs can plug in custom rewards.

The rules run inside relift_jax.reward.RewardScorer's worker processes, which add the timeouts.
"""

from __future__ import annotations

import importlib
import logging
import re
from typing import Any, Callable

RewardFn = Callable[..., float]

THINK_OPEN = "<think>\n"
THINK_CLOSE = "</think>"


# ----------------------------------------------------------------------------------------------
# Answer extraction shared by the rules
# ----------------------------------------------------------------------------------------------


def _answer_part(response: str, require_think_close: bool) -> str | None:
    """Returns the text after the last `</think>`, or None when the format gate fails.

    The official code prepends the `<think>\\n` that ended the prompt before checking; that prefix
    never contains `</think>`, so it changes neither the gate nor the answer and is added only so
    that the string we inspect is the same one the official code inspects.
    """
    full = THINK_OPEN + response
    if THINK_CLOSE not in full:
        # With the gate off a response that never closed its thought is graded whole, without the
        # synthetic prefix (which is not model output).
        return None if require_think_close else response
    return full.rsplit(THINK_CLOSE, 1)[1]


def _drop_timeout_disabled_warning(record: logging.LogRecord) -> bool:
    # We disable math-verify's SIGALRM timeouts on purpose (RewardScorer enforces its own), so its
    # warning about that, printed once per worker process, is noise.
    return not record.getMessage().startswith("Timeout is disabled")


def _import_math_verify() -> Any:
    # Imported lazily: only graders pay for sympy, not every module importing this one.
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_drop_timeout_disabled_warning)  # idempotent
    return math_verify


def math_reward(response: str, ground_truth: str, *, require_think_close: bool = True) -> float:
    """The official ReLIFT math reward.

    Args:
      response: model output after the prompt (the prompt ended with `<think>\\n`).
      ground_truth: reference answer as stored in the dataset (LaTeX without `$`).
      require_think_close: score 0 when the response has no `</think>` (the official format gate).

    Returns:
      1.0 if `verify(parse("$" + ground_truth + "$"), parse(answer))` holds, else 0.0; any exception
      inside math-verify also gives 0.0.
    """
    answer = _answer_part(response, require_think_close)
    if answer is None:
        return 0.0
    try:
        math_verify = _import_math_verify()
        # math-verify's own timeouts use SIGALRM, which fails outside the main thread; timeouts are
        # enforced by RewardScorer killing the worker process instead.
        gold = math_verify.parse("$" + ground_truth + "$", parsing_timeout=None)
        pred = math_verify.parse(answer, parsing_timeout=None)
        return 1.0 if math_verify.verify(gold, pred, timeout_seconds=None) else 0.0
    except Exception:  # the official rule: any failure of the checker is a wrong answer
        return 0.0


_LETTERS = "ABCDEFGHIJ"
_DIGITS = "123456789"
# \text{C}, \textbf{(C)}, \mathrm{C}: unwrapped repeatedly so nested wrappers also go.
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mathit|texttt)\s*\{([^{}]*)\}")
_ANSWER_IS = re.compile(
    r"answer\s*(?:is|:)?\s*(?:\*\*)?\s*:?\s*(?:option\s*)?\$?\s*"
    r"(?P<open>[(\[])?\s*(?P<label>[A-Za-z0-9])\s*(?P<close>[)\]])?",
    re.IGNORECASE,
)
_PAREN_LABEL = re.compile(r"\((?P<label>[A-Za-z0-9])\)")


def _boxed_contents(text: str) -> list[str]:
    """Returns the contents of every `\\boxed{...}` / `\\fbox{...}` in order, braces balanced."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    out.append(text[start:i])
                    break
    return out


def _label_in_box(content: str, labels: str) -> str | None:
    """The option label a boxed answer names: `C`, `(C)`, `\\text{C}`, `C) text`, `C. text`."""
    s = content
    while True:
        unwrapped = _TEXT_WRAPPER.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    s = s.strip().strip("$").strip()
    m = re.match(r"^\(?\s*([A-Za-z0-9])\s*\)?(?:$|[.):\s])", s)
    if m and m.group(1).upper() in labels:
        return m.group(1).upper()
    return None


def _label_after_answer_is(text: str, labels: str) -> str | None:
    """The label in the last "answer is (C)" / "Answer: C" / "ANSWER: C" phrase."""
    found = None
    for m in _ANSWER_IS.finditer(text):
        label = m.group("label")
        if label.upper() not in labels:
            continue
        after = text[m.end() :]
        bracketed = m.group("open") is not None and m.group("close") is not None
        # An uppercase letter as its own word is a label; a lowercase one (or "I", also a pronoun)
        # must be bracketed or end the phrase, so "the answer is a planet" is not option A.
        ends_phrase = re.match(r"^\s*(?:$|[.,;!*$\n])", after) is not None
        own_word = re.match(r"^[A-Za-z0-9]", after) is None
        word_like = label.islower() or label == "I"
        if bracketed or ends_phrase or (own_word and not word_like):
            found = label.upper()
    return found


def extract_choice(answer: str, labels: str = _LETTERS) -> str | None:
    """Extracts the chosen option label from the answer part of a response.

    Order of preference: the last `\\boxed{}`; the last "answer is ..." / "Answer: ..." phrase; the
    last parenthesised label "(C)"; an answer that is just a label ("C", "C.", "C) text").

    Args:
      answer: the text after `</think>`.
      labels: the allowed labels (uppercase), e.g. "ABCDEFGHIJ" or "123456789".

    Returns:
      The uppercase label, or None when none is found.
    """
    boxes = _boxed_contents(answer)
    if boxes:
        label = _label_in_box(boxes[-1], labels)
        if label is not None:
            return label
    label = _label_after_answer_is(answer, labels)
    if label is not None:
        return label
    parens = [m.group("label").upper() for m in _PAREN_LABEL.finditer(answer)]
    parens = [p for p in parens if p in labels]
    if parens:
        return parens[-1]
    return _lone_label(answer, labels)


def _lone_label(answer: str, labels: str) -> str | None:
    """A label that is the whole answer ("C", "(C).", "**C**") or opens it with a delimiter
    ("C) text", "C. text"); a bare "A robot ..." is a word, not option A."""
    s = _TEXT_WRAPPER.sub(r"\1", answer).strip().strip("*$").strip()
    m = re.match(r"^\(?([A-Za-z0-9])\)?[.:]?$", s) or re.match(r"^\(?([A-Za-z0-9])[).:]\s", s)
    if m and m.group(1).upper() in labels:
        return m.group(1).upper()
    return None


def _normalise_choice_truth(ground_truth: str) -> tuple[str, str]:
    """Returns (label, allowed labels) for a ground truth such as "C", "(c)", "\\text{C}" or "2"."""
    s = _TEXT_WRAPPER.sub(r"\1", ground_truth).strip().strip("()").strip().upper()
    if len(s) == 1 and s in _LETTERS:
        return s, _LETTERS
    if len(s) == 1 and s in _DIGITS:
        return s, _DIGITS
    raise ValueError(
        f"choice ground truth must be one option label A-J or 1-9, got {ground_truth!r}"
    )


def choice_reward(response: str, ground_truth: str, *, require_think_close: bool = True) -> float:
    """Multiple-choice reward (ARC-c, GPQA): 1.0 when the chosen label equals the ground truth.

    Args:
      response: model output after the prompt (the prompt ended with `<think>\\n`).
      ground_truth: the correct option label, a letter A-J (any case) or a digit 1-9 (a few ARC-c
        questions number their options).
      require_think_close: score 0 when the response has no `</think>`.

    Returns:
      1.0 or 0.0.

    Raises:
      ValueError: if the ground truth is not a single option label (a data error, not model error).
    """
    truth, labels = _normalise_choice_truth(ground_truth)
    answer = _answer_part(response, require_think_close)
    if answer is None:
        return 0.0
    return 1.0 if extract_choice(answer, labels) == truth else 0.0


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

REWARD_FNS: dict[str, RewardFn] = {"math": math_reward, "choice": choice_reward}


def register_reward(name: str, fn: RewardFn) -> None:
    """Registers a reward function under `name` (overwriting an existing entry of that name).

    To run in RewardScorer workers the function must be picklable by reference: a module-level
    function of an importable module (not a lambda or closure).

    Args:
      name: registry key, e.g. "math_strict".
      fn: `fn(response, ground_truth, *, require_think_close) -> float`.
    """
    if not callable(fn):
        raise TypeError(f"reward {name!r} must be callable, got {type(fn).__name__}")
    REWARD_FNS[name] = fn


def get_reward_fn(name: str) -> RewardFn:
    """Looks a reward function up by registry name or by dotted path `"package.module:function"`.

    Args:
      name: a key of REWARD_FNS, or "module.path:function" imported with importlib.

    Returns:
      The reward function.

    Raises:
      KeyError: unknown name (the message lists the known ones) or a path that does not resolve.
    """
    if name in REWARD_FNS:
        return REWARD_FNS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"reward path {name!r} does not resolve: {e}") from e
        if not callable(fn):
            raise KeyError(f"reward path {name!r} resolves to a non-callable {type(fn).__name__}")
        return fn
    raise KeyError(
        f"unknown reward {name!r}; known: {sorted(REWARD_FNS)} "
        "(or give an importable path 'package.module:function')"
    )
