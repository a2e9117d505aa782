"""What `genssd run` is asked to do, as one value: the config, the run directory and the flags that
every way of running it shares (one run, one shard of it, or every shard)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


def default_run_dir(config_path: Path | None) -> Path:
    return Path("runs") / (config_path.stem if config_path else "demo")


@dataclass(frozen=True)
class RunOptions:
    config: Path | None  # None: the bundled demo
    out: Path | None = None  # None: runs/CONFIG_NAME
    limit: int | None = None  # only the first N problems
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, in order
    force: bool = False  # resume even though the result settings changed

    @property
    def run_dir(self) -> Path:
        return self.out or default_run_dir(self.config)
