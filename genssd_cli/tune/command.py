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
teacher tokens per kept token against the kept trajectories' mean student PPL. The recommendation
follows RECOMMENDATION_RULE, ours.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from genssd_cli.config import RunConfig, TeacherConfig, load_run_config
from genssd_cli.errors import BudgetReached, UsageError
from genssd_cli.files import write_atomic
from genssd_cli.methods import METHODS
from genssd_cli.problems import Problem, load_problems
from genssd_cli.rundir.records import Choice, Finish, Prune, Response
from genssd_cli.rundir.replay import failure_rows, spent
from genssd_cli.rundir.store import read_events, scan_events
from genssd_cli.stats import wilson

CACHE = "responses.sqlite"
RAN, BUDGET, NOT_RUN = "ran", "stopped at the budget", "not run"
Z = 1.96  # 95 %
ORDER_RULE = (
    "cheapest first: estimated teacher tokens per problem = search.n (1 for standard-kd) * search.max_new_tokens "
    "* search.samples; ties in grid order"
)
RECOMMENDATION_RULE = (
    "our rule, not the paper's: among the points whose correct kept trajectories number at least half the best "
    "point's, the lowest mean student PPL of kept trajectories; ties: fewer teacher tokens per kept token "
    "(points stopped by the budget, or with failed or unfinished trajectories, are partial and left out)"
)
# Settings the sweep itself decides.
OWNED = {
    "max_cost": "the sweep's budget is --max-cost",
    "teacher.cache": "the points share one response cache: name it with --set teacher.cache=PATH",
    "data.limit": "the points run on the first --pilot N problems",
}


PILOT_HEADING = "What a pilot can and cannot predict"


def pilot_note(pilot: int) -> str:
    return (
        f"On the {pilot} pilot problems it measures the teacher cost, the prune rate, the student PPL and length of "
        "the kept traces and how often the teacher's kept traces are correct. It cannot predict the trained "
        f"student's accuracy: no training or eval happens. With {pilot} pilot problems the correct-share intervals "
        "are wide (the 95 % Wilson intervals shown)."
    )


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


def tune_command(
    config_path: Path,
    grid_items: list[str],
    pilot: int,
    out: Path | None,
    max_cost: float | None,
    sets: list[str],
    console: Console,
    resume_hint: str,
) -> dict[str, Any]:
    from genssd_cli.run.command import run_command

    if max_cost is not None and not max_cost > 0:
        raise UsageError(f"--max-cost must be above 0, got {max_cost:g}")
    grid = parse_grid(grid_items)
    out = out or Path("runs") / f"tune-{config_path.stem}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    points, shared = plan(config_path, grid, pilot, sets, max_cost, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write to {out}: {exc.strerror}") from None
    console.print(f"{len(points)} points on the first {pilot} problems, {ORDER_RULE}", markup=False)
    stopped = False
    for number, point in enumerate(points, start=1):
        run_dir = out / point.slug
        budget: list[str] = []
        if not _ended(run_dir, point):  # an ended run costs nothing more: it runs whatever is left
            if stopped:
                console.print(f"{point.slug}: not run, the sweep stopped at the budget", markup=False)
                continue
            if max_cost is not None:
                # Its own earlier cost + what is left = the budget less what the other points spent.
                allowance = max_cost - sum(_cost(out / p.slug, p.cfg.teacher) for p in points if p is not point)
                if allowance <= 0:
                    console.print(f"{point.slug}: not run, the budget is spent", markup=False)
                    continue
                point.max_cost = allowance
                budget = [f"max_cost={allowance!r}"]
        console.rule(f"point {number}/{len(points)}: {point.slug}")
        try:
            run_command(config_path, run_dir, pilot, [*shared, *sets, *point.overrides, *budget], False, console,
                        resume_hint)  # fmt: skip
            point.status = RAN
        except BudgetReached as exc:
            why = "the sweep's budget is spent: raise --max-cost and run the same command to go on" if budget else exc
            console.print(f"{point.slug}: {why}", markup=False)
            point.status = BUDGET
            stopped = True
    for point in points:
        if point.status != NOT_RUN:
            point.numbers = measure(out / point.slug, point)
    best = recommend(points)
    record = _record(config_path, grid, pilot, out, max_cost, sets, points, best)
    write_atomic(out / "tune.json", json.dumps(record, indent=2) + "\n")
    write_atomic(out / "tune.md", to_markdown(record, points, best))
    write_plot(points, best, out / "tune.png")
    console.print(to_rich(record, points))
    console.print(_recommendation_line(best), markup=False)
    console.print(f"rule: {RECOMMENDATION_RULE}", markup=False)
    console.print(f"{PILOT_HEADING}: {pilot_note(pilot)}", markup=False)
    return record


