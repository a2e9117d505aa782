"""What an export reads: each run directory's kept rows, and what its card says about it (its
sessions' `run_start` events, its summary, its settings made public), then the dataset's rows."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

from pydantic import ValidationError

from genssd_cli.config import load_run_config
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.rundir.layout import CONFIG, EVENTS, open_finished
from genssd_cli.rundir.records import RunStart, Summary, TrajectoryRow
from genssd_cli.rundir.results_hash import results_settings
from genssd_cli.shards.plan import log_paths

METADATA = ("problem_id", "sample", "rank", "method", "reference", "answer", "correct", "finish", "steps",
            "student_ppl", "teacher_tokens", "completion_tokens", "run")  # fmt: skip
COLUMNS = ("prompt", "completion", "messages", *METADATA)
# Settings never written to a card: where the teacher lives and how it is reached.
PRIVATE_KEYS = {"base_url", "endpoints", "api_key", "api_key_env"}
KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{16,}|[A-Za-z0-9_-]*(key|token|secret)=\S+)", re.I)


@dataclass
class Run:
    """What one run directory contributes: its rows and what the card says about it."""

    name: str  # its folder name (more of its path only when two runs share one): the `run` column
    rows: list[TrajectoryRow]
    summary: Summary | None = None
    starts: list[RunStart] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # flat dotted keys, made public
    notes: list[str] = field(default_factory=list)

    @property
    def config_hash(self) -> str | None:
        if self.summary and self.summary.config_hash:
            return self.summary.config_hash
        return self.starts[-1].config_hash if self.starts else None


def read_runs(run_dirs: list[Path]) -> list[Run]:
    resolved = [d.resolve() for d in run_dirs]
    if len(set(resolved)) < len(resolved):
        raise UsageError("a run directory is given twice")
    names = run_names(resolved)
    return [read_run(d, name) for d, name in zip(run_dirs, names, strict=True)]


def run_names(dirs: list[Path]) -> list[str]:
    """Each run's folder name; where two share one (a pipeline's METHOD/run), as many of the
    parent folders as tell them apart."""
    depth = 1
    while True:
        names = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names) or depth >= max(len(d.parts) for d in dirs):
            return names
        depth += 1


def read_run(run_dir: Path, name: str) -> Run:
    try:
        finished = open_finished(run_dir)
        rows, summary = finished.rows, finished.summary()
    except RuntimeFailure as exc:  # the user's files to fix, as for `genssd train`
        raise UsageError(str(exc)) from None
    run = Run(name, rows, summary, [s for log in log_paths(run_dir) for s in run_starts(log)])  # sharded: all
    if run.starts:
        run.settings = run.starts[-1].settings  # the latest session's: what the config hash covers
    elif (run_dir / CONFIG).is_file():
        try:
            run.settings = results_settings(load_run_config(run_dir / CONFIG), {})
        except UsageError:  # written by another genssd version: the rows still stand
            run.notes.append(f"{name}: its {CONFIG} is not readable by this genssd; settings not shown")
    else:
        run.notes.append(f"{name}: no {CONFIG} or {EVENTS}; settings not shown")
    run.settings = {k: public(v) for k, v in run.settings.items() if not PRIVATE_KEYS & set(k.split("."))}
    return run


def run_starts(path: Path) -> list[RunStart]:
    """The `run_start` events of events.jsonl (one per session). Only those lines are parsed: a
    long run's log holds millions of other records. One not readable (torn, another format) is
    left out: provenance, not rows, depends on it."""
    starts = []
    try:
        with open(path, "rb") as log:
            for line in log:
                if b'"run_start"' not in line:
                    continue
                try:
                    starts.append(RunStart.model_validate_json(line))
                except ValidationError:
                    continue
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    return starts


def public(value: Any) -> Any:
    """A setting as the card may show it: a path only by its last part, no URL, nothing key-like."""
    if isinstance(value, list):
        return [public(v) for v in value]
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items() if k not in PRIVATE_KEYS}
    if not isinstance(value, str):
        return value
    if "://" in value:
        return "(a URL, not recorded)"
    if KEY_LIKE.search(value):
        return "(redacted)"
    if value.startswith(("/", "~", "\\")) or re.match(r"[A-Za-z]:[\\/]", value):
        return PureWindowsPath(value).name or value  # Windows parsing splits on both kinds of slash
    return value


def correct(row: TrajectoryRow) -> bool:
    """As `genssd train` reads it: rows an older genssd marked correct must also have ended and
    stated their answer."""
    return row.correct and row.finish == "stop" and row.answer is not None


def dataset_rows(runs: list[Run], only_correct: bool) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        for row in run.rows:
            if only_correct and not correct(row):
                continue
            prompt = [m.model_dump() for m in row.prompt]
            completion = [m.model_dump() for m in row.completion]
            rows.append({"prompt": prompt, "completion": completion, "messages": prompt + completion,
                         **{k: getattr(row, k) for k in METADATA if k != "run"},
                         "correct": correct(row), "run": run.name})  # fmt: skip
    return rows
