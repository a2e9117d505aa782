"""The run directory's door: the names of its files, and a finished run opened for the commands
that read one (train, export, report) with the checks and hints they share.

    RUN_DIR/events.jsonl        the append-only log, the source of truth (rundir/log.py reads it)
    RUN_DIR/trajectories.jsonl  the kept rows, materialised from the log
    RUN_DIR/failures.jsonl      trajectories that failed, materialised from the log
    RUN_DIR/summary.json        the run's totals, materialised from the log
    RUN_DIR/config.yaml         the resolved config the run was started with
    RUN_DIR/.lock               held by the one `genssd run` writing the directory
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.files import first_error, read_rows
from genssd_cli.rundir.records import Summary, TrajectoryRow

EVENTS = "events.jsonl"
TRAJECTORIES = "trajectories.jsonl"
FAILURES = "failures.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
LOCK = ".lock"

REWRITE_HINT = "run `genssd run` on it again to rewrite it"


@dataclass(frozen=True)
class FinishedRun:
    """A run directory at least one session of which ended, and its kept rows."""

    dir: Path
    rows: list[TrajectoryRow]

    def summary(self) -> Summary | None:
        """summary.json, or None where there is none."""
        path = self.dir / SUMMARY
        return read_summary(path) if path.is_file() else None


def open_finished(run_dir: Path, needs: tuple[str, ...] = ()) -> FinishedRun:
    """The run directory's kept rows, after the checks every reader makes: the directory is there,
    trajectories.jsonl and the files in `needs` too. Unreadable rows are a RuntimeFailure naming
    the file and line, with the hint to rewrite them."""
    if not run_dir.is_dir():
        raise UsageError(f"run directory not found: {run_dir}")
    for name in (TRAJECTORIES, *needs):
        if not (run_dir / name).is_file():
            raise UsageError(f"{run_dir} has no {name}: not a genssd run directory, or no session ended")
    return FinishedRun(run_dir, read_rows(run_dir / TRAJECTORIES, TrajectoryRow, REWRITE_HINT))


def read_summary(path: Path) -> Summary:
    try:
        return Summary.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        reason = first_error(exc) if isinstance(exc, ValidationError) else exc.strerror
        raise RuntimeFailure(f"{path}: unreadable summary ({reason}); run `genssd run` on it again") from None