def _ended(run_dir: Path, point: Point) -> bool:
    log = scan_events(run_dir) if run_dir.is_dir() else None  # one streaming pass
    return log is not None and log.events > 0 and log.all_ended(point.problems, point.cfg.search.samples)


def _cost(run_dir: Path, teacher: TeacherConfig) -> float:
    """What a point's run directory has spent, from its log (the truth also after a session that
    ended before writing its summary: a kill, a second Ctrl-C)."""
    return (scan_events(run_dir, teacher).spent or 0.0) if run_dir.is_dir() else 0.0


def wilson_share(k: int, n: int) -> list[float] | None:
    """Wilson's 95 % interval of k successes in n."""
    if n == 0:
        return None
    low, high = wilson(k / n, n, Z)
    return [round(low, 4), round(high, 4)]


def measure(run_dir: Path, point: Point) -> dict[str, Any]:
    """A point's numbers, from its log (the pilot problems' events) and its summary (cost)."""
    ids = {p.id for p in point.problems}
    events = [e for e in read_events(run_dir) if getattr(e, "problem_id", None) in ids]
    finished = [e for e in events if isinstance(e, Finish)]
    rows = [row for e in finished for row in (e.row, *e.more)]
    pruned = sum(1 for e in events if isinstance(e, Prune))
    failed = len(failure_rows(events))
    responses = [e for e in events if isinstance(e, Response)]
    paid = sum(e.completion_tokens for e in responses)  # hits included: what the setting uses
    kept_tokens = sum(r.completion_tokens for r in rows)
    ppls = [r.student_ppl for r in rows if r.student_ppl is not None and math.isfinite(r.student_ppl)]
    correct = sum(1 for r in rows if r.correct)
    # Candidate texts per scored step: distinct ones / candidates received (n for genssd).
    texts: dict[tuple, dict[int, str]] = {}
    for e in responses:
        step = texts.setdefault((e.problem_id, e.sample, e.step, e.attempt), {})
        step.update({e.start + i: c.text for i, c in enumerate(e.candidates)})
    shares = [len(set(t.values())) / len(t) for e in events if isinstance(e, Choice)
              if (t := texts.get((e.problem_id, e.sample, e.step, e.attempt)))]  # fmt: skip
    return {
        "kept": len(finished),
        "rows": len(rows),
        "pruned": pruned,
        "failed": failed,
        "pending": len(ids) * point.cfg.search.samples - len(finished) - pruned - failed,
        "prune_rate": _round(pruned / (len(finished) + pruned)) if finished or pruned else None,
        "teacher_completion_tokens": paid,
        "kept_tokens": kept_tokens,
        "teacher_tokens_per_kept_token": _round(paid / kept_tokens) if kept_tokens else None,
        "student_ppl": {
            "mean": _round(statistics.fmean(ppls)) if ppls else None,
            "median": _round(statistics.median(ppls)) if ppls else None,
        },
        "length_tokens_mean": _round(kept_tokens / len(rows)) if rows else None,
        "correct": correct,
        "correct_share": _round(correct / len(rows)) if rows else None,
        "correct_ci95": wilson_share(correct, len(rows)),
        "diversity": _round(statistics.fmean(shares)) if shares else None,
        "requests": len(responses),
        "cache_hits": sum(1 for e in responses if e.cached),
        "cost": _round6(spent(responses, point.cfg.teacher)),  # the pilot problems', as the other columns
    }


def _round6(x: float | None) -> float | None:
    return round(x, 6) if x is not None else None


def _round(x: float) -> float:
    return round(x, 4)


def recommend(points: list[Point]) -> Point | None:
    """RECOMMENDATION_RULE; the first in the table's order on a full tie."""
    # Only points that ended every pilot trajectory: one with failures was measured on other problems.
    measured = [p for p in points
                if p.status == RAN and p.numbers and not (p.numbers["failed"] or p.numbers["pending"])]  # fmt: skip
    if not measured:
        return None
    most = max(p.numbers["correct"] for p in measured)
    eligible = [
        p for p in measured if p.numbers["correct"] >= most / 2 and p.numbers["student_ppl"]["mean"] is not None
    ]
    if not eligible:
        return None
    return min(eligible, key=lambda p: (p.numbers["student_ppl"]["mean"],
                                        p.numbers["teacher_tokens_per_kept_token"] or math.inf))  # fmt: skip


