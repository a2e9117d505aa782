"""Where genssd finds its bundled files and keeps its cache."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """Converted models and assembled GGUF files live here (GENSSD_CACHE overrides)."""
    root = os.environ.get("GENSSD_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "genssd"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def bundled_dir(kind: str) -> Path:
    """`configs` or `prompts`: the checkout's top-level folder, or the copy inside an installed wheel."""
    for candidate in (_PACKAGE_DIR.parent / kind, _PACKAGE_DIR / "_bundled" / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"bundled folder {kind!r} is missing from this installation")


def package_data(name: str) -> Path:
    return _PACKAGE_DIR / "data" / name
