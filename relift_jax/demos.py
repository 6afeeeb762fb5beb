"""Where a hardest question's demonstration comes from: the dataset's column, or a teacher.

The controller asks a source for the demonstrations of the questions it wants to buffer
(`request(ids, iteration) -> Reply`) and later for the tokens it trains on (`get(id)`, the student's
token ids); only questions with a demonstration enter the buffer. `kind` names the source.

  ColumnDemos   the dataset's own demonstration (`Question.demo_ids`): today's ReLIFT.
  TeacherDemos  a teacher model samples `tries` answers per question in one batch, the run's
                reward grades them, and the first accepted one (reward 1: the maths rule's
                "correct"), encoded for the student, is the demonstration. Every result (accepted or not) is cached in
                `<run_dir>/teacher_demos.jsonl`, so a resumed run never asks again.

Host-side: the sampler, scorer and encoder are injected callables (build.make_teacher_demos wires
the real ones); no JAX here except the process index of the cache's writer.
Shapes: N questions asked, k = tries, rows are question-major (row j * k + t).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from relift_jax.config import ConfigError

CACHE_FILE = "teacher_demos.jsonl"


@dataclasses.dataclass(frozen=True)
class Reply:
    """The answer to one request.

    Attributes:
      ids: the asked questions that have a demonstration, in the asked order.
      requests: teacher only: asked questions whose teacher result is from this iteration
        (answered now, or by an interrupted earlier process at the same iteration).
      accepted: of those, how many have a demonstration.
      tries: of those, the samples used (first accepted index + 1, or k).
    """

    ids: list[int]
    requests: int = 0
    accepted: int = 0
    tries: int = 0


class ColumnDemos:
    """The dataset's demonstration column: a question has one iff its row had one."""

    kind = "column"

    def __init__(self, questions: Sequence[Any]):
        self.q = questions

    def request(self, ids: Sequence[int], iteration: int) -> Reply:
        return Reply([i for i in ids if self.q[i].demo_ids is not None])

    def get(self, i: int) -> list[int]:
        return self.q[i].demo_ids


@dataclasses.dataclass(frozen=True)
class TeacherResult:
    """One question's teacher result, as a line of the cache."""

    question: int             # position in the run's training questions
    row: int                  # Example.index: the row of the training file
    text: str                 # the question (last user message), to check the cache's data
    demonstration: str | None  # think prefix + the accepted response text; None: none accepted
    tries: int                # samples used: first accepted index + 1, or k
    iteration: int            # the controller iteration that asked
    batch: int                # how many questions that iteration's teacher batch held


def teacher_seed(seed: int, iteration: int) -> int:
    """The teacher's sampling seed: a function of (run seed, iteration) only, unlike the policy's."""
    return int(np.random.default_rng([seed, iteration, 17]).integers(0, 2**31 - 1))


def question_text(example) -> str:
    users = [m["content"] for m in example.messages if m.get("role") == "user"]
    return str(users[-1]) if users else ""


