"""`genssd report`: runs and evals side by side."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def report(
    paths: list[Path] = typer.Argument(..., help="run directories, or a pipeline directory (its runs and evals)"),
    evals: list[Path] = typer.Option([], "--eval", help="an eval directory from genssd eval (repeatable)"),
    out: Path | None = typer.Option(None, "--out", help="default: PIPELINE_DIR/report, else runs/report"),
) -> None:
    """Runs side by side: kept / pruned, student PPL, length, teacher tokens, cost, eval accuracy."""
    from genssd_cli.report.command import report_command

    result = report_command(paths, evals, out, Console())
    print(f"report of {result['columns']} columns -> {result['out']}/report.md, {len(result['plots'])} plots")
