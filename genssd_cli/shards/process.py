"""A shard's process, whoever runs it (genssd_cli/shards/local.py here, genssd_cli/shards/ray_executor.py on
Ray): the command it runs, whether it may be started again after it ended, and passing a stop on."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from genssd_cli.redact import shown
from genssd_cli.run.options import RunOptions

POLL_S = 0.5
# A shard's exit status that a relaunch cannot change: done, a user's mistake, a runtime failure
# (the teacher unreachable, the budget spent: it would fail again), a stop.
FINAL_CODES = {0: "completed", 1: "failed", 2: "refused", 130: "stopped"}


@dataclass
class ShardCommand:
    index: int
    argv: list[str]
    log: Path
    restarts: int = 0
    code: int | None = None
    error: str = ""  # its last `error:` line, if it ended on one
    env: dict[str, str] = field(default_factory=dict)


def shard_commands(options: RunOptions, count: int) -> list[ShardCommand]:
    """What each shard runs: this command for one shard; its output goes to RUN/shard-K.log."""
    run_dir = options.run_dir
    common = [*([str(options.config)] if options.config else []), "--out", str(run_dir),
              *(["--limit", str(options.limit)] if options.limit else []),
              *[a for o in options.overrides for a in ("--set", o)],
              *(["--force"] if options.force else [])]  # fmt: skip
    argv = [sys.executable, "-m", "genssd_cli", "run", *common]
    return [ShardCommand(k, [*argv, "--shard", f"{k}/{count}"], run_dir / f"shard-{k}.log") for k in range(count)]


def relaunch(command: ShardCommand, code: int, max_restarts: int, console: Console, stopping: bool) -> bool:
    """Record how a shard process ended; True when it died and may be started again (never once a
    stop was passed on: a shard still starting up dies of the SIGTERM it could not catch yet)."""
    if stopping and code not in FINAL_CODES:
        code = 130
    if code in FINAL_CODES:
        command.code = code
        command.error = _last_error(command.log) if code in (1, 2) else ""
        console.print(f"shard {command.index}: {FINAL_CODES[code]}" + (f" ({command.error})" if command.error else ""),
                      markup=False)  # fmt: skip
        return False
    why = f"signal {-code}" if code < 0 else f"exit {code}"
    if command.restarts >= max_restarts:
        command.code = code
        console.print(f"shard {command.index}: died ({why}), {max_restarts} restarts used", markup=False)
        return False
    command.restarts += 1
    console.print(f"shard {command.index}: died ({why}); started again ({command.restarts} of {max_restarts})",
                  markup=False)  # fmt: skip
    return True


def _last_error(log: Path) -> str:
    if not log.is_file():
        return ""
    last = b""
    with open(log, "rb") as lines:  # line by line: a shard's log grows with its run
        for line in lines:
            if line.startswith(b"error: "):
                last = line
    text = last.decode("utf-8", errors="replace").rstrip("\r\n").removeprefix("error: ")
    return shown(text) if last else ""  # a log line: shown as any error is
