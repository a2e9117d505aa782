"""The report's differences from genssd (95 % paired bootstrap over problems), on hand-written run
directories (typed records through genssd's own replay) and evals, with every delta and interval
recomputed here from the hand-written numbers by the bootstrap's definition: the pairs each metric
is taken over, report.md's second table and the terminal, a dash and a warning where no problem is
shared, and the first run as the reference when there is no genssd run."""

import io
import json
from pathlib import Path

import pytest
import yaml
from report_helpers import bootstrap, check_differences, md_row, mean_gap, ratio_gap, report, write_eval

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
    from genssd_cli.rundir.records import Candidate, Finish, Message, Prune, Response, RunStart, SessionEnd
    from genssd_cli.rundir.records import TrajectoryRow as Row
    from genssd_cli.rundir.replay import summarize, trajectory_rows

    problems = [Problem(pid, "Q", "1") for pid in trajectories]
    events = [RunStart(config_hash="h", settings={}, forced=False, limit=None, problems=len(problems), genssd="t",
                       time=0.0)]  # fmt: skip
    for pid, samples in trajectories.items():
        for sample, (paid, kept) in enumerate(samples):
            for step, tokens in enumerate(paid):
                candidate = Candidate(text="x", finish_reason="stop", tokens=tokens)
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
