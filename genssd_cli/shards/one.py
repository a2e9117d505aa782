"""`genssd run --shard K/N`: one shard of a sharded run, as a session of its own directory RUN/shard-K
(genssd_cli/run/session.py) with the shard's part of the run: its share of the endpoint limits, its
problems, the plan, the one budget of all shards, its completion marker, and the merge of every
shard's log into the run's files by the shard that completes last."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from rich.console import Console

from genssd_cli.files import SortedSpool
from genssd_cli.run.materialise import dataset_selection, materialise, write_results
from genssd_cli.run.options import RunOptions
from genssd_cli.run.session import Prepared, SessionHooks, prepare, run_session
from genssd_cli.rundir.layout import CONFIG, EVENTS, TRAJECTORIES
from genssd_cli.rundir.records import Summary
from genssd_cli.rundir.replay import RunLog
from genssd_cli.rundir.results_hash import dump_config_yaml
from genssd_cli.rundir.store import RunStore
from genssd_cli.shards.plan import (
    Shard,
    SharedSpend,
    all_completed,
    check_plan,
    clear_completed,
    mark_completed,
    merge_lock,
    record_spent,
    select,
    shard_dir,
    share_limits,
    write_plan,
)


def run_shard(options: RunOptions, shard: Shard, console: Console, resume_hint: str) -> Summary:
    whole = prepare(options)
    cfg = share_limits(whole.cfg, shard.count)  # the run's endpoint limits, shared out
    check_plan(whole.dir, shard.count, whole.config_hash, options.force)
    mine = replace(whole, cfg=cfg, problems=select(whole.problems, shard), dir=shard_dir(whole.dir, shard.index))
    hooks = ShardHooks(whole, shard, console)
    if not mine.problems:  # more shards than problems: this one has nothing to do
        with RunStore(mine.dir) as store:
            hooks.started()
            console.print(f"shard {shard.index}/{shard.count} has no problems; nothing to do")
            summary = materialise(store, [], cfg)
        hooks.completed()
        return summary
    return run_session(mine, console, resume_hint, hooks)


class ShardHooks(SessionHooks):
    """A shard's part in a session of its directory."""

    def __init__(self, whole: Prepared, shard: Shard, console: Console):
        self.whole, self.shard, self.console = whole, shard, console  # whole: the run's config and every problem
        self.dir = shard_dir(whole.dir, shard.index)

    def resumed(self, spent: float, ended: bool) -> None:
        # Every shard says what it spent, also one with nothing left to ask: the run's budget is all of it.
        record_spent(self.dir, spent)
        if not ended:  # more problems, or --force: a marker of an earlier session would merge too soon
            clear_completed(self.dir)

    def shared_budget(self, spent: float) -> tuple[float, Callable[[float], float]]:
        budget = SharedSpend(self.whole.dir, self.shard, spent)
        return budget.total(), budget.add

    def started(self) -> None:
        write_plan(self.whole.dir, self.shard.count, self.whole.config_hash, self.whole.options.force)
        clear_completed(self.dir)

    def completed(self) -> None:
        """Mark the shard done; the shard that completes last materialises the run's files from all."""
        whole, count = self.whole, self.shard.count
        mark_completed(self.dir)
        with merge_lock(whole.dir):
            if not all_completed(whole.dir, count):
                return
            files = RunStore(whole.dir)  # writes only: the run directory's lock is the executor's
            # Every shard's log in one streaming pass, as one log: the files an unsharded run writes.
            with RunLog(whole.cfg.teacher, SortedSpool(whole.dir / TRAJECTORIES)) as log:
                for k in range(count):
                    log.read(shard_dir(whole.dir, k) / EVENTS)
                write_results(files, log, whole.problems, whole.cfg.search.samples, shards=count,
                              morsd=dataset_selection(whole.cfg))
            files.write_text(CONFIG, dump_config_yaml(whole.cfg, whole.config_hash))
        self.console.print(f"every shard has completed: {whole.dir}/{TRAJECTORIES} holds them all")
