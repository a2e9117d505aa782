"""`genssd pipeline`: every stage of a study, each resumable."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from genssd_cli.cli.common import err_console, resume_command


def pipeline(
    config: Path | None = typer.Argument(None, help="pipeline config YAML (default: configs/pipeline-demo.yaml)"),
    out: Path | None = typer.Option(None, "--out", help="where every stage's directory goes"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting: --set limit=4"),
) -> None:
    """Cold start, then each method's run and training, each stage resumable; again: resumes."""
    from genssd_cli.errors import Interrupted
    from genssd_cli.paths import bundled_dir
    from genssd_cli.pipeline.command import pipeline_command

    config = config or bundled_dir("configs") / "pipeline-demo.yaml"
    try:
        record = pipeline_command(config, out, overrides, Console(), resume_command())
    except (KeyboardInterrupt, Interrupted):
        err_console.print(f"interrupted; resume with: {resume_command()}", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    for name, stage in record["stages"].items():
        print(f"{name}: {stage['wall_s']} s -> {stage['dir']}")
    print(f"done: {len(record['stages'])} stages in {record['wall_s']} s")
