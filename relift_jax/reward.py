"""Host-side answer grading: the official ReLIFT math rule, multiple-choice letters, a worker pool.

Everything here is plain Python on the host; no JAX. Rewards are 0/1 floats per response.

- `math_reward`: the official ReLIFT rule (a `</think>` format gate, math-verify on the text after).
- `choice_reward`: the option label (A-J, or 1-9 for the few ARC-c rows numbered that way).
- `REWARD_FNS` / `register_reward` / `get_reward_fn`: rewards by name; a name may also be an
  importable path `"package.module:function"`, so gin configs can plug in custom rewards.
- `RewardScorer`: scores a batch in long-lived worker processes with a per-item timeout, because
  sympy can hang on adversarial model output and one hang must cost a 0, not the run.
- `pass_at_k`: the unbiased pass@k estimator.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import multiprocessing.connection
import re
import time
import traceback
import pickle
import weakref
from typing import Any, Callable

import numpy as np

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


# ----------------------------------------------------------------------------------------------
# Worker pool with per-item timeouts
# ----------------------------------------------------------------------------------------------


def _worker_main(conn: multiprocessing.connection.Connection, require_think_close: bool) -> None:
    """Worker loop: receives (item_id, fn, response, truth), sends (item_id, ok, value)."""
    # Warm up before announcing readiness so the import of sympy and math-verify's first parse do
    # not count against the first item's timeout.
    math_reward("x</think>\\boxed{\\frac{1}{2}}", "0.5", require_think_close=require_think_close)
    conn.send(("ready", True, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # parent gone
            return
        if msg is None:
            return
        item_id, fn, response, truth = msg
        try:
            value = float(fn(response, truth, require_think_close=require_think_close))
            conn.send((item_id, True, value))
        except Exception:  # reported to the parent, which raises after the batch
            conn.send((item_id, False, traceback.format_exc()))


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, require_think_close: bool):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main, args=(child_conn, require_think_close), daemon=True
        )
        self.process.start()
        child_conn.close()  # so that recv() in the parent sees EOF if the worker dies
        self.started = time.monotonic()
        self.ready = False
        self.item: int | None = None  # batch position in flight
        self.item_id: int | None = None
        self.deadline = float("inf")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()  # SIGKILL: a hang inside C code may not answer SIGTERM
        self.process.join(timeout=5.0)
        self.conn.close()


def _shutdown_workers(workers: list[_Worker]) -> None:
    """Stops all workers; used by close() and by the finaliser at interpreter exit."""
    for w in workers:
        try:
            if w.process.is_alive():
                w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in workers:
        w.process.join(timeout=1.0)
        w.kill()
    workers.clear()


class RewardScorer:
    """Scores batches of responses in long-lived worker processes with a per-item timeout.

    Workers start in `__init__` (their start-up overlaps with whatever the caller does next) and
    live across `score()` calls. An item that runs past `timeout_s` scores 0: its worker is killed
    and replaced, and the batch goes on. Workers use the "spawn" (or "forkserver") start method,
    never fork, because the parent runs JAX threads.

    Attributes:
      num_timeouts: items that timed out since construction (for logging).
      num_crashes: items whose worker died without answering (e.g. a segfault in a C extension).
    """

    def __init__(
        self,
        reward_name: str = "math",
        *,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        require_think_close: bool = True,
        start_method: str = "spawn",
        startup_timeout_s: float = 120.0,
    ):
        """Creates the scorer and starts its workers.

        Args:
          reward_name: default reward (registry name or "module:function") for score().
          num_workers: worker processes; 0 scores in-process without timeouts (debugging, tests).
          timeout_s: seconds one item may take in a worker before it scores 0.
          require_think_close: the `</think>` format gate passed to every reward function.
          start_method: "spawn" or "forkserver" (fork is refused: the parent runs JAX threads).
          startup_timeout_s: how long a worker may take to start before score() raises.
        """
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
        get_reward_fn(reward_name)  # fail fast on a bad name
        self.reward_name = reward_name
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.require_think_close = require_think_close
        self.startup_timeout_s = float(startup_timeout_s)
        self.num_timeouts = 0
        self.num_crashes = 0
        self._ctx = multiprocessing.get_context(start_method)
        self._next_item_id = 0
        self._workers: list[_Worker] = []
        self._closed = False
        # The finaliser holds the worker list, not self, so the scorer can still be collected; it
        # runs at close(), at garbage collection, and at interpreter exit.
        self._finalizer = weakref.finalize(self, _shutdown_workers, self._workers)
        for _ in range(num_workers):
            self._workers.append(_Worker(self._ctx, require_think_close))

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops the workers. Idempotent."""
        self._closed = True
        self._finalizer()

    def score(
        self,
        responses: list[str],
        ground_truths: list[str],
        reward_names: list[str] | None = None,
    ) -> np.ndarray:
        """Scores each response against its ground truth.

        Args:
          responses: model outputs (text after the prompt).
          ground_truths: one reference answer per response.
          reward_names: optional per-item reward names (mixing e.g. "math" and "choice" in one
            evaluation batch); defaults to the scorer's reward_name for every item.

        Returns:
          float32 array of rewards, in input order; timed-out or crashed items are 0.

        Raises:
          ValueError: mismatched lengths.
          KeyError: unknown reward name.
          TypeError: a reward function that cannot be pickled by reference (lambda, closure).
          RuntimeError: a reward function raised (raised after the whole batch is done, so the
            workers stay in a consistent state), or a worker failed to start.
        """
        if self._closed:
            raise RuntimeError("RewardScorer is closed")
        n = len(responses)
        if len(ground_truths) != n:
            raise ValueError(f"{n} responses but {len(ground_truths)} ground truths")
        if reward_names is None:
            reward_names = [self.reward_name] * n
        elif len(reward_names) != n:
            raise ValueError(f"{n} responses but {len(reward_names)} reward names")
        fns_by_name = {name: get_reward_fn(name) for name in set(reward_names)}
        fns = [fns_by_name[name] for name in reward_names]
        if self.num_workers > 0:
            for name, fn in fns_by_name.items():
                try:
                    pickle.dumps(fn)
                except Exception as e:
                    raise TypeError(
                        f"reward {name!r} cannot be sent to a worker process; it must be a "
                        f"module-level function of an importable module: {e}"
                    ) from e

        if self.num_workers == 0:
            # In-process: a reward function's exception propagates as it is.
            out = [
                float(fn(r, t, require_think_close=self.require_think_close))
                for fn, r, t in zip(fns, responses, ground_truths)
            ]
            return np.asarray(out, dtype=np.float32)
        return self._score_in_workers(fns, responses, ground_truths, reward_names)

    # -- worker scheduling ---------------------------------------------------------------------

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self._ctx, self.require_think_close)

    def _score_in_workers(
        self,
        fns: list[RewardFn],
        responses: list[str],
        ground_truths: list[str],
        reward_names: list[str],
    ) -> np.ndarray:
        n = len(responses)
        rewards = np.zeros(n, dtype=np.float32)
        pending = list(range(n - 1, -1, -1))  # popped from the end: input order
        in_flight = 0
        errors: list[str] = []
        try:
            while pending or in_flight:
                now = time.monotonic()
                for w in list(self._workers):
                    if w.ready and w.item is None and pending:
                        i = pending.pop()
                        self._next_item_id += 1
                        w.item, w.item_id = i, self._next_item_id
                        try:
                            w.conn.send((w.item_id, fns[i], responses[i], ground_truths[i]))
                        except OSError:
                            # The worker died while idle: retry the item on a fresh worker.
                            w.item = w.item_id = None
                            pending.append(i)
                            self._replace(w)
                            continue
                        w.deadline = time.monotonic() + self.timeout_s
                        in_flight += 1
                    elif (not w.ready and now - w.started > self.startup_timeout_s
                          and not w.conn.poll()):  # its "ready" may wait unread since long ago
                        raise RuntimeError(
                            f"reward worker did not start within {self.startup_timeout_s}s"
                        )

                busy = [w for w in self._workers if w.item is not None]
                deadlines = [w.deadline for w in busy]
                starting = [w for w in self._workers if not w.ready]
                if starting:
                    deadlines.append(min(w.started for w in starting) + self.startup_timeout_s)
                wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                conns = [w.conn for w in self._workers if w.item is not None or not w.ready]
                readable = multiprocessing.connection.wait(conns, timeout=wait_s)

                for conn in readable:
                    w = next(w for w in self._workers if w.conn is conn)
                    try:
                        item_id, ok, value = conn.recv()
                    except (EOFError, OSError):
                        # Died without answering: the item scores 0, as a hang would.
                        if w.item is not None:
                            self.num_crashes += 1
                            in_flight -= 1
                        elif not w.ready:
                            raise RuntimeError(
                                f"reward worker exited during start-up "
                                f"(exit code {w.process.exitcode})"
                            ) from None
                        self._replace(w)
                        continue
                    if item_id == "ready":
                        w.ready = True
                        continue
                    if item_id != w.item_id:  # stale answer from an interrupted batch
                        continue
                    if ok:
                        rewards[w.item] = value
                    else:
                        errors.append(f"item {w.item} ({reward_names[w.item]!r}):\n{value}")
                    w.item, w.item_id, w.deadline = None, None, float("inf")
                    in_flight -= 1

                now = time.monotonic()
                for w in list(self._workers):
                    if w.item is not None and now >= w.deadline:
                        self.num_timeouts += 1
                        in_flight -= 1  # its reward stays 0
                        self._replace(w)
        except BaseException:
            # Interrupted (Ctrl-C, a raise above): workers with an item in flight would answer
            # into the next batch, so replace them.
            for w in list(self._workers):
                if w.item is not None:
                    self._replace(w)
            raise
        if errors:
            raise RuntimeError(f"{len(errors)} reward call(s) raised; first:\n{errors[0]}")
        return rewards


# ----------------------------------------------------------------------------------------------
# pass@k
# ----------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator `1 - C(n-c, k) / C(n, k)` (Chen et al., 2021).

    Computed as `1 - prod_{i=n-c+1}^{n} (1 - k/i)`, which avoids huge binomials.

    Args:
      n: samples drawn for the question.
      c: correct samples among them.
      k: the k of pass@k, 1 <= k <= n.

    Returns:
      The probability that at least one of k samples drawn without replacement is correct.

    Raises:
      ValueError: if any argument is negative, k < 1, k > n or c > n.
    """
    if n < 0 or c < 0 or k < 0:
        raise ValueError(f"pass_at_k needs non-negative n, c, k; got n={n}, c={c}, k={k}")
    if k < 1:
        raise ValueError(f"pass_at_k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass_at_k needs k <= n, got k={k} > n={n}")
    if c > n:
        raise ValueError(f"pass_at_k needs c <= n, got c={c} > n={n}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))
