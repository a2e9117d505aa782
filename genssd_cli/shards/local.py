"""`genssd run --shards N`: start every shard as a `genssd run --shard K/N` process and watch
them; a shard that dies (a signal, the OOM killer, a lost node) is started again and resumes from
its own log. Where the shards run is the executor's choice: here (`local`, one process per shard,
one GPU each when there are GPUs) or on a Ray cluster (`ray`, genssd_cli/shards/ray_executor.py).

The shard processes write everything; this process only launches, relays a stop, and says how
each shard ended. The shard that completes last materialises the run's files from all shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from genssd_cli.config import load_run_config
from genssd_cli.errors import GenssdError, Interrupted, RuntimeFailure, UsageError
from genssd_cli.files import check_out_dir
from genssd_cli.problems import load_problems
from genssd_cli.procs import die_with_parent, relay_stop
from genssd_cli.run.options import RunOptions
from genssd_cli.rundir.layout import SUMMARY, read_summary
from genssd_cli.rundir.records import Summary
from genssd_cli.shards.plan import PLAN, check_layout, share_limits
from genssd_cli.shards.process import FINAL_CODES, POLL_S, ShardCommand, relaunch, shard_commands

EXECUTOR_LOCK = ".lock"


@dataclass(frozen=True)
class ShardedOptions:
    """`--shards N` and where they run."""

    count: int
    executor: str = "local"  # local or ray
    ray_address: str | None = None
    gpus_per_shard: float | None = None  # Ray: default 1 where the cluster has GPUs
    restarts: int = 3  # times a dead shard is started again


def check_start(options: RunOptions, count: int) -> None:
    """The user's mistakes that every shard would make, refused here once before any starts."""
    cfg = load_run_config(options.config, options.overrides)
    load_problems(cfg.data, options.limit)
    share_limits(cfg, count)
    run_dir = options.run_dir
    check_out_dir(run_dir)
    check_layout(run_dir, count)


@contextlib.contextmanager
def executor_lock(run_dir: Path, commands: list[ShardCommand]):
    """One executor per sharded run directory (the shards lock their own sub-directories). A start
    that no shard got to (refused, stopped) takes back the directory it made; one that failed keeps
    the shards' logs, which say why."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / EXECUTOR_LOCK, "a+")  # noqa: SIM115 - held until the shards end
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeFailure(f"run directory {run_dir} is in use by another genssd run") from None
    try:
        yield
    finally:
        lock.close()
        failed = any(c.code not in (None, *FINAL_CODES) or c.code == 1 for c in commands)
        if created and not (run_dir / PLAN).exists() and not failed:  # no shard's teacher answered: nothing to keep
            for leftover in [run_dir / EXECUTOR_LOCK, *run_dir.glob("shard-*.log"), *run_dir.glob("shard-*")]:
                with contextlib.suppress(OSError):
                    leftover.rmdir() if leftover.is_dir() else leftover.unlink()
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def visible_gpus() -> list[str]:
    """The GPUs this process may use, one per local shard; none on a CPU machine."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_local(commands: list[ShardCommand], max_restarts: int, console: Console) -> None:
    """Every shard as a child process here, each pinned to one GPU when there are GPUs; a shard that
    dies is started again (at most `max_restarts` times each). Returns once all have ended."""
    gpus = visible_gpus()
    for command in commands:
        if gpus:
            command.env["CUDA_VISIBLE_DEVICES"] = gpus[command.index % len(gpus)]
    running: dict[int, subprocess.Popen] = {}
    stopping = False

    def start(command: ShardCommand) -> None:
        with open(command.log, "ab") as log:  # the child holds its own descriptor
            running[command.index] = subprocess.Popen(
                die_with_parent(command.argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **command.env}, start_new_session=True,  # stops come from here, once
            )  # fmt: skip

    def stop_all(signum: int) -> None:
        nonlocal stopping
        stopping = True
        for process in running.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    with relay_stop(stop_all):
        for command in commands:
            start(command)
        while running:
            time.sleep(POLL_S)
            for command in commands:
                process = running.get(command.index)
                if process is None or process.poll() is None:
                    continue
                del running[command.index]
                if relaunch(command, process.returncode, max_restarts, console, stopping):
                    start(command)
                elif command.code == 2:
                    stop_all(signal.SIGTERM)  # a refusal every shard will meet: stop the others too


def outcome(commands: list[ShardCommand], run_dir: Path, resume_hint: str) -> Summary:
    """The merged summary when every shard completed; else one line saying what to do."""
    codes = {c.code for c in commands}
    if codes == {0}:
        return read_summary(run_dir / SUMMARY)
    if 2 in codes:
        refused = next(c for c in commands if c.code == 2)
        raise UsageError(refused.error or f"shard {refused.index} refused to start (see {refused.log})")
    if codes <= {0, 130}:
        raise Interrupted("stopped")
    ended = ", ".join(f"shard {c.index} {FINAL_CODES.get(c.code, 'died')}" for c in commands if c.code != 0)
    raise RuntimeFailure(f"{ended} (see {run_dir}/shard-K.log); run the same command to resume: {resume_hint}")


def run_sharded(options: RunOptions, sharded: ShardedOptions, console: Console, resume_hint: str) -> Summary:
    run_dir, count, executor = options.run_dir, sharded.count, sharded.executor
    check_start(options, count)
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError("--executor ray needs Ray: pip install 'genssd[ray]' (on every node of the cluster)")
    commands = shard_commands(options, count)
    with executor_lock(run_dir, commands):
        console.print(f"{count} shards, executor {executor}; each shard's output: {run_dir}/shard-K.log")
        try:
            if executor == "ray":
                from genssd_cli.shards.ray_executor import run_on_ray

                run_on_ray(commands, sharded.ray_address, sharded.gpus_per_shard, sharded.restarts, console)
            else:
                run_local(commands, sharded.restarts, console)
        except GenssdError:
            raise
        except KeyboardInterrupt:
            raise Interrupted("stopped") from None
        return outcome(commands, run_dir, resume_hint)
