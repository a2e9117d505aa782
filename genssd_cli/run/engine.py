"""The Gen-SSD search loop. Per trajectory, per step: the teacher proposes `n` chunks continuing
the accepted prefix; the student scores each by perplexity; the lowest-PPL chunk is kept. If even
the best is too hard (PPL above `prune_ppl`) the step is re-sampled up to `retries` times, then the
trajectory is pruned.

The loop is deterministic given the teacher's responses and the student's scores, and both are
logged before they are used. Resuming walks the same loop with the log as a cache: nothing that
was received is asked for again, nothing that was scored is scored again.

A stop request (first Ctrl-C / SIGTERM, or max_cost reached: `RunControl`) lets requests in
flight finish and be recorded, drops scoring in progress, and each trajectory returns at its next
teacher request or score, leaving no record: it is simply resumed.

The method's selection rule (methods.py) is the only place a candidate is chosen: the engine asks
it, and hands it to the scorer with each step so the scorer keeps the chosen candidate's cache.
Every record goes to the log as a typed record (records.py).

The baselines (methods.py) run through the same engine as one step of whole trajectories, so
they share the teacher client, the log, resume and the records.

The engine knows the teacher only as the `Teacher` protocol (teacher/protocol.py): the pool in a
run, a scripted stub in the tests. A teacher reply is one type (`records.TeacherReply`) from the
endpoint to the log's `response` event and back at replay.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import anyio

from genssd_cli.answers import answer_statement_start, answers_match, extract_answer
from genssd_cli.config import RunConfig
from genssd_cli.errors import ContextTooLong, StopRequested, TeacherUnavailable
from genssd_cli.methods import METHODS, answer_sentence, morsd_keep
from genssd_cli.problems import Problem, load_prompt, render_prompt
from genssd_cli.run.control import RunControl
from genssd_cli.run.counters import RunStats
from genssd_cli.rundir.records import (
    Candidate,
    Choice,
    Finish,
    Message,
    Prune,
    Response,
    TeacherReply,
    TrajectoryError,
    TrajectoryRow,
)
from genssd_cli.rundir.replay import Ended, Replay
from genssd_cli.rundir.store import RunStore
from genssd_cli.student.scorer import Score, ScoreRequest
from genssd_cli.student.scoring_queue import ScoringQueue
from genssd_cli.teacher.endpoint import Prompt, Request
from genssd_cli.teacher.protocol import Teacher


def request_seed(base: int, *key: object) -> int:
    """A stable per-step seed: the same (problem, sample, step, attempt) always asks the same."""
    digest = hashlib.blake2b(repr((base, *key)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1024)


@dataclass(frozen=True)
class Collaborators:
    """What the engine works with, made by the run's session: the teacher, the student's scoring
    queue, the run directory's store, the replay of its log, the stop and budget control and the
    counters the progress display reads."""

    teacher: Teacher
    scoring: ScoringQueue
    store: RunStore
    replay: Replay
    control: RunControl
    stats: RunStats


@dataclass
class Trajectory:
    problem: Problem
    sample: int
    text: str = ""
    steps: int = 0
    kept_tokens: int = 0  # teacher tokens of the kept chunks
    teacher_tokens: int = 0  # teacher tokens of every candidate received (what it cost; cache hits too)

    @property
    def key(self) -> tuple[str, int]:
        return (self.problem.id, self.sample)

    @property
    def ids(self) -> dict[str, str | int]:
        """The fields every record of this trajectory starts with."""
        return {"problem_id": self.problem.id, "sample": self.sample}


class Engine:
    def __init__(self, cfg: RunConfig, teacher_template: str, parts: Collaborators):
        self.cfg = cfg
        self.search = cfg.search
        self.teacher_template = teacher_template
        self.teacher = parts.teacher
        self.scoring = parts.scoring
        self.scorer = parts.scoring.scorer
        self.store = parts.store
        self.replay = parts.replay
        self.control = parts.control
        self.stop = parts.control.stop
        self.stats = parts.stats
        self.method = METHODS[cfg.method]
        self._rd: dict[tuple[str, int], list[float | None]] = {}  # MoRSD: each candidate's RD, until its rows are made
        self._student_prompt: str | None = None  # MoRSD: the student's template, for its answer format

    async def run(self, problems: list[Problem]) -> None:
        # A problem's task starts when a place frees up, in problem order: not one task per problem
        # up front (100 k problems would be 100 k tasks waiting).
        places = anyio.Semaphore(self.cfg.engine.max_active_problems)
        async with anyio.create_task_group() as outer:
            outer.start_soon(self.scoring.serve)
            outer.start_soon(self._drop_scoring_on_stop)
            async with anyio.create_task_group() as work:
                for problem in problems:
                    await places.acquire()
                    if self.stop.is_set():  # no new problem after a stop
                        places.release()
                        break
                    work.start_soon(self._problem, problem, places)
            outer.cancel_scope.cancel()

    async def _drop_scoring_on_stop(self) -> None:
        """A stop is a stop within seconds, even mid-batch: scoring in progress is dropped (the
        responses it scores are logged; a resume scores them again)."""
        await self.scoring.stop.wait()
        self.scoring.interrupt()

    async def _problem(self, problem: Problem, places: anyio.Semaphore) -> None:
        """One problem's trajectories; its place (taken by run) is given back when they end."""
        self.stats.problems_active += 1
        try:
            async with anyio.create_task_group() as group:
                for sample in range(self.search.samples):
                    group.start_soon(self._trajectory, Trajectory(problem, sample))
        finally:
            self.stats.problems_active -= 1
            places.release()
        if not self.stop.is_set():
            self.stats.problems_done += 1

    async def _trajectory(self, t: Trajectory) -> None:
        ended = self.replay.ended.get(t.key)
        if ended is not None:
            self._count_end(ended)
            return
        search = self.search
        teacher_prompt = render_prompt(self.teacher_template, t.problem.question)
        student_prompt = self.scorer.prompt_text(t.problem.question)
        try:
            if self.method.whole:
                return await self._whole(t, teacher_prompt, student_prompt)
            while True:
                if t.steps >= search.max_steps or t.kept_tokens >= search.max_new_tokens:
                    return await self._finish(t, "truncated")
                max_tokens = min(search.chunk_tokens, search.max_new_tokens - t.kept_tokens)
                for attempt in range(search.retries + 1):
                    prompt = Prompt(teacher_prompt, t.text, t.key)  # the key routes it (affinity)
                    candidates = await self._candidates(t, attempt, prompt, max_tokens, search.n)
                    scores, best = await self._choose(t, attempt, student_prompt + t.text, candidates)
                    # On the step's lowest PPL, whatever was picked: a random-pick control prunes as genssd.
                    lowest = min(s.ppl for s in scores)
                    if not self._too_hard(lowest):
                        break
                else:
                    self.store.append(Prune(**t.ids, step=t.steps, best_ppl=lowest))
                    self.stats.pruned += 1
                    return
                if self._accept(t, candidates[best], scores[best].ppl):
                    return await self._finish(t, "stop")
        except StopRequested:
            return
        except ContextTooLong:
            return await self._finish(t, "truncated")
        except TeacherUnavailable as exc:
            self.store.append(TrajectoryError(**t.ids, step=t.steps, error_class=exc.error_class, message=str(exc)))
            self.stats.failed += 1
            self.stats.failures.update([exc.error_class])
        finally:
            self.scorer.forget(t.key)

    async def _whole(self, t: Trajectory, teacher_prompt: str, student_prompt: str) -> None:
        """A baseline: one request for whole trajectories (step 0), the method keeps one (MoRSD
        possibly several: one row each, best first)."""
        n = self.method.candidates(self.search.n)
        candidates = await self._candidates(t, 0, Prompt(teacher_prompt, "", t.key), self.search.max_new_tokens, n)
        kept = await self._choose_whole(t, student_prompt, candidates)
        rows = []
        for rank, index in enumerate(kept):
            copy = Trajectory(t.problem, t.sample, teacher_tokens=t.teacher_tokens if rank == 0 else 0)
            complete = self._accept(copy, candidates[index], math.inf)  # its PPL counts at the finish, scored whole
            row = await self._row(copy, "stop" if complete else "truncated", rank)
            rd = self._rd.get(t.key)
            if rd is not None and rd[index] is not None:  # MoRSD's dataset-level selection reads it off the row
                row = row.model_copy(update={"rd": round(rd[index], 6)})
            rows.append(row)
        self._rd.pop(t.key, None)
        self._end(Finish(**t.ids, row=rows[0], more=rows[1:]))

    async def _choose_whole(self, t: Trajectory, context: str, candidates: list[Candidate]) -> list[int]:
        """The kept candidates, best first (one, except for MoRSD with morsd.keep > 1)."""
        recorded = self.replay.choices.get((*t.key, 0, 0))
        if recorded is not None:
            if recorded.rd is not None:
                self._rd[t.key] = recorded.rd
            return recorded.kept or [recorded.chosen]
        texts = [self._until_stop(c.text) for c in candidates]
        correct = []
        if self.method.correct_first:
            for text, c in zip(texts, candidates, strict=True):
                correct.append((await self._verdict(t, text, self._complete(c)))[1])
        if self.method.rationale_difficulty:
            return await self._choose_morsd(t, context, texts, correct)
        if self.method.scores_candidates:
            scores = await self.scoring.score(ScoreRequest(context, texts))
        else:  # nothing to score before the pick: the kept rows' PPL is computed at the finish
            scores = [Score(math.inf, 0)] * len(texts)
        if self.method.keep_all_correct:
            kept = self.method.keep(correct)
            self.store.append(_choice(t, 0, 0, kept[0], scores, correct).model_copy(update={"kept": kept}))
            return kept
        seed = self._pick_seed(t, 0)
        best = self.method.select([s.ppl for s in scores], correct, seed)
        self.store.append(_choice(t, 0, 0, best, scores, correct or None, seed))
        return [best]

    def _pick_seed(self, t: Trajectory, attempt: int) -> int | None:
        """A random-pick control's seed for this step: from teacher.seed and the step's key, so a
        rerun picks the same and the student has no say (None: the method picks by its rule)."""
        if not self.method.random_pick:
            return None
        return request_seed(self.cfg.teacher.seed, "pick", *t.key, t.steps, attempt)

    async def _choose_morsd(self, t: Trajectory, context: str, texts: list[str], correct: list[bool]) -> list[int]:
        """Rationale Difficulty of each correct candidate: the student's PPL of the answer after
        its rationale, over the PPL of the answer after the prompt alone; then MoRSD's pick."""
        answer = answer_sentence(self._student_template(), t.problem.reference)  # the student's answer format
        ranked = [i for i, ok in enumerate(correct) if ok]
        rationales = [texts[i][: answer_statement_start(texts[i])] for i in ranked]  # correct: it states one
        scored = await self.scoring.score_all(
            [ScoreRequest(context, [answer]), *(ScoreRequest(context + r, [answer]) for r in rationales)]
        )
        base = scored[0][0].ppl
        answer_ppl: list[float | None] = [None] * len(texts)
        rd: list[float | None] = [None] * len(texts)
        for i, [score] in zip(ranked, scored[1:], strict=True):
            answer_ppl[i], rd[i] = score.ppl, score.ppl / base
        self._rd[t.key] = rd
        morsd = self.cfg.morsd
        compared = dict(zip(ranked, rationales, strict=True))  # redundancy is between rationales
        kept = morsd_keep(rd, [compared.get(i, "") for i in range(len(texts))], morsd.keep,
                          morsd.duplicate_threshold, morsd.duplicate_ngram) or [0]  # fmt: skip
        self.store.append(Choice(
            **t.ids, step=0, attempt=0, chosen=kept[0], correct=correct, ppl=[None] * len(texts),
            tokens=[0] * len(texts), rd=rd, answer_ppl=answer_ppl, base_ppl=base, kept=kept,
        ))  # fmt: skip
        return kept

    def _student_template(self) -> str:
        if self._student_prompt is None:
            self._student_prompt = load_prompt(self.cfg.prompts.student)
        return self._student_prompt

    def _until_stop(self, text: str) -> str:
        cut = _find_stop(text, self.cfg.teacher.stop, 0)
        return text if cut is None else text[:cut]

    def _complete(self, candidate: Candidate) -> bool:
        """A whole trajectory that ended (the model stopped, or a stop string came), not one cut
        at max_tokens."""
        return candidate.finish_reason == "stop" or _find_stop(candidate.text, self.cfg.teacher.stop, 0) is not None

    async def _verdict(self, t: Trajectory, text: str, complete: bool) -> tuple[str | None, bool]:
        """The answer a trace states, and whether it is right. Only a trace that ended and stated
        its answer (the prompt's answer line, \\boxed{}, ####) can be right: an unfinished one
        is not a solution, whatever number it last wrote."""
        answer = extract_answer(text, explicit=True)
        if not complete or answer is None:
            return answer, False
        return answer, await anyio.to_thread.run_sync(answers_match, t.problem.reference, answer)

    def _too_hard(self, ppl: float) -> bool:
        # inf means no candidate had tokens of its own (the teacher just stopped): not "hard".
        return self.search.prune_ppl is not None and math.isfinite(ppl) and ppl > self.search.prune_ppl

    async def _candidates(
        self, t: Trajectory, attempt: int, prompt: Prompt, max_tokens: int, n: int
    ) -> list[Candidate]:
        """The step's n candidates: those already received (from the log), then the rest from
        the teacher, each response logged the moment it arrives."""
        key = (*t.key, t.steps, attempt)
        have: dict[int, Candidate] = {}

        def absorb(reply: TeacherReply) -> None:
            for offset, candidate in enumerate(reply.candidates):
                have[reply.start + offset] = candidate
            t.teacher_tokens += reply.completion_tokens

        def receive(reply: TeacherReply) -> None:
            self.store.append(Response.of(reply, **t.ids, step=t.steps, attempt=attempt))
            absorb(reply)
            # This session's counts: what was received now, not what a resume replays.
            self.stats.candidates += len(reply.candidates)
            self.stats.teacher_tokens += reply.completion_tokens
            self._pay(reply)

        for event in self.replay.responses.get(key, []):  # a logged response is the reply it logged
            absorb(event)
        if len(have) < n:
            if self.stop.is_set():
                raise StopRequested
            step = Request(prompt, n, max_tokens, request_seed(self.cfg.teacher.seed, *key))
            await self.teacher.sample(step, have, receive)
        return [have[i] for i in range(n)]

    async def _choose(
        self, t: Trajectory, attempt: int, context: str, candidates: list[Candidate]
    ) -> tuple[list[Score], int]:
        """The step's scores and the kept candidate: recorded, or scored now and recorded."""
        recorded = self.replay.choices.get((*t.key, t.steps, attempt))
        if recorded is not None:
            ppls = [math.inf if p is None else p for p in recorded.ppl]
            return [Score(p, n) for p, n in zip(ppls, recorded.tokens, strict=True)], recorded.chosen
        texts = [c.text for c in candidates]
        seed = self._pick_seed(t, attempt)

        def keep(ppls: Sequence[float]) -> int:  # the scorer keeps the prefix cache of the same pick
            return self.method.select(ppls, seed=seed)

        scores = await self.scoring.score(ScoreRequest(context, texts, key=t.key, keep=keep))
        best = keep([s.ppl for s in scores])
        self.store.append(_choice(t, t.steps, attempt, best, scores, seed=seed))
        return scores, best

    def _pay(self, reply: TeacherReply) -> None:
        price = self.cfg.teacher.price_of(reply.endpoint)
        if price is not None and not reply.cached:
            self.control.pay(price.cost(reply.prompt_tokens, reply.completion_tokens))

    def _accept(self, t: Trajectory, chosen: Candidate, ppl: float) -> bool:
        """Append the chosen chunk; True when the trajectory is complete."""
        before = len(t.text)
        t.text += chosen.text
        t.steps += 1
        t.kept_tokens += chosen.tokens
        if math.isfinite(ppl):
            self.stats.add_ppl(ppl)
        self.stats.steps += 1
        # A stop string can straddle two chunks, where the server cannot see it.
        cut = _find_stop(t.text, self.cfg.teacher.stop, max(0, before - _longest(self.cfg.teacher.stop)))
        if cut is not None:
            t.text = t.text[:cut]
            return True
        return chosen.finish_reason == "stop"

    async def _finish(self, t: Trajectory, finish: str) -> None:
        self._end(Finish(**t.ids, row=await self._row(t, finish)))

    async def _row(self, t: Trajectory, finish: str, rank: int = 0) -> TrajectoryRow:
        # The kept trajectory's PPL, scored whole and alone: a pure function of its text.
        student_prompt = self.scorer.prompt_text(t.problem.question)
        [whole] = await self.scoring.score(ScoreRequest(student_prompt, [t.text]), solo=True)
        if self.method.whole and math.isfinite(whole.ppl):
            self.stats.add_ppl(whole.ppl)
        answer, correct = await self._verdict(t, t.text, finish == "stop")
        row = TrajectoryRow(
            **t.ids,
            method=self.cfg.method,
            prompt=[Message(role="user", content=self.scorer.user_message(t.problem.question))],
            completion=[Message(role="assistant", content=t.text)],
            reference=t.problem.reference,
            answer=answer,
            correct=correct,
            finish=finish,
            steps=t.steps,
            rank=rank,
            student_ppl=round(whole.ppl, 6) if math.isfinite(whole.ppl) else None,
            teacher_tokens=t.teacher_tokens,
            completion_tokens=t.kept_tokens,
        )
        return row

    def _end(self, event: Finish) -> None:
        self.store.append(event)
        self._count_end(Ended.of(event))

    def _count_end(self, ended: Ended) -> None:
        self.stats.pruned += ended.pruned
        self.stats.finished += ended.finished
        self.stats.truncated += ended.truncated
        self.stats.correct += ended.correct


def _choice(  # noqa: PLR0913 -- the record's fields
    t: Trajectory, step: int, attempt: int, chosen: int, scores: list[Score], correct: list[bool] | None = None,
    seed: int | None = None,
) -> Choice:
    return Choice(**t.ids, step=step, attempt=attempt, chosen=chosen, correct=correct,
                  ppl=[s.ppl if math.isfinite(s.ppl) else None for s in scores],
                  tokens=[s.tokens for s in scores], pick_seed=seed)  # fmt: skip


def _longest(stops: list[str]) -> int:
    return max((len(s) for s in stops), default=0)


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
