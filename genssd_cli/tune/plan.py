"""`genssd tune`'s plan: the grid read from --grid, every point validated and ordered cheapest
first (ORDER_RULE), before anything runs or is written."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genssd_cli.config import RunConfig, load_run_config
from genssd_cli.errors import UsageError
from genssd_cli.methods import METHODS
from genssd_cli.problems import Problem, load_problems

CACHE = "responses.sqlite"
RAN, BUDGET, NOT_RUN = "ran", "stopped at the budget", "not run"
ORDER_RULE = (
    "cheapest first: estimated teacher tokens per problem = search.n (1 for standard-kd) * search.max_new_tokens "
    "* search.samples; ties in grid order"
)
# Settings the sweep itself decides.
OWNED = {
    "max_cost": "the sweep's budget is --max-cost",
    "teacher.cache": "the points share one response cache: name it with --set teacher.cache=PATH",
    "data.limit": "the points run on the first --pilot N problems",
}



@dataclass
class Point:
    settings: dict[str, str]  # grid key -> value, as given
    slug: str
    cfg: RunConfig
    problems: list[Problem]
    status: str = NOT_RUN
    max_cost: float | None = None  # the allowance it ran with
    numbers: dict[str, Any] | None = None

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.settings.items()]

    @property
    def estimate(self) -> int:
        s = self.cfg.search
        return METHODS[self.cfg.method].candidates(s.n) * s.max_new_tokens * s.samples


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`--grid KEY=V1,V2,…` items as {KEY: [values]} (each value YAML, as --set's)."""
    if not items:
        raise UsageError("give at least one --grid KEY=V1,V2 (e.g. --grid search.chunk_tokens=16,32,64)")
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(parts):
            raise UsageError(f"--grid expects KEY=V1,V2,... (e.g. search.n=2,4,8), got {item!r}")
        if key in OWNED:
            raise UsageError(f"--grid {key}: {OWNED[key]}")
        if key in grid:
            raise UsageError(f"--grid {key} is given twice: give all its values in one --grid")
        if len(set(parts)) < len(parts):
            raise UsageError(f"--grid {item}: a value is given twice")
        grid[key] = parts
    return grid


def slug(settings: dict[str, str]) -> str:
    """A point's directory name: `chunk_tokens-16_n-2` (full keys when two end alike)."""
    leaves = [key.rsplit(".", 1)[-1] for key in settings]
    names = leaves if len(set(leaves)) == len(leaves) else list(settings)
    clean = ("".join(c if c.isalnum() or c in "-._" else "-" for c in v) for v in settings.values())
    return "_".join(f"{name}-{value}" for name, value in zip(names, clean, strict=True))


def _load(config_path: Path, overrides: list[str], what: str) -> RunConfig:
    try:
        return load_run_config(config_path, overrides)
    except UsageError as exc:
        raise UsageError(f"{what}: {exc}") from None


def plan(
    config_path: Path, grid: dict[str, list[str]], pilot: int, sets: list[str], max_cost: float | None, out: Path
) -> tuple[list[Point], list[str]]:
    """Every point, validated and ordered cheapest first, and the overrides all points share
    (the response cache). Nothing is written."""
    base = load_run_config(config_path, sets)  # a bad config or --set: its own line
    for key in dict.fromkeys(item.partition("=")[0].strip() for item in sets):
        if key in grid:
            raise UsageError(f"--set {key} and --grid {key}: give its values in --grid alone")
        if key in OWNED and key != "teacher.cache":  # a --set cache is the points' shared one
            raise UsageError(f"--set {key}: {OWNED[key]}")
    shared = [] if base.teacher.cache else [f"teacher.cache={json.dumps(str((out / CACHE).absolute()))}"]
    for key, values in grid.items():  # a bad key or value named alone, not as part of a point
        for value in values:
            _load(config_path, [*shared, *sets, f"{key}={value}"], f"--grid {key}={value}")
    points = []
    for combination in itertools.product(*grid.values()):
        settings = dict(zip(grid, combination, strict=True))
        name = slug(settings)
        cfg = _load(config_path, [*shared, *sets, *(f"{k}={v}" for k, v in settings.items())], f"--grid point {name}")
        if max_cost is not None and not cfg.teacher.priced:
            raise UsageError("--max-cost needs teacher.price (input and output per million tokens) for every "
                             f"endpoint: set it in {config_path} or with --set")  # fmt: skip
        points.append(Point(settings, name, cfg, load_problems(cfg.data, pilot)))
    names = [p.slug for p in points]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"--grid: two points would share the directory {twice}: give values that differ in letters "
                         "or digits")  # fmt: skip
    points.sort(key=lambda p: p.estimate)  # stable: grid order among equals
    return points, shared
