"""`genssd run`: wire config → problems → teacher endpoint → student → engine → run directory.

Every check that can fail on user input runs before the run directory is touched, so a bad
config or dataset never damages an earlier run's files.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import anyio
from rich.console import Console

from genssd_cli import __version__
from genssd_cli.config import RunConfig, dump_config_yaml, load_run_config, results_settings, settings_hash
from genssd_cli.data import Problem, load_problems, load_prompt
from genssd_cli.engine import Engine
from genssd_cli.errors import UsageError, unwrap_group
from genssd_cli.launch import LocalServer, launched
from genssd_cli.results import Replay, check_resume, failure_rows, summarize, trajectory_rows
from genssd_cli.store import CONFIG, FAILURES, SUMMARY, TRAJECTORIES, RunStore, read_events
from genssd_cli.student import ScoringQueue, StudentScorer
from genssd_cli.teacher import TeacherClient
from genssd_cli.ui import RunStats, progress_display


def default_run_dir(config_path: Path | None) -> Path:
    return Path("runs") / (config_path.stem if config_path else "demo")


def run_command(
    config_path: Path | None,
    out: Path | None,
    limit: int | None,
    overrides: list[str],
    force: bool,
    console: Console,
) -> dict:
    cfg = load_run_config(config_path, overrides)
    problems = load_problems(cfg.data, limit)
    teacher_template = load_prompt(cfg.prompts.teacher)
    student_template = load_prompt(cfg.prompts.student)
    settings = results_settings(cfg, {"teacher": teacher_template, "student": student_template})
    config_hash = settings_hash(settings)
    run_dir = out or default_run_dir(config_path)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} exists and is not a directory")
    check_resume(read_events(run_dir), settings, force)

    with RunStore(run_dir) as store, ExitStack() as stack:
        events = read_events(run_dir)  # again, now that we hold the lock
        check_resume(events, settings, force)
        server = None
        if cfg.teacher.launch is not None:
            server = LocalServer(cfg.teacher.launch, cfg.teacher.model, run_dir / "teacher-server.log")
            stack.enter_context(launched(server))  # boots while the student loads
        console.print(f"loading student {cfg.student.model} …")
        scorer = StudentScorer.load(cfg.student, student_template)
        if server is not None:
            console.print(f"starting teacher server for {cfg.teacher.launch.gguf} …")
            server.wait_ready()
        base_url = server.base_url if server else cfg.teacher.base_url
        teacher = TeacherClient(cfg.teacher, base_url)

        def begin() -> Engine:
            """Called once the teacher answered: only now does the run directory change."""
            store.open_log()
            store.append({
                "type": "run_start", "config_hash": config_hash, "settings": settings,
                "forced": force, "limit": limit, "problems": len(problems),
                "genssd": __version__, "time": time.time(),
                "teacher_server": {"pid": server.process.pid, "port": server.port} if server else None,
            })  # fmt: skip
            store.write_text(CONFIG, dump_config_yaml(cfg, config_hash))
            scoring = ScoringQueue(scorer)
            return Engine(cfg, teacher, scoring, store, stats, teacher_template, Replay(events))

        stats = RunStats(problems_total=len(problems))
        started = time.monotonic()
        interrupted = True
        try:
            try:
                anyio.run(_session, teacher, begin, problems, stats, console, cfg)
            except BaseExceptionGroup as group_error:
                raise unwrap_group(group_error) from None
            interrupted = False
        finally:
            if store.log_open:
                store.append({
                    "type": "session_end", "wall_s": round(time.monotonic() - started, 3),
                    "interrupted": interrupted, "retries": dict(teacher.retries),
                })  # fmt: skip
                summary = _materialise(store, problems, cfg)
    return summary


async def _session(teacher: TeacherClient, begin, problems, stats: RunStats, console: Console, cfg: RunConfig) -> None:
    try:
        await teacher.check()
        engine = begin()
        async with progress_display(stats, console, cfg.engine.progress_interval_s):
            await engine.run(problems)
    finally:
        await teacher.aclose()


def _materialise(store: RunStore, problems: list[Problem], cfg: RunConfig) -> dict:
    events = read_events(store.dir)
    store.write_jsonl(TRAJECTORIES, trajectory_rows(events, problems))
    store.write_jsonl(FAILURES, failure_rows(events))
    summary = summarize(events, problems, cfg.search.samples)
    store.write_json(SUMMARY, summary)
    return summary
