"""`genssd run`: wire config → problems → teacher endpoint → student → engine → run directory.

Every check that can fail on user input runs before the run directory is touched, so a bad
config or dataset never damages an earlier run's files.

Signals: the first Ctrl-C or SIGTERM stops sending, lets requests in flight finish and be
recorded, writes the summary and exits 130; a second one exits at once. Either way every line
of events.jsonl is whole (only the event-loop thread writes it), so the run resumes.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, closing, contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import anyio
from rich.console import Console

from genssd_cli import __version__
from genssd_cli.config import RunConfig, TeacherConfig, load_run_config
from genssd_cli.errors import BudgetReached, Interrupted, UsageError, unwrap_group
from genssd_cli.files import SortedSpool, WriteFailed
from genssd_cli.problems import Problem, load_problems, load_prompt, teacher_template, teacher_token_counter
from genssd_cli.run.control import RunControl
from genssd_cli.run.counters import RunStats
from genssd_cli.run.engine import Engine
from genssd_cli.run.progress import progress_display
from genssd_cli.rundir.records import EndpointUse, RunStart, SessionEnd, Summary, TeacherServer, TrajectoryError
from genssd_cli.rundir.replay import RunLog
from genssd_cli.rundir.results_hash import dump_config_yaml, results_settings, settings_hash
from genssd_cli.rundir.store import CONFIG, EVENTS, FAILURES, SUMMARY, TRAJECTORIES, RunStore, scan_events
from genssd_cli.shards.plan import (
    Shard,
    SharedSpend,
    all_completed,
    check_plan,
    clear_completed,
    mark_completed,
    merge_lock,
    record_spent,
    refuse_sharded,
    select,
    shard_dir,
    share_limits,
    write_plan,
)
from genssd_cli.student.scorer import StudentScorer
from genssd_cli.student.scoring_queue import ScoringQueue
from genssd_cli.teacher.pool import TeacherClient, check_api_keys
from genssd_cli.teacher.probes import preflight
from genssd_cli.teacher.response_cache import ResponseCache
from genssd_cli.teacher.servers.llama_cpp import LocalServer, launched, stop_leftover_server


def default_run_dir(config_path: Path | None) -> Path:
    return Path("runs") / (config_path.stem if config_path else "demo")


def run_command(
    config_path: Path | None,
    out: Path | None,
    limit: int | None,
    overrides: list[str],
    force: bool,
    console: Console,
    resume_hint: str,
    shard: Shard | None = None,
) -> Summary:
    """One run directory, or with `shard` one shard of a sharded run directory (RUN/shard-K)."""
    cfg = load_run_config(config_path, overrides)
    problems = load_problems(cfg.data, limit)
    teacher_prompt = teacher_template(cfg.prompts, cfg.teacher)
    student_template = load_prompt(cfg.prompts.student)
    check_api_keys(cfg.teacher)  # every named environment variable is set
    settings = results_settings(cfg, {"teacher": teacher_prompt, "student": student_template})
    config_hash = settings_hash(settings)
    run_dir = out or default_run_dir(config_path)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} exists and is not a directory")
    whole = _Whole(run_dir, cfg, problems, config_hash)
    if shard is None:
        refuse_sharded(run_dir)
    else:
        cfg = share_limits(cfg, shard.count)  # the run's endpoint limits, shared out
        check_plan(run_dir, shard.count, config_hash, force)
        problems = select(problems, shard)
        run_dir = shard_dir(run_dir, shard.index)
        if not problems:  # more shards than problems: this one has nothing to do
            return _empty_shard(whole, run_dir, shard, cfg, force, console)
    log = scan_events(run_dir, cfg.teacher)  # one streaming pass: what a resume needs, not the whole log
    log.check_resume(settings, force)

    store = RunStore(run_dir, cfg.engine.fsync, cfg.engine.fsync_interval_ms)
    ended = bool(log.events) and log.all_ended(problems, cfg.search.samples)
    if shard is not None and log.events:
        # Every shard says what it spent, also one with nothing left to ask: the run's budget is all of it.
        record_spent(run_dir, log.spent or 0.0)
        if not ended:  # more problems, or --force: a marker of an earlier session would merge too soon
            clear_completed(run_dir)
    if ended:
        # Nothing to ask: no teacher server, no student, just the files re-made from the log.
        with store:
            console.print("every trajectory has already ended; nothing to do")
            summary = _materialise(store, problems, cfg)
        if shard is not None:
            _shard_completed(whole, run_dir, shard, console)
        return summary
    already = log.spent
    if cfg.max_cost is not None and already >= cfg.max_cost:
        raise BudgetReached(_over_budget(already, cfg.max_cost))
    cache = ResponseCache(Path(cfg.teacher.cache)) if cfg.teacher.cache else None  # a bad file: refused here
    with _sigterm_as_keyboard_interrupt(), closing(cache) if cache else nullcontext(), store, ExitStack() as stack:
        log = scan_events(run_dir, cfg.teacher, previous=log)  # again now that we hold the lock (if it changed)
        log.check_resume(settings, force)
        budget = None
        if shard is not None and cfg.max_cost is not None:  # one budget for all shards
            budget = SharedSpend(whole.dir, shard, log.spent or 0.0)
            already = budget.total()
            if already >= cfg.max_cost:
                raise BudgetReached(_over_budget(already, cfg.max_cost))
        server = None
        if cfg.teacher.launch is not None:
            _stop_leftover(log, console)
            server = LocalServer(cfg.teacher.launch, cfg.teacher.model, run_dir / "teacher-server.log")
            stack.enter_context(launched(server))  # boots while the student loads
        else:  # an endpoint that cannot serve the run is said before the student loads (minutes, for a big one)
            anyio.run(_check_teacher, cfg.teacher)
        console.print(f"loading student {cfg.student.model} …")
        scorer = StudentScorer.load(cfg.student, student_template)
        too_long = _too_long_for_the_student(scorer, problems, cfg)  # refused here: no log opened yet
        to_run = [p for p in problems if p.id not in too_long]
        if server is not None:
            console.print(f"starting teacher server for {cfg.teacher.launch.gguf} …")
            server.wait_ready()
        base_url = server.base_url if server else cfg.teacher.base_url
        teacher = TeacherClient(cfg.teacher, base_url, count_tokens=teacher_token_counter(cfg.prompts), cache=cache)
        stats = RunStats(problems_total=len(to_run), retries=teacher.retries,
                         endpoints=teacher.health if len(teacher.endpoints) > 1 else None)  # fmt: skip

        def begin(control: RunControl) -> Engine:
            """Called once the teacher answered: only now does the run directory change."""
            if shard is not None:
                write_plan(whole.dir, shard.count, config_hash, force)
                clear_completed(run_dir)
            store.open_log()
            store.append(RunStart(
                config_hash=config_hash, settings=settings, forced=force, limit=limit, problems=len(problems),
                genssd=__version__, time=time.time(),
                teacher_server=TeacherServer(pid=server.process.pid, port=server.port) if server else None,
            ))  # fmt: skip
            store.write_text(CONFIG, dump_config_yaml(cfg, config_hash))
            for problem_id, message in too_long.items():  # failures that a resume does not fix
                for sample in range(cfg.search.samples):
                    store.append(TrajectoryError(problem_id=problem_id, sample=sample, step=0, error_class="too_long",
                                                 message=message))  # fmt: skip
            scoring = ScoringQueue(scorer, control.stop)
            return Engine(cfg, teacher, scoring, store, stats, teacher_prompt, log.replay, control)

        def abort() -> None:
            """Second signal: no draining. Every logged line is already whole."""
            print(f"\nstopped at once; resume with: {resume_hint}", file=sys.stderr, flush=True)
            if server is not None:
                server.kill()
            os._exit(130)

        started = time.monotonic()
        end = "failed"
        refused = False
        loop = {"cpu_s": 0.0}
        try:
            try:
                control = anyio.run(_session, teacher, begin, store, to_run, stats, console, cfg, abort, loop,
                                    already, budget.add if budget else None)  # fmt: skip
            except BaseExceptionGroup as group_error:
                raise unwrap_group(group_error) from None
            finally:
                signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # the loop reset it
            end = "stopped" if control.stopping else "completed"
        except KeyboardInterrupt:
            end = "stopped"
            raise
        except WriteFailed:
            refused = True  # the first refused write is the one to report, not a later one's
            raise
        finally:
            if store.log_open and not store.write_failed and not refused:
                store.append(SessionEnd(
                    wall_s=round(time.monotonic() - started, 3), end=end, retries=dict(teacher.retries),
                    # How well the engine kept the teacher busy, and what its own loop cost.
                    teacher_busy_s=round(teacher.busy_s, 3), max_concurrency=teacher.max_concurrency,
                    endpoints={name: EndpointUse(**use) for name, use in teacher.endpoint_stats().items()},
                    engine_wall_s=round(loop.get("wall_s", 0.0), 3), loop_cpu_s=round(loop["cpu_s"], 3),
                    candidates=stats.candidates, student_cache_peak_mb=scorer.peak_cache_mb,
                ))  # fmt: skip
                summary = _materialise(store, problems, cfg)
    if teacher.cache_failure:
        console.print(f"warning: {teacher.cache_failure} (the response cache stopped there; the run did not)")
    if shard is not None and end == "completed":
        _shard_completed(whole, run_dir, shard, console)
    if end == "stopped":
        if control.reason == "budget":
            raise BudgetReached(_over_budget(control.spent, cfg.max_cost))
        raise Interrupted("stopped")
    return summary


def _too_long_for_the_student(scorer: StudentScorer, problems: list[Problem], cfg: RunConfig) -> dict[str, str]:
    """Problems whose student prompt plus search.max_new_tokens is longer than the student holds
    (id -> why): the run is refused in one line naming the first, or, with data.too_long: skip,
    they are left out and listed in failures.jsonl. The scorer never gets a sequence it cannot hold."""
    limit = scorer.context_length
    if limit is None:
        return {}
    found = {}
    for problem in problems:
        size = scorer.prompt_tokens(problem.question)
        if size + cfg.search.max_new_tokens > limit:
            found[problem.id] = (f"problem {problem.id!r} needs {size + cfg.search.max_new_tokens} student tokens "
                                 f"({size} of prompt + search.max_new_tokens {cfg.search.max_new_tokens}); the student "
                                 f"{cfg.student.model} holds {limit}")  # fmt: skip
    if found and cfg.data.too_long == "refuse":
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UsageError(f"{next(iter(found.values()))}{more}: shorten it, lower search.max_new_tokens, or set "
                         "data.too_long: skip to leave such problems out")  # fmt: skip
    return found


def _stop_leftover(log: RunLog, console: Console) -> None:
    """An earlier session of this directory that died without stopping its teacher server (a
    genssd older than the kernel's parent-death signal, or another OS) left it running."""
    start = log.last_start
    if start is not None and start.teacher_server is not None:
        leftover = start.teacher_server
        if stop_leftover_server(leftover.pid, leftover.port):
            console.print(f"stopped the teacher server an earlier session left running (pid {leftover.pid})")


def _over_budget(cost: float, limit: float) -> str:
    return (f"the teacher cost reached max_cost ({cost:.4f} of {limit:g}); the run stopped cleanly: "
            "raise max_cost (--set max_cost=N) and run the same command to resume")  # fmt: skip


async def _check_teacher(cfg: TeacherConfig) -> None:
    """The endpoints' model lists (no tokens): a refused key, a model not served, no endpoint
    reachable are one line now; the session checks again and warns of what it sidelines."""
    teacher = TeacherClient(cfg)
    try:
        await teacher.check()
    finally:
        await teacher.aclose()


async def _session(
    teacher: TeacherClient,
    begin: Callable[[RunControl], Engine],
    store: RunStore,
    problems: list[Problem],
    stats: RunStats,
    console: Console,
    cfg: RunConfig,
    abort: Callable[[], None],
    loop: dict[str, float],
    already_spent: float | None,
    share: Callable[[float], float] | None,
) -> RunControl:
    """The whole asynchronous part of a run; returns its control (stopped or not, and why).
    `loop` gets the engine's wall time and the CPU time of the event-loop thread (scoring runs
    elsewhere)."""
    control = RunControl(anyio.Event(), spent=already_spent, max_cost=cfg.max_cost, share=share)
    teacher.stop = control.stop
    try:
        async with anyio.create_task_group() as helpers:
            helpers.start_soon(_watch_signals, control, console, abort)
            for warning in await teacher.check():
                console.print(f"warning: {warning}")
            if cfg.teacher.preflight and cfg.teacher.mode == "chat-continue":
                await preflight(teacher)
            engine = begin(control)
            helpers.start_soon(store.sync_every_interval)
            cpu, wall = time.thread_time(), time.monotonic()
            teacher.busy_s = 0.0
            try:
                async with progress_display(stats, control, console, cfg.engine.progress_interval_s):
                    await engine.run(problems)
            finally:
                loop["cpu_s"], loop["wall_s"] = time.thread_time() - cpu, time.monotonic() - wall
            helpers.cancel_scope.cancel()
    finally:
        await teacher.aclose()
    return control


async def _watch_signals(control: RunControl, console: Console, abort: Callable[[], None]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if control.stopping:
                abort()
            control.request_stop("signal")
            console.print("stopping: finishing the requests in flight (Ctrl-C again to stop at once) …")


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_as_keyboard_interrupt():
    """Outside the event loop, SIGTERM unwinds like Ctrl-C, so the teacher server is stopped."""
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _materialise(store: RunStore, problems: list[Problem], cfg: RunConfig) -> Summary:
    with scan_events(store.dir, cfg.teacher, rows=True) as log:  # one streaming pass; rows spooled, not held
        store.write_lines(TRAJECTORIES, log.trajectory_lines(problems))
        store.write_jsonl(FAILURES, log.failure_rows())
        summary = log.summary(problems, cfg.search.samples)
    store.write_json(SUMMARY, summary)
    return summary


class _Whole(NamedTuple):
    """The run a shard belongs to: its directory, its config (the whole limits) and every problem."""

    dir: Path
    cfg: RunConfig
    problems: list[Problem]
    config_hash: str


def _empty_shard(whole: _Whole, run_dir: Path, shard: Shard, cfg: RunConfig, force: bool, console: Console) -> Summary:
    with RunStore(run_dir) as store:
        write_plan(whole.dir, shard.count, whole.config_hash, force)
        console.print(f"shard {shard.index}/{shard.count} has no problems; nothing to do")
        summary = _materialise(store, [], cfg)
    _shard_completed(whole, run_dir, shard, console)
    return summary


def _shard_completed(whole: _Whole, run_dir: Path, shard: Shard, console: Console) -> None:
    """Mark the shard done; the shard that completes last materialises the run's files from all."""
    mark_completed(run_dir)
    with merge_lock(whole.dir):
        if not all_completed(whole.dir, shard.count):
            return
        files = RunStore(whole.dir)  # writes only: the run directory's lock is the executor's
        # Every shard's log in one streaming pass, as one log: the files an unsharded run writes.
        with RunLog(whole.cfg.teacher, SortedSpool(whole.dir / TRAJECTORIES)) as log:
            for k in range(shard.count):
                log.read(shard_dir(whole.dir, k) / EVENTS)
            files.write_lines(TRAJECTORIES, log.trajectory_lines(whole.problems))
            files.write_jsonl(FAILURES, log.failure_rows())
            summary = log.summary(whole.problems, whole.cfg.search.samples)
            files.write_json(SUMMARY, summary.model_copy(update={"shards": shard.count}))
        files.write_text(CONFIG, dump_config_yaml(whole.cfg, whole.config_hash))
    console.print(f"every shard has completed: {whole.dir}/{TRAJECTORIES} holds them all")
