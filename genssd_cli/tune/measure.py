"""`genssd tune`'s numbers: each point's, read back from its run directory's log (restricted
to the pilot problems), and the point recommended by RECOMMENDATION_RULE."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from genssd_cli.config import TeacherConfig
from genssd_cli.rundir.layout import EVENTS
from genssd_cli.rundir.log import iter_log
from genssd_cli.rundir.records import Choice, Finish, Prune, Response
from genssd_cli.rundir.replay import failure_rows, scan_events, spent
from genssd_cli.stats import wilson
from genssd_cli.tune.plan import RAN, Point

Z = 1.96  # 95 %
# Not the kept traces' student PPL: that is what the selection itself minimises (the same student
# selects and measures), so a rule on it would favour whatever selects hardest, whatever it costs.
RECOMMENDATION_RULE = (
    "our rule, not the paper's: among the points whose correct kept rows number at least half the best point's "
    "(and at least one), the fewest teacher completion tokens per correct kept row, the cost of one usable "
    "training row; ties: more correct kept rows. The student PPL of the kept rows, the selection objective "
    "itself, plays no part: it is shown beside the cost as the trade-off (points stopped by the budget, or with "
    "failed or unfinished trajectories, are partial and left out)"
)


def ended(run_dir: Path, point: Point) -> bool:
    """Whether a point's run has ended every pilot trajectory (so it runs with whatever budget is left)."""
    log = scan_events(run_dir) if run_dir.is_dir() else None  # one streaming pass
    return log is not None and log.events > 0 and log.all_ended(point.problems, point.cfg.search.samples)


def cost(run_dir: Path, teacher: TeacherConfig) -> float:
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
    events = [e for e in iter_log(run_dir / EVENTS) if getattr(e, "problem_id", None) in ids]  # pilot problems only
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
        "teacher_tokens_per_correct_row": _round(paid / correct) if correct else None,
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
    eligible = [p for p in measured if p.numbers["correct"] >= max(1, most / 2)]
    if not eligible:
        return None
    return min(eligible, key=lambda p: (p.numbers["teacher_tokens_per_correct_row"] or math.inf,
                                        -p.numbers["correct"]))  # fmt: skip
