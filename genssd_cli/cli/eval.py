"""`genssd eval`: the student's accuracy on an eval dataset."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def evaluate(
    model: str = typer.Argument(..., help="the student: shipped name, HF model id or local folder"),
    dataset: str = typer.Option(..., "--dataset", "--bench",  # --bench: its earlier name, still accepted
                                help="gsm8k or arith1-heldout (bundled), math-500, aime24, hf:ID, or FILE.jsonl"),
    adapter: str | None = typer.Option(None, "--adapter", help="a LoRA adapter folder from genssd train"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="only the first N problems"),
    samples: int = typer.Option(1, "--samples", min=1, help="generations per problem (pass@k)"),
    out: Path | None = typer.Option(None, "--out", help="default: runs/eval/MODEL-DATASET[-adapter-HASH]"),
    config: Path | None = typer.Option(None, "--config", help="eval config YAML (default: configs/eval.yaml)"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting: --set max_new_tokens=512"),
) -> None:
    """Accuracy of the student (with --adapter: after distillation) on an eval dataset; resumes."""
    from genssd_cli.eval.command import EvalOptions, eval_command

    m = eval_command(EvalOptions(model, dataset, adapter, limit, samples, out, config, overrides), Console())
    passes = "".join(f", pass@{k} {v:.3f}" for k, v in m.get("pass_at_k", {}).items())
    ci = m["ci95"] or [None, None]
    print(f"accuracy {m['accuracy']:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}) on {m['problems']} problems{passes}, "
          f"mean {m['mean_generated_tokens']} tokens -> {m['out']}/metrics.json")  # fmt: skip
