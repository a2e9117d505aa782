"""docs/records.md, generated from the record models in records.py (their field annotations and
docstrings): `python -m genssd_cli.rundir.records_doc > docs/records.md`. A test fails when the page and
the code disagree."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from genssd_cli.rundir.records import (
    EVENTS,
    SCHEMA_VERSION,
    CacheTotals,
    Candidate,
    Centre,
    EndpointTotals,
    EndpointUse,
    EngineUse,
    FailureRow,
    KeptStats,
    Message,
    Price,
    Record,
    SelectionStats,
    ShardPlan,
    Summary,
    TeacherServer,
    TeacherTotals,
    TrajectoryCounts,
    TrajectoryRow,
)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (types.UnionType, typing.Union):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _table(model: type[Record]) -> list[str]:
    lines = ["| field | type | meaning |", "|---|---|---|"]
    for name, info in model.model_fields.items():
        text = " ".join((info.description or "").split())
        lines.append(f"| `{name}` | {_type_name(info.annotation)} | {text} |")
    return lines


def markdown() -> str:
    """docs/records.md."""
    out = [
        "# The run directory's records",
        "",
        "<!-- Generated from genssd_cli/rundir/records.py by"
        " `python -m genssd_cli.rundir.records_doc > docs/records.md`; a test fails when they disagree. -->",
        "",
        "`events.jsonl` is the source of truth of a run: one JSON object per line, appended and "
        "flushed as it happens, never rewritten. `trajectories.jsonl`, `failures.jsonl` and "
        "`summary.json` are materialised from it at the end of every session. Every event carries "
        f"`v` (the format version, {SCHEMA_VERSION}) and `type`. A genssd that reads another format "
        "version refuses the directory in one line; fields a reader does not know are ignored.",
        "",
        "## Events (events.jsonl)",
    ]
    for model in EVENTS:
        kind = model.model_fields["type"].default
        out += ["", f"### `{kind}`", "", " ".join((model.__doc__ or "").split()), "", *_table(model)]
    parts = [
        ("## Trajectory rows (trajectories.jsonl)", [TrajectoryRow, Message]),
        ("## Failure rows (failures.jsonl)", [FailureRow]),
        ("## Summary (summary.json)", [Summary, TrajectoryCounts, TeacherTotals, CacheTotals, EndpointTotals, Price,
                                       KeptStats, Centre, EngineUse, SelectionStats]),
        ("## Nested records of events", [Candidate, TeacherServer, EndpointUse]),
        ("## Shard plan (shards.json of a sharded run)", [ShardPlan]),
    ]  # fmt: skip
    for title, models in parts:
        out += ["", title]
        for model in models:
            doc = " ".join((model.__doc__ or "").split())
            out += ["", f"### {model.__name__}", *(["", doc] if doc else []), "", *_table(model)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
