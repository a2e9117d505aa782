"""The files a run directory's log is materialised into at the end of a session: trajectories.jsonl,
failures.jsonl and summary.json, from one log, or from every shard's log read as one."""

from __future__ import annotations

import json
from collections.abc import Iterator

from genssd_cli.config import MorsdSettings, RunConfig
from genssd_cli.methods import morsd_dataset_keep
from genssd_cli.problems import Problem
from genssd_cli.rundir.layout import FAILURES, SUMMARY, TRAJECTORIES
from genssd_cli.rundir.records import Summary
from genssd_cli.rundir.replay import RunLog, scan_events
from genssd_cli.rundir.store import RunStore


def materialise(store: RunStore, problems: list[Problem], cfg: RunConfig) -> Summary:
    """The files of `store`'s directory, re-made from its own log."""
    with scan_events(store.dir, cfg.teacher, rows=True) as log:  # one streaming pass; rows spooled, not held
        return write_results(store, log, problems, cfg.search.samples, morsd=dataset_selection(cfg))


def write_results(files: RunStore, log: RunLog, problems: list[Problem], samples: int,
                  shards: int | None = None, morsd: MorsdSettings | None = None) -> Summary:  # fmt: skip
    """The three files from a log already read (with rows); `shards`: the summary of a sharded run's
    merge says how many shards it came from; `morsd`: MoRSD's dataset-level selection of the rows
    (`dataset_selection`). Returns the run's summary as the log has it (every row the log holds)."""
    lines = log.trajectory_lines(problems) if morsd is None else _morsd_selected(log, problems, morsd)
    files.write_lines(TRAJECTORIES, lines)
    files.write_jsonl(FAILURES, log.failure_rows())
    summary = log.summary(problems, samples)
    files.write_json(SUMMARY, summary if shards is None else summary.model_copy(update={"shards": shards}))
    return summary


def dataset_selection(cfg: RunConfig) -> MorsdSettings | None:
    """MoRSD's settings when its dataset-level selection is on (`morsd.fraction` or `morsd.rows`).
    It runs here, where the finished rows are materialised, because it needs every problem's rows
    (it waits for the last one) and the log keeps them all: trajectories.jsonl, which train,
    export and report read, holds the selection; another fraction is a re-materialisation away."""
    on = cfg.method == "morsd" and (cfg.morsd.fraction is not None or cfg.morsd.rows is not None)
    return cfg.morsd if on else None


def _morsd_selected(log: RunLog, problems: list[Problem], morsd: MorsdSettings) -> Iterator[bytes]:
    """trajectories.jsonl with only the selected correct rows (two passes over the spooled rows:
    their RDs first, then the lines). A row that is not correct (no correct rationale: kept
    marked incorrect) stays, as train leaves it out anyway."""
    ranked = []
    for number, line in enumerate(log.trajectory_lines(problems)):
        row = json.loads(line)
        if row["correct"] and row.get("rd") is not None:
            ranked.append((number, row["rd"]))
    kept = morsd_dataset_keep(ranked, morsd.fraction, morsd.rows)
    candidates = {number for number, _ in ranked}
    for number, line in enumerate(log.trajectory_lines(problems)):
        if number not in candidates or number in kept:
            yield line
