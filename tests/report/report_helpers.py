"""What the report tests share (imported as `report_helpers`: pytest puts this folder on sys.path
for the test files in it). No tests here.

RECORDED, tests/data/compare-recorded/, the fixed runs the report tests read: a small `genssd pipeline
configs/compare-demo.yaml` (the embedded demo: Gemma-3-270M teacher, SmolLM2-135M student, one-step
arithmetic problems): 10 training problems per method (morsd left out), the evals on 40 held-out
problems, made with

    genssd pipeline configs/compare-demo.yaml --out /tmp/fx --set limit=10 \
        --set 'methods=[genssd, standard-kd, posthoc-ppl]' --set eval.dataset=arith1-heldout --set eval.limit=40

(97 minutes on 2 CPU cores shared with other test runs, 54 of them the base student's eval) and
then trimmed to what `genssd report` reads: cold-start/run, cold-start/train, every METHOD/train
(adapters, checkpoints) and report/ left out, and of each run directory only events.jsonl,
trajectories.jsonl, failures.jsonl, summary.json and config.yaml kept. The eval dataset is the demo
generator's held-out problems, where every student answers some right and no two as many (GSM8K is
left out: the 135M student answers none, and 0 == 0 checks nothing). The expected numbers are
recomputed here from the raw records (events.jsonl, samples.jsonl), not from the summary.json and
metrics.json the report reads.

The paired bootstrap and the per-problem values are written here again from their definitions,
sharing no code with genssd_cli/report/ or genssd_cli/stats.py."""

import io
import json
import math
import random
import shutil
import statistics
from pathlib import Path

import pytest

RECORDED = Path(__file__).resolve().parent.parent / "data" / "compare-recorded"
METHODS = ("genssd", "standard-kd", "posthoc-ppl")
DATASET = "arith1-heldout"  # the recorded evals' one dataset
# The pipeline's directories with an eval, and their columns in the report, in its order.
COLUMNS = {"base": "base student", "cold-start": "cold start", **{m: m for m in METHODS}}
COLD_ADAPTER = "/tmp/fx/cold-start/train/adapter"  # what the recorded runs were scored by
COUNTS = ("kept", "correct", "pruned", "truncated", "failed", "pending")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def kept_rows(events: list[dict]) -> list[dict]:
    """The rows of the trajectories that ended with one (finished or truncated), from the log."""
    return [row for e in events if e["type"] == "finish" for row in (e["row"], *e.get("more", []))]


def expected_run(run_dir: Path) -> dict:
    events = jsonl(run_dir / "events.jsonl")
    rows = kept_rows(events)
    responses = [e for e in events if e["type"] == "response"]
    ppls = [r["student_ppl"] for r in rows if r["student_ppl"] is not None]
    lengths = [r["completion_tokens"] for r in rows]
    generated = sum(e["completion_tokens"] for e in responses)
    # Every trajectory of the run (problems times samples) ended (finish, prune), failed (an error and
    # no end after it) or is pending (neither: the run stopped before it ended).
    ended = {(e["problem_id"], e["sample"]) for e in events if e["type"] in ("finish", "prune")}
    failed = {(e["problem_id"], e["sample"]) for e in events if e["type"] == "error"} - ended
    start = [e for e in events if e["type"] == "run_start"][-1]
    wanted = start["problems"] * start["settings"]["search.samples"]
    return {
        "problems": start["problems"],
        "kept": len(rows),
        "correct": sum(r["correct"] for r in rows),
        "pruned": sum(e["type"] == "prune" for e in events),
        "truncated": sum(r["finish"] == "truncated" for r in rows),
        "failed": len(failed),
        "pending": wanted - len(ended) - len(failed),
        "ppl": (statistics.fmean(ppls), statistics.median(ppls)),
        "length": (statistics.fmean(lengths), statistics.median(lengths)),
        "teacher_tokens": generated,
        "per_kept_token": generated / sum(lengths),
        "requests": len(responses),
    }


def correct_by_problem(eval_dir: Path) -> dict[str, float]:
    """From samples.jsonl alone: per problem, the share of its samples answered right."""
    right: dict[str, list[bool]] = {}
    for sample in jsonl(eval_dir / "samples.jsonl"):
        right.setdefault(sample["problem_id"], []).append(sample["correct"])
    return {p: sum(oks) / len(oks) for p, oks in right.items()}


