"""How `genssd report` shows what report.py read: the rich tables on the terminal, report.md,
report.json (the same numbers, for scripts) and the PNG plots (matplotlib, imported inside
`write_plots`).

It is given the columns and their differences as data and reads nothing from disk; it imports
nothing of report.py (which imports it), so the shapes it reads are the protocols below. The
difference rows' keys and names (`RUN_DIFFERENCES`, `accuracy_key`, `accuracy_name`) and the order
of the eval datasets (`datasets`) are defined here and used by report.py too, in its differences
and warnings.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from rich.markup import escape
from rich.table import Table

from genssd_cli.files import write_atomic
from genssd_cli.stats import RESAMPLES, SEED, Difference

PLOTS = ("ppl.png", "length.png", "teacher_tokens.png", "accuracy.png")


class ShownColumn(Protocol):
    """What the view reads of a column (report.py's `Column`)."""

    label: str
    run: dict[str, Any] | None
    evals: dict[str, dict[str, Any]]  # by eval dataset
    ppls: list[float]
    lengths: list[int]


class ShownDifferences(Protocol):
    """What the view reads of the differences (report.py's `Differences`): by compared column's
    label, by report.json key."""

    by_column: dict[str, dict[str, Difference]]

    @property
    def reference(self) -> ShownColumn: ...


# The differences' run rows: report.json key, row name, digits shown, what makes a pair.
RUN_DIFFERENCES = (
    ("student_ppl", "Δ student PPL of kept (mean)", 3, "problems both runs kept a scored trajectory of"),
    ("length_tokens", "Δ length in tokens (mean)", 1, "problems both runs kept a trajectory of"),
    ("teacher_tokens_per_kept_token", "Δ teacher tokens per kept token", 2, "problems both runs asked the teacher"),
)


def accuracy_key(dataset: str) -> str:
    return f"accuracy:{dataset}"


def accuracy_name(dataset: str) -> str:
    return f"Δ eval accuracy, {dataset} (points)"


def datasets(columns: Sequence[ShownColumn]) -> list[str]:
    """The columns' eval datasets, in order of first appearance."""
    return list(dict.fromkeys(dataset for c in columns for dataset in c.evals))


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def _pair(centre: dict[str, Any] | None, digits: int) -> str:
    if not centre or centre["mean"] is None:
        return "—"
    return f"{_fmt(centre['mean'], digits)} / {_fmt(centre['median'], digits)}"


def _accuracy(e: dict[str, Any] | None, tag: bool = False) -> str:
    """Accuracy with its 95 % CI; `tag`: say avg@k in the cell (columns with other k)."""
    if not e or e["accuracy"] is None:
        return "—"
    low, high = e["ci95"] or (None, None)
    span = f" ({100 * low:.1f} to {100 * high:.1f})" if low is not None else ""
    avg = f" avg@{e['samples']}" if tag and e["samples"] > 1 else ""
    return f"{100 * e['accuracy']:.1f} %{span}{avg}"


def _pass(e: dict[str, Any] | None, tag: bool = False) -> str:
    """pass@k at k = the eval's samples per problem; `tag`: say k in the cell."""
    value = (e.get("pass_at_k") or {}).get(str(e["samples"])) if e and e["samples"] > 1 else None
    if value is None:
        return "—"
    return f"{100 * value:.1f} %" + (f" (k={e['samples']})" if tag else "")


def table_rows(columns: Sequence[ShownColumn]) -> list[tuple[str, list[str]]]:
    """(metric, one cell per column): the same rows for the terminal and report.md."""

    def run(key: str, digits: int = 2) -> list[str]:
        return [_fmt(c.run[key], digits) if c.run else "" for c in columns]

    def tokens(cells: list[str]) -> list[str]:
        # ≈: the run's token counts were split from bills nothing checks (summary.json says so)
        return [f"≈ {cell}" if c.run and c.run.get("approximate_tokens") and cell != "—" else cell
                for c, cell in zip(columns, cells, strict=True)]  # fmt: skip

    rows = [
        ("trajectories kept", run("kept")),
        ("  correct", run("correct")),
        ("  pruned", run("pruned")),
        ("student PPL of kept (mean / median)", [_pair(c.run["student_ppl"], 3) if c.run else "" for c in columns]),
        ("length in tokens (mean / median)",
         tokens([_pair(c.run["length_tokens"], 1) if c.run else "" for c in columns])),
        ("teacher tokens generated", tokens(run("teacher_tokens"))),
        ("  per kept trajectory", tokens(run("teacher_tokens_per_kept", 1))),
        ("  per kept token", tokens(run("teacher_tokens_per_kept_token", 2))),
        ("teacher requests", run("requests")),
        ("cost", tokens(run("cost", 4))),
        ("wall time (s)", run("wall_s", 1)),
        *selection_rows(columns),
    ]
    for dataset in datasets(columns):
        rows += _eval_rows(dataset, [c.evals.get(dataset) for c in columns])
    return rows


# The selection block: (summary.json `selection` key, row name, how shown); "share+" shows the
# key's base rate (`BASE`) beside it: what a uniform random pick would score.
SELECTION_ROWS = (
    ("selections", "selections (choices among ≥ 2 candidates)", "count"),
    ("distinct_candidates", "  distinct candidates (mean)", "mean"),
    ("with_distinct", "  with ≥ 2 distinct", "share"),
    ("differs_from_first", "  kept ≠ the first candidate", "share"),
    ("differs_from_random", "  kept ≠ a random pick (expected)", "share"),
    ("kept_shortest", "  kept the shortest (random pick)", "share+"),
    ("kept_stopping", "  kept one that stops (random pick)", "share+"),
    ("resamples_per_step", "  re-samples per step", "mean"),
    ("prune_rate", "  trajectories pruned", "share"),
    ("teacher_tokens_per_correct_row", "  teacher tokens per correct row", "mean"),
    ("pruned_branch_tokens", "  teacher tokens on pruned branches", "count"),
    ("coverage", "  problems with a correct row", "share"),
)
BASE = {"kept_shortest": "shortest_base_rate", "kept_stopping": "stopping_base_rate"}


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def selection_rows(columns: Sequence[ShownColumn]) -> list[tuple[str, list[str]]]:
    """What each run's choices did (summary.json `selection`): where the student's pick can
    matter, and how it differs from a first, a random, the shortest and a stopping pick."""
    if not any(c.run and c.run.get("selection") for c in columns):
        return []

    def cell(c: ShownColumn, key: str, shown: str) -> str:
        if not c.run:
            return ""
        selection = c.run.get("selection")
        if not selection:
            return "—"
        value = selection.get(key)
        if shown == "share+" and value is not None:
            return f"{_percent(value)} ({_percent(selection.get(BASE[key]))})"
        return _percent(value) if shown == "share" else _fmt(value, 2)

    return [(name, [cell(c, key, shown) for c in columns]) for key, name, shown in SELECTION_ROWS]


def _eval_rows(dataset: str, evals: list[dict[str, Any] | None]) -> list[tuple[str, list[str]]]:
    """One dataset's rows: accuracy (avg@k: the mean over k samples per problem, when k > 1) with
    its 95 % CI, pass@k when some eval has k > 1, the mean generated length."""
    size = next(e["problems"] for e in evals if e)
    ks = sorted({e["samples"] for e in evals if e})
    mixed = len(ks) > 1  # then each cell says its own k (and a warning says they differ)
    metric = "accuracy" if ks == [1] else f"avg@{ks[0]}" if not mixed else "accuracy / avg@k"
    rows = [(f"eval {metric}, {dataset} ({size} problems, 95 % CI)", [_accuracy(e, mixed) for e in evals])]
    if ks[-1] > 1:
        rows.append((f"  pass@{ks[0]}" if not mixed else "  pass@k", [_pass(e, mixed) for e in evals]))
    rows.append(("  mean generated tokens", [_fmt(e["mean_generated_tokens"], 1) if e else "—" for e in evals]))
    return rows


def _title(diffs: ShownDifferences) -> str:
    return f"differences from {diffs.reference.label} (95 % paired bootstrap over problems)"


def _method(diffs: ShownDifferences) -> str:
    return (f"Δ = column - {diffs.reference.label}, the point estimate on all pairs; in parentheses its 95 % "
            f"percentile interval over {RESAMPLES} paired bootstrap resamples of the problems (seed {SEED}); "
            "n: problems paired. Accuracy in points (avg@k when k > 1).")  # fmt: skip


def _delta(d: Difference | None, digits: int) -> str:
    """+1.23 (-0.40 to +2.90), n=10; — when there is none; empty when not applicable."""
    if d is None:
        return ""
    if d.delta is None:
        return "—"

    def signed(x: float) -> str:
        return f"{round(x, digits) + 0.0:+.{digits}f}"  # + 0.0: no "-0.0"

    span = f"({signed(d.low)} to {signed(d.high)})" if d.low is not None and d.high is not None else "(—)"
    return f"{signed(d.delta)} {span}, n={d.pairs}"


def difference_rows(
    columns: Sequence[ShownColumn], diffs: ShownDifferences
) -> tuple[list[ShownColumn], list[tuple[str, list[str]]]]:
    """The compared columns, and (row name, one cell per column) for the terminal and report.md."""
    shown = [c for c in columns if c.label in diffs.by_column]
    rows = []
    if any(c.run for c in shown):
        rows += [(name, [_delta(diffs.by_column[c.label].get(key), digits) for c in shown])
                 for key, name, digits, _ in RUN_DIFFERENCES]  # fmt: skip
    for dataset in datasets(columns):
        if dataset in diffs.reference.evals and any(dataset in c.evals for c in shown):
            key = accuracy_key(dataset)
            rows.append((accuracy_name(dataset), [_delta(diffs.by_column[c.label].get(key), 1) for c in shown]))
    return shown, rows


def differences_json(diffs: ShownDifferences | None) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Per compared column, per metric: {delta, low, high, pairs} (None: no difference)."""

    def rounded(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    if diffs is None:
        return {}
    return {label: {key: {"delta": rounded(d.delta), "low": rounded(d.low), "high": rounded(d.high), "pairs": d.pairs}
                    for key, d in by_key.items()}
            for label, by_key in diffs.by_column.items()}  # fmt: skip


def to_json(columns: Sequence[ShownColumn], warnings: list[str], diffs: ShownDifferences | None = None) -> str:
    """report.json: the table's numbers unformatted, the differences and how they were drawn, the warnings."""
    numbers = {"columns": [{"label": c.label, "run": c.run, "evals": c.evals} for c in columns],
               "differences": differences_json(diffs),
               "bootstrap": {"reference": diffs.reference.label if diffs else None, "over": "problems, paired",
                             "resamples": RESAMPLES, "seed": SEED, "level": 0.95, "interval": "percentile"},
               "warnings": warnings}  # fmt: skip
    return json.dumps(numbers, indent=2) + "\n"


def to_markdown(columns: Sequence[ShownColumn], warnings: list[str], diffs: ShownDifferences | None = None) -> str:
    rows = table_rows(columns)
    lines = ["| | " + " | ".join(c.label for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name.strip()} | " + " | ".join(cells) + " |" for name, cells in rows]
    sources = [f"- {c.label}: " + ", ".join(([c.run["dir"]] if c.run else []) + [e["dir"] for e in c.evals.values()])
               for c in columns]  # fmt: skip
    text = "# genssd report\n\n" + "\n".join(lines) + "\n\n"
    shown, rows = difference_rows(columns, diffs) if diffs else ([], [])
    if rows:
        lines = ["| | " + " | ".join(c.label for c in shown) + " |", "|---|" + "---:|" * len(shown)]
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
        text += f"## {_title(diffs)}\n\n" + "\n".join(lines) + f"\n\n{_method(diffs)}\n\n"
    text += "From:\n" + "\n".join(sources) + "\n"
    if warnings:
        text += "\nNot comparable as it stands:\n" + "".join(f"- {w}\n" for w in warnings)
    plots = "".join(f"![{name[:-4]}]({name})\n" for name in PLOTS)
    return text + "\n" + plots


def to_rich(columns: Sequence[ShownColumn], warnings: list[str], diffs: ShownDifferences | None = None) -> list[Table]:
    """The report's table, then the differences' (when there are any). Every string is escaped:
    labels and warnings hold folder and dataset names, which rich would read as markup."""
    table = Table(title="genssd report", caption=escape("\n".join(warnings)) or None, caption_style="yellow")
    table.add_column("")
    for c in columns:
        table.add_column(escape(c.label), justify="right")
    for name, cells in table_rows(columns):
        table.add_row(escape(name), *map(escape, cells))
    shown, rows = difference_rows(columns, diffs) if diffs else ([], [])
    if not rows:
        return [table]
    second = Table(title=escape(_title(diffs)), caption=escape(_method(diffs)))
    second.add_column("")
    for c in shown:
        second.add_column(escape(c.label), justify="right")
    for name, cells in rows:
        second.add_row(escape(name), *map(escape, cells))
    return [table, second]


def write_plots(columns: Sequence[ShownColumn], out: Path) -> list[Path]:
    """The distributions behind the means, one PNG each (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [c for c in columns if c.run]
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        write_atomic(out / name, png.getvalue())
        written.append(out / name)

    for name, values, ylabel in (
        ("ppl.png", [c.ppls for c in runs], "student PPL of kept trajectory"),
        ("length.png", [c.lengths for c in runs], "kept trajectory length (tokens)"),
    ):
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(runs), 4))
        present = [(c.label, v) for c, v in zip(runs, values, strict=True) if v]
        if present:
            ax.boxplot([v for _, v in present], showmeans=True)
            ax.set_xticks(range(1, len(present) + 1), [label for label, _ in present])
        ax.set_ylabel(ylabel)
        ax.set_title("box: quartiles, line: median, triangle: mean", fontsize=9)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(runs), 4))
    ax.bar([c.label for c in runs], [c.run["teacher_tokens_per_kept_token"] or 0 for c in runs], color="tab:orange")
    ax.set_ylabel("teacher tokens generated per kept token")
    save(fig, "teacher_tokens.png")

    names = datasets(columns)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * max(1, len(columns)), 4))
    width = 0.8 / max(1, len(names))
    for k, dataset in enumerate(names):
        at = [(i, c.evals[dataset]) for i, c in enumerate(columns)
              if c.evals.get(dataset, {}).get("accuracy") is not None]
        acc = [100 * e["accuracy"] for _, e in at]
        ci = [e["ci95"] or [e["accuracy"]] * 2 for _, e in at]
        below = [a - 100 * lo for a, (lo, _) in zip(acc, ci, strict=True)]
        above = [100 * hi - a for a, (_, hi) in zip(acc, ci, strict=True)]
        ax.bar([i + (k - (len(names) - 1) / 2) * width for i, _ in at], acc, width, yerr=[below, above],
               capsize=4, label=dataset)  # fmt: skip
    ax.set_xticks(range(len(columns)), [c.label for c in columns])
    ax.set_ylim(0, 100)
    if names:
        ax.legend()
    save(fig, "accuracy.png")
    return written
