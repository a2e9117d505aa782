"""`genssd report`: runs (and the evals of what was trained on them) side by side.

Everything is read back from what the commands wrote: a run's trajectories.jsonl (the kept
trajectories, each scored whole by the run's student), its summary.json (teacher requests and
tokens, wall time, cost when known) and config.yaml (method, student); an eval's metrics.json and
eval.json. Output: a rich table, report.md, report.json (the same numbers, for scripts) and PNG
plots. A pipeline directory stands for its method runs and evals. Evals of the base student and of
the cold start (the student every method starts from) get columns of their own: the references.

A second table gives each column's difference from the genssd run (else the first run) with a 95 %
interval, by a paired bootstrap over problems (stats.py): eval accuracy per dataset over the eval
problems both evals answered (samples.jsonl), the kept trajectories' student PPL and length over
the training problems both runs kept rows of (trajectories.jsonl), and teacher tokens paid per kept
token over the problems both runs asked the teacher (the `response` events of events.jsonl).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.eval_dir import METRICS, SAMPLES, SETTINGS, read_eval_settings
from genssd_cli.records import Response, TrajectoryRow, parse_jsonl, read_rows, read_summary
from genssd_cli.stats import MIN_PAIRS, RESAMPLES, SEED, Difference, paired_bootstrap, ratio_difference
from genssd_cli.stats import mean as mean_difference
from genssd_cli.store import CONFIG, SUMMARY, TRAJECTORIES, read_events

PIPELINE = "pipeline.json"
PLOTS = ("ppl.png", "length.png", "teacher_tokens.png", "accuracy.png")
# Eval settings that make accuracies of one dataset not comparable when they differ (eval.json).
EVAL_SETTINGS = {"samples": "samples per problem", "max_new_tokens": "max_new_tokens", "temperature": "temperature",
                 "top_p": "top_p"}  # fmt: skip


@dataclass
class Column:
    """One column of the table: a run, with the evals of the student trained on it; or evals
    alone (the base student, the cold start, or an adapter whose run is not in the report)."""

    label: str
    run: dict[str, Any] | None = None
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # by eval dataset
    ppls: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    alone: bool = False  # evals whose run is not in the report: no differences
    # Per problem id, for the paired differences: the mean over its kept rows ("student_ppl",
    # "length_tokens"); (teacher completion tokens paid, kept tokens); per eval dataset, the share
    # of its samples answered right.
    kept: dict[str, dict[str, float]] = field(default_factory=dict)
    teacher: dict[str, tuple[int, int]] = field(default_factory=dict)
    correct: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_run(run_dir: Path) -> Column:
    """A run's numbers, the per-trajectory PPLs and lengths for the plots, and its per-problem
    numbers for the differences."""
    import yaml

    for name in (TRAJECTORIES, SUMMARY, CONFIG):
        if not (run_dir / name).is_file():
            raise UsageError(f"{run_dir} has no {name}: not a genssd run directory, or no session ended")
    rows = read_rows(run_dir / TRAJECTORIES, TrajectoryRow, "run `genssd run` on it again to rewrite it")
    summary = read_summary(run_dir / SUMMARY)
    try:
        config = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8"))
        method, student = config["method"], config["student"]
    except (ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        raise RuntimeFailure(f"{run_dir}: unreadable run files; run `genssd run` on it again to rewrite them") from None
    ppls = [r.student_ppl for r in rows if r.student_ppl is not None and math.isfinite(r.student_ppl)]
    lengths = [r.completion_tokens for r in rows]
    correct = sum(r.correct for r in rows)
    teacher, counts = summary.teacher, summary.trajectories
    kept, kept_tokens = len(rows), sum(lengths)
    generated = teacher.completion_tokens
    info = {
        "dir": str(run_dir),
        "method": method,
        "student": {"model": student.get("model"), "adapter": student.get("adapter")},
        "problems": summary.problems,
        "problems_sha256": summary.problems_sha256,
        "kept": kept,
        "correct": correct,
        "pruned": counts.pruned,
        "failed": counts.failed,
        "pending": counts.pending,
        "truncated": counts.truncated,
        "student_ppl": _centre(ppls),
        "length_tokens": _centre(lengths),
        "teacher_tokens": generated,
        "teacher_tokens_per_kept": round(generated / kept, 2) if kept else None,
        "teacher_tokens_per_kept_token": round(generated / kept_tokens, 3) if kept_tokens else None,
        "requests": teacher.requests,
        "cost": teacher.cost,
        "wall_s": summary.wall_s,
    }
    column = Column(method, info, {}, ppls, lengths)
    column.kept = {"student_ppl": _by_problem(rows, "student_ppl"),
                   "length_tokens": _by_problem(rows, "completion_tokens")}  # fmt: skip
    try:
        events = read_events(run_dir)
    except UsageError:  # a log of another format version: the rest of the report stands
        events = []
        column.notes.append(f"{run_dir}: events.jsonl is of another log format: no per-problem teacher tokens")
    paid: dict[str, int] = {}
    for event in events:
        if isinstance(event, Response):
            paid[event.problem_id] = paid.get(event.problem_id, 0) + event.completion_tokens
    kept_of: dict[str, int] = {}
    for row in rows:
        kept_of[row.problem_id] = kept_of.get(row.problem_id, 0) + row.completion_tokens
    # Every problem the teacher was asked about: pruned ones paid too (and kept 0 tokens).
    column.teacher = {p: (paid.get(p, 0), kept_of.get(p, 0)) for p in paid.keys() | kept_of.keys()}
    return column


def _by_problem(rows: list[TrajectoryRow], key: str) -> dict[str, float]:
    """Per problem id, the mean of a row field over its rows (finite values only)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        value = getattr(row, key)
        if value is not None and math.isfinite(value):
            values.setdefault(row.problem_id, []).append(value)
    return {p: statistics.fmean(v) for p, v in values.items()}


