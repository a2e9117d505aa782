"""What the engine tests share (imported as `engine_helpers`: pytest puts this folder on sys.path
for the test files in it): a config and problems, one engine session over a run directory as the
run's session wires it, readers of the log, and scripts for the stub teacher. No tests here."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from engine_stubs import Call, StubScorer, StubTeacher, chunk

from genssd_cli.config import RunConfig
from genssd_cli.problems import Problem
from genssd_cli.run.control import RunControl
from genssd_cli.run.counters import RunStats
from genssd_cli.run.engine import Collaborators, Engine
from genssd_cli.rundir.layout import EVENTS
from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import Candidate, Event
from genssd_cli.rundir.replay import Replay, spent, trajectory_rows
from genssd_cli.rundir.store import RunStore
from genssd_cli.student.scoring_queue import ScoringQueue

TEMPLATE = "Question: {question}\nAnswer:"
STOP = "\nQuestion:"
PRICE = {"input": 100.0, "output": 400.0}  # per million tokens: big, so that a few requests cost something


def make_config(**sections) -> RunConfig:
    raw = {
        "method": "genssd",
        "teacher": {"model": "stub-teacher", "base_url": "http://127.0.0.1:9/v1", "stop": [STOP]},
        "student": {"model": "stub-student"},
        "search": {"n": 3, "chunk_tokens": 8, "max_steps": 6, "max_new_tokens": 64,
                   "prune_ppl": None, "retries": 1, "samples": 1},
        "data": {"source": "arith", "count": 4, "seed": 0},
        "engine": {"max_active_problems": 4, "fsync": "never"},
    }  # fmt: skip
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return RunConfig.model_validate(raw)


def make_problems(count: int) -> list[Problem]:
    return [Problem(f"p{i}", f"Problem {i}: what is {i} + 7 - {i}?", "7") for i in range(count)]


def problem_number(request: Call) -> int:
    return int(re.search(r"Problem (\d+):", request.head).group(1))


def step_of(request: Call) -> int:
    """The scripts below write one line per chunk: the step is the number of lines so far."""
    return request.trace.count("\n")


@dataclass
class Session:
    control: RunControl
    stats: RunStats


def run_engine(cfg: RunConfig, run_dir: Path, problems: list[Problem], teacher: StubTeacher,
               scorer: StubScorer | None = None) -> Session:  # fmt: skip
    """One session as run/session.py wires it: replay of what run_dir's log holds, the cost spent so
    far, a RunControl made inside the event loop, and the engine over all problems."""
    events = read_events(run_dir)
    stats = RunStats(problems_total=len(problems))

    async def main() -> RunControl:
        control = RunControl(anyio.Event(), spent=spent(events, cfg.teacher), max_cost=cfg.max_cost)
        teacher.control = control
        with RunStore(run_dir, fsync="never") as store:
            store.open_log()
            scoring = ScoringQueue(scorer or StubScorer(), control.stop)
            parts = Collaborators(teacher, scoring, store, Replay(events), control, stats)
            engine = Engine(cfg, TEMPLATE, parts)
            with anyio.fail_after(10):
                await engine.run(problems)
        return control

    return Session(anyio.run(main), stats)


def rows(run_dir: Path, problems: list[Problem]) -> list[dict]:
    return [r.model_dump() for r in trajectory_rows(read_events(run_dir), problems)]


def of_type(events: list[Event], kind: str) -> list:
    return [e for e in events if e.type == kind]


def by_trajectory(events: list[Event], kind: str) -> dict[tuple[str, int], list]:
    out: dict[tuple[str, int], list] = {}
    for e in of_type(events, kind):
        out.setdefault((e.problem_id, e.sample), []).append(e)
    return out


def received(events: list[Event]) -> dict[tuple, list[int]]:
    """(problem, sample, step, attempt) -> the candidate indices its responses held."""
    out: dict[tuple, list[int]] = {}
    for e in of_type(events, "response"):
        out.setdefault((e.problem_id, e.sample, e.step, e.attempt), []).extend(
            range(e.start, e.start + len(e.candidates))
        )
    return out


def candidate_texts(events: list[Event]) -> dict[tuple, dict[int, str]]:
    out: dict[tuple, dict[int, str]] = {}
    for e in of_type(events, "response"):
        step = out.setdefault((e.problem_id, e.sample, e.step, e.attempt), {})
        step.update({e.start + i: c.text for i, c in enumerate(e.candidates)})
    return out


def copy_log(src: Path, dst: Path, keep: Callable[[int, Event], bool]) -> None:
    """A run directory whose log holds the lines of src's that `keep(index, event)` accepts."""
    lines = (src / EVENTS).read_text(encoding="utf-8").splitlines(keepends=True)
    events = read_events(src)
    dst.mkdir()
    kept = [line for i, (line, event) in enumerate(zip(lines, events, strict=True)) if keep(i, event)]
    (dst / EVENTS).write_text("".join(kept), encoding="utf-8")


def ladder(request: Call, index: int) -> Candidate:
    """A problem-dependent number of reasoning lines (1 to 3), then the answer (wrong for problem
    2), which stops. Every candidate depends on the step's seed, as a sampling teacher's does."""
    draw = (request.seed + index) % 1000
    if step_of(request) >= 1 + problem_number(request) % 3:
        answer = 8 if problem_number(request) == 2 else 7
        return chunk(f"After {draw} checks, the answer is {answer}.", "stop")
    return chunk(f"Step {step_of(request)}: idea {draw}.\n")


def reference_run(tmp_path: Path) -> tuple[RunConfig, list[Problem], Path, list[dict], StubTeacher]:
    """A whole run with one response per candidate (a server that ignores n), and its rows."""
    cfg = make_config(search={"samples": 2})
    problems = make_problems(3)
    run = tmp_path / "reference"
    teacher = StubTeacher(ladder, per_candidate=True)
    run_engine(cfg, run, problems, teacher)
    return cfg, problems, run, rows(run, problems), teacher
