"""A scripted teacher and a scoring student for driving `genssd_cli.run.engine.Engine` in process.

`StubTeacher` implements the engine's `Teacher` protocol (teacher/protocol.py), as `TeacherClient`
does; `StubScorer` has what the engine and `ScoringQueue` use of `StudentScorer`. Both are
deterministic and record what they were asked, so a test can check the engine's rules in
milliseconds, without a model or a server.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from genssd_cli.errors import StopRequested, TeacherUnavailable
from genssd_cli.run.control import RunControl
from genssd_cli.rundir.records import Candidate, TeacherReply
from genssd_cli.student.scorer import Score, ScoreRequest
from genssd_cli.teacher.endpoint import Request
from genssd_cli.teacher.protocol import OnReply


@dataclass(frozen=True)
class Call:
    """One call of `sample` as the engine made it."""

    head: str  # the rendered teacher prompt
    trace: str  # the accepted prefix the teacher continues
    n: int
    max_tokens: int
    seed: int  # the step's seed; candidate i of a one-per-request part uses seed + i
    missing: tuple[int, ...]  # the candidate indices asked for (not in `have`)
    stopping: bool  # control.stop was already set: the engine must never call then
    spent: float | None  # control.spent when it was sent


Script = Callable[[Call, int], Candidate]  # (call, candidate index) -> the candidate
Failure = Callable[[Call], "tuple[int, Exception] | None"]  # None, or (replies reported first, error)


def chunk(text: str, finish: str = "length", tokens: int | None = None) -> Candidate:
    """A candidate; its tokens default to its words."""
    return Candidate(text=text, finish_reason=finish, tokens=len(text.split()) if tokens is None else tokens)


def timeout(after: int = 0) -> tuple[int, Exception]:
    """For `fail`: report `after` replies, then run out of retries as a timing-out server does."""
    return after, TeacherUnavailable("teacher failed after 4 attempts: timeout", "timeout")


class StubTeacher:
    """Answers from `script`, a pure function of (call, index), so a candidate is the same
    whichever way it is asked for. A step with every candidate missing is one reply of n
    (start 0, the step's seed); otherwise, or with `per_candidate`, one reply per missing
    candidate i (start i, seed + i), as the real client tops up or talks to a server ignoring n.

    Each reply goes to `on_reply` as it arrives. Nothing is sent once control.stop is set
    (StopRequested, as the real client). `fail(call)` may make a call report some replies
    then raise; `on_request(call, control)` runs when a call is sent (it is in flight)."""

    def __init__(
        self,
        script: Script,
        *,
        per_candidate: bool = False,
        fail: Failure | None = None,
        on_request: Callable[[Call, RunControl], None] | None = None,
        endpoint: str = "stub",
    ):
        self.script = script
        self.per_candidate = per_candidate
        self.fail = fail
        self.on_request = on_request
        self.endpoint = endpoint
        self.control: RunControl | None = None  # set by the test helper inside the event loop
        self.requests: list[Call] = []  # every call, including refused ones (stopping=True)

    async def sample(self, step: Request, have: Mapping[int, Candidate], on_reply: OnReply) -> None:
        n, seed, prompt = step.n, step.seed, step.prompt
        if step.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        missing = tuple(i for i in range(n) if i not in have)
        if not missing:
            return
        call = Call(prompt.head, prompt.trace, n, step.max_tokens, seed, missing, self.control.stopping,
                    self.control.spent)  # fmt: skip
        self.requests.append(call)
        if call.stopping:
            raise StopRequested
        if self.on_request is not None:
            self.on_request(call, self.control)
        await anyio.sleep(0)  # in flight: the other trajectories run meanwhile
        whole = len(missing) == n and not self.per_candidate
        replies = [(0, n, seed)] if whole else [(i, 1, seed + i) for i in missing]
        failure = self.fail(call) if self.fail is not None else None
        for number, (start, count, reply_seed) in enumerate(replies):
            if failure is not None and number == failure[0]:
                raise failure[1]
            candidates = [self.script(call, start + j) for j in range(count)]
            on_reply(TeacherReply(
                start=start, seed=reply_seed, n=count, prompt_tokens=len((prompt.head + prompt.trace).split()),
                completion_tokens=sum(c.tokens for c in candidates), endpoint=self.endpoint, token_source="usage",
                candidates=candidates,
            ))  # fmt: skip
            await anyio.sleep(0)
        if failure is not None:
            raise failure[1]

    def seeds(self) -> set[int]:
        """The seeds of the steps it was asked for."""
        return {r.seed for r in self.requests if not r.stopping}


def default_ppl(text: str) -> float:
    """Some deterministic perplexity of a non-empty text."""
    return 1.0 + sum(map(ord, text)) % 97 / 10


@dataclass(frozen=True)
class Kept:
    """A step the scorer was asked to keep a candidate of (its prefix cache)."""

    key: Any
    context: str
    index: int
    text: str


@dataclass
class StubScorer:
    """PPL of a candidate = `ppl(text)`; inf for an empty one (no tokens of its own), as the real
    scorer. For a request naming its trajectory, the candidate the request's selection rule
    keeps is recorded, as the real scorer keeps its prefix cache."""

    ppl: Callable[[str], float] = default_ppl
    requests: list[ScoreRequest] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    forgotten: list[Any] = field(default_factory=list)
    peak_cache_mb: float | None = None
    interrupted: bool = False  # the run stopped: the queue dropped its scoring

    def user_message(self, question: str) -> str:
        return f"Solve: {question}"

    def prompt_text(self, question: str) -> str:
        return f"<user>{self.user_message(question)}</user><assistant>"

    def score(self, requests: list[ScoreRequest]) -> list[list[Score]]:
        results = []
        for request in requests:
            self.requests.append(request)
            scores = [Score(self.ppl(text) if text else math.inf, len(text.split())) for text in request.candidates]
            if request.key is not None:
                index = request.keep([s.ppl for s in scores])
                self.kept.append(Kept(request.key, request.context, index, request.candidates[index]))
            results.append(scores)
        return results

    def forget(self, key: Any) -> None:
        self.forgotten.append(key)

    def interrupt(self) -> None:
        self.interrupted = True

    def step_requests(self) -> list[ScoreRequest]:
        """Requests of search steps (they name their trajectory); the others score whole texts."""
        return [r for r in self.requests if r.key is not None]
