"""`genssd report`: runs (and the evals of what was trained on them) side by side.

Everything is read back from what the commands wrote: a run's trajectories.jsonl (the kept
trajectories, each scored whole by the run's student), its summary.json (teacher requests and
tokens, wall time, cost when known) and config.yaml (method, student); an eval's metrics.json and
eval.json. Output: a rich table, report.md, report.json (the same numbers, for scripts) and PNG
plots. A pipeline directory stands for its method runs and evals. Evals of the base student and of
the cold start (the student every method starts from) get columns of their own: the references.
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
from genssd_cli.eval_dir import METRICS, SETTINGS, read_eval_settings
from genssd_cli.records import TrajectoryRow, read_rows, read_summary
from genssd_cli.store import CONFIG, SUMMARY, TRAJECTORIES

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


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[float], list[int]]:
    """A run's numbers, and the per-trajectory PPLs and lengths for the plots."""
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
    return {
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
    }, ppls, lengths


def read_eval(eval_dir: Path) -> dict[str, Any]:
    """An eval's numbers (accuracy is avg@k when samples > 1; pass_at_k then holds pass@1 and
    pass@k) and the settings that decide whether two evals of a dataset are comparable."""
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
        run, ppls, lengths = read_run(run_dir)
        label = run["method"]
        if label in labels:  # the same method twice: tell them apart by directory
            label = f"{run['method']} ({run_dir})"
        labels.append(label)
        columns[run_dir] = Column(label, run, {}, ppls, lengths)
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
        if home is None or info["dataset"] in home.evals:
            alone.append(Column(f"eval {eval_dir}", evals={info["dataset"]: info}))
        else:
            home.evals[info["dataset"]] = info
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
    notes = []
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


def to_markdown(columns: list[Column], warnings: list[str]) -> str:
    rows = table_rows(columns)
    lines = ["| | " + " | ".join(c.label for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name.strip()} | " + " | ".join(cells) + " |" for name, cells in rows]
    sources = [f"- {c.label}: " + ", ".join(([c.run["dir"]] if c.run else []) + [e["dir"] for e in c.evals.values()])
               for c in columns]  # fmt: skip
    text = "# genssd report\n\n" + "\n".join(lines) + "\n\nFrom:\n" + "\n".join(sources) + "\n"
    if warnings:
        text += "\nNot comparable as it stands:\n" + "".join(f"- {w}\n" for w in warnings)
    plots = "".join(f"![{name[:-4]}]({name})\n" for name in PLOTS)
    return text + "\n" + plots


def to_rich(columns: list[Column], warnings: list[str]) -> Table:
    table = Table(title="genssd report", caption="\n".join(warnings) or None, caption_style="yellow")
    table.add_column("")
    for c in columns:
        table.add_column(c.label, justify="right")
    for name, cells in table_rows(columns):
        table.add_row(name, *cells)
    return table


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
    if out is None:
        out = paths[0] / "report" if len(paths) == 1 and (paths[0] / PIPELINE).is_file() else Path("runs") / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(to_markdown(columns, warnings), encoding="utf-8")
        numbers = {"columns": [{"label": c.label, "run": c.run, "evals": c.evals} for c in columns],
                   "warnings": warnings}  # fmt: skip
        (out / "report.json").write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
        plots = write_plots(columns, out)
    except OSError as exc:
        raise UsageError(f"cannot write to {out}: {exc.strerror}") from None
    console.print(to_rich(columns, warnings))
    return {"out": str(out), "columns": len(columns), "plots": [str(p) for p in plots]}