class TeacherDemos:
    """Verified teacher demonstrations, sampled on demand and cached in the run directory.

    Args:
      run_dir: the cache goes to `<run_dir>/teacher_demos.jsonl`.
      examples: the training examples, aligned with the controller's questions.
      params: the teacher's parameters (passed to sample_fn).
      prompt_fn: Example -> the teacher's prompt ids, or None when too long (a failure, 0 tries).
      sample_fn: (params, prompts, k, seed) -> rollouts with `.tokens`, question-major.
      score_fn: (token lists, ground truths, reward names) -> rewards (the run's reward).
      text_fn: teacher token ids -> the graded response text.
      encode_fn: demonstration text -> the student's demonstration ids.
      tries: k samples per question.
      seed: the run seed.
      think_prefix: put before the response text (the prompt ended with it).
      write: whether this process writes the cache (process 0 of a multi-host run).
    """

    kind = "teacher"

    def __init__(self, *, run_dir: str, examples: Sequence[Any], params: Any,
                 prompt_fn: Callable, sample_fn: Callable, score_fn: Callable, text_fn: Callable,
                 encode_fn: Callable, tries: int, seed: int, think_prefix: str = "",
                 write: bool | None = None):
        self.path = os.path.join(run_dir, CACHE_FILE)
        self.examples, self.params = list(examples), params
        self.prompt_fn, self.sample_fn, self.score_fn = prompt_fn, sample_fn, score_fn
        self.text_fn, self.encode_fn = text_fn, encode_fn
        self.tries, self.seed, self.think_prefix = tries, seed, think_prefix
        self.write = jax.process_index() == 0 if write is None else write
        self.results: dict[int, TeacherResult] = {}
        self._ids: dict[int, list[int]] = {}  # the student's tokens of accepted demonstrations
        for r in self._load():
            self._keep(r)

    # ------------------------------------------------------------------ the source
    def request(self, ids: Sequence[int], iteration: int) -> Reply:
        """Demonstrations for `ids`: cached results as they are, the others sampled in one batch."""
        new = [i for i in dict.fromkeys(ids) if i not in self.results]
        if new:
            for r in self._ask(new, iteration):
                self._keep(r)
        now = [self.results[i] for i in dict.fromkeys(ids) if self.results[i].iteration == iteration]
        return Reply([i for i in ids if i in self._ids], requests=len(now),
                     accepted=sum(r.demonstration is not None for r in now),
                     tries=sum(r.tries for r in now))

    def get(self, i: int) -> list[int]:
        if i not in self._ids:
            raise KeyError(f"question {i} has no teacher demonstration in {self.path} (a buffer "
                           f"restored without the cache it was built from)")
        return self._ids[i]

    # ------------------------------------------------------------------ sampling and grading
    def _ask(self, new: list[int], iteration: int) -> list[TeacherResult]:
        k, n = self.tries, len(new)
        exs = [self.examples[i] for i in new]
        prompts = [self.prompt_fn(ex) for ex in exs]
        fit = [j for j, p in enumerate(prompts) if p is not None]
        demos: list[str | None] = [None] * n
        used = [0] * n
        if fit:
            ro = self.sample_fn(self.params, [prompts[j] for j in fit], k,
                                teacher_seed(self.seed, iteration))
            rewards_NK = np.asarray(self.score_fn(
                ro.tokens, [exs[j].ground_truth for j in fit for _ in range(k)],
                [exs[j].reward for j in fit for _ in range(k)]), np.float32).reshape(len(fit), k)
            for row, j in enumerate(fit):
                ok = np.flatnonzero(rewards_NK[row] >= 1.0)
                used[j] = int(ok[0]) + 1 if ok.size else k
                if ok.size:
                    demos[j] = self.think_prefix + self.text_fn(ro.tokens[row * k + int(ok[0])])
        out = [TeacherResult(question=i, row=int(ex.index), text=question_text(ex),
                             demonstration=d, tries=t, iteration=iteration, batch=n)
               for i, ex, d, t in zip(new, exs, demos, used)]
        self._append(out)
        return out

    def _keep(self, r: TeacherResult) -> None:
        self.results[r.question] = r
        if r.demonstration is not None:
            self._ids[r.question] = self.encode_fn(r.demonstration)

    # ------------------------------------------------------------------ the cache
    def _append(self, results: list[TeacherResult]) -> None:
        """One write per batch, flushed and fsynced, so a batch is on disk before it is used."""
        if not self.write:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in results))
            f.flush()
            os.fsync(f.fileno())

    def _load(self) -> list[TeacherResult]:
        """The cache's complete batches, checked against this run's questions.

        A process killed while writing leaves a torn last line, maybe after some complete lines of
        its batch: the whole batch is dropped (and the file rewritten without it), so the resumed run
        samples that batch again with the same questions and seed, as the uninterrupted run did.
        """
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        *complete, last = text.split("\n")  # `last` is "" unless the final write was cut short
        records = []
        for n, line in enumerate(complete, 1):
            try:
                records.append(TeacherResult(**json.loads(line)))
            except (ValueError, TypeError):
                raise ConfigError(f"{self.path} line {n}: not a teacher result ({line[:80]!r}); "
                                  f"only a torn last line is ignored") from None
        try:  # a line cut just before its newline is whole; anything shorter is torn
            records += [TeacherResult(**json.loads(last))] if last else []
        except (ValueError, TypeError):
            pass
        per_batch: dict[int, int] = {}
        for r in records:
            per_batch[r.iteration] = per_batch.get(r.iteration, 0) + 1
        kept = [r for r in records if per_batch[r.iteration] == r.batch]
        if self.write and (last or len(kept) < len(records)):
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        for r in kept:
            ex = self.examples[r.question] if 0 <= r.question < len(self.examples) else None
            if ex is None or int(ex.index) != r.row or question_text(ex) != r.text:
                raise ConfigError(
                    f"{self.path}: question {r.question} is row {r.row} ({r.text!r}) there but "
                    f"{'absent' if ex is None else f'row {ex.index} ({question_text(ex)!r})'} in "
                    f"this run's training data: the cache belongs to other data; move it away")
        return kept
