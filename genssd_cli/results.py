"""Reading meaning back out of events.jsonl: what a resumed run can reuse (`Replay`), and the
files materialised from it (trajectories.jsonl, failures.jsonl, summary.json)."""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import Counter
from typing import Any

from genssd_cli.config import TeacherConfig, changed_keys
from genssd_cli.data import Problem
from genssd_cli.errors import UsageError
from genssd_cli.store import SCHEMA_VERSION

StepKey = tuple[str, int, int, int]  # (problem_id, sample, step, attempt)
END_TYPES = ("finish", "prune")


def step_key(event: dict[str, Any]) -> StepKey:
    return (event["problem_id"], event["sample"], event["step"], event["attempt"])


class Replay:
    """Every received teacher response and every recorded choice, by step, so the engine can walk
    its deterministic loop again and only ask the teacher for what it never received."""

    def __init__(self, events: list[dict[str, Any]]):
        self.responses: dict[StepKey, list[dict]] = {}
        self.choices: dict[StepKey, dict] = {}
        self.ended: dict[tuple[str, int], dict] = {}
        for event in events:
            kind = event.get("type")
            if kind == "response":
                self.responses.setdefault(step_key(event), []).append(event)
            elif kind == "choice":
                self.choices[step_key(event)] = event
            elif kind in END_TYPES:
                self.ended[(event["problem_id"], event["sample"])] = event


