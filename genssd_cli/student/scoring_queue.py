"""The bridge between the async engine and the student: score requests from all trajectories in
flight are gathered and run in a worker thread, so the event loop never waits on the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from genssd_cli.errors import StopRequested
from genssd_cli.student.scorer import Score, ScoreRequest, StudentScorer


@dataclass
class _Pending:
    request: ScoreRequest
    solo: bool
    done: anyio.Event = field(default_factory=anyio.Event)
    result: list[Score] | None = None
    error: BaseException | None = None


class ScoringQueue:
    """Gathers the score requests of all trajectories in flight and runs them as one batched call
    in a worker thread: the event loop never blocks on the model, and whatever arrives while
    the model is busy goes into the next batch.

    Batching changes float rounding (padding, kernel shapes) by ~1e-6. A `solo` request is run
    in a forward of its own, so its result depends on nothing but the request: the numbers
    written to trajectories.jsonl use it and are identical however the run was interrupted.

    Once the run's `stop` is set, scoring work is dropped: every waiting or later request gets
    StopRequested, and `interrupt` ends the batch in progress at the model's next block. Nothing
    unrecorded is lost: the responses are in the log, and a resume scores them again."""

    def __init__(self, scorer: StudentScorer, stop: anyio.Event | None = None):
        self.scorer = scorer
        self.stop = stop or anyio.Event()
        self._pending: list[_Pending] = []
        self._wakeup = anyio.Event()

    def interrupt(self) -> None:
        """The run stopped: end the batch in progress now."""
        self.scorer.interrupt()
        self._wakeup.set()

    async def score(self, request: ScoreRequest, solo: bool = False) -> list[Score]:
        return (await self.score_all([request], solo))[0]

    async def score_all(self, requests: list[ScoreRequest], solo: bool = False) -> list[list[Score]]:
        """Several requests (other contexts) at once: they join the same batch."""
        if self.stop.is_set():
            raise StopRequested
        items = [_Pending(request, solo) for request in requests]
        self._pending.extend(items)
        self._wakeup.set()
        for item in items:
            await item.done.wait()
            if item.error is not None:
                raise item.error
        return [item.result for item in items]

    async def serve(self) -> None:
        """Runs until cancelled (the engine cancels it when the last trajectory ends)."""
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            if self.stop.is_set():
                for item in batch:
                    item.error = StopRequested()
                    item.done.set()
                continue
            try:
                results = await anyio.to_thread.run_sync(self._score_all, batch, abandon_on_cancel=False)
            except Exception as exc:  # handed to every waiter; the engine decides
                for item in batch:
                    item.error = exc
                    item.done.set()
                continue
            for item, result in zip(batch, results, strict=True):
                item.result = result
                item.done.set()

    def _score_all(self, batch: list[_Pending]) -> list[list[Score]]:
        shared = [item for item in batch if not item.solo]
        results = dict(zip(map(id, shared), self.scorer.score([p.request for p in shared]), strict=True))
        for item in batch:
            if item.solo:
                results[id(item)] = self.scorer.score([item.request])[0]
        return [results[id(item)] for item in batch]
