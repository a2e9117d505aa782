"""Reading meaning back out of events.jsonl: what a resumed run can reuse (`Replay`), and the
files materialised from it (trajectories.jsonl, failures.jsonl, summary.json).

`RunLog` takes the log in one streaming pass and keeps what those need, not the log: the
responses and choices of trajectories still open, the keys of ended ones, the latest error of
failed ones, running totals, the last `run_start`, and (when materialising) the finished rows,
spooled to a temporary file with only their sort keys in memory. So memory grows with the
trajectories still open, not with the log. The functions over a list of events at the bottom
are the same computations for a log already in memory (tests, small readers).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import statistics
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import UsageError
from genssd_cli.files import SortedSpool
from genssd_cli.problems import Problem
from genssd_cli.rundir.layout import EVENTS, TRAJECTORIES
from genssd_cli.rundir.log import iter_log
from genssd_cli.rundir.records import (
    CacheTotals,
    Centre,
    Choice,
    EndpointTotals,
    EngineUse,
    Event,
    FailureRow,
    Finish,
    KeptStats,
    Price,
    Prune,
    Response,
    RunStart,
    SessionEnd,
    Summary,
    TeacherTotals,
    TrajectoryCounts,
    TrajectoryError,
    TrajectoryRow,
)
from genssd_cli.rundir.results_hash import changed_keys
from genssd_cli.rundir.selection import SelectionTally

StepKey = tuple[str, int, int, int]  # (problem_id, sample, step, attempt)
TrajectoryKey = tuple[str, int]  # (problem_id, sample)
RowKey = tuple[str, int, int]  # (problem_id, sample, rank)
Events = Sequence[Event]


@dataclass(frozen=True, slots=True)
class Ended:
    """How a trajectory ended, as the engine counts it when a resume skips it: pruned, or its
    rows by finish. A handful of distinct values, shared, however many trajectories ended."""

    pruned: int = 0
    finished: int = 0
    truncated: int = 0
    correct: int = 0

    @staticmethod
    def of(event: Finish | Prune) -> Ended:
        if isinstance(event, Prune):
            return _ended(1, 0, 0, 0)
        rows = (event.row, *event.more)
        return _ended(0, sum(r.finish == "stop" for r in rows), sum(r.finish == "truncated" for r in rows),
                      sum(r.correct for r in rows))  # fmt: skip


@functools.cache
def _ended(pruned: int, finished: int, truncated: int, correct: int) -> Ended:
    return Ended(pruned, finished, truncated, correct)


class Replay:
    """Every received teacher response and every recorded choice of the trajectories not ended,
    by step, so the engine can walk its deterministic loop again and only ask the teacher for
    what it never received; and how each ended trajectory ended (it is not walked again)."""

    def __init__(self, events: Iterable[Event] = ()):
        self.responses: dict[StepKey, list[Response]] = {}
        self.choices: dict[StepKey, Choice] = {}
        self.ended: dict[TrajectoryKey, Ended] = {}
        self._steps: dict[TrajectoryKey, set[StepKey]] = {}  # of each open trajectory: what to drop at its end
        for event in events:
            self.add(event)

    def add(self, event: Event) -> None:
        if isinstance(event, Response | Choice):
            trajectory = (event.problem_id, event.sample)
            if trajectory in self.ended:
                return
            key = (*trajectory, event.step, event.attempt)
            self._steps.setdefault(trajectory, set()).add(key)
            if isinstance(event, Response):
                self.responses.setdefault(key, []).append(event)
            else:
                self.choices[key] = event
        elif isinstance(event, Finish | Prune):
            trajectory = (event.problem_id, event.sample)
            self.ended[trajectory] = Ended.of(event)
            for key in self._steps.pop(trajectory, ()):
                self.responses.pop(key, None)
                self.choices.pop(key, None)


def row_order(problems: list[Problem]) -> Callable[[RowKey], tuple]:
    """Sort key of a row's (problem_id, sample, rank): problem order, then sample, then rank, so
    a resumed run writes the same trajectories.jsonl as an uninterrupted one."""
    order = {p.id: i for i, p in enumerate(problems)}
    return lambda key: (order.get(key[0], len(order)), *key)


class RunLog:
    """What resume and materialisation need of a run's log, taken in one pass (`scan_events`, or `add`
    event by event). `teacher` prices the responses (costs are summed in log order, as they
    were paid); `rows`, when given, receives every finished row (materialisation)."""

    def __init__(self, teacher: TeacherConfig | None = None, rows: SortedSpool | None = None):
        self.teacher = teacher
        self.rows = rows
        self.replay = Replay()
        self.events = 0
        self.last_start: RunStart | None = None
        self.sessions: list[SessionEnd] = []
        self.errors: dict[TrajectoryKey, TrajectoryError] = {}  # latest, of trajectories not ended
        self.steps = 0
        self.pruned = 0
        self.finished = self.truncated = self.correct = 0
        self.ppls = array("d")  # the rows' finite student_ppl
        self.lengths = array("q")  # the rows' completion_tokens
        self.requests = self.prompt_tokens = self.completion_tokens = self.candidates = 0
        self.token_sources: Counter[str] = Counter()
        priced = teacher is not None and teacher.priced
        self.spent: float | None = 0 if priced else None  # what the responses received cost, at today's prices
        self.hits = self.saved_completion_tokens = 0
        self.saved_cost: float | None = 0 if priced else None
        self.endpoints: dict[str, EndpointTotals] = {}
        self.stat: tuple[int, int, int] | None = None  # of the file read: (inode, size, mtime)
        self.selection = SelectionTally()

    @classmethod
    def of(cls, events: Iterable[Event], teacher: TeacherConfig | None = None) -> RunLog:
        log = cls(teacher)
        for event in events:
            log.add(event)
        return log

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rows is not None:
            self.rows.close()

    def read(self, path: Path) -> None:
        """Add every event of the log at `path`, streamed (several logs: a sharded run's)."""
        for event in iter_log(path):
            self.add(event)

    @property
    def ended(self) -> dict[TrajectoryKey, Ended]:
        return self.replay.ended

    def add(self, event: Event) -> None:
        self.events += 1
        if isinstance(event, Finish | Prune) and (event.problem_id, event.sample) not in self.ended:
            self.selection.end(event)
        self.replay.add(event)
        if isinstance(event, Response):
            self._response(event)
            if (event.problem_id, event.sample) not in self.ended:
                self.selection.response((event.problem_id, event.sample), event.completion_tokens)
        elif isinstance(event, Choice):
            self.steps += 1
            key = (event.problem_id, event.sample, event.step, event.attempt)
            self.selection.choice(event, self.replay.responses.get(key, []))
        elif isinstance(event, Finish):
            self.errors.pop((event.problem_id, event.sample), None)
            for row in (event.row, *event.more):
                self._row(row)
        elif isinstance(event, Prune):
            self.errors.pop((event.problem_id, event.sample), None)
            self.pruned += 1
        elif isinstance(event, TrajectoryError):
            key = (event.problem_id, event.sample)
            if key not in self.ended:  # a resumed run retries failed ones; an ended one is done
                self.errors[key] = event
        elif isinstance(event, SessionEnd):
            self.sessions.append(event)
            for name, seen in event.endpoints.items():
                totals = self._endpoint(name)
                totals.failures = dict(Counter(totals.failures) + Counter(seen.failures))
                totals.sidelined += seen.sidelined
        elif isinstance(event, RunStart):
            self.last_start = event

    def _response(self, e: Response) -> None:
        self.requests += 1  # answered ones; retried attempts are in the sessions' `retries`
        self.prompt_tokens += e.prompt_tokens
        self.completion_tokens += e.completion_tokens
        self.candidates += len(e.candidates)
        self.token_sources[e.token_source or "unknown"] += 1
        cost = self._cost(e)
        if e.cached:  # answered from teacher.cache: no server answered it in this run
            self.hits += 1
            self.saved_completion_tokens += e.completion_tokens
            if self.saved_cost is not None and self.teacher is not None:
                # Priced as this run's answerer would be: the price of an endpoint of another run's
                # pool is not known here (unless the teacher has one price): unknown, not 0.
                known = self.teacher.price is not None or any(x.label == e.endpoint for x in self.teacher.endpoints)
                self.saved_cost = self.saved_cost + cost if known else None
            return
        if self.spent is not None:
            self.spent += cost
        totals = self._endpoint(e.endpoint or "teacher")
        totals.requests += 1
        totals.prompt_tokens += e.prompt_tokens
        totals.completion_tokens += e.completion_tokens
        if totals.cost is not None:
            totals.cost += cost

    def _cost(self, response: Response) -> float:
        price = self.teacher.price_of(response.endpoint) if self.teacher is not None else None
        return price.cost(response.prompt_tokens, response.completion_tokens) if price else 0.0

    def _endpoint(self, name: str) -> EndpointTotals:
        if name not in self.endpoints:
            priced = self.teacher is not None and self.teacher.priced
            self.endpoints[name] = EndpointTotals(requests=0, prompt_tokens=0, completion_tokens=0,
                                                  cost=0.0 if priced else None)  # fmt: skip
        return self.endpoints[name]

    def _row(self, row: TrajectoryRow) -> None:
        self.finished += row.finish == "stop"
        self.truncated += row.finish == "truncated"
        self.correct += row.correct
        if row.student_ppl is not None and math.isfinite(row.student_ppl):
            self.ppls.append(row.student_ppl)
        self.lengths.append(row.completion_tokens)
        if self.rows is not None:
            self.rows.add((row.problem_id, row.sample, row.rank), row.line().encode("utf-8"))

    # ---- what resume asks -------------------------------------------------------------------

    def all_ended(self, problems: list[Problem], samples: int) -> bool:
        return all((p.id, s) in self.ended for p in problems for s in range(samples))

    def check_resume(self, settings: dict, force: bool) -> None:
        """Refuse to mix results of different settings in one run directory, unless forced. (A
        log of another format version was already refused when it was read.)"""
        if self.last_start is None or force:
            return
        changed = changed_keys(self.last_start.settings, settings)
        if changed:
            raise UsageError(
                f"this run directory was made with other settings (changed: {', '.join(changed)}); "
                "use another --out, or --force to continue anyway"
            )

    # ---- what materialisation writes --------------------------------------------------------

    def trajectory_lines(self, problems: list[Problem]) -> Iterator[bytes]:
        """trajectories.jsonl, line by line, in problem order then sample (needs `rows`)."""
        return self.rows.lines(row_order(problems))

    def failure_rows(self) -> list[FailureRow]:
        """Errors of trajectories that did not end later (a resumed run retries failed ones)."""
        return [FailureRow.model_validate(e.model_dump(exclude={"v", "type"})) for e in self.errors.values()]

    def summary(self, problems: list[Problem], samples: int) -> Summary:
        teacher = self.teacher
        errors = self.failure_rows()
        pending = {(p.id, s) for p in problems for s in range(samples) if (p.id, s) not in self.ended}
        retries: Counter[str] = Counter()
        for session in self.sessions:
            retries.update(session.retries)
        endpoints = {}
        for name, totals in self.endpoints.items():
            cost = round(totals.cost, 6) if totals.cost is not None else None
            failures = dict(sorted(totals.failures.items()))
            endpoints[name] = totals.model_copy(update={"failures": failures, "cost": cost})
        cache = None
        if teacher.cache is not None or self.hits:
            cache = CacheTotals(
                hits=self.hits, misses=self.requests - self.hits, saved_completion_tokens=self.saved_completion_tokens,
                saved_cost=round(self.saved_cost, 6) if self.saved_cost is not None else None,
            )  # fmt: skip
        return Summary(
            problems=len(problems),
            # Tells runs of the same problems apart from runs of others (genssd report compares them).
            problems_sha256=hashlib.sha256("\n".join(p.id for p in problems).encode()).hexdigest()[:16],
            trajectories=TrajectoryCounts(
                finished=self.finished,
                truncated=self.truncated,
                pruned=self.pruned,
                failed=len(errors),
                pending=len(pending) - len(errors),
            ),
            correct=self.correct,
            steps=self.steps,
            teacher=TeacherTotals(
                requests=self.requests,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                candidates=self.candidates,
                token_sources=dict(sorted(self.token_sources.items())),
                approximate_tokens=bool(self.token_sources["split"] or self.token_sources["none"]),
                cost=round(self.spent, 6) if self.spent is not None else None,
                price_per_million=Price.model_validate(teacher.price.model_dump()) if teacher.price else None,
                endpoints=endpoints,
                retries=dict(sorted(retries.items())),
                failures=dict(sorted(Counter(f.error_class for f in errors).items())),
                cache=cache,
            ),
            kept=KeptStats(student_ppl=_centre(self.ppls), completion_tokens=_centre(self.lengths)),
            engine=_engine_use(self.sessions),
            sessions=len(self.sessions),
            wall_s=round(sum(s.wall_s for s in self.sessions), 1),
            config_hash=self.last_start.config_hash if self.last_start else None,
            selection=self.selection.stats(len(problems), {p.id for p in problems}, self.completion_tokens,
                                           self.correct),
        )


def scan_events(
    run_dir: Path, teacher: TeacherConfig | None = None, rows: bool = False, previous: RunLog | None = None
) -> RunLog:
    """The run directory's events.jsonl in one streaming pass. With `rows`, the finished rows are
    spooled beside trajectories.jsonl for `trajectory_lines`: close the RunLog after (it is a
    context manager). `previous`, a RunLog of the same directory read the same way without rows,
    is returned as is when the log has not changed since (an append-only file that kept its
    inode, size and mtime): the second read of a resume costs nothing."""
    path = run_dir / EVENTS
    stat = _stat(path)
    unchanged = previous is not None and stat is not None and previous.stat == stat
    if unchanged and not rows and previous.rows is None and previous.teacher is teacher:
        return previous
    log = RunLog(teacher, SortedSpool(run_dir / TRAJECTORIES) if rows else None)
    log.stat = stat
    try:
        log.read(path)
    except BaseException:
        log.__exit__()
        raise
    return log


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        s = os.stat(path)
    except FileNotFoundError:
        return None
    return (s.st_ino, s.st_size, s.st_mtime_ns)


def _centre(values: Iterable[float | int | None]) -> Centre:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return Centre()
    return Centre(mean=round(statistics.fmean(finite), 4), median=round(statistics.median(finite), 4))


def _engine_use(sessions: list[SessionEnd]) -> EngineUse:
    """Over all sessions: the share of the allowed teacher concurrency that was busy, and the
    event loop's own CPU time per candidate (model time excluded: it runs in a worker thread)."""
    allowed = sum(s.max_concurrency * s.engine_wall_s for s in sessions)
    candidates = sum(s.candidates for s in sessions)
    return EngineUse(
        teacher_busy_fraction=round(sum(s.teacher_busy_s for s in sessions) / allowed, 4) if allowed else None,
        loop_cpu_ms_per_candidate=round(1000 * sum(s.loop_cpu_s for s in sessions) / candidates, 3)
        if candidates else None,
        student_cache_peak_mb=max((s.student_cache_peak_mb or 0 for s in sessions), default=None),
    )  # fmt: skip


# ---- the same, over a log already in memory --------------------------------------------------


def ended_keys(events: Events) -> set[TrajectoryKey]:
    """(problem_id, sample) of every trajectory that finished or was pruned."""
    return {(e.problem_id, e.sample) for e in events if isinstance(e, Finish | Prune)}


def all_ended(events: Events, problems: list[Problem], samples: int) -> bool:
    ended = ended_keys(events)
    return all((p.id, s) in ended for p in problems for s in range(samples))


def last_run_start(events: Events) -> RunStart | None:
    starts = [e for e in events if isinstance(e, RunStart)]
    return starts[-1] if starts else None


def check_resume(events: Events, settings: dict, force: bool) -> None:
    RunLog.of(e for e in events if isinstance(e, RunStart)).check_resume(settings, force)


def trajectory_rows(events: Events, problems: list[Problem]) -> list[TrajectoryRow]:
    """Finished and truncated trajectories in problem order then sample."""
    rows = [row for e in events if isinstance(e, Finish) for row in (e.row, *e.more)]
    order = row_order(problems)
    return sorted(rows, key=lambda r: order((r.problem_id, r.sample, r.rank)))


def failure_rows(events: Events) -> list[FailureRow]:
    """Errors of trajectories that did not end later (a resumed run retries failed ones)."""
    return RunLog.of(events).failure_rows()


def spent(events: Events, teacher: TeacherConfig) -> float | None:
    """The teacher cost of every response received in this run directory, at today's prices."""
    return RunLog.of((e for e in events if isinstance(e, Response)), teacher).spent


def summarize(events: Events, problems: list[Problem], samples: int, teacher: TeacherConfig) -> Summary:
    return RunLog.of(events, teacher).summary(problems, samples)