def _record(config_path: Path, grid: dict[str, list[str]], pilot: int, out: Path, max_cost: float | None,
            sets: list[str], points: list[Point], best: Point | None) -> dict[str, Any]:  # fmt: skip
    priced = all(p.cfg.teacher.priced for p in points)
    return {
        "config": str(config_path),
        "pilot": pilot,
        "out": str(out),
        "grid": grid,
        "set": sets,
        "cache": points[0].cfg.teacher.cache,  # the config's, else the one tune set
        "order": ORDER_RULE,
        "max_cost": max_cost,
        "spent": round(sum(_cost(out / p.slug, p.cfg.teacher) for p in points), 6) if priced else None,
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


HEADERS = ("point", "est. teacher tokens / problem", "status", "kept / pruned / failed", "prune rate",
           "teacher tokens / kept token", "student PPL of kept (mean / median)", "length (mean tokens)",
           "correct of kept (95 % Wilson)", "distinct candidates / step", "cost")  # fmt: skip


def _cells(point: Point) -> list[str]:
    head = [point.slug, f"{point.estimate:,}", point.status]
    n = point.numbers
    if n is None:
        return head + ["—"] * (len(HEADERS) - len(head))
    ci = n["correct_ci95"]
    share = f"{n['correct']}/{n['rows']} = {100 * n['correct_share']:.0f} %" if ci else "—"
    correct = f"{share} ({100 * ci[0]:.0f}-{100 * ci[1]:.0f} %)" if ci else share
    ppl = n["student_ppl"]
    return [
        *head,
        f"{n['kept']} / {n['pruned']} / {n['failed']}" + (f" ({n['pending']} pending)" if n["pending"] else ""),
        _show(None if n["prune_rate"] is None else 100 * n["prune_rate"], "{:.0f} %"),
        _show(n["teacher_tokens_per_kept_token"], "{:.2f}"),
        f"{_show(ppl['mean'], '{:.3f}')} / {_show(ppl['median'], '{:.3f}')}",
        _show(n["length_tokens_mean"], "{:.1f}"),
        correct,
        _show(n["diversity"], "{:.2f}"),
        _show(n["cost"], "{:.4f}"),
    ]


def _show(value: float | None, form: str) -> str:
    return "—" if value is None else form.format(value)


def _recommendation_line(best: Point | None) -> str:
    if best is None:
        return "recommended: none (no point that ran to its end kept a trajectory the student scored)"
    return f"recommended: {best.slug} ({', '.join(best.overrides)})"


def to_rich(record: dict[str, Any], points: list[Point]) -> Table:
    budget = f"; budget {record['max_cost']:g}, spent {record['spent'] or 0:g}" if record["max_cost"] else ""
    table = Table(title=f"genssd tune: {record['pilot']} pilot problems{budget}", caption=record["order"])
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i in (0, 2) else "right")
    for point in points:
        table.add_row(*_cells(point))
    return table


def to_markdown(record: dict[str, Any], points: list[Point], best: Point | None) -> str:
    lines = [
        f"# genssd tune: {record['config']}",
        "",
        f"Each point is `genssd run` on the first {record['pilot']} problems of the config's data with the point's "
        f"settings, in its own run directory under `{record['out']}`; all points share the response cache "
        f"`{record['cache']}`.",
        "",
        f"Order: {record['order']}.",
    ]
    if record["max_cost"]:
        lines += ["", f"Budget: {record['max_cost']:g} for the whole sweep; spent {record['spent'] or 0:g}."]
    lines += ["", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(_cells(p))) + " |" for p in points]
    lines += [
        "",
        "Teacher tokens: completion tokens of every response for the pilot problems (cache hits included: what "
        "the setting uses; the cost is what was paid). Prune rate: pruned / (kept + pruned). Distinct candidates "
        "per step: the mean over scored steps of distinct candidate texts / candidates received (n).",
        "",
        f"**{_recommendation_line(best)}**. Rule: {RECOMMENDATION_RULE}.",
        "",
        f"## {PILOT_HEADING}",
        "",
        pilot_note(record["pilot"]),
        "",
        "![teacher tokens per kept token vs mean kept PPL](tune.png)",
        "",
    ]
    return "\n".join(lines)


def write_plot(points: list[Point], best: Point | None, path: Path) -> None:
    """Teacher tokens per kept token vs the mean kept PPL, one labelled point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for point in points:
        n = point.numbers
        if not n or n["teacher_tokens_per_kept_token"] is None or n["student_ppl"]["mean"] is None:
            continue
        x, y = n["teacher_tokens_per_kept_token"], n["student_ppl"]["mean"]
        ax.scatter([x], [y], color="tab:red" if point is best else "tab:blue")
        ax.annotate(point.slug + (" (recommended)" if point is best else ""), (x, y), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)  # fmt: skip
    ax.set_xlabel("teacher tokens generated per kept token")
    ax.set_ylabel("mean student PPL of kept trajectories")
    ax.set_title("genssd tune: lower left is cheaper and easier for the student", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, png.getvalue())