def read_eval(eval_dir: Path) -> dict[str, Any]:
    """An eval's numbers (accuracy is avg@k when samples > 1; pass_at_k then holds pass@1 and
    pass@k) and the settings that decide whether two evals of a dataset are comparable. (The
    per-problem correctness is `read_correct`'s.)"""
    for name in (METRICS, SETTINGS):
        if not (eval_dir / name).is_file():
            raise UsageError(f"{eval_dir} has no {name}: not a genssd eval directory, or the eval never finished")
    settings = read_eval_settings(eval_dir)
    try:
        metrics = json.loads((eval_dir / METRICS).read_text(encoding="utf-8"))
        return {"dir": str(eval_dir), "dataset": settings["dataset"], "adapter": settings["adapter"],
                **{k: metrics[k] for k in ("accuracy", "ci95", "problems", "mean_generated_tokens")},
                "samples": int(metrics.get("samples_per_problem", settings.get("samples", 1))),
                "pass_at_k": metrics.get("pass_at_k"),
                **{k: settings.get(k) for k in EVAL_SETTINGS if k != "samples"}}  # fmt: skip
    except (ValueError, KeyError, TypeError):
        raise RuntimeFailure(f"{eval_dir}: unreadable eval files; run `genssd eval` on it again") from None


def read_correct(eval_dir: Path) -> dict[str, float]:
    """Per problem id, the share of its samples answered right (samples.jsonl; none: empty)."""
    path = eval_dir / SAMPLES
    try:
        done = {(row["problem_id"], row["sample"]): bool(row["correct"])
                for row in parse_jsonl(path, "run `genssd eval` on it again")}  # fmt: skip
    except (KeyError, TypeError):
        raise RuntimeFailure(f"{path}: not a genssd eval samples file; run `genssd eval` on it again") from None
    per_problem: dict[str, list[bool]] = {}
    for (problem_id, _), correct in done.items():
        per_problem.setdefault(str(problem_id), []).append(correct)
    return {p: sum(c) / len(c) for p, c in per_problem.items()}