def expected_accuracy(eval_dir: Path) -> float:
    samples = jsonl(eval_dir / "samples.jsonl")
    return sum(s["correct"] for s in samples) / len(samples)


EVAL_PROBLEMS = len(correct_by_problem(RECORDED / "base/eval"))


def copy_recorded(tmp_path: Path) -> Path:
    """A copy of RECORDED that a test may edit."""
    copy = tmp_path / "compare"
    shutil.copytree(RECORDED, copy)
    return copy


# The paired bootstrap, written here from its definition (docs/commands.md, genssd_cli/stats.py):
# units one per problem in problem id order; resample b = 1..2000 draws n units with replacement,
# unit floor(u * n) for n successive u = rng.random() of one random.Random(0); the 95 % interval is
# the 2.5 and 97.5 % quantiles of the resampled statistics (linear interpolation at q * (m - 1));
# resamples where the statistic is undefined are left out.
def bootstrap(units: list, statistic, resamples: int = 2000) -> tuple[float, float, float, int]:
    """(point estimate, low, high, resamples left out)."""
    rng = random.Random(0)
    n = len(units)
    values = []
    for _ in range(resamples):
        resample = []
        for _ in range(n):
            resample.append(units[math.floor(rng.random() * n)])
        value = statistic(resample)
        if value is not None:
            values.append(value)
    values.sort()

    def quantile(q: float) -> float:
        position = q * (len(values) - 1)
        below = math.floor(position)
        above = min(below + 1, len(values) - 1)
        return values[below] + (position - below) * (values[above] - values[below])

    return statistic(units), quantile(0.025), quantile(0.975), resamples - len(values)


def mean_gap(units: list[tuple[float, float]]) -> float:
    """Units (genssd's value, the other's): mean of the other's minus mean of genssd's."""
    return sum(other for _, other in units) / len(units) - sum(ref for ref, _ in units) / len(units)


def ratio_gap(units: list[tuple[int, int, int, int]]) -> float | None:
    """Units (genssd paid, genssd kept, other paid, other kept): Σ paid / Σ kept, other minus genssd."""
    ref_kept, other_kept = sum(u[1] for u in units), sum(u[3] for u in units)
    if ref_kept == 0 or other_kept == 0:
        return None
    return sum(u[2] for u in units) / other_kept - sum(u[0] for u in units) / ref_kept


def teacher_by_problem(run_dir: Path) -> dict[str, tuple[int, int]]:
    """From events.jsonl alone: per problem, (teacher completion tokens paid, kept tokens)."""
    paid: dict[str, int] = {}
    kept: dict[str, int] = {}
    for event in jsonl(run_dir / "events.jsonl"):
        if event["type"] == "response":
            paid[event["problem_id"]] = paid.get(event["problem_id"], 0) + event["completion_tokens"]
        if event["type"] == "finish":
            for row in [event["row"], *event.get("more", [])]:
                kept[row["problem_id"]] = kept.get(row["problem_id"], 0) + row["completion_tokens"]
    return {p: (paid.get(p, 0), kept.get(p, 0)) for p in paid.keys() | kept.keys()}


def logged_by_problem(run_dir: Path, field: str) -> dict[str, float]:
    """From events.jsonl alone: per problem, the mean of a kept row field (rows with a finite value)."""
    values: dict[str, list[float]] = {}
    for row in kept_rows(jsonl(run_dir / "events.jsonl")):
        if row[field] is not None and math.isfinite(row[field]):
            values.setdefault(row["problem_id"], []).append(row[field])
    return {p: statistics.fmean(v) for p, v in values.items()}


def recorded_teacher_ratio(recorded: Path, method: str) -> tuple[float, float, float, int]:
    ref, other = teacher_by_problem(recorded / "genssd/run"), teacher_by_problem(recorded / method / "run")
    return bootstrap([(*ref[p], *other[p]) for p in sorted(ref.keys() & other.keys())], ratio_gap)


