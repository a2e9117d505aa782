"""`genssd report` on runs that did not end cleanly: the recorded genssd run's events.jsonl edited
as a stopped session or a pruning-heavy run would leave it (then materialised again by genssd's own
replay). Failed, truncated and pending trajectories are counted and said under the table, and
bootstrap resamples where genssd kept no tokens are left out of the interval and counted, the
differences still equal to those recomputed from the raw records."""

import json
from pathlib import Path

import pytest
from conftest import genssd
from report_helpers import (
    COUNTS,
    METHODS,
    RECORDED,
    copy_recorded,
    expected_run,
    jsonl,
    matches_recorded_differences,
    md_row,
    recorded_teacher_ratio,
    report,
)


@pytest.fixture
def recorded(tmp_path):
    return copy_recorded(tmp_path)


def rematerialise(run_dir: Path) -> None:
    """trajectories.jsonl, failures.jsonl and summary.json made again from an edited events.jsonl,
    as `genssd run` makes them at the end of every session."""
    from genssd_cli.config import load_run_config
    from genssd_cli.problems import load_problems
    from genssd_cli.rundir.log import read_events
    from genssd_cli.rundir.records import RunStart
    from genssd_cli.rundir.replay import failure_rows, summarize, trajectory_rows

    cfg = load_run_config(run_dir / "config.yaml")
    events = read_events(run_dir)
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
