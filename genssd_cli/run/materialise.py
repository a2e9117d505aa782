"""The files a run directory's log is materialised into at the end of a session: trajectories.jsonl,
failures.jsonl and summary.json, from one log, or from every shard's log read as one."""

from __future__ import annotations

from genssd_cli.config import RunConfig
from genssd_cli.problems import Problem
from genssd_cli.rundir.layout import FAILURES, SUMMARY, TRAJECTORIES
from genssd_cli.rundir.records import Summary
from genssd_cli.rundir.replay import RunLog, scan_events
from genssd_cli.rundir.store import RunStore


def materialise(store: RunStore, problems: list[Problem], cfg: RunConfig) -> Summary:
    """The files of `store`'s directory, re-made from its own log."""
    with scan_events(store.dir, cfg.teacher, rows=True) as log:  # one streaming pass; rows spooled, not held
        return write_results(store, log, problems, cfg.search.samples)


def write_results(files: RunStore, log: RunLog, problems: list[Problem], samples: int,
                  shards: int | None = None) -> Summary:  # fmt: skip
    """The three files from a log already read (with rows); `shards`: the summary of a sharded run's
    merge says how many shards it came from. Returns the run's summary as the log has it."""
    files.write_lines(TRAJECTORIES, log.trajectory_lines(problems))
    files.write_jsonl(FAILURES, log.failure_rows())
    summary = log.summary(problems, samples)
    files.write_json(SUMMARY, summary if shards is None else summary.model_copy(update={"shards": shards}))
    return summary
