"""`genssd run` of one whole run directory (no shards): one session of it (genssd_cli/run/session.py).
`--shard K/N` is genssd_cli/shards/one.py, `--shards N` genssd_cli/shards/local.py."""

from __future__ import annotations

from rich.console import Console

from genssd_cli.run.options import RunOptions
from genssd_cli.run.session import prepare, run_session
from genssd_cli.rundir.records import Summary
from genssd_cli.shards.plan import refuse_sharded


def run_command(options: RunOptions, console: Console, resume_hint: str) -> Summary:
    run = prepare(options)
    refuse_sharded(run.dir)
    return run_session(run, console, resume_hint)
