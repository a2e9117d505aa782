"""`genssd doctor`: what each teacher endpoint can do, before hours are spent."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def doctor(
    config: Path | None = typer.Argument(None, help="run config YAML (default: the embedded demo)"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting: --set teacher.base_url=…"),
) -> None:
    """Probe each teacher endpoint: reachable, model, n, seed, continuation, stop strings, context."""
    from genssd_cli.doctor.command import doctor_command

    findings = doctor_command(config, overrides, Console())
    doubts = list(dict.fromkeys(f.check for f in findings if f.ok is False))
    print("the endpoint can serve a run" + (f"; see the rows marked no: {', '.join(doubts)}" if doubts else ""))
