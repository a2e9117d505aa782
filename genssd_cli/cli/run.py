"""`genssd run`: generate trajectories, one run or its shards; the same command resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer
from rich.console import Console

from genssd_cli.cli.common import err_console, resume_command


def run(
    config: Path | None = typer.Argument(None, help="run config YAML (default: the bundled demo)"),
    out: Path | None = typer.Option(None, "--out", help="run directory (default: runs/CONFIG_NAME)"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="only the first N problems"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting: --set search.n=8"),
    force: bool = typer.Option(False, "--force", help="resume even though result settings changed"),
    shards: int | None = typer.Option(None, "--shards", min=1, help="split the problems into N shards, run them all"),
    shard: str | None = typer.Option(None, "--shard", help="run one shard, K/N (K from 0), e.g. in a Slurm array"),
    executor: Literal["local", "ray"] | None = typer.Option(None, "--executor", help="where --shards run (local)"),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster: auto, ray://HOST:PORT"),
    gpus_per_shard: float | None = typer.Option(None, "--gpus-per-shard", min=0, help="Ray: default 1 if it has GPUs"),
    restarts: int | None = typer.Option(None, "--restarts", min=0, help="times a dead shard is started again (3)"),
) -> None:
    """Generate Gen-SSD trajectories; running it again on the same --out resumes."""
    from genssd_cli.errors import Interrupted, UsageError
    from genssd_cli.run.options import RunOptions

    console = Console()
    options = RunOptions(config, out, limit, overrides, force)
    run_dir = options.run_dir
    try:
        if shards is not None and shard is not None:
            raise UsageError("give --shards N (run every shard) or --shard K/N (run one), not both")
        _check_executor_flags(shards, executor, ray_address, gpus_per_shard, restarts)
        if shards is not None:
            from genssd_cli.shards.local import ShardedOptions, run_sharded

            sharded = ShardedOptions(shards, executor or "local", ray_address, gpus_per_shard,
                                     3 if restarts is None else restarts)  # fmt: skip
            summary = run_sharded(options, sharded, console, resume_command())
        elif shard is not None:
            from genssd_cli.shards.one import run_shard
            from genssd_cli.shards.plan import parse_shard

            summary = run_shard(options, parse_shard(shard), console, resume_command())
        else:
            from genssd_cli.run.command import run_command

            summary = run_command(options, console, resume_command())
    except (KeyboardInterrupt, Interrupted):
        err_console.print(f"interrupted; resume with: {resume_command()}", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    t = summary.trajectories
    console.print(
        f"done: {t.finished} finished, {t.truncated} truncated, {t.pruned} pruned, "
        f"{t.failed} failed, {summary.correct} correct -> {run_dir}/trajectories.jsonl",
        markup=False,
        soft_wrap=True,
    )
    if t.failed or t.pending:
        console.print(f"some trajectories did not end; resume with: {resume_command()}", markup=False, soft_wrap=True)


def _check_executor_flags(shards: int | None, executor: str | None, ray_address: str | None,
                          gpus_per_shard: float | None, restarts: int | None) -> None:
    """A flag that would change nothing is a mistake worth a line, not a run that ignores it."""
    from genssd_cli.errors import UsageError

    given = {"--executor": executor, "--ray-address": ray_address, "--gpus-per-shard": gpus_per_shard,
             "--restarts": restarts}  # fmt: skip
    if shards is None and (named := [flag for flag, value in given.items() if value is not None]):
        raise UsageError(f"{', '.join(named)}: only with --shards N (where the shards run)")
    if executor != "ray" and (named := [f for f in ("--ray-address", "--gpus-per-shard") if given[f] is not None]):
        raise UsageError(f"{', '.join(named)}: only with --executor ray")
