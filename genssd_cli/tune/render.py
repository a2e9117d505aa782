"""`genssd tune`'s table: the terminal's (rich), tune.md and the tune.png plot, from the sweep's
record (tune.json) and its points."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.table import Table

from genssd_cli.files import write_atomic
from genssd_cli.tune.measure import RECOMMENDATION_RULE
from genssd_cli.tune.plan import Point

PILOT_HEADING = "What a pilot can and cannot predict"


def pilot_note(pilot: int) -> str:
    return (
        f"On the {pilot} pilot problems it measures the teacher cost, the prune rate, the student PPL and length of "
        "the kept traces and how often the teacher's kept traces are correct. It cannot predict the trained "
        f"student's accuracy: no training or eval happens. With {pilot} pilot problems the correct-share intervals "
        "are wide (the 95 % Wilson intervals shown)."
    )


HEADERS = ("point", "est. teacher tokens / problem", "status", "kept / pruned / failed", "prune rate",
           "teacher tokens / kept token", "teacher tokens / correct row", "student PPL of kept (mean / median)",
           "length (mean tokens)",
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
        _show(n["teacher_tokens_per_correct_row"], "{:,.0f}"),
        f"{_show(ppl['mean'], '{:.3f}')} / {_show(ppl['median'], '{:.3f}')}",
        _show(n["length_tokens_mean"], "{:.1f}"),
        correct,
        _show(n["diversity"], "{:.2f}"),
        _show(n["cost"], "{:.4f}"),
    ]


def _show(value: float | None, form: str) -> str:
    return "—" if value is None else form.format(value)


def recommendation_line(best: Point | None) -> str:
    if best is None:
        return "recommended: none (no point that ran to its end kept a correct row)"
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
        "per step: the mean over scored steps of distinct candidate texts / candidates received (n). Teacher "
        "tokens / correct row: those teacher tokens over the correct kept rows, what one usable training row costs. "
        "The student PPL of the kept rows is what the selection minimises (the same student selects and "
        "measures): lower by construction, so it is shown as the trade-off, not used to recommend.",
        "",
        f"**{recommendation_line(best)}**. Rule: {RECOMMENDATION_RULE}.",
        "",
        f"## {PILOT_HEADING}",
        "",
        pilot_note(record["pilot"]),
        "",
        "![teacher tokens per correct row vs mean kept PPL](tune.png)",
        "",
    ]
    return "\n".join(lines)


def write_plot(points: list[Point], best: Point | None, path: Path) -> None:
    """The trade-off: teacher tokens per correct kept row (what the rule minimises) vs the mean kept
    PPL (what the selection minimises), one labelled point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for point in points:
        n = point.numbers
        if not n or n["teacher_tokens_per_correct_row"] is None or n["student_ppl"]["mean"] is None:
            continue
        x, y = n["teacher_tokens_per_correct_row"], n["student_ppl"]["mean"]
        ax.scatter([x], [y], color="tab:red" if point is best else "tab:blue")
        ax.annotate(point.slug + (" (recommended)" if point is best else ""), (x, y), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)  # fmt: skip
    ax.set_xlabel("teacher tokens generated per correct kept row (the recommendation's measure)")
    ax.set_ylabel("mean student PPL of kept trajectories")
    ax.set_title("genssd tune: left is cheaper per usable row; lower is easier for the student (the selection's "
                 "own objective)", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, png.getvalue())
