"""`genssd report`: runs (and the evals of what was trained on them) side by side. This module
reads them into columns and works out their numbers, the warnings that say what is not comparable
and the differences; report/view.py shows them (the rich tables, report.md, report.json and PNG
plots), given them as data by `report_command`.

Everything is read back from what the commands wrote: a run's trajectories.jsonl (the kept
trajectories, each scored whole by the run's student), its summary.json (teacher requests and
tokens, wall time, cost when known) and config.yaml (method, student); an eval's metrics.json and
eval.json. A pipeline directory stands for its method runs and evals. Evals of the base student and
of the cold start (the student every method starts from) get columns of their own: the references.

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

from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.eval.outdir import METRICS, SAMPLES, SETTINGS, read_eval_settings
from genssd_cli.files import locked_out_dir, parse_jsonl, write_atomic
from genssd_cli.report.view import (
    RUN_DIFFERENCES,
    accuracy_key,
    accuracy_name,
    datasets,
    to_json,
    to_markdown,
    to_rich,
    write_plots,
)
from genssd_cli.rundir.layout import CONFIG, SUMMARY, open_finished, read_summary
from genssd_cli.rundir.log import iter_log
from genssd_cli.rundir.records import Response, TrajectoryRow
from genssd_cli.rundir.replay import RunLog
from genssd_cli.shards.plan import log_paths
from genssd_cli.stats import MIN_PAIRS, RESAMPLES, Difference, paired_bootstrap, ratio_difference
from genssd_cli.stats import mean as mean_difference

PIPELINE = "pipeline.json"
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

    run = open_finished(run_dir, needs=(SUMMARY, CONFIG))
    rows, summary = run.rows, read_summary(run_dir / SUMMARY)
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
        # Token figures built on bills split evenly (or not counted): marked ≈ in the table.
        "approximate_tokens": teacher.approximate_tokens,
        "teacher_tokens_per_kept": round(generated / kept, 2) if kept else None,
        "teacher_tokens_per_kept_token": round(generated / kept_tokens, 3) if kept_tokens else None,
        "requests": teacher.requests,
        "cost": teacher.cost,
        "wall_s": summary.wall_s,
        "shards": summary.shards,
        "selection": summary.selection.model_dump(mode="json") if summary.selection else None,
    }
    column = Column(method, info, {}, ppls, lengths)
    column.kept = {"student_ppl": _by_problem(rows, "student_ppl"),
                   "length_tokens": _by_problem(rows, "completion_tokens")}  # fmt: skip
    paid: dict[str, int] = {}
    # A summary written before the selection diagnostics: they are worked out from the log here.
    diagnose = RunLog() if summary.selection is None else None
    try:
        for event in (e for log in log_paths(run_dir) for e in iter_log(log)):  # streamed; a sharded run's: all
            if isinstance(event, Response):
                paid[event.problem_id] = paid.get(event.problem_id, 0) + event.completion_tokens
            if diagnose is not None:
                diagnose.add(event)
    except UsageError:  # a log of another format version: the rest of the report stands
        paid, diagnose = {}, None
        column.notes.append(f"{run_dir}: events.jsonl is of another log format: no per-problem teacher tokens")
    if diagnose is not None:
        selection = diagnose.selection.stats(summary.problems, None, diagnose.completion_tokens, diagnose.correct)
        info["selection"] = selection.model_dump(mode="json")
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
        if r["shards"] > 1:
            notes.append(f"{r['dir']}: its wall time sums its {r['shards']} shards', which ran side by side")
        if r["pending"] or r["failed"]:
            notes.append(f"{r['dir']}: {r['pending']} pending and {r['failed']} failed trajectories (not finished)")
        if r.get("approximate_tokens"):
            notes.append(f"{r['dir']}: ≈ token counts are approximate (its teacher's bills were split evenly "
                         "among choices, or missing: see summary.json's teacher.token_sources)")  # fmt: skip
    for dataset in datasets(columns):
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


@dataclass
class Differences:
    """Each compared column's differences from the reference column, by report.json key."""

    reference: Column
    by_column: dict[str, dict[str, Difference]]


def differences(columns: list[Column]) -> tuple[Differences | None, list[str]]:
    """Each run column's differences from the genssd run (else the first run), and the base and
    cold start's in accuracy; the warnings say why a difference could not be given."""
    runs = [c for c in columns if c.run]
    if not runs:
        return None, []
    ref = next((c for c in runs if c.run["method"] == "genssd"), runs[0])
    compared = [c for c in columns if c is not ref and not c.alone]
    notes = [f"{ref.label} has no {dataset} eval: no accuracy differences for {dataset}"
             for dataset in datasets(compared) if dataset not in ref.evals]  # fmt: skip
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
                diffs[accuracy_key(dataset)] = (d, accuracy_name(dataset), "eval problems both evals answered")
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
    with locked_out_dir(out):  # two reports into one folder would mix their files
        write_atomic(out / "report.md", to_markdown(columns, warnings, diffs))
        write_atomic(out / "report.json", to_json(columns, warnings, diffs))
        plots = write_plots(columns, out)
    for table in to_rich(columns, warnings, diffs):
        console.print(table)
    return {"out": str(out), "columns": len(columns), "plots": [str(p) for p in plots]}