def paired(ref: dict[str, float], other: dict[str, float], scale: float = 1.0) -> tuple[float, float, float, int]:
    """(delta, low, high, pairs) of the mean difference over the problems both have, in id order."""
    pairs = sorted(ref.keys() & other.keys())
    return (*bootstrap([(scale * ref[p], scale * other[p]) for p in pairs], mean_gap)[:3], len(pairs))


def recorded_differences(recorded: Path) -> dict[str, dict[str, tuple[float, float, float, int]]]:
    """Per column but genssd's, per report.json key: (delta, low, high, pairs) from the raw records."""
    ref = recorded / "genssd"
    want: dict[str, dict[str, tuple[float, float, float, int]]] = {}
    for owner, label in COLUMNS.items():
        if owner == "genssd":
            continue
        metrics = {}
        if owner in METHODS:  # a run of its own: the run rows too
            other = recorded / owner / "run"
            for key, field in (("student_ppl", "student_ppl"), ("length_tokens", "completion_tokens")):
                metrics[key] = paired(logged_by_problem(ref / "run", field), logged_by_problem(other, field))
            delta, low, high, _ = recorded_teacher_ratio(recorded, owner)
            pairs = len(teacher_by_problem(ref / "run").keys() & teacher_by_problem(other).keys())
            metrics["teacher_tokens_per_kept_token"] = (delta, low, high, pairs)
        metrics[f"accuracy:{DATASET}"] = paired(correct_by_problem(ref / "eval"),
                                                correct_by_problem(recorded / owner / "eval"), scale=100.0)  # fmt: skip
        want[label] = metrics
    return want


def matches_recorded_differences(numbers: dict, recorded: Path) -> dict:
    """Asserts report.json's differences are those recomputed from the raw records; returns them."""
    want = recorded_differences(recorded)
    check_differences(numbers, want)
    return want


def check_differences(numbers: dict, want: dict) -> None:
    """report.json's differences from genssd are exactly `want` (label -> key -> delta, low, high, pairs)."""
    assert set(numbers["differences"]) == set(want)
    for label, metrics in want.items():
        assert set(numbers["differences"][label]) == set(metrics), label
        for key, (delta, low, high, pairs) in metrics.items():
            got = numbers["differences"][label][key]
            assert got["pairs"] == pairs, (label, key)
            assert (got["delta"], got["low"], got["high"]) == pytest.approx((delta, low, high), abs=1e-4), (label, key)


# Hand-made evals: samples.jsonl written here, metrics.json as `genssd eval` writes it from them,
# and the expected numbers recomputed below by formula from the samples alone.
Z = 1.96


def write_eval(eval_dir: Path, adapter: str | None, correct: dict[str, list[bool]], dataset: str = "gsm8k",
               **settings) -> None:  # fmt: skip
    from genssd_cli.eval.command import compute_metrics
    from genssd_cli.problems import Problem

    samples = len(next(iter(correct.values())))
    rows = [{"problem_id": pid, "sample": k, "prompt": "Q", "generation": "A", "reference": "1",
             "answer": "1" if ok else "2", "correct": ok, "tokens": 10 + k, "hit_limit": False}
            for pid, oks in correct.items() for k, ok in enumerate(oks)]  # fmt: skip
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recorded = json.loads((RECORDED / "base/eval/eval.json").read_text())  # the recorded evals' other settings
    eval_json = {**recorded, "adapter": adapter, "dataset": dataset, "samples": samples, **settings}
    (eval_dir / "eval.json").write_text(json.dumps(eval_json))
    problems = [Problem(pid, "Q", "1") for pid in correct]
    metrics = compute_metrics(problems, {(r["problem_id"], r["sample"]): r for r in rows}, samples)
    (eval_dir / "metrics.json").write_text(json.dumps({**metrics, "adapter": adapter, "dataset": dataset}))


def report(paths: list[Path], out: Path, evals: list[Path] = ()) -> tuple[dict, str]:
    from rich.console import Console

    from genssd_cli.report.command import report_command

    report_command(paths, list(evals), out, Console(file=io.StringIO(), width=200))
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def md_row(md: str, name: str) -> list[str]:
    """A report.md row's cells, found by its name."""
    [line] = [line for line in md.splitlines() if line.startswith(f"| {name} |")]
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]
