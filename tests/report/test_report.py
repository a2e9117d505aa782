r"""`genssd report` on fixed recorded runs, tests/data/compare-recorded/: a small `genssd pipeline
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
metrics.json the report reads."""

import io
import json
import math
import random
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import genssd

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


def shown(difference: tuple[float, float, float, int], digits: int) -> str:
    """A difference as report.md shows it: +1.23 (-0.40 to +2.90), n=10."""
    delta, low, high, pairs = difference
    signed = [f"{round(x, digits) + 0.0:+.{digits}f}" for x in (delta, low, high)]
    return f"{signed[0]} ({signed[1]} to {signed[2]}), n={pairs}"


def comparability(warnings: list[str]) -> list[str]:
    """The warnings about the columns, not about their differences from genssd."""
    return [w for w in warnings if " - genssd, " not in w]


EVAL_PROBLEMS = len(correct_by_problem(RECORDED / "base/eval"))
RUN_ROWS = (("student_ppl", "Δ student PPL of kept (mean)", 3), ("length_tokens", "Δ length in tokens (mean)", 1),
            ("teacher_tokens_per_kept_token", "Δ teacher tokens per kept token", 2))  # fmt: skip


@pytest.fixture
def recorded(tmp_path):
    copy = tmp_path / "compare"
    shutil.copytree(RECORDED, copy)
    return copy


def test_recorded_accuracies_are_not_zero_and_differ_per_column():
    # What makes the checks below able to fail: a column's number shown in another's place, or an
    # accuracy computed over the wrong samples, changes what is shown.
    correct = {m: expected_run(RECORDED / m / "run")["correct"] for m in METHODS}
    assert min(correct.values()) > 0 and len(set(correct.values())) == len(METHODS), correct
    accuracy = {owner: expected_accuracy(RECORDED / owner / "eval") for owner in COLUMNS}
    assert min(accuracy.values()) > 0 and len(set(accuracy.values())) == len(COLUMNS), accuracy
    # Every eval is of the same held-out problems, one greedy sample each: the accuracies are paired.
    for owner in COLUMNS:
        settings = json.loads((RECORDED / owner / "eval/eval.json").read_text())
        assert (settings["dataset"], settings["samples"], settings["temperature"]) == (DATASET, 1, 0.0)
        samples = jsonl(RECORDED / owner / "eval/samples.jsonl")
        assert len(samples) == EVAL_PROBLEMS
        assert correct_by_problem(RECORDED / owner / "eval").keys() == correct_by_problem(RECORDED / "base/eval").keys()
    # Finished runs: nothing failed or pending, and every run of the same problems.
    runs = [expected_run(RECORDED / m / "run") for m in METHODS]
    assert {(r["failed"], r["pending"], r["problems"]) for r in runs} == {(0, 0, runs[0]["problems"])}


