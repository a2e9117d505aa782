"""An eval directory's files, shared by `genssd eval` (writes them) and `genssd report` (reads
them): samples.jsonl (one row per generation), metrics.json and eval.json (the settings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from genssd_cli.errors import RuntimeFailure

SAMPLES = "samples.jsonl"
METRICS = "metrics.json"
SETTINGS = "eval.json"


def read_eval_settings(out: Path) -> dict[str, Any] | None:
    """An eval directory's settings, None when it has none. An earlier genssd named the eval
    dataset `bench`: read as `dataset`."""
    path = out / SETTINGS
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
        settings["dataset"] = settings.pop("bench") if "bench" in settings else settings["dataset"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RuntimeFailure(f"{path} is unreadable; move the eval directory away to start over") from None
    return settings