def ended_keys(events: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """(problem_id, sample) of every trajectory that finished or was pruned."""
    return {(e["problem_id"], e["sample"]) for e in events if e.get("type") in END_TYPES}


def all_ended(events: list[dict[str, Any]], problems: list[Problem], samples: int) -> bool:
    ended = ended_keys(events)
    return all((p.id, s) in ended for p in problems for s in range(samples))


def last_run_start(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    starts = [e for e in events if e.get("type") == "run_start"]
    return starts[-1] if starts else None


def check_resume(events: list[dict[str, Any]], settings: dict[str, Any], force: bool) -> None:
    """Refuse to mix results of different settings in one run directory, unless forced."""
    previous = last_run_start(events)
    if previous is None:
        return
    if previous.get("v") != SCHEMA_VERSION:
        raise UsageError(
            f"this run directory was written by another genssd version (log format {previous.get('v')}, "
            f"this one reads {SCHEMA_VERSION}); use another --out"
        )
    if force:
        return
    changed = changed_keys(previous["settings"], settings)
    if changed:
        raise UsageError(
            f"this run directory was made with other settings (changed: {', '.join(changed)}); "
            "use another --out, or --force to continue anyway"
        )


def trajectory_rows(events: list[dict[str, Any]], problems: list[Problem]) -> list[dict[str, Any]]:
    """Finished and truncated trajectories in problem order then sample: a resumed run writes the
    same file as an uninterrupted one."""
    order = {p.id: i for i, p in enumerate(problems)}
    rows = [e["row"] for e in events if e.get("type") == "finish"]
    return sorted(rows, key=lambda r: (order.get(r["problem_id"], len(order)), r["problem_id"], r["sample"]))


def failure_rows(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Errors of trajectories that did not end later (a resumed run retries failed ones)."""
    ended = ended_keys(events)
    latest: dict[tuple[str, int], dict] = {}
    for event in events:
        if event.get("type") == "error" and (event["problem_id"], event["sample"]) not in ended:
            latest[(event["problem_id"], event["sample"])] = event
    return [{k: v for k, v in e.items() if k not in ("v", "type")} for e in latest.values()]


def _stats(values: list[float]) -> dict[str, float | None]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "median": None}
    return {"mean": round(statistics.fmean(finite), 4), "median": round(statistics.median(finite), 4)}


def _engine_use(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """Over all sessions: the share of the allowed teacher concurrency that was busy, and the
    event loop's own CPU time per candidate (model time excluded: it runs in a worker thread)."""
    allowed = sum(s.get("max_concurrency", 0) * s.get("engine_wall_s", 0.0) for s in sessions)
    candidates = sum(s.get("candidates", 0) for s in sessions)
    return {
        "teacher_busy_fraction": round(sum(s.get("teacher_busy_s", 0.0) for s in sessions) / allowed, 4)
        if allowed else None,
        "loop_cpu_ms_per_candidate": round(1000 * sum(s.get("loop_cpu_s", 0.0) for s in sessions) / candidates, 3)
        if candidates else None,
        "student_cache_peak_mb": max((s.get("student_cache_peak_mb") or 0 for s in sessions), default=None),
    }


def spent(events: list[dict[str, Any]], teacher: TeacherConfig) -> float | None:
    """The teacher cost of every response received in this run directory, at today's prices."""
    if not teacher.priced:
        return None
    return sum(_cost(e, teacher) for e in events if e.get("type") == "response")


def _cost(response: dict[str, Any], teacher: TeacherConfig) -> float:
    price = teacher.price_of(response.get("endpoint"))
    return price.cost(response["prompt_tokens"], response["completion_tokens"]) if price else 0.0


def per_endpoint(events: list[dict[str, Any]], teacher: TeacherConfig) -> dict[str, dict[str, Any]]:
    """Requests, tokens, cost, failures and benchings of each endpoint that answered or failed."""
    out: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return out.setdefault(name, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                     "cost": 0.0 if teacher.priced else None, "failures": Counter(), "benched": 0})

    for e in events:
        if e.get("type") == "response":
            row = entry(e.get("endpoint") or "teacher")
            row["requests"] += 1
            row["prompt_tokens"] += e["prompt_tokens"]
            row["completion_tokens"] += e["completion_tokens"]
            if row["cost"] is not None:
                row["cost"] += _cost(e, teacher)
        elif e.get("type") == "session_end":
            for name, seen in (e.get("endpoints") or {}).items():
                row = entry(name)
                row["failures"].update(seen.get("failures", {}))
                row["benched"] += seen.get("benched", 0)
    for row in out.values():
        row["failures"] = dict(sorted(row["failures"].items()))
        if row["cost"] is not None:
            row["cost"] = round(row["cost"], 6)
    return out


def summarize(
    events: list[dict[str, Any]], problems: list[Problem], samples: int, teacher: TeacherConfig
) -> dict[str, Any]:
    rows = trajectory_rows(events, problems)
    pruned = sum(1 for e in events if e.get("type") == "prune")
    failed = len(failure_rows(events))
    wanted = {(p.id, s) for p in problems for s in range(samples)}
    ended = ended_keys(events)
    responses = [e for e in events if e.get("type") == "response"]
    sessions = [e for e in events if e.get("type") == "session_end"]
    retries: Counter[str] = Counter()
    for session in sessions:
        retries.update(session.get("retries", {}))
    failures = Counter(row["error_class"] for row in failure_rows(events))
    return {
        "problems": len(problems),
        # Tells runs of the same problems apart from runs of others (genssd report compares them).
        "problems_sha256": hashlib.sha256("\n".join(p.id for p in problems).encode()).hexdigest()[:16],
        "trajectories": {
            "finished": sum(1 for r in rows if r["finish"] == "stop"),
            "truncated": sum(1 for r in rows if r["finish"] == "truncated"),
            "pruned": pruned,
            "failed": failed,
            "pending": len(wanted - ended) - failed,
        },
        "correct": sum(1 for r in rows if r["correct"]),
        "steps": sum(1 for e in events if e.get("type") == "choice"),
        "teacher": {
            "requests": len(responses),  # answered ones; retried attempts are under "retries"
            "prompt_tokens": sum(e["prompt_tokens"] for e in responses),
            "completion_tokens": sum(e["completion_tokens"] for e in responses),
            "candidates": sum(len(e["candidates"]) for e in responses),
            "cost": round(cost, 6) if (cost := spent(events, teacher)) is not None else None,
            "price_per_million": teacher.price.model_dump() if teacher.price else None,
            "endpoints": per_endpoint(events, teacher),
            "retries": dict(sorted(retries.items())),
            "failures": dict(sorted(failures.items())),
        },
        "kept": {
            "student_ppl": _stats([r["student_ppl"] for r in rows]),
            "completion_tokens": _stats([r["completion_tokens"] for r in rows]),
        },
        "engine": _engine_use(sessions),
        "sessions": len(sessions),
        "wall_s": round(sum(s.get("wall_s", 0.0) for s in sessions), 1),
        "config_hash": (last_run_start(events) or {}).get("config_hash"),
    }
