"""The Gen-SSD search loop. Per trajectory, per step: the teacher proposes `n` chunks continuing
the accepted prefix; the student scores each by perplexity; the lowest-PPL chunk is kept. If even
the best is too hard (PPL above `prune_ppl`) the step is re-sampled up to `retries` times, then the
trajectory is pruned.

The loop is deterministic given the teacher's responses and the student's scores, and both are
logged before they are used. Resuming walks the same loop with the log as a cache: nothing that
was received is asked for again, nothing that was scored is scored again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import anyio

from genssd_cli.answers import answers_match, extract_answer
from genssd_cli.config import RunConfig
from genssd_cli.data import Problem, render_prompt
from genssd_cli.errors import ContextTooLong, TeacherUnavailable
from genssd_cli.results import Replay
from genssd_cli.store import RunStore
from genssd_cli.student import Score, ScoreRequest, ScoringQueue
from genssd_cli.teacher import Candidate, TeacherClient, TeacherResponse, request_seed
from genssd_cli.ui import RunStats


@dataclass
class Trajectory:
    problem: Problem
    sample: int
    text: str = ""
    steps: int = 0
    kept_tokens: int = 0  # teacher tokens of the kept chunks
    teacher_tokens: int = 0  # teacher tokens of every candidate asked for (what was paid)
    nll: float = 0.0  # student NLL summed over the kept chunks
    scored_tokens: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.problem.id, self.sample)

    def event(self, kind: str, **fields) -> dict:
        return {"type": kind, "problem_id": self.problem.id, "sample": self.sample, **fields}


class Engine:
    def __init__(
        self,
        cfg: RunConfig,
        teacher: TeacherClient,
        scoring: ScoringQueue,
        store: RunStore,
        stats: RunStats,
        teacher_template: str,
        replay: Replay,
    ):
        self.cfg = cfg
        self.search = cfg.search
        self.teacher = teacher
        self.scoring = scoring
        self.scorer = scoring.scorer
        self.store = store
        self.stats = stats
        self.teacher_template = teacher_template
        self.replay = replay

    async def run(self, problems: list[Problem]) -> None:
        limiter = anyio.CapacityLimiter(self.cfg.engine.max_active_problems)
        async with anyio.create_task_group() as outer:
            outer.start_soon(self.scoring.serve)
            async with anyio.create_task_group() as work:
                for problem in problems:
                    work.start_soon(self._problem, problem, limiter)
            outer.cancel_scope.cancel()

    async def _problem(self, problem: Problem, limiter: anyio.CapacityLimiter) -> None:
        async with limiter:
            self.stats.problems_active += 1
            try:
                async with anyio.create_task_group() as group:
                    for sample in range(self.search.samples):
                        group.start_soon(self._trajectory, Trajectory(problem, sample))
            finally:
                self.stats.problems_active -= 1
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
            while True:
                if t.steps >= search.max_steps or t.kept_tokens >= search.max_new_tokens:
                    return await self._finish(t, "truncated")
                max_tokens = min(search.chunk_tokens, search.max_new_tokens - t.kept_tokens)
                for attempt in range(search.retries + 1):
                    response = await self._candidates(t, attempt, teacher_prompt + t.text, max_tokens)
                    scores = await self._choose(t, attempt, student_prompt + t.text, response)
                    best = lowest_ppl(scores)
                    if not self._too_hard(scores[best].ppl):
                        break
                else:
                    self.store.append(t.event("prune", step=t.steps, best_ppl=scores[best].ppl))
                    self.stats.pruned += 1
                    return
                if self._accept(t, response.candidates[best], scores[best]):
                    return await self._finish(t, "stop")
        except ContextTooLong:
            return await self._finish(t, "truncated")
        except TeacherUnavailable as exc:
            self.store.append(
                t.event("error", step=t.steps, error_class=exc.error_class, message=str(exc))
            )
            self.stats.failed += 1

    def _too_hard(self, ppl: float) -> bool:
        # inf means no candidate had tokens of its own (the teacher just stopped): not "hard".
        return self.search.prune_ppl is not None and math.isfinite(ppl) and ppl > self.search.prune_ppl

    async def _candidates(self, t: Trajectory, attempt: int, prompt: str, max_tokens: int) -> TeacherResponse:
        key = (*t.key, t.steps, attempt)
        recorded = self.replay.candidates.get(key)
        if recorded is not None:
            response = TeacherResponse(
                [Candidate(c["text"], c["finish_reason"], c["tokens"]) for c in recorded["candidates"]],
                recorded["prompt_tokens"],
                recorded["completion_tokens"],
                recorded["requests"],
            )
        else:
            seed = request_seed(self.cfg.teacher.seed, *key)
            response = await self.teacher.sample(prompt, self.search.n, max_tokens, seed)
            self.store.append(t.event(
                "candidates", step=t.steps, attempt=attempt, seed=seed,
                requests=response.requests, prompt_tokens=response.prompt_tokens,
                completion_tokens=response.completion_tokens,
                candidates=[
                    {"text": c.text, "finish_reason": c.finish_reason, "tokens": c.completion_tokens}
                    for c in response.candidates
                ],
            ))  # fmt: skip
        t.teacher_tokens += response.completion_tokens
        self.stats.candidates += len(response.candidates)
        self.stats.teacher_tokens += response.completion_tokens
        return response

    async def _choose(self, t: Trajectory, attempt: int, context: str, response: TeacherResponse) -> list[Score]:
        recorded = self.replay.choices.get((*t.key, t.steps, attempt))
        if recorded is not None:
            return [
                Score(math.inf if p is None else p, n)
                for p, n in zip(recorded["ppl"], recorded["tokens"], strict=True)
            ]
        texts = [c.text for c in response.candidates]
        scores = await self.scoring.score(ScoreRequest(context, texts))
        best = lowest_ppl(scores)
        self.store.append(t.event(
            "choice", step=t.steps, attempt=attempt, chosen=best,
            ppl=[s.ppl if math.isfinite(s.ppl) else None for s in scores],
            tokens=[s.tokens for s in scores],
        ))  # fmt: skip
        return scores

    def _accept(self, t: Trajectory, chosen: Candidate, score: Score) -> bool:
        """Append the chosen chunk; True when the trajectory is complete."""
        before = len(t.text)
        t.text += chosen.text
        t.steps += 1
        t.kept_tokens += chosen.completion_tokens
        if math.isfinite(score.ppl) and score.tokens:
            t.nll += math.log(score.ppl) * score.tokens
            t.scored_tokens += score.tokens
            self.stats.add_ppl(score.ppl)
        self.stats.steps += 1
        # A stop string can straddle two chunks, where the server cannot see it.
        cut = _find_stop(t.text, self.cfg.teacher.stop, max(0, before - _longest(self.cfg.teacher.stop)))
        if cut is not None:
            t.text = t.text[:cut]
            return True
        return chosen.finish_reason == "stop"

    async def _finish(self, t: Trajectory, finish: str) -> None:
        answer = extract_answer(t.text)
        correct = await anyio.to_thread.run_sync(answers_match, t.problem.reference, answer)
        row = {
            "problem_id": t.problem.id,
            "sample": t.sample,
            "method": self.cfg.method,
            "prompt": [{"role": "user", "content": self.scorer.user_message(t.problem.question)}],
            "completion": [{"role": "assistant", "content": t.text}],
            "reference": t.problem.reference,
            "answer": answer,
            "correct": correct,
            "finish": finish,
            "steps": t.steps,
            "student_ppl": round(math.exp(t.nll / t.scored_tokens), 6) if t.scored_tokens else None,
            "teacher_tokens": t.teacher_tokens,
            "completion_tokens": t.kept_tokens,
        }
        self.store.append(t.event("finish", row=row))
        self._count_end({"type": "finish", "row": row})

    def _count_end(self, event: dict) -> None:
        if event["type"] == "prune":
            self.stats.pruned += 1
            return
        row = event["row"]
        if row["finish"] == "stop":
            self.stats.finished += 1
        else:
            self.stats.truncated += 1
        self.stats.correct += bool(row["correct"])


def lowest_ppl(scores: list[Score]) -> int:
    """The selection rule: the candidate the student finds easiest (first one on ties)."""
    return min(range(len(scores)), key=lambda i: scores[i].ppl)


def _longest(stops: list[str]) -> int:
    return max((len(s) for s in stops), default=0)


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
