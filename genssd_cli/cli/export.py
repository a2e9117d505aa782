"""`genssd export`: kept trajectories as a Hugging Face dataset folder."""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    run_dirs: list[Path] = typer.Argument(..., help="run directories whose trajectories.jsonl to export"),
    out: Path = typer.Option(..., "--out", help="the dataset folder (a previous export there is replaced)"),
    only_correct: bool = typer.Option(False, "--only-correct", help="only the rows marked correct"),
) -> None:
    """The kept trajectories as a Hugging Face dataset folder (parquet + dataset card), ready to push."""
    from genssd_cli.export.command import export_command
    from genssd_cli.export.folder import CARD, DATA_FILE

    result = export_command(run_dirs, out, only_correct)
    print(f"exported {result['rows']} rows ({result['correct']} correct) of {result['runs']} runs -> "
          f"{result['out']}/{DATA_FILE}, {result['out']}/{CARD}")  # fmt: skip
