"""One session of one run directory: config → problems → teacher endpoint → student → engine →
the log, and the files materialised from it at the end.

Every check that can fail on user input runs before the run directory is touched (`prepare`), so a
bad config or dataset never damages an earlier run's files.

Signals: the first Ctrl-C, SIGTERM or SIGHUP stops sending, lets requests in flight finish and be
recorded, writes the summary and exits 130; a second one exits at once. Either way every line
of events.jsonl is whole (only the event-loop thread writes it), so the run resumes.

A shard of a sharded run is a session of its own directory; what it adds (the plan, the shared
budget, the completion marker, the merge) comes in through `SessionHooks` (genssd_cli/shards/one.py).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.markup import escape

from genssd_cli import __version__
from genssd_cli.config import RunConfig, TeacherConfig, load_run_config
from genssd_cli.errors import BudgetReached, Interrupted, UsageError, unwrap_group
from genssd_cli.files import WriteFailed, check_out_dir
from genssd_cli.problems import Problem, load_problems, load_prompt, teacher_template, teacher_token_counter
from genssd_cli.procs import STOP_SIGNALS, reinstall_sigterm_as_keyboard_interrupt, sigterm_as_keyboard_interrupt
from genssd_cli.run.control import RunControl
from genssd_cli.run.counters import RunStats
from genssd_cli.run.engine import Collaborators, Engine
from genssd_cli.run.materialise import materialise
from genssd_cli.run.options import RunOptions
from genssd_cli.run.progress import progress_display
from genssd_cli.rundir.layout import CONFIG
from genssd_cli.rundir.records import EndpointUse, RunStart, SessionEnd, Summary, TeacherServer, TrajectoryError
from genssd_cli.rundir.replay import Replay, RunLog, scan_events
from genssd_cli.rundir.results_hash import dump_config_yaml, results_settings, settings_hash
from genssd_cli.rundir.store import RunStore
from genssd_cli.student.scorer import StudentScorer
from genssd_cli.student.scoring_queue import ScoringQueue
from genssd_cli.teacher.pool import TeacherClient, check_api_keys
from genssd_cli.teacher.probes import preflight, usage_preflight
from genssd_cli.teacher.response_cache import ResponseCache
from genssd_cli.teacher.servers.llama_cpp import LocalServer, launched, stop_leftover_server


@dataclass(frozen=True)
class Prepared:
    """A run checked against the user's input, its directory not yet touched."""

    options: RunOptions
    cfg: RunConfig
    problems: list[Problem]
    settings: dict[str, Any]  # what decides the results (results_hash.results_settings)
    config_hash: str
    teacher_prompt: str
    student_template: str
    dir: Path


def prepare(options: RunOptions) -> Prepared:
    cfg = load_run_config(options.config, options.overrides)
    problems = load_problems(cfg.data, options.limit)
    teacher_prompt = teacher_template(cfg.prompts, cfg.teacher)
    student_template = load_prompt(cfg.prompts.student)
    check_api_keys(cfg.teacher)  # every named environment variable is set
    settings = results_settings(cfg, {"teacher": teacher_prompt, "student": student_template})
    run_dir = options.run_dir
    check_out_dir(run_dir)
    return Prepared(options, cfg, problems, settings, settings_hash(settings), teacher_prompt, student_template,
                    run_dir)  # fmt: skip


class SessionHooks:
    """What a shard of a sharded run adds to a session of its directory (genssd_cli/shards/one.py);
    a whole run adds nothing."""

    def resumed(self, spent: float, ended: bool) -> None:
        """The directory's log was read before the session: its cost so far, and whether every
        trajectory has ended."""

    def shared_budget(self, spent: float) -> tuple[float, Callable[[float], float]] | None:
        """Where max_cost is shared with other directories: the whole run's cost so far (this
        directory's is `spent`), and what adds a cost to it and returns the new total."""
        return None

    def started(self) -> None:
        """The teacher answered: the directory is about to change (its log is opened next)."""

    def completed(self) -> None:
        """Every trajectory of the directory has ended, its files are materialised."""


def run_session(run: Prepared, console: Console, resume_hint: str, hooks: SessionHooks | None = None) -> Summary:
    """One session of `run.dir`: the teacher and the student until every trajectory ended or a stop;
    when every trajectory had already ended, only the files re-made from the log."""
    hooks = hooks or SessionHooks()
    cfg = run.cfg
    log = scan_events(run.dir, cfg.teacher)  # one streaming pass: what a resume needs, not the whole log
    log.check_resume(run.settings, run.options.force)
    store = RunStore(run.dir, cfg.engine.fsync, cfg.engine.fsync_interval_ms)
    ended = bool(log.events) and log.all_ended(run.problems, cfg.search.samples)
    if log.events:
        hooks.resumed(log.spent or 0.0, ended)
    if ended:
        # Nothing to ask: no teacher server, no student, just the files re-made from the log.
        with store:
            console.print("every trajectory has already ended; nothing to do")
            summary = materialise(store, run.problems, cfg)
        hooks.completed()
        return summary
    if cfg.max_cost is not None and log.spent >= cfg.max_cost:
        raise BudgetReached(_over_budget(log.spent, cfg.max_cost))
    return _Session(run, store, console, resume_hint, hooks).run(log)


