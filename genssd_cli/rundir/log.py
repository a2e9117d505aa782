"""Reading events.jsonl: the one reader of the log, a stream of typed events. Everything that
reads a log goes through `iter_log`: replay and materialisation (replay.scan_events folds it in
one pass), report, export, tune, the benches; `read_events` is the stream as a list, for tests
and small readers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.files import first_error, whole_lines
from genssd_cli.rundir.layout import EVENTS
from genssd_cli.rundir.records import EVENT, SCHEMA_VERSION, Event


def iter_log(path: Path) -> Iterator[Event]:
    """events.jsonl as typed events, one at a time: a reader holds what it keeps, never the log.
    A torn last line (a crash mid-write) is left out; a log of another format version is refused
    in one line, at its first line of that version."""
    for number, line in whole_lines(path):
        try:  # the common case in one step (about twice as fast as json.loads, then validation)
            event = EVENT.validate_json(line)
        except ValidationError:
            event = None
        if event is None or event.v != SCHEMA_VERSION or "v" not in event.model_fields_set:
            event = _checked_event(path, number, line)  # the exact refusal, or what JSON alone accepts
        yield event


def _checked_event(path: Path, number: int, line: bytes) -> Event:
    try:
        raw = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RuntimeFailure(f"{path} line {number} is corrupt; the log cannot be replayed") from None
    version = raw.get("v") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise UsageError(
            f"this run directory was written by another genssd version (log format {version}, "
            f"this one reads {SCHEMA_VERSION}); use another --out"
        )
    try:
        return EVENT.validate_python(raw)
    except ValidationError as exc:
        raise RuntimeFailure(f"{path} line {number} is not a genssd record: {first_error(exc)}") from None


def read_events(run_dir: Path) -> list[Event]:
    """A run directory's whole log in memory (`iter_log`, listed): for tests and small logs; a run
    streams it (replay.scan_events)."""
    return list(iter_log(run_dir / EVENTS))
