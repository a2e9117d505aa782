"""`genssd tune`: pilot runs over a grid of settings."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from genssd_cli.cli.common import err_console, resume_command


def tune(
    config: Path = typer.Argument(..., help="run config YAML"),
    grid: list[str] = typer.Option([], "--grid", help="a setting and its values: --grid search.n=2,4,8 (repeatable)"),
    pilot: int = typer.Option(50, "--pilot", min=1, help="run each point on the first N problems"),
    out: Path | None = typer.Option(None, "--out", help="default: runs/tune-CONFIG_NAME"),
    max_cost: float | None = typer.Option(None, "--max-cost", help="teacher budget of the whole sweep (needs a price)"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting of every point: --set search.retries=2"),
) -> None:
    """Pilot runs over a grid of settings, cheapest first, sharing one teacher cache; a table and a pick."""
    from genssd_cli.errors import Interrupted
    from genssd_cli.tune.command import TuneOptions, tune_command

    try:
        options = TuneOptions(config, grid, pilot, out, max_cost, overrides)
        record = tune_command(options, Console(), resume_command())
    except (KeyboardInterrupt, Interrupted):
        err_console.print(f"interrupted; resume with: {resume_command()}", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    ran = sum(1 for p in record["points"] if p["status"] != "not run")
    pick = record["recommendation"]["slug"]
    print(f"done: {ran} of {len(record['points'])} points -> {record['out']}/tune.md"
          + (f"; recommended: {pick}" if pick else ""))  # fmt: skip
