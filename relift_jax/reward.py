"""Host-side scoring of responses: a worker pool with per-item timeouts, and pass@k.

Everything here is plain Python on the host; no JAX. The grading rules themselves (the official
ReLIFT math rule, multiple-choice letters, the registry of rewards by name) are in
relift_jax.grading.

- `RewardScorer`: scores a batch in long-lived worker processes with a per-item timeout, because
  sympy can hang on adversarial model output and one hang must cost a 0, not the run.
- `pass_at_k`: the unbiased pass@k estimator.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import pickle
import time
import traceback
import weakref
from typing import Any

import numpy as np

from relift_jax.grading import RewardFn, get_reward_fn, math_reward


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
        """Runs every item on the workers: hand out, wait, collect answers, expire overdue items."""
        n = len(responses)
        rewards = np.zeros(n, dtype=np.float32)
        pending = list(range(n - 1, -1, -1))  # popped from the end: input order
        errors: list[str] = []
        try:
            while pending or self._num_in_flight():
                self._dispatch(pending, fns, responses, ground_truths)
                for conn in self._wait_for_answers():
                    self._receive(conn, rewards, errors, reward_names)
                self._expire_overdue()
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

    def _num_in_flight(self) -> int:
        """Items sent to a worker and not yet answered, timed out or lost to a crash."""
        return sum(w.item is not None for w in self._workers)

    def _dispatch(
        self,
        pending: list[int],
        fns: list[RewardFn],
        responses: list[str],
        ground_truths: list[str],
    ) -> None:
        """Sends the next pending items to idle ready workers; raises if a worker is still not
        ready after startup_timeout_s."""
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
            elif (not w.ready and now - w.started > self.startup_timeout_s
                  and not w.conn.poll()):  # its "ready" may wait unread since long ago
                raise RuntimeError(
                    f"reward worker did not start within {self.startup_timeout_s}s"
                )

    def _wait_for_answers(self) -> list[Any]:
        """The connections with a message (answer, "ready" or EOF) to read, waiting at most until
        the nearest item deadline or start-up limit."""
        deadlines = [w.deadline for w in self._workers if w.item is not None]
        starting = [w for w in self._workers if not w.ready]
        if starting:
            deadlines.append(min(w.started for w in starting) + self.startup_timeout_s)
        wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        conns = [w.conn for w in self._workers if w.item is not None or not w.ready]
        return multiprocessing.connection.wait(conns, timeout=wait_s)

    def _receive(
        self,
        conn: multiprocessing.connection.Connection,
        rewards: np.ndarray,
        errors: list[str],
        reward_names: list[str],
    ) -> None:
        """Reads one message from a worker: its readiness, an item's reward or error, or EOF."""
        w = next(w for w in self._workers if w.conn is conn)
        try:
            item_id, ok, value = conn.recv()
        except (EOFError, OSError):
            # Died without answering: the item scores 0, as a hang would.
            if w.item is not None:
                self.num_crashes += 1
            elif not w.ready:
                raise RuntimeError(
                    f"reward worker exited during start-up "
                    f"(exit code {w.process.exitcode})"
                ) from None
            self._replace(w)
            return
        if item_id == "ready":
            w.ready = True
            return
        if item_id != w.item_id:  # stale answer from an interrupted batch
            return
        if ok:
            rewards[w.item] = value
        else:
            errors.append(f"item {w.item} ({reward_names[w.item]!r}):\n{value}")
        w.item, w.item_id, w.deadline = None, None, float("inf")

    def _expire_overdue(self) -> None:
        """Replaces the workers whose item ran past its deadline; those items keep reward 0."""
        now = time.monotonic()
        for w in list(self._workers):
            if w.item is not None and now >= w.deadline:
                self.num_timeouts += 1
                self._replace(w)


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


class ProcessShareScorer:
    """A scorer for multi-host runs: each process grades its contiguous share of the items, and the
    rewards are all-gathered, so every process holds the same rewards.

    Every process must call `score` with the same items (the controller runs in lockstep). Besides
    splitting the work, this makes the rewards identical everywhere by construction: a grading
    timeout on one host yields the same 0 on all of them, so the buffer and every SFT/RL decision
    stay the same. With one process it is the wrapped scorer. Other attributes (`num_timeouts`,
    `close`, ...) are the wrapped scorer's, counted on this process.
    """

    def __init__(self, scorer: RewardScorer):
        self.scorer = scorer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scorer, name)

    def score(self, responses: list[str], ground_truths: list[str],
              reward_names: list[str] | None = None) -> np.ndarray:
        import jax
        count, me = jax.process_count(), jax.process_index()
        if count == 1:
            return self.scorer.score(responses, ground_truths, reward_names)
        n = len(responses)
        per = -(-n // count)
        lo, hi = min(n, me * per), min(n, (me + 1) * per)
        mine = np.zeros(per, np.float32)
        if hi > lo:
            mine[:hi - lo] = self.scorer.score(
                responses[lo:hi], ground_truths[lo:hi],
                None if reward_names is None else reward_names[lo:hi])
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)[:n]