def test_report_numbers_match_the_raw_records(recorded, tmp_path):
    out = tmp_path / "report"
    result = genssd("report", str(recorded), "--out", str(out))
    assert result.returncode == 0, result.stderr
    numbers = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    terminal = " ".join(result.stdout.split())
    columns = {c["label"]: c for c in numbers["columns"]}
    assert list(columns) == list(COLUMNS.values())
    assert md.splitlines()[2] == "| | " + " | ".join(COLUMNS.values()) + " |"
    # The only warnings: teacher-ratio resamples that drew problems genssd pruned alone, if any.
    undefined = {m: recorded_teacher_ratio(recorded, m)[3] for m in METHODS[1:]}
    assert numbers["warnings"] == [
        f"{m} - genssd, teacher tokens per kept token: {n} of 2000 resamples kept no tokens of one run and were "
        "left out of the interval" for m, n in undefined.items() if n]  # fmt: skip

    # The runs: counts, PPLs, lengths, teacher tokens, from events.jsonl.
    wants = {m: expected_run(recorded / m / "run") for m in METHODS}
    for method, want in wants.items():
        run = columns[method]["run"]
        assert run["method"] == method and run["problems"] == want["problems"]
        assert {k: run[k] for k in COUNTS} == {k: want[k] for k in COUNTS}, method
        assert run["student_ppl"]["mean"] == pytest.approx(want["ppl"][0], abs=1e-3)
        assert run["student_ppl"]["median"] == pytest.approx(want["ppl"][1], abs=1e-3)
        assert run["length_tokens"]["mean"] == pytest.approx(want["length"][0], abs=1e-3)
        assert run["length_tokens"]["median"] == pytest.approx(want["length"][1], abs=1e-3)
        assert run["teacher_tokens"] == want["teacher_tokens"]
        assert run["teacher_tokens_per_kept_token"] == pytest.approx(want["per_kept_token"], abs=1e-3)
        assert run["requests"] == want["requests"]
    for label in ("base student", "cold start"):
        assert columns[label]["run"] is None
    # The markdown shows the same numbers, one column per method (the reference columns have no run).
    blank = ["", ""]
    assert md_row(md, "trajectories kept") == blank + [str(wants[m]["kept"]) for m in METHODS]
    assert md_row(md, "correct") == blank + [str(wants[m]["correct"]) for m in METHODS]
    assert md_row(md, "pruned") == blank + [str(wants[m]["pruned"]) for m in METHODS]
    assert md_row(md, "student PPL of kept (mean / median)") == blank + [
        f"{wants[m]['ppl'][0]:.3f} / {wants[m]['ppl'][1]:.3f}" for m in METHODS]  # fmt: skip
    # Standard KD asks one whole trajectory per sample: one request each, never pruned.
    assert columns["standard-kd"]["run"]["requests"] == columns["standard-kd"]["run"]["kept"]

    # The evals: accuracy = right / answered, one greedy sample per problem: Wilson's 95 % interval.
    cells = []
    for owner, label in COLUMNS.items():
        samples = jsonl(recorded / owner / "eval/samples.jsonl")
        right, n = sum(s["correct"] for s in samples), len(samples)
        evaluation = columns[label]["evals"][DATASET]
        assert evaluation["dir"] == str(recorded / owner / "eval")
        assert (evaluation["problems"], evaluation["samples"], evaluation["pass_at_k"]) == (n, 1, None)
        assert evaluation["accuracy"] == pytest.approx(right / n, abs=1e-4)
        assert evaluation["ci95"] == pytest.approx(wilson(right, n), abs=1e-4)
        low, high = (round(x, 4) for x in wilson(right, n))
        cells.append(f"{100 * round(right / n, 4):.1f} % ({100 * low:.1f} to {100 * high:.1f})")
    assert md_row(md, f"eval accuracy, {DATASET} ({EVAL_PROBLEMS} problems, 95 % CI)") == cells
    assert all(cell in terminal for cell in cells)
    assert "pass@" not in md  # one sample per problem everywhere: no pass@k row

    # The differences from genssd: the paired bootstrap redone on the raw records.
    want = matches_recorded_differences(numbers, recorded)
    accuracy = f"accuracy:{DATASET}"
    for label, metrics in want.items():
        assert all(low <= delta <= high for delta, low, high, _ in metrics.values()), label
        assert metrics[accuracy][0] != 0 and metrics[accuracy][3] == EVAL_PROBLEMS, label
    for method in METHODS[1:]:  # on all problems the teacher ratio is the main table's difference
        got = numbers["differences"][method]["teacher_tokens_per_kept_token"]
        table = [columns[m]["run"]["teacher_tokens_per_kept_token"] for m in (method, "genssd")]
        assert got["pairs"] == wants[method]["problems"]
        assert got["delta"] == pytest.approx(table[0] - table[1], abs=0.01)
    title = "differences from genssd (95 % paired bootstrap over problems)"
    compared = [label for label in COLUMNS.values() if label != "genssd"]
    assert md.split(f"## {title}")[1].splitlines()[2] == "| | " + " | ".join(compared) + " |"
    for key, name, digits in RUN_ROWS:
        assert md_row(md, name) == [shown(want[label][key], digits) if label in METHODS else "" for label in compared]
    accuracy_cells = [shown(want[label][accuracy], 1) for label in compared]
    assert md_row(md, f"Δ eval accuracy, {DATASET} (points)") == accuracy_cells
    assert title in terminal and all(cell in terminal for cell in accuracy_cells)