def _centre(values: list[float] | list[int]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None}
    return {"mean": round(statistics.fmean(values), 3), "median": round(float(statistics.median(values)), 3)}


def expand(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Run directories and eval directories; a pipeline directory gives its method runs (not the
    cold start's, which is every method's starting point) and all its evals, the cold start's too."""
    runs: list[Path] = []
    evals: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UsageError(f"not a directory: {path}")
        if (path / PIPELINE).is_file():
            try:
                stages = json.loads((path / PIPELINE).read_text(encoding="utf-8"))["stages"]
            except (ValueError, KeyError, TypeError):
                raise RuntimeFailure(f"{path / PIPELINE} is unreadable; run `genssd pipeline` again") from None
            runs += [path / s for s in stages if s.endswith("/run") and not s.startswith("cold-start/")]
            evals += [path / s for s in stages if _is_eval_stage(s)]
        elif (path / METRICS).is_file():
            raise UsageError(f"{path} is an eval directory: pass it with --eval")
        else:
            runs.append(path)
    return runs, evals


def _is_eval_stage(stage: str) -> bool:
    """METHOD/eval, or METHOD/eval-DATASET when the pipeline has several eval datasets."""
    kind = stage.rpartition("/")[2]
    return kind == "eval" or kind.startswith("eval-")


def _trained_on(eval_info: dict[str, Any], run_dirs: list[Path]) -> Path | None:
    """The run whose trajectories trained the evaluated adapter: the pipeline's layout
    (METHOD/run beside METHOD/eval), else the training manifest next to the adapter."""
    eval_dir = Path(eval_info["dir"]).resolve()
    for run_dir in run_dirs:
        if run_dir.resolve().parent == eval_dir.parent and eval_info["adapter"]:
            return run_dir
    if not eval_info["adapter"]:
        return None
    try:
        manifest = json.loads((Path(eval_info["adapter"]).parent / "manifest.json").read_text(encoding="utf-8"))
        sources = [Path(r["dir"]).resolve() for r in manifest["runs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(sources) != 1:
        return None  # trained on several runs: it belongs to none of them alone
    return next((r for r in run_dirs if r.resolve() == sources[0]), None)


def build_columns(run_dirs: list[Path], eval_dirs: list[Path]) -> tuple[list[Column], list[str]]:
    columns: dict[Path, Column] = {}
    labels: list[str] = []
    for run_dir in run_dirs:
        column = read_run(run_dir)
        if column.label in labels:  # the same method twice: tell them apart by directory
            column.label = f"{column.label} ({run_dir})"
        labels.append(column.label)
        columns[run_dir] = column
    base, cold = Column("base student"), Column("cold start")
    scorers = {Path(c.run["student"]["adapter"]).resolve() for c in columns.values() if c.run["student"]["adapter"]}
    alone: list[Column] = []
    for eval_dir in eval_dirs:
        info = read_eval(eval_dir)
        owner = _trained_on(info, run_dirs)
        if info["adapter"] is None:
            home: Column | None = base
        elif owner is not None:
            home = columns[owner]
        else:
            home = cold if _is_cold_start(info, scorers) else None
        correct = read_correct(eval_dir)
        if home is None or info["dataset"] in home.evals:
            alone.append(Column(f"eval {eval_dir}", evals={info["dataset"]: info}, alone=True,
                                correct={info["dataset"]: correct}))  # fmt: skip
        else:
            home.evals[info["dataset"]] = info
            home.correct[info["dataset"]] = correct
    ordered = [c for c in (base, cold) if c.evals] + list(columns.values()) + alone
    return ordered, _warnings(ordered)


def _is_cold_start(eval_info: dict[str, Any], scorers: set[Path]) -> bool:
    """An eval of the student every method started from: of the adapter that scored the runs (in
    a pipeline, the cold start's), or in a pipeline's cold-start/ directory."""
    adapter = Path(eval_info["adapter"]).resolve()
    return adapter in scorers or Path(eval_info["dir"]).parent.name == "cold-start"


def _warnings(columns: list[Column]) -> list[str]:
    """What makes the columns not comparable, said once in the table's caption."""
    runs = [c.run for c in columns if c.run]
    notes = [note for c in columns for note in c.notes]
    if len({json.dumps(r["student"], sort_keys=True) for r in runs}) > 1:
        notes.append("the runs were scored by different students: their PPLs are not comparable")
    if len({r["problems"] for r in runs}) > 1 or len({r["problems_sha256"] for r in runs}) > 1:
        notes.append("the runs are not of the same problems")
    for r in runs:
        if r["pending"] or r["failed"]:
            notes.append(f"{r['dir']}: {r['pending']} pending and {r['failed']} failed trajectories (not finished)")
    for dataset in _datasets(columns):
        evals = [c.evals[dataset] for c in columns if dataset in c.evals]
        if len({e["problems"] for e in evals}) > 1:
            notes.append(f"the {dataset} evals differ in number of problems")
        differ = [f"{label} ({', '.join(_distinct(evals, key))})" for key, label in EVAL_SETTINGS.items()
                  if len(_distinct(evals, key)) > 1]  # fmt: skip
        if differ:
            notes.append(f"the {dataset} evals differ in {', '.join(differ)}: their accuracies are not comparable")
    return notes


def _distinct(evals: list[dict[str, Any]], key: str) -> list[str]:
    """The values one setting takes across evals, in order of appearance (unknown: ?); compared
    as values, so 0 and 0.0 are one."""
    return ["?" if v is None else str(v) for v in dict.fromkeys(e.get(key) for e in evals)]


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


def _datasets(columns: list[Column]) -> list[str]:
    return list(dict.fromkeys(dataset for c in columns for dataset in c.evals))


def table_rows(columns: list[Column]) -> list[tuple[str, list[str]]]:
    """(metric, one cell per column): the same rows for the terminal and report.md."""

    def run(key: str, digits: int = 2) -> list[str]:
        return [_fmt(c.run[key], digits) if c.run else "" for c in columns]

    rows = [
        ("trajectories kept", run("kept")),
        ("  correct", run("correct")),
        ("  pruned", run("pruned")),
        ("student PPL of kept (mean / median)", [_pair(c.run["student_ppl"], 3) if c.run else "" for c in columns]),
        ("length in tokens (mean / median)", [_pair(c.run["length_tokens"], 1) if c.run else "" for c in columns]),
        ("teacher tokens generated", run("teacher_tokens")),
        ("  per kept trajectory", run("teacher_tokens_per_kept", 1)),
        ("  per kept token", run("teacher_tokens_per_kept_token", 2)),
        ("teacher requests", run("requests")),
        ("cost", run("cost", 4)),
        ("wall time (s)", run("wall_s", 1)),
    ]
    for dataset in _datasets(columns):
        rows += _eval_rows(dataset, [c.evals.get(dataset) for c in columns])
    return rows


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


# The differences' run rows: report.json key, row name, digits shown, what makes a pair.
RUN_DIFFERENCES = (
    ("student_ppl", "Δ student PPL of kept (mean)", 3, "problems both runs kept a scored trajectory of"),
    ("length_tokens", "Δ length in tokens (mean)", 1, "problems both runs kept a trajectory of"),
    ("teacher_tokens_per_kept_token", "Δ teacher tokens per kept token", 2, "problems both runs asked the teacher"),
)


@dataclass
class Differences:
    """Each compared column's differences from the reference column, by report.json key."""

    reference: Column
    by_column: dict[str, dict[str, Difference]]

    @property
    def title(self) -> str:
        return f"differences from {self.reference.label} (95 % paired bootstrap over problems)"

    @property
    def method(self) -> str:
        return (f"Δ = column - {self.reference.label}, the point estimate on all pairs; in parentheses its 95 % "
                f"percentile interval over {RESAMPLES} paired bootstrap resamples of the problems (seed {SEED}); "
                "n: problems paired. Accuracy in points (avg@k when k > 1).")  # fmt: skip


def _accuracy_key(dataset: str) -> str:
    return f"accuracy:{dataset}"


def _accuracy_name(dataset: str) -> str:
    return f"Δ eval accuracy, {dataset} (points)"


def differences(columns: list[Column]) -> tuple[Differences | None, list[str]]:
    """Each run column's differences from the genssd run (else the first run), and the base and
    cold start's in accuracy; the warnings say why a difference could not be given."""
    runs = [c for c in columns if c.run]
    if not runs:
        return None, []
    ref = next((c for c in runs if c.run["method"] == "genssd"), runs[0])
    compared = [c for c in columns if c is not ref and not c.alone]
    notes = [f"{ref.label} has no {dataset} eval: no accuracy differences for {dataset}"
             for dataset in _datasets(compared) if dataset not in ref.evals]  # fmt: skip
    by_column: dict[str, dict[str, Difference]] = {}
    for c in compared:
        diffs: dict[str, tuple[Difference, str, str]] = {}  # key: (difference, row name, what a pair is)
        if c.run:
            for key, name, _, what in RUN_DIFFERENCES[:2]:
                diffs[key] = (_mean_difference(ref.kept[key], c.kept[key]), name, what)
            pairs = sorted(ref.teacher.keys() & c.teacher.keys())
            units = [(*ref.teacher[p], *c.teacher[p]) for p in pairs]
            key, name, _, what = RUN_DIFFERENCES[2]
            diffs[key] = (paired_bootstrap(units, ratio_difference), name, what)
        for dataset in c.evals:
            if dataset in ref.evals:
                d = _mean_difference(ref.correct[dataset], c.correct[dataset], scale=100.0)
                diffs[_accuracy_key(dataset)] = (d, _accuracy_name(dataset), "eval problems both evals answered")
        by_column[c.label] = {key: d for key, (d, _, _) in diffs.items()}
        notes += [f"{c.label} - {ref.label}, {name.removeprefix('Δ ')}: {why}"
                  for d, name, what in diffs.values() if (why := _why(d, what))]  # fmt: skip
    return Differences(ref, by_column), notes


def _mean_difference(ref: dict[str, float], other: dict[str, float], scale: float = 1.0) -> Difference:
    """Paired over the problems both have, in problem id order: the mean of other - ref."""
    return paired_bootstrap([scale * (other[p] - ref[p]) for p in sorted(ref.keys() & other.keys())], mean_difference)


def _why(d: Difference, what: str) -> str | None:
    if d.pairs < MIN_PAIRS:
        return f"{d.pairs} {what} (a paired difference needs {MIN_PAIRS}): —"
    if d.delta is None:
        return f"a run kept no tokens of the {d.pairs} {what}: —"
    if d.undefined:
        return f"{d.undefined} of {RESAMPLES} resamples kept no tokens of one run and were left out of the interval"
    return None


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


def difference_rows(columns: list[Column], diffs: Differences) -> tuple[list[Column], list[tuple[str, list[str]]]]:
    """The compared columns, and (row name, one cell per column) for the terminal and report.md."""
    shown = [c for c in columns if c.label in diffs.by_column]
    rows = []
    if any(c.run for c in shown):
        rows += [(name, [_delta(diffs.by_column[c.label].get(key), digits) for c in shown])
                 for key, name, digits, _ in RUN_DIFFERENCES]  # fmt: skip
    for dataset in _datasets(columns):
        if dataset in diffs.reference.evals and any(dataset in c.evals for c in shown):
            key = _accuracy_key(dataset)
            rows.append((_accuracy_name(dataset), [_delta(diffs.by_column[c.label].get(key), 1) for c in shown]))
    return shown, rows


def differences_json(diffs: Differences | None) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Per compared column, per metric: {delta, low, high, pairs} (None: no difference)."""

    def rounded(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    if diffs is None:
        return {}
    return {label: {key: {"delta": rounded(d.delta), "low": rounded(d.low), "high": rounded(d.high), "pairs": d.pairs}
                    for key, d in by_key.items()}
            for label, by_key in diffs.by_column.items()}  # fmt: skip


def to_markdown(columns: list[Column], warnings: list[str], diffs: Differences | None = None) -> str:
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
        text += f"## {diffs.title}\n\n" + "\n".join(lines) + f"\n\n{diffs.method}\n\n"
    text += "From:\n" + "\n".join(sources) + "\n"
    if warnings:
        text += "\nNot comparable as it stands:\n" + "".join(f"- {w}\n" for w in warnings)
    plots = "".join(f"![{name[:-4]}]({name})\n" for name in PLOTS)
    return text + "\n" + plots


def to_rich(columns: list[Column], warnings: list[str], diffs: Differences | None = None) -> list[Table]:
    """The report's table, then the differences' (when there are any)."""
    table = Table(title="genssd report", caption="\n".join(warnings) or None, caption_style="yellow")
    table.add_column("")
    for c in columns:
        table.add_column(c.label, justify="right")
    for name, cells in table_rows(columns):
        table.add_row(name, *cells)
    shown, rows = difference_rows(columns, diffs) if diffs else ([], [])
    if not rows:
        return [table]
    second = Table(title=diffs.title, caption=diffs.method)
    second.add_column("")
    for c in shown:
        second.add_column(c.label, justify="right")
    for name, cells in rows:
        second.add_row(name, *cells)
    return [table, second]


def write_plots(columns: list[Column], out: Path) -> list[Path]:
    """The distributions behind the means, one PNG each (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [c for c in columns if c.run]
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
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

    datasets = _datasets(columns)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * max(1, len(columns)), 4))
    width = 0.8 / max(1, len(datasets))
    for k, dataset in enumerate(datasets):
        at = [(i, c.evals[dataset]) for i, c in enumerate(columns)
              if c.evals.get(dataset, {}).get("accuracy") is not None]
        acc = [100 * e["accuracy"] for _, e in at]
        ci = [e["ci95"] or [e["accuracy"]] * 2 for _, e in at]
        below = [a - 100 * lo for a, (lo, _) in zip(acc, ci, strict=True)]
        above = [100 * hi - a for a, (_, hi) in zip(acc, ci, strict=True)]
        ax.bar([i + (k - (len(datasets) - 1) / 2) * width for i, _ in at], acc, width, yerr=[below, above],
               capsize=4, label=dataset)  # fmt: skip
    ax.set_xticks(range(len(columns)), [c.label for c in columns])
    ax.set_ylim(0, 100)
    if datasets:
        ax.legend()
    save(fig, "accuracy.png")
    return written


def report_command(paths: list[Path], eval_dirs: list[Path], out: Path | None, console: Console) -> dict[str, Any]:
    run_dirs, found_evals = expand(paths)
    for eval_dir in eval_dirs:
        if not eval_dir.is_dir():
            raise UsageError(f"--eval: not a directory: {eval_dir}")
    if not run_dirs and not eval_dirs:
        raise UsageError("nothing to report: give run directories, a pipeline directory or --eval directories")
    columns, warnings = build_columns(run_dirs, found_evals + eval_dirs)
    diffs, notes = differences(columns)
    warnings += notes
    if out is None:
        out = paths[0] / "report" if len(paths) == 1 and (paths[0] / PIPELINE).is_file() else Path("runs") / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(to_markdown(columns, warnings, diffs), encoding="utf-8")
        numbers = {"columns": [{"label": c.label, "run": c.run, "evals": c.evals} for c in columns],
                   "differences": differences_json(diffs),
                   "bootstrap": {"reference": diffs.reference.label if diffs else None, "over": "problems, paired",
                                 "resamples": RESAMPLES, "seed": SEED, "level": 0.95, "interval": "percentile"},
                   "warnings": warnings}  # fmt: skip
        (out / "report.json").write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
        plots = write_plots(columns, out)
    except OSError as exc:
        raise UsageError(f"cannot write to {out}: {exc.strerror}") from None
    for table in to_rich(columns, warnings, diffs):
        console.print(table)
    return {"out": str(out), "columns": len(columns), "plots": [str(p) for p in plots]}
