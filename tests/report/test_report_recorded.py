"""`genssd report` (the real CLI, a subprocess) on the recorded pipeline of report_helpers.RECORDED:
every number of report.json, report.md and the terminal (the runs' counts, PPLs, lengths and
teacher tokens; each eval's accuracy with Wilson's interval; the paired-bootstrap differences from
genssd) equals the one recomputed here from the raw records (events.jsonl, samples.jsonl), not
from the summary.json and metrics.json the report reads; and the four plots are real, non-blank PNGs."""

import json
import math

import pytest
from conftest import genssd
from report_helpers import (
    COLUMNS,
    COUNTS,
    DATASET,
    EVAL_PROBLEMS,
    METHODS,
    RECORDED,
    Z,
    copy_recorded,
    correct_by_problem,
    expected_accuracy,
    expected_run,
    jsonl,
    matches_recorded_differences,
    md_row,
    recorded_teacher_ratio,
)

RUN_ROWS = (("student_ppl", "Δ student PPL of kept (mean)", 3), ("length_tokens", "Δ length in tokens (mean)", 1),
            ("teacher_tokens_per_kept_token", "Δ teacher tokens per kept token", 2))  # fmt: skip


def wilson(correct: int, n: int) -> list[float]:
    p = correct / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return [centre - half, centre + half]


def shown(difference: tuple[float, float, float, int], digits: int) -> str:
    """A difference as report.md shows it: +1.23 (-0.40 to +2.90), n=10."""
    delta, low, high, pairs = difference
    signed = [f"{round(x, digits) + 0.0:+.{digits}f}" for x in (delta, low, high)]
    return f"{signed[0]} ({signed[1]} to {signed[2]}), n={pairs}"


@pytest.fixture
def recorded(tmp_path):
    return copy_recorded(tmp_path)


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