def test_plots_are_valid_pngs(recorded, tmp_path):
    import matplotlib.image

    out = tmp_path / "report"
    assert genssd("report", str(recorded), "--out", str(out)).returncode == 0
    for name in ("ppl.png", "length.png", "teacher_tokens.png", "accuracy.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        pixels = matplotlib.image.imread(out / name)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0.01, f"{name} is blank"


def rematerialise(run_dir: Path) -> None:
    """trajectories.jsonl, failures.jsonl and summary.json made again from an edited events.jsonl,
    as `genssd run` makes them at the end of every session."""
    from genssd_cli.config import load_run_config
    from genssd_cli.problems import load_problems
    from genssd_cli.rundir.records import RunStart, read_log
    from genssd_cli.rundir.replay import failure_rows, summarize, trajectory_rows

    cfg = load_run_config(run_dir / "config.yaml")
    events = read_log(run_dir / "events.jsonl")
    start = [e for e in events if isinstance(e, RunStart)][-1]
    problems = load_problems(cfg.data, start.limit)
    (run_dir / "trajectories.jsonl").write_text("".join(r.line() for r in trajectory_rows(events, problems)))
    (run_dir / "failures.jsonl").write_text("".join(r.line() for r in failure_rows(events)))
    summary = summarize(events, problems, cfg.search.samples, cfg.teacher)
    (run_dir / "summary.json").write_text(summary.model_dump_json())


def test_failed_truncated_and_pending_trajectories_are_counted(recorded, tmp_path):
    # genssd's run as a stopped session leaves it: of four of its finished problems, one failed
    # (the teacher gave up on its next step), one hit max_steps (truncated, after an error that a
    # resume retried), one stopped mid-way (its end never logged), one never started (no record).
    run = recorded / "genssd/run"
    events = jsonl(run / "events.jsonl")
    finishes = [e for e in events if e["type"] == "finish"]
    truncated = next(e for e in finishes if e["row"]["correct"])
    failed, stopped, unstarted = [e for e in finishes if e is not truncated][:3]
    never = unstarted["problem_id"]

    def error(finish: dict, step: int, error_class: str) -> dict:
        return {"v": 2, "type": "error", "problem_id": finish["problem_id"], "sample": finish["sample"], "step": step,
                "error_class": error_class, "message": f"{error_class} after 5 retries"}  # fmt: skip

    edited = []
    for event in events:
        if event.get("problem_id") == never or event is stopped:
            continue
        if event is failed:
            edited.append(error(failed, failed["row"]["steps"], "timeout"))
        elif event is truncated:
            row = {**truncated["row"], "finish": "truncated", "correct": False}
            edited += [error(truncated, 0, "connection"), {**truncated, "row": row}]
        else:
            edited.append(event)
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in edited))
    rematerialise(run)
    want, before = expected_run(run), expected_run(RECORDED / "genssd/run")
    # The log says what was done to it: 1 failed, 2 pending, 1 more truncated, 3 fewer kept.
    assert (want["failed"], want["pending"]) == (1, 2)
    assert (want["truncated"], want["kept"]) == (before["truncated"] + 1, before["kept"] - 3)

    out = tmp_path / "report"
    result = genssd("report", str(recorded), "--out", str(out))
    assert result.returncode == 0, result.stderr
    numbers, md = json.loads((out / "report.json").read_text()), (out / "report.md").read_text()
    columns = {c["label"]: c for c in numbers["columns"]}
    assert {k: columns["genssd"]["run"][k] for k in COUNTS} == {k: want[k] for k in COUNTS}
    for method in METHODS[1:]:  # the other runs as they were
        assert {k: columns[method]["run"][k] for k in COUNTS} == {k: expected_run(RECORDED / method / "run")[k]
                                                                   for k in COUNTS}  # fmt: skip
    assert md_row(md, "trajectories kept")[2] == str(want["kept"])
    assert md_row(md, "correct")[2] == str(want["correct"])
    # Said under the table, in report.json, report.md and on the terminal.
    warning = f"{run}: 2 pending and 1 failed trajectories (not finished)"
    assert warning in numbers["warnings"] and f"- {warning}\n" in md
    assert warning in " ".join(result.stdout.split())
    # The differences still stand, over the problems each has: the failed problem was paid for and
    # kept nothing, the unstarted one is in no pair of genssd's.
    want_differences = matches_recorded_differences(numbers, recorded)
    ratio = want_differences["standard-kd"]["teacher_tokens_per_kept_token"]
    assert ratio[3] == want["problems"] - 1  # all but the unstarted problem
    assert want_differences["standard-kd"]["student_ppl"][3] <= want["problems"] - 3
    for name in ("ppl.png", "length.png", "teacher_tokens.png", "accuracy.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name


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


def test_resamples_where_genssd_kept_nothing_are_left_out_and_counted(recorded, tmp_path):
    # genssd's run with all but two of its trajectories pruned (paid for, nothing kept): a resample
    # of the problems that draws neither of the two has no genssd tokens to divide by.
    run = recorded / "genssd/run"
    events = jsonl(run / "events.jsonl")
    finishes = [e for e in events if e["type"] == "finish"]
    pruned = {id(e) for e in finishes[2:]}
    edited = [{"v": 2, "type": "prune", "problem_id": e["problem_id"], "sample": e["sample"],
               "step": e["row"]["steps"] - 1, "best_ppl": 9.5} if id(e) in pruned else e for e in events]  # fmt: skip
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in edited))
    rematerialise(run)
    assert expected_run(run)["pruned"] == len(finishes) - 2
    numbers, md = report([recorded], tmp_path / "report")
    matches_recorded_differences(numbers, recorded)
    undefined = {m: recorded_teacher_ratio(recorded, m)[3] for m in METHODS[1:]}
    assert all(0 < n < 2000 for n in undefined.values())  # about 0.8 ** 10 of the resamples
    warnings = [f"{m} - genssd, teacher tokens per kept token: {n} of 2000 resamples kept no tokens of one run and "
                "were left out of the interval" for m, n in undefined.items()]  # fmt: skip
    assert numbers["warnings"] == warnings
    assert all(f"- {w}\n" in md for w in warnings)