class _Session:
    """A session that asks the teacher: the student loaded, a teacher server launched (if the config
    says so), the engine driven in an event loop, the session's end recorded whatever happens."""

    teacher: TeacherClient
    scorer: StudentScorer
    stats: RunStats
    too_long: dict[str, str]  # problem id -> why the student cannot hold it
    replay: Replay

    def __init__(self, run: Prepared, store: RunStore, console: Console, resume_hint: str, hooks: SessionHooks):
        self.prepared, self.cfg, self.store, self.console, self.resume_hint, self.hooks = (
            run, run.cfg, store, console, resume_hint, hooks)  # fmt: skip
        self.server: LocalServer | None = None
        self.loop = {"cpu_s": 0.0}  # the engine's wall time and the event-loop thread's CPU time

    def run(self, first: RunLog) -> Summary:
        cfg, run = self.cfg, self.prepared
        cache = ResponseCache(Path(cfg.teacher.cache)) if cfg.teacher.cache else None  # a bad file: refused here
        with (
            sigterm_as_keyboard_interrupt(),
            closing(cache) if cache else nullcontext(),
            self.store,
            ExitStack() as stack,
        ):
            log = scan_events(run.dir, cfg.teacher, previous=first)  # again now that we hold the lock (if it changed)
            log.check_resume(run.settings, run.options.force)
            already, share = first.spent, None
            shared = self.hooks.shared_budget(log.spent or 0.0) if cfg.max_cost is not None else None
            if shared is not None:  # one budget for several directories
                already, share = shared
                if already >= cfg.max_cost:
                    raise BudgetReached(_over_budget(already, cfg.max_cost))
            self.replay = log.replay
            to_run = self._start(log, cache, stack)
            control, summary = self._drive(to_run, already, share)
        if self.teacher.cache_failure:
            self.console.print(f"warning: {self.teacher.cache_failure} (the response cache stopped there; "
                               "the run did not)")  # fmt: skip
        if not control.stopping:
            self.hooks.completed()
            return summary
        if control.reason == "budget":
            raise BudgetReached(_over_budget(control.spent, cfg.max_cost))
        raise Interrupted("stopped")

    def _start(self, log: RunLog, cache: ResponseCache | None, stack: ExitStack) -> list[Problem]:
        """The teacher server (if launched) and the student; the problems the student can hold."""
        cfg, console, run = self.cfg, self.console, self.prepared
        if cfg.teacher.launch is not None:
            _stop_leftover(log, console)
            self.server = LocalServer(cfg.teacher.launch, cfg.teacher.model, run.dir / "teacher-server.log")
            stack.enter_context(launched(self.server))  # boots while the student loads
        else:  # an endpoint that cannot serve the run is said before the student loads (minutes, for a big one)
            anyio.run(_check_teacher, cfg.teacher)
        console.print(f"loading student {cfg.student.model} …")
        self.scorer = StudentScorer.load(cfg.student, run.student_template)
        self.too_long = _too_long_for_the_student(self.scorer, run.problems, cfg)  # refused here: no log yet
        to_run = [p for p in run.problems if p.id not in self.too_long]
        if self.server is not None:
            console.print(f"starting teacher server for {cfg.teacher.launch.gguf} …")
            self.server.wait_ready()
        base_url = self.server.base_url if self.server else cfg.teacher.base_url
        self.teacher = TeacherClient(cfg.teacher, base_url, count_tokens=teacher_token_counter(cfg.prompts),
                                     cache=cache, api_key=self.server.api_key if self.server else None)  # fmt: skip
        self.teacher.warn = lambda line: console.print(f"warning: {escape(line)}")
        self.stats = RunStats(problems_total=len(to_run), retries=self.teacher.retries,
                              endpoints=self.teacher.health if len(self.teacher.endpoints) > 1 else None)  # fmt: skip
        return to_run

    def _drive(self, to_run: list[Problem], already: float | None,
               share: Callable[[float], float] | None) -> tuple[RunControl, Summary]:  # fmt: skip
        """The event loop until the engine ends or stops; then the session's end in the log and
        the files materialised (also when it was interrupted), unless a write was refused."""
        started = time.monotonic()
        end = "failed"
        refused = False
        try:
            try:
                control = anyio.run(self._serve, to_run, already, share)
            except BaseExceptionGroup as group_error:
                raise unwrap_group(group_error) from None
            finally:
                reinstall_sigterm_as_keyboard_interrupt()  # the loop reset it
            end = "stopped" if control.stopping else "completed"
        except KeyboardInterrupt:
            end = "stopped"
            raise
        except WriteFailed:
            refused = True  # the first refused write is the one to report, not a later one's
            raise
        finally:
            if self.store.log_open and not self.store.write_failed and not refused:
                self.store.append(self._session_end(end, started))
                summary = materialise(self.store, self.prepared.problems, self.cfg)
        return control, summary

    def _session_end(self, end: str, started: float) -> SessionEnd:
        teacher = self.teacher
        return SessionEnd(
            wall_s=round(time.monotonic() - started, 3), end=end, retries=dict(teacher.retries),
            # How well the engine kept the teacher busy, and what its own loop cost.
            teacher_busy_s=round(teacher.busy_s, 3), max_concurrency=teacher.max_concurrency,
            endpoints={name: EndpointUse(**use) for name, use in teacher.endpoint_stats().items()},
            engine_wall_s=round(self.loop.get("wall_s", 0.0), 3), loop_cpu_s=round(self.loop["cpu_s"], 3),
            candidates=self.stats.candidates, student_cache_peak_mb=self.scorer.peak_cache_mb,
        )  # fmt: skip

    def _begin(self, control: RunControl) -> Engine:
        """Called once the teacher answered: only now does the run directory change."""
        run, cfg, store = self.prepared, self.cfg, self.store
        self.hooks.started()
        store.open_log()
        server = self.server
        store.append(RunStart(
            config_hash=run.config_hash, settings=run.settings, forced=run.options.force, limit=run.options.limit,
            problems=len(run.problems), genssd=__version__, time=time.time(),
            teacher_server=TeacherServer(pid=server.process.pid, port=server.port) if server else None,
        ))  # fmt: skip
        store.write_text(CONFIG, dump_config_yaml(cfg, run.config_hash))
        for problem_id, message in self.too_long.items():  # failures that a resume does not fix
            for sample in range(cfg.search.samples):
                store.append(TrajectoryError(problem_id=problem_id, sample=sample, step=0, error_class="too_long",
                                             message=message))  # fmt: skip
        scoring = ScoringQueue(self.scorer, control.stop)
        parts = Collaborators(self.teacher, scoring, store, self.replay, control, self.stats)
        return Engine(cfg, run.teacher_prompt, parts)

    def _abort(self) -> None:
        """Second signal: no draining. Every logged line is already whole."""
        print(f"\nstopped at once; resume with: {self.resume_hint}", file=sys.stderr, flush=True)
        if self.server is not None:
            self.server.kill()
        os._exit(130)

    async def _serve(self, problems: list[Problem], already_spent: float | None,
                     share: Callable[[float], float] | None) -> RunControl:  # fmt: skip
        """The whole asynchronous part of a session; returns its control (stopped or not, and why).
        `self.loop` gets the engine's wall time and the CPU time of the event-loop thread (scoring
        runs elsewhere)."""
        cfg, teacher = self.cfg, self.teacher
        control = RunControl(anyio.Event(), spent=already_spent, max_cost=cfg.max_cost, share=share)
        teacher.stop = control.stop
        try:
            async with anyio.create_task_group() as helpers:
                helpers.start_soon(_watch_signals, control, self.console, self._abort)
                for warning in await teacher.check():
                    self.console.print(f"warning: {warning}", markup=False)
                if cfg.teacher.preflight and cfg.teacher.mode == "chat-continue":
                    await preflight(teacher)
                if cfg.max_cost is not None:  # a bill that cannot be counted is refused before spending
                    await usage_preflight(teacher)
                engine = self._begin(control)
                helpers.start_soon(self.store.sync_every_interval)
                cpu, wall = time.thread_time(), time.monotonic()
                teacher.busy_s = 0.0
                try:
                    async with progress_display(self.stats, control, self.console, cfg.engine.progress_interval_s):
                        await engine.run(problems)
                finally:
                    self.loop["cpu_s"], self.loop["wall_s"] = time.thread_time() - cpu, time.monotonic() - wall
                helpers.cancel_scope.cancel()
        finally:
            await teacher.aclose()
        return control


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


async def _watch_signals(control: RunControl, console: Console, abort: Callable[[], None]) -> None:
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:  # SIGHUP: the terminal closed
        async for _ in signals:
            if control.stopping:
                abort()
            control.request_stop("signal")
            console.print("stopping: finishing the requests in flight (Ctrl-C again to stop at once) …")
