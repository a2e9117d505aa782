"""Reading meaning back out of events.jsonl: what a resumed run can reuse (`Replay`), and the
files materialised from it (trajectories.jsonl, failures.jsonl, summary.json)."""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import Counter
from collections.abc import Sequence

from genssd_cli.config import TeacherConfig, changed_keys
from genssd_cli.data import Problem
from genssd_cli.errors import UsageError
from genssd_cli.records import (
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

StepKey = tuple[str, int, int, int]  # (problem_id, sample, step, attempt)
TrajectoryKey = tuple[str, int]  # (problem_id, sample)
Events = Sequence[Event]


def _key(event: Response | Choice) -> StepKey:
    return (event.problem_id, event.sample, event.step, event.attempt)


class Replay:
    """Every received teacher response and every recorded choice, by step, so the engine can walk
    its deterministic loop again and only ask the teacher for what it never received."""

    def __init__(self, events: Events):
        self.responses: dict[StepKey, list[Response]] = {}
        self.choices: dict[StepKey, Choice] = {}
        self.ended: dict[TrajectoryKey, Finish | Prune] = {}
        for event in events:
            if isinstance(event, Response):
                self.responses.setdefault(_key(event), []).append(event)
            elif isinstance(event, Choice):
                self.choices[_key(event)] = event
            elif isinstance(event, Finish | Prune):
                self.ended[(event.problem_id, event.sample)] = event


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
    """Refuse to mix results of different settings in one run directory, unless forced. (A log
    of another format version was already refused when it was read.)"""
    previous = last_run_start(events)
    if previous is None or force:
        return
    changed = changed_keys(previous.settings, settings)
    if changed:
        raise UsageError(
            f"this run directory was made with other settings (changed: {', '.join(changed)}); "
            "use another --out, or --force to continue anyway"
        )


def trajectory_rows(events: Events, problems: list[Problem]) -> list[TrajectoryRow]:
    """Finished and truncated trajectories in problem order then sample: a resumed run writes the
    same file as an uninterrupted one."""
    order = {p.id: i for i, p in enumerate(problems)}
    rows = [row for e in events if isinstance(e, Finish) for row in (e.row, *e.more)]
    return sorted(rows, key=lambda r: (order.get(r.problem_id, len(order)), r.problem_id, r.sample, r.rank))


def failure_rows(events: Events) -> list[FailureRow]:
    """Errors of trajectories that did not end later (a resumed run retries failed ones)."""
    ended = ended_keys(events)
    latest: dict[TrajectoryKey, TrajectoryError] = {}
    for event in events:
        if isinstance(event, TrajectoryError) and (event.problem_id, event.sample) not in ended:
            latest[(event.problem_id, event.sample)] = event
    return [FailureRow.model_validate(e.model_dump(exclude={"v", "type"})) for e in latest.values()]


def _centre(values: list[float | int | None]) -> Centre:
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


def spent(events: Events, teacher: TeacherConfig) -> float | None:
    """The teacher cost of every response received in this run directory, at today's prices."""
    if not teacher.priced:
        return None
    return sum(_cost(e, teacher) for e in events if isinstance(e, Response) and not e.cached)


def cache_totals(events: Events, teacher: TeacherConfig) -> CacheTotals | None:
    responses = [e for e in events if isinstance(e, Response)]
    hits = [e for e in responses if e.cached]
    if teacher.cache is None and not hits:
        return None
    return CacheTotals(
        hits=len(hits), misses=len(responses) - len(hits),
        saved_completion_tokens=sum(e.completion_tokens for e in hits),
        saved_cost=round(sum(_cost(e, teacher) for e in hits), 6) if teacher.priced else None,
    )  # fmt: skip


def _cost(response: Response, teacher: TeacherConfig) -> float:
    price = teacher.price_of(response.endpoint)
    return price.cost(response.prompt_tokens, response.completion_tokens) if price else 0.0


def per_endpoint(events: Events, teacher: TeacherConfig) -> dict[str, EndpointTotals]:
    """Requests, tokens, cost, failures and sidelinings of each endpoint that answered or failed."""
    out: dict[str, EndpointTotals] = {}

    def entry(name: str) -> EndpointTotals:
        return out.setdefault(name, EndpointTotals(requests=0, prompt_tokens=0, completion_tokens=0,
                                                   cost=0.0 if teacher.priced else None))  # fmt: skip

    for e in events:
        if isinstance(e, Response) and not e.cached:  # a hit: no server answered it in this run
            row = entry(e.endpoint or "teacher")
            row.requests += 1
            row.prompt_tokens += e.prompt_tokens
            row.completion_tokens += e.completion_tokens
            if row.cost is not None:
                row.cost += _cost(e, teacher)
        elif isinstance(e, SessionEnd):
            for name, seen in e.endpoints.items():
                row = entry(name)
                row.failures = dict(Counter(row.failures) + Counter(seen.failures))
                row.sidelined += seen.sidelined
    for row in out.values():
        row.failures = dict(sorted(row.failures.items()))
        if row.cost is not None:
            row.cost = round(row.cost, 6)
    return out


def summarize(events: Events, problems: list[Problem], samples: int, teacher: TeacherConfig) -> Summary:
    rows = trajectory_rows(events, problems)
    failures = failure_rows(events)
    wanted = {(p.id, s) for p in problems for s in range(samples)}
    ended = ended_keys(events)
    responses = [e for e in events if isinstance(e, Response)]
    sessions = [e for e in events if isinstance(e, SessionEnd)]
    retries: Counter[str] = Counter()
    for session in sessions:
        retries.update(session.retries)
    cost = spent(events, teacher)
    start = last_run_start(events)
    return Summary(
        problems=len(problems),
        # Tells runs of the same problems apart from runs of others (genssd report compares them).
        problems_sha256=hashlib.sha256("\n".join(p.id for p in problems).encode()).hexdigest()[:16],
        trajectories=TrajectoryCounts(
            finished=sum(1 for r in rows if r.finish == "stop"),
            truncated=sum(1 for r in rows if r.finish == "truncated"),
            pruned=sum(1 for e in events if isinstance(e, Prune)),
            failed=len(failures),
            pending=len(wanted - ended) - len(failures),
        ),
        correct=sum(1 for r in rows if r.correct),
        steps=sum(1 for e in events if isinstance(e, Choice)),
        teacher=TeacherTotals(
            requests=len(responses),  # answered ones; retried attempts are under "retries"
            prompt_tokens=sum(e.prompt_tokens for e in responses),
            completion_tokens=sum(e.completion_tokens for e in responses),
            candidates=sum(len(e.candidates) for e in responses),
            token_sources=dict(sorted(Counter(e.token_source or "unknown" for e in responses).items())),
            cost=round(cost, 6) if cost is not None else None,
            price_per_million=Price.model_validate(teacher.price.model_dump()) if teacher.price else None,
            endpoints=per_endpoint(events, teacher),
            retries=dict(sorted(retries.items())),
            failures=dict(sorted(Counter(f.error_class for f in failures).items())),
            cache=cache_totals(events, teacher),
        ),
        kept=KeptStats(
            student_ppl=_centre([r.student_ppl for r in rows]),
            completion_tokens=_centre([r.completion_tokens for r in rows]),
        ),
        engine=_engine_use(sessions),
        sessions=len(sessions),
        wall_s=round(sum(s.wall_s for s in sessions), 1),
        config_hash=start.config_hash if start else None,
    )