def test_runs_given_one_by_one_with_evals_linked_by_training_manifest(recorded, tmp_path):
    # Outside a pipeline the eval is tied to its run through the adapter's training manifest.
    train = tmp_path / "lora"
    (train / "adapter").mkdir(parents=True)
    (train / "manifest.json").write_text(json.dumps({"runs": [{"dir": str(recorded / "genssd/run")}]}))
    loose = tmp_path / "eval-elsewhere"
    shutil.copytree(recorded / "genssd/eval", loose)
    settings = json.loads((loose / "eval.json").read_text())
    (loose / "eval.json").write_text(json.dumps({**settings, "adapter": str(train / "adapter")}))
    out = tmp_path / "report"
    result = genssd("report", str(recorded / "genssd/run"), str(recorded / "standard-kd/run"),
                    "--eval", str(loose), "--eval", str(recorded / "base/eval"), "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    columns = {c["label"]: c for c in json.loads((out / "report.json").read_text())["columns"]}
    assert list(columns) == ["base student", "genssd", "standard-kd"]
    assert columns["genssd"]["evals"][DATASET]["dir"] == str(loose)
    assert columns["standard-kd"]["evals"] == {}


def test_report_says_when_runs_are_not_comparable(recorded, tmp_path):
    config = recorded / "posthoc-ppl/run/config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["student"]["adapter"] = None
    config.write_text(yaml.safe_dump(cfg))
    result = genssd("report", str(recorded), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    warning = "the runs were scored by different students: their PPLs are not comparable"
    assert warning in json.loads((tmp_path / "report/report.json").read_text())["warnings"]
    assert warning in (tmp_path / "report/report.md").read_text()


@pytest.mark.parametrize(
    ("make_args", "message", "code"),
    [
        (lambda r, t: [str(t / "missing")], "not a directory", 2),
        (lambda r, t: [str(t)], "has no trajectories.jsonl", 2),
        (lambda r, t: [str(r / "base/eval")], "is an eval directory: pass it with --eval", 2),
        (lambda r, t: [str(r / "genssd/run"), "--eval", str(r / "genssd/run")], "has no metrics.json", 2),
        (lambda r, t: [str(r / "genssd/run"), "--eval", str(t / "nope")], "--eval: not a directory", 2),
    ],
)
def test_bad_report_inputs_are_one_line(recorded, tmp_path, make_args, message, code):
    result = genssd("report", *make_args(recorded, tmp_path), "--out", str(tmp_path / "report"))
    assert result.returncode == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unreadable_summary_is_one_line(recorded, tmp_path):
    (recorded / "genssd/run/summary.json").write_text("{not json")
    result = genssd("report", str(recorded), "--out", str(tmp_path / "report"))
    assert result.returncode == 1
    assert "summary.json: unreadable summary (Invalid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


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


def add_stages(pipeline_dir: Path, *stages: str) -> None:
    record = json.loads((pipeline_dir / "pipeline.json").read_text())
    record["stages"].update({s: {"dir": str(pipeline_dir / s), "wall_s": 0.0} for s in stages})
    (pipeline_dir / "pipeline.json").write_text(json.dumps(record))


def wilson(correct: int, n: int) -> list[float]:
    p = correct / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return [centre - half, centre + half]


def avg_at_k(correct: dict[str, list[bool]]) -> tuple[float, list[float]]:
    """Mean over problems of the share of correct samples, with a normal 95 % interval over problems."""
    means = [sum(oks) / len(oks) for oks in correct.values()]
    mean = sum(means) / len(means)
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (len(means) - 1))
    half = Z * sd / math.sqrt(len(means))
    return mean, [max(0.0, mean - half), min(1.0, mean + half)]


def pass_at(correct: dict[str, list[bool]], k: int) -> float:
    """1 - C(n - c, k) / C(n, k) per problem, averaged."""
    per_problem = [1 - math.comb(len(oks) - sum(oks), k) / math.comb(len(oks), k) for oks in correct.values()]
    return sum(per_problem) / len(per_problem)


def report(paths: list[Path], out: Path, evals: list[Path] = ()) -> tuple[dict, str]:
    from rich.console import Console

    from genssd_cli.report.command import report_command

    report_command(paths, list(evals), out, Console(file=io.StringIO(), width=200))
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def md_row(md: str, name: str) -> list[str]:
    """A report.md row's cells, found by its name."""
    [line] = [line for line in md.splitlines() if line.startswith(f"| {name} |")]
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


# Five problems, four samples each.
FOUR = {"p0": [True, True, True, True], "p1": [True, False, False, False], "p2": [False] * 4,
        "p3": [True, True, False, False], "p4": [False, False, True, False]}  # fmt: skip


def varied(column: int) -> dict[str, list[bool]]:
    """FOUR with the first `column` samples of p2 right: every column's numbers differ."""
    return {**FOUR, "p2": [k < column for k in range(4)]}


def test_cold_start_eval_is_a_column_of_its_own(recorded, tmp_path):
    # The pipeline's cold-start/eval: the student every method starts from, a reference column.
    numbers, md = report([recorded], tmp_path / "report")
    columns = {c["label"]: c for c in numbers["columns"]}
    assert list(columns) == list(COLUMNS.values())
    assert columns["cold start"]["run"] is None
    assert columns["cold start"]["evals"][DATASET]["adapter"] == COLD_ADAPTER
    assert list(numbers["differences"]["cold start"]) == [f"accuracy:{DATASET}"]  # a reference column: accuracy only
    assert md_row(md, "Δ student PPL of kept (mean)")[:2] == ["", ""]

    # Outside a pipeline, anywhere: the eval of the adapter that scored the runs is the cold start too.
    loose = tmp_path / "elsewhere"
    shutil.copytree(recorded / "cold-start/eval", loose)
    numbers, _ = report([recorded / "genssd/run"], tmp_path / "alone", [loose])
    assert [c["label"] for c in numbers["columns"]] == ["cold start", "genssd"]
    assert numbers["columns"][0]["evals"][DATASET]["dir"] == str(loose)


def test_avg_at_k_and_pass_at_k_per_dataset(recorded, tmp_path):
    # A second dataset, four samples per problem (sampled), in every column of a two-dataset pipeline.
    owners = {"base": None, "cold-start": COLD_ADAPTER, **{m: f"/tmp/fx/{m}/train/adapter" for m in METHODS}}
    for by, (owner, adapter) in enumerate(owners.items()):
        write_eval(recorded / owner / "eval-aime24", adapter, varied(by), dataset="aime24", temperature=0.6,
                   top_p=0.95, max_new_tokens=512)  # fmt: skip
    add_stages(recorded, *(f"{owner}/eval-aime24" for owner in owners))
    numbers, md = report([recorded], tmp_path / "report")
    assert [c["label"] for c in numbers["columns"]] == ["base student", "cold start", *METHODS]
    # other datasets may differ in settings: they are not compared
    assert comparability(numbers["warnings"]) == []
    for column, by in zip(numbers["columns"], range(len(owners)), strict=True):
        evaluation, want = column["evals"]["aime24"], varied(by)
        mean, interval = avg_at_k(want)
        assert evaluation["samples"] == 4
        assert evaluation["accuracy"] == pytest.approx(mean, abs=1e-4)
        assert evaluation["ci95"] == pytest.approx(interval, abs=1e-4)
        assert evaluation["pass_at_k"]["4"] == pytest.approx(pass_at(want, 4), abs=1e-4)
        assert evaluation["pass_at_k"]["4"] == sum(any(oks) for oks in want.values()) / len(want)
        assert evaluation["pass_at_k"]["1"] == pytest.approx(mean, abs=1e-4)
    # The markdown: accuracy labelled avg@4 with its interval, a pass@4 row, for aime24 only.
    cells = md_row(md, "eval avg@4, aime24 (5 problems, 95 % CI)")
    for cell, by in zip(cells, range(len(owners)), strict=True):
        mean, (low, high) = avg_at_k(varied(by))
        assert cell == f"{100 * mean:.1f} % ({100 * low:.1f} to {100 * high:.1f})"
    assert md_row(md, "pass@4") == [f"{100 * pass_at(varied(by), 4):.1f} %" for by in range(len(owners))]
    assert md.count("pass@4 |") == 1 and f"eval accuracy, {DATASET} ({EVAL_PROBLEMS} problems, 95 % CI)" in md
    assert "| mean generated tokens | 11.5 |" in md  # tokens 10..13 per problem


def test_evals_of_one_dataset_with_other_settings_are_flagged(recorded, tmp_path):
    # genssd's eval replaced by one of as many other problems, four samples each, sampled; posthoc-ppl's
    # eval said to allow longer answers.
    sampled = {f"p{i}": FOUR[f"p{i % 5}"] for i in range(EVAL_PROBLEMS)}
    write_eval(recorded / "genssd/eval", "/tmp/fx/genssd/train/adapter", sampled, dataset=DATASET, temperature=0.6,
               top_p=0.95)  # fmt: skip
    settings = json.loads((recorded / "posthoc-ppl/eval/eval.json").read_text())
    (recorded / "posthoc-ppl/eval/eval.json").write_text(json.dumps({**settings, "max_new_tokens": 512}))
    numbers, md = report([recorded], tmp_path / "report")
    tokens = settings["max_new_tokens"]
    warning = (f"the {DATASET} evals differ in samples per problem (1, 4), max_new_tokens ({tokens}, 512), "
               "temperature (0.0, 0.6), top_p (1.0, 0.95): their accuracies are not comparable")  # fmt: skip
    assert comparability(numbers["warnings"]) == [warning]
    assert warning in md
    # genssd's eval is now of other problems: no accuracy difference, and the warnings say why.
    for column in ("base student", "cold start", "standard-kd", "posthoc-ppl"):
        assert numbers["differences"][column][f"accuracy:{DATASET}"] == {"delta": None, "low": None, "high": None,
                                                                          "pairs": 0}  # fmt: skip
        assert (f"{column} - genssd, eval accuracy, {DATASET} (points): 0 eval problems both evals answered (a paired "
                "difference needs 2): —") in numbers["warnings"]  # fmt: skip
    assert md_row(md, f"Δ eval accuracy, {DATASET} (points)") == ["—"] * 4
    # Mixed samples: the row says both, each cell says its k.
    cells = md_row(md, f"eval accuracy / avg@k, {DATASET} ({EVAL_PROBLEMS} problems, 95 % CI)")
    mean, (low, high) = avg_at_k(sampled)
    assert cells[2] == f"{100 * mean:.1f} % ({100 * low:.1f} to {100 * high:.1f}) avg@4"
    assert all(cell.endswith(")") and "avg@" not in cell for cell in cells[:2] + cells[3:])
    assert md_row(md, "pass@k") == ["—", "—", f"{100 * pass_at(sampled, 4):.1f} % (k=4)", "—", "—"]


# ---- differences from genssd, on hand-written runs and evals ---------------------------------------
# Per method, per training problem, its two trajectories: the teacher completion tokens of each
# response, then the kept row's (student PPL, completion tokens), or None: pruned (paid, nothing kept).
RUNS = {
    "genssd": {
        "t0": [([30, 25], (2.10, 28)), ([28, 20], (2.40, 31))],
        "t1": [([40, 35, 30], (1.80, 44)), ([50], None)],
        "t2": [([22], (3.10, 20)), ([26, 24], (2.90, 25))],
        "t3": [([60, 55], (1.50, 52)), ([45, 40], (1.70, 48))],
        "t4": [([35, 30], None), ([33], None)],  # pruned twice: paid, kept nothing
        "t5": [([18, 16], (2.60, 17)), ([21], (2.20, 19))],
    },
    "standard-kd": {  # one whole trajectory per request, never pruned
        "t0": [([41], (3.40, 41)), ([37], (3.90, 37))],
        "t1": [([55], (2.70, 55)), ([61], (2.95, 61))],
        "t2": [([30], (4.20, 30)), ([33], (4.60, 33))],
        "t3": [([70], (2.10, 70)), ([66], (2.30, 66))],
        "t4": [([48], (3.70, 48)), ([52], (3.30, 52))],
        "t5": [([0], (None, 0)), ([0], (None, 0))],  # empty completions: no PPL, 0 tokens
    },
    "posthoc-ppl": {  # of other problems in part: t6 is its own
        "t0": [([38, 44], (2.80, 38)), ([40, 36], (2.60, 36))],
        "t1": [([57, 52], (2.20, 52)), ([49, 60], (2.40, 49))],
        "t2": [([29, 31], (3.50, 29)), ([27, 35], (3.20, 27))],
        "t3": [([68, 71], (1.90, 68)), ([63, 58], (2.00, 58))],
        "t6": [([25, 30], (2.50, 25)), ([28, 26], (2.70, 26))],
    },
}
# Per eval problem, right or wrong, one sample each (greedy): genssd 7/10, standard-kd 4/10,
# posthoc-ppl 5/10, the base student 2/10; aime24: 3 samples per problem, for two methods only.
GSM8K = {"genssd": "1110110101", "standard-kd": "1000110001", "posthoc-ppl": "1100100101", "base": "0010010000"}
AIME = {"genssd": ["110", "000", "111", "100", "010"], "standard-kd": ["100", "001", "011", "000", "000"]}
ADAPTERS = {"base": None, **{m: f"/fx/{m}/train/adapter" for m in ("genssd", "standard-kd", "posthoc-ppl", "morsd")}}


def write_run(run_dir: Path, method: str, trajectories: dict[str, list]) -> None:
    """A run directory as `genssd run` leaves it, from typed records: events.jsonl, then the files
    materialised from it (trajectories.jsonl, summary.json) and config.yaml."""
    from genssd_cli.config import TeacherConfig
    from genssd_cli.problems import Problem
    from genssd_cli.rundir.records import CandidateRecord, Finish, Message, Prune, Response, RunStart, SessionEnd
    from genssd_cli.rundir.records import TrajectoryRow as Row
    from genssd_cli.rundir.replay import summarize, trajectory_rows

    problems = [Problem(pid, "Q", "1") for pid in trajectories]
    events = [RunStart(config_hash="h", settings={}, forced=False, limit=None, problems=len(problems), genssd="t",
                       time=0.0)]  # fmt: skip
    for pid, samples in trajectories.items():
        for sample, (paid, kept) in enumerate(samples):
            for step, tokens in enumerate(paid):
                candidate = CandidateRecord(text="x", finish_reason="stop", tokens=tokens)
                events.append(Response(problem_id=pid, sample=sample, step=step, attempt=0, start=0, seed=0, n=1,
                                       prompt_tokens=10, completion_tokens=tokens, candidates=[candidate]))  # fmt: skip
            if kept is None:
                events.append(Prune(problem_id=pid, sample=sample, step=len(paid) - 1, best_ppl=9.0))
                continue
            ppl, length = kept
            row = Row(problem_id=pid, sample=sample, method=method, prompt=[Message(role="user", content="Q")],
                      completion=[Message(role="assistant", content="The answer is 1.")], reference="1", answer="1",
                      correct=True, finish="stop", steps=len(paid), student_ppl=ppl, teacher_tokens=sum(paid),
                      completion_tokens=length)  # fmt: skip
            events.append(Finish(problem_id=pid, sample=sample, row=row))
    events.append(SessionEnd(wall_s=1.0, end="completed", retries={}, teacher_busy_s=0.5, max_concurrency=1,
                             engine_wall_s=1.0, loop_cpu_s=0.1, candidates=len(events)))  # fmt: skip
    run_dir.mkdir(parents=True)
    (run_dir / "events.jsonl").write_text("".join(e.line() for e in events))
    (run_dir / "trajectories.jsonl").write_text("".join(r.line() for r in trajectory_rows(events, problems)))
    summary = summarize(events, problems, 2, TeacherConfig(model="t", base_url="http://t"))
    (run_dir / "summary.json").write_text(summary.model_dump_json())
    config = {"method": method, "student": {"model": "smollm2-135m-instruct", "adapter": "/fx/cold-start/adapter"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


def bits(text: str) -> list[bool]:
    return [c == "1" for c in text]


@pytest.fixture
def handmade(tmp_path) -> tuple[list[Path], list[Path]]:
    """Run directories and eval directories, laid out as a pipeline's (METHOD/run beside METHOD/eval)."""
    runs = []
    for method, trajectories in RUNS.items():
        write_run(tmp_path / method / "run", method, trajectories)
        runs.append(tmp_path / method / "run")
    evals = []
    for owner, right in GSM8K.items():
        write_eval(tmp_path / owner / "eval", ADAPTERS[owner], {f"e{i}": [ok] for i, ok in enumerate(bits(right))})
        evals.append(tmp_path / owner / "eval")
    for owner, per_problem in AIME.items():
        correct = {f"a{i}": bits(oks) for i, oks in enumerate(per_problem)}
        write_eval(tmp_path / owner / "eval-aime24", ADAPTERS[owner], correct, dataset="aime24", temperature=0.6)
        evals.append(tmp_path / owner / "eval-aime24")
    return runs, evals


def kept_by_problem(trajectories: dict[str, list], which: int) -> dict[str, float]:
    """Per problem, the mean over its kept rows of PPL (which=0, rows with one) or length (which=1)."""
    values = {pid: [kept[which] for _, kept in samples if kept is not None and kept[which] is not None]
              for pid, samples in trajectories.items()}  # fmt: skip
    return {pid: sum(v) / len(v) for pid, v in values.items() if v}


def expected_differences(method: str) -> dict[str, tuple[float, float, float, int]]:
    """(delta, low, high, pairs) per metric, recomputed from the hand-written records."""
    ref, other = RUNS["genssd"], RUNS[method]
    want = {}
    for key, which in (("student_ppl", 0), ("length_tokens", 1)):
        a, b = kept_by_problem(ref, which), kept_by_problem(other, which)
        pairs = sorted(a.keys() & b.keys())
        want[key] = (*bootstrap([(a[p], b[p]) for p in pairs], mean_gap)[:3], len(pairs))

    def teacher(trajectories: dict[str, list]) -> dict[str, tuple[int, int]]:
        return {pid: (sum(sum(paid) for paid, _ in samples), sum(kept[1] for _, kept in samples if kept))
                for pid, samples in trajectories.items()}  # fmt: skip

    a, b = teacher(ref), teacher(other)
    pairs = sorted(a.keys() & b.keys())
    delta, low, high, undefined = bootstrap([(*a[p], *b[p]) for p in pairs], ratio_gap)
    assert undefined == 0  # genssd's pruned t4 alone in a resample: (1/6)^6, never drawn here
    want["teacher_tokens_per_kept_token"] = (delta, low, high, len(pairs))
    return want


def accuracy_difference(ref: list[str], other: list[str]) -> tuple[float, float, float, int]:
    """Paired over the problems (e0, e1, ... in id order), per problem the share of right samples, in points."""
    units = [(100 * sum(bits(r)) / len(r), 100 * sum(bits(o)) / len(o)) for r, o in zip(ref, other, strict=True)]
    return (*bootstrap(units, mean_gap)[:3], len(units))


def test_differences_from_genssd_by_paired_bootstrap(handmade, tmp_path):
    from rich.console import Console

    from genssd_cli.report.command import report_command

    runs, evals = handmade
    out = tmp_path / "report"
    console = Console(file=io.StringIO(), width=250)
    report_command(runs, evals, out, console)
    numbers, md = json.loads((out / "report.json").read_text()), (out / "report.md").read_text()
    columns = {c["label"]: c for c in numbers["columns"]}
    assert list(columns) == ["base student", *RUNS]
    assert [columns[m]["evals"]["gsm8k"]["accuracy"] for m in RUNS] == [0.7, 0.4, 0.5]
    assert numbers["bootstrap"] == {"reference": "genssd", "over": "problems, paired", "resamples": 2000, "seed": 0,
                                    "level": 0.95, "interval": "percentile"}  # fmt: skip
    # posthoc-ppl is not of the same problems as genssd (t6 instead of t4, t5): said, and paired on t0..t3.
    assert numbers["warnings"] == ["the runs are not of the same problems"]
    gsm8k = {owner: [r for r in right] for owner, right in GSM8K.items()}
    want = {
        "base student": {"accuracy:gsm8k": accuracy_difference(gsm8k["genssd"], gsm8k["base"])},
        "standard-kd": {**expected_differences("standard-kd"),
                        "accuracy:gsm8k": accuracy_difference(gsm8k["genssd"], gsm8k["standard-kd"]),
                        "accuracy:aime24": accuracy_difference(AIME["genssd"], AIME["standard-kd"])},
        "posthoc-ppl": {**expected_differences("posthoc-ppl"),
                        "accuracy:gsm8k": accuracy_difference(gsm8k["genssd"], gsm8k["posthoc-ppl"])},
    }  # fmt: skip
    check_differences(numbers, want)
    for label, metrics in want.items():
        for key, (delta, low, high, _pairs) in metrics.items():
            assert low <= delta <= high and low < high, (label, key)
    # The pairs: standard-kd's t5 has no PPL (empty completions); posthoc-ppl shares t0..t3 with genssd.
    assert [want["standard-kd"][k][3] for k in ("student_ppl", "length_tokens", "teacher_tokens_per_kept_token")] == [
        4, 5, 6]  # fmt: skip
    assert [want["posthoc-ppl"][k][3] for k in ("student_ppl", "length_tokens", "teacher_tokens_per_kept_token")] == [
        4, 4, 4]  # fmt: skip
    # Accuracy in points: 40 - 70 and 50 - 70 on the full sample.
    assert want["standard-kd"]["accuracy:gsm8k"][0] == pytest.approx(-30.0)
    assert want["posthoc-ppl"]["accuracy:gsm8k"][0] == pytest.approx(-20.0)
    # The teacher ratio on the full sample is the main table's per-kept-token difference (same problems).
    assert numbers["differences"]["standard-kd"]["teacher_tokens_per_kept_token"]["delta"] == pytest.approx(
        columns["standard-kd"]["run"]["teacher_tokens_per_kept_token"]
        - columns["genssd"]["run"]["teacher_tokens_per_kept_token"], abs=2e-3)  # fmt: skip

    # The same numbers in report.md's second table and on the terminal.
    title = "differences from genssd (95 % paired bootstrap over problems)"
    assert f"## {title}" in md and title in console.file.getvalue()
    assert md.split(f"## {title}")[1].splitlines()[2] == "| | base student | standard-kd | posthoc-ppl |"

    def cell(label: str, key: str, digits: int) -> str:
        delta, low, high, pairs = want[label][key]
        signed = [f"{round(x, digits) + 0.0:+.{digits}f}" for x in (delta, low, high)]
        return f"{signed[0]} ({signed[1]} to {signed[2]}), n={pairs}"

    assert md_row(md, "Δ eval accuracy, gsm8k (points)") == [cell(c, "accuracy:gsm8k", 1) for c in want]
    assert md_row(md, "Δ eval accuracy, aime24 (points)") == ["", cell("standard-kd", "accuracy:aime24", 1), ""]
    for key, name, digits in (("student_ppl", "Δ student PPL of kept (mean)", 3),
                              ("length_tokens", "Δ length in tokens (mean)", 1),
                              ("teacher_tokens_per_kept_token", "Δ teacher tokens per kept token", 2)):  # fmt: skip
        assert md_row(md, name) == ["", cell("standard-kd", key, digits), cell("posthoc-ppl", key, digits)]
    terminal = " ".join(console.file.getvalue().split())  # the caption wraps
    assert cell("standard-kd", "accuracy:gsm8k", 1) in terminal
    assert "95 % percentile interval over 2000 paired bootstrap resamples of the problems (seed 0)" in terminal

    # Reproducible: the same report again gives the same numbers.
    report_command(runs, evals, tmp_path / "again", Console(file=io.StringIO()))
    assert json.loads((tmp_path / "again/report.json").read_text())["differences"] == numbers["differences"]


def test_no_common_problems_give_a_dash_and_a_warning(handmade, tmp_path):
    runs, evals = handmade
    # A fourth method of problems genssd never saw, its student evaluated on other gsm8k problems.
    write_run(tmp_path / "morsd/run", "morsd", {"u0": RUNS["genssd"]["t0"], "u1": RUNS["genssd"]["t2"]})
    write_eval(tmp_path / "morsd/eval", ADAPTERS["morsd"], {"f0": [True], "f1": [False], "f2": [True]})
    numbers, md = report([*runs, tmp_path / "morsd/run"], tmp_path / "report", [*evals, tmp_path / "morsd/eval"])
    got = numbers["differences"]["morsd"]
    none = {"delta": None, "low": None, "high": None, "pairs": 0}
    assert got == {key: none for key in ("student_ppl", "length_tokens", "teacher_tokens_per_kept_token",
                                         "accuracy:gsm8k")}  # fmt: skip
    assert md_row(md, "Δ student PPL of kept (mean)")[-1] == "—"
    assert md_row(md, "Δ eval accuracy, gsm8k (points)")[-1] == "—"
    assert md_row(md, "Δ eval accuracy, aime24 (points)")[-1] == ""  # no aime24 eval of its own: not applicable
    why = "(a paired difference needs 2): —"
    assert [w for w in numbers["warnings"] if w.startswith("morsd - genssd")] == [
        f"morsd - genssd, student PPL of kept (mean): 0 problems both runs kept a scored trajectory of {why}",
        f"morsd - genssd, length in tokens (mean): 0 problems both runs kept a trajectory of {why}",
        f"morsd - genssd, teacher tokens per kept token: 0 problems both runs asked the teacher {why}",
        f"morsd - genssd, eval accuracy, gsm8k (points): 0 eval problems both evals answered {why}",
    ]
    assert "morsd - genssd, student PPL of kept (mean): 0 problems" in md
    # The other columns' differences are untouched by it.
    alone, _ = report(runs, tmp_path / "without", evals)
    assert {k: v for k, v in numbers["differences"].items() if k != "morsd"} == alone["differences"]


def test_without_a_genssd_run_the_first_run_is_the_reference(handmade, tmp_path):
    runs, evals = handmade
    numbers, md = report(runs[1:], tmp_path / "report", evals)
    assert numbers["bootstrap"]["reference"] == "standard-kd"
    assert set(numbers["differences"]) == {"base student", "posthoc-ppl"}
    assert "## differences from standard-kd (95 % paired bootstrap over problems)" in md
    # genssd's evals have no run here: columns of their own, not compared; standard-kd's aime24 eval has no
    # counterpart to compare with.
    run_metrics = {"student_ppl", "length_tokens", "teacher_tokens_per_kept_token"}
    assert set(numbers["differences"]["posthoc-ppl"]) == {*run_metrics, "accuracy:gsm8k"}
