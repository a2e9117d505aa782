"""`genssd tune`: pilot runs over a grid of settings, so that chunk size, n or the prune threshold
are chosen from measurements on a few problems rather than guessed (the paper: Gen-SSD needs
"careful chunk-size tuning, which may be costly").

    genssd tune CONFIG --grid search.chunk_tokens=16,32,64 --grid search.n=2,4,8 --pilot 50

The grid is the cartesian product of the --grid lists; every point is validated before anything
runs. Each point is an ordinary run directory OUT/SLUG (`genssd run` on the config's first --pilot
problems with the point's settings), so a tune resumes the way a run does, and a second tune with
the same arguments asks the teacher nothing. All points share one response cache (`teacher.cache`:
OUT/responses.sqlite unless the config names one), so points that send the same requests (same n
and chunk, another prune_ppl) pay for them once.

Order: cheapest first, by an estimate of the teacher tokens per problem (ORDER_RULE).

Budget (--max-cost, the whole sweep): before each point, the sweep's spend is the sum of every
point's teacher cost, from its log; the point runs with `max_cost` = its own earlier cost + what is
left (the budget less the other points' cost). A point that hits it stops cleanly (BudgetReached);
once the budget is gone, points whose run has not ended are listed as not run.

The table (terminal, OUT/tune.md, OUT/tune.json) is computed from each run directory's
events.jsonl, restricted to the pilot problems; OUT/tune.png plots
teacher tokens per correct kept row against the kept rows' mean student PPL (the trade-off). The
recommendation follows RECOMMENDATION_RULE, ours: the fewest teacher tokens per correct kept row,
not the lowest kept PPL, which is the selection's own objective.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from genssd_cli.errors import BudgetReached, UsageError
from genssd_cli.files import check_out_dir, locked_out_dir, write_atomic
from genssd_cli.tune.measure import RECOMMENDATION_RULE, cost, ended, measure, recommend
from genssd_cli.tune.plan import BUDGET, NOT_RUN, ORDER_RULE, RAN, Point, parse_grid, plan
from genssd_cli.tune.render import PILOT_HEADING, pilot_note, recommendation_line, to_markdown, to_rich, write_plot


@dataclass(frozen=True)
class TuneOptions:
    """What `genssd tune` is asked to do, in the order of its flags."""

    config: Path  # the run config every point starts from
    grid: list[str]  # --grid KEY=V1,V2,…
    pilot: int = 50  # each point runs on the first N problems
    out: Path | None = None  # None: runs/tune-CONFIG_NAME
    max_cost: float | None = None  # teacher budget of the whole sweep
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE for every point


def tune_command(options: TuneOptions, console: Console, resume_hint: str) -> dict[str, Any]:
    from genssd_cli.run.command import run_command
    from genssd_cli.run.options import RunOptions

    config_path, pilot, max_cost, sets = options.config, options.pilot, options.max_cost, options.overrides
    if max_cost is not None and not max_cost > 0:
        raise UsageError(f"--max-cost must be above 0, got {max_cost:g}")
    grid = parse_grid(options.grid)
    out = options.out or Path("runs") / f"tune-{config_path.stem}"
    check_out_dir(out)
    points, shared = plan(config_path, grid, pilot, sets, max_cost, out)
    with locked_out_dir(out):  # a second sweep here would run the same points side by side
        console.print(f"{len(points)} points on the first {pilot} problems, {ORDER_RULE}", markup=False)
        stopped = False
        for number, point in enumerate(points, start=1):
            run_dir = out / point.slug
            budget: list[str] = []
            if not ended(run_dir, point):  # an ended run costs nothing more: it runs whatever is left
                if stopped:
                    console.print(f"{point.slug}: not run, the sweep stopped at the budget", markup=False)
                    continue
                if max_cost is not None:
                    # Its own earlier cost + what is left = the budget less what the other points spent.
                    allowance = max_cost - sum(cost(out / p.slug, p.cfg.teacher) for p in points if p is not point)
                    if allowance <= 0:
                        console.print(f"{point.slug}: not run, the budget is spent", markup=False)
                        continue
                    point.max_cost = allowance
                    budget = [f"max_cost={allowance!r}"]
            console.rule(f"point {number}/{len(points)}: {point.slug}")
            try:
                # Its own name: `options` (the sweep's) is read again for the record below.
                run_options = RunOptions(config_path, run_dir, pilot, [*shared, *sets, *point.overrides, *budget])
                run_command(run_options, console, resume_hint)
                point.status = RAN
            except BudgetReached as exc:
                spent = "the sweep's budget is spent: raise --max-cost and run the same command to go on"
                why = spent if budget else exc
                console.print(f"{point.slug}: {why}", markup=False)
                point.status = BUDGET
                stopped = True
        for point in points:
            if point.status != NOT_RUN:
                point.numbers = measure(out / point.slug, point)
        best = recommend(points)
        record = _record(options, grid, out, points, best)
        write_atomic(out / "tune.json", json.dumps(record, indent=2) + "\n")
        write_atomic(out / "tune.md", to_markdown(record, points, best))
        write_plot(points, best, out / "tune.png")
        console.print(to_rich(record, points))
        console.print(recommendation_line(best), markup=False)
        console.print(f"rule: {RECOMMENDATION_RULE}", markup=False)
        console.print(f"{PILOT_HEADING}: {pilot_note(pilot)}", markup=False)
        return record


def _record(options: TuneOptions, grid: dict[str, list[str]], out: Path, points: list[Point],
            best: Point | None) -> dict[str, Any]:  # fmt: skip
    priced = all(p.cfg.teacher.priced for p in points)
    pilot = options.pilot
    return {
        "config": str(options.config),
        "pilot": pilot,
        "out": str(out),
        "grid": grid,
        "set": options.overrides,
        "cache": points[0].cfg.teacher.cache,  # the config's, else the one tune set
        "order": ORDER_RULE,
        "max_cost": options.max_cost,
        "spent": round(sum(cost(out / p.slug, p.cfg.teacher) for p in points), 6) if priced else None,
        "points": [
            {
                "slug": p.slug,
                "dir": str(out / p.slug),
                "settings": p.settings,
                "estimate_teacher_tokens": p.estimate,
                "status": p.status,
                "max_cost": p.max_cost,
                **(p.numbers or {}),
            }
            for p in points
        ],
        "recommendation": {
            "rule": RECOMMENDATION_RULE,
            "slug": best.slug if best else None,
            "settings": best.settings if best else None,
        },
        "pilot_note": pilot_note(pilot),
    }
