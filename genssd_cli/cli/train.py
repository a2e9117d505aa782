"""`genssd train`: LoRA-fine-tune the student on kept trajectories."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console


def train(
    run_dirs: list[Path] = typer.Argument(..., help="run directories whose trajectories.jsonl to train on"),
    out: Path = typer.Option(..., "--out", help="where the adapter, checkpoints and logs go"),
    config: Path | None = typer.Option(None, "--config", help="train config YAML (default: configs/train.yaml)"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting: --set training.epochs=1"),
    include_incorrect: bool = typer.Option(False, "--include-incorrect", help="also train on wrong answers"),
    merge: bool = typer.Option(False, "--merge", help="also write the merged model to OUT/merged"),
    processes: int = typer.Option(1, "--processes", min=1, help="data-parallel processes, one GPU each (CPU: gloo)"),
) -> None:
    """LoRA-fine-tune the student on kept trajectories (TRL SFT); running it again resumes."""
    from genssd_cli.train.command import TrainOptions, train_main

    options = TrainOptions(run_dirs, out, config, overrides, include_incorrect, merge)
    result = train_main(options, processes, sys.argv[1:], Console())
    if result is None:  # printed by the main training process
        return
    on = f" on {result['processes']} processes" if result.get("processes", 1) > 1 else ""
    print(
        f"done: {result['rows']} rows, {result['steps']} steps{on}, loss {result['first_loss']} -> "
        f"{result['last_loss']} in {result['wall_s']} s -> {result['adapter']}"
    )
