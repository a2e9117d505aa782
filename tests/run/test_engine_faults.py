"""Teacher failures, in process: a trajectory the teacher cannot serve gets an error record (and a
failure row) while the others finish, and a resume retries it, asking only for the candidates that
never arrived."""

from __future__ import annotations

from collections import Counter

import pytest
from engine_helpers import (
    ladder,
    of_type,
    problem_number,
    reference_run,
    rows,
    run_engine,
    step_of,
)
from engine_stubs import Call, StubTeacher, timeout

from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import FailureRow
from genssd_cli.rundir.replay import failure_rows, summarize


@pytest.fixture
def reference(tmp_path):
    """A whole run with one response per candidate, its rows and its teacher (reference_run)."""
    return reference_run(tmp_path)


# ---- teacher failures ------------------------------------------------------------------------


def test_a_failing_trajectory_gets_an_error_record_the_others_finish_and_resume_retries_it(reference, tmp_path):
    cfg, problems, _, expected, _ = reference

    def fail(request: Call):
        # p1's step 1: one candidate arrives, then the teacher runs out of retries.
        return timeout(after=1) if problem_number(request) == 1 and step_of(request) == 1 else None

    run = tmp_path / "run"
    session = run_engine(cfg, run, problems, StubTeacher(ladder, per_candidate=True, fail=fail))
    events = read_events(run)
    errors = of_type(events, "error")
    assert sorted((e.problem_id, e.sample, e.step, e.error_class) for e in errors) == [
        ("p1", 0, 1, "timeout"), ("p1", 1, 1, "timeout")]  # fmt: skip
    assert failure_rows(events) == [
        FailureRow(problem_id="p1", sample=s, step=1, error_class="timeout",
                   message="teacher failed after 4 attempts: timeout") for s in (0, 1)
    ]  # fmt: skip
    assert rows(run, problems) == [r for r in expected if r["problem_id"] != "p1"]
    assert session.stats.failed == 2 and session.stats.failures == Counter(timeout=2)
    assert summarize(events, problems, 2, cfg.teacher).trajectories.failed == 2

    retry = StubTeacher(ladder, per_candidate=True)
    run_engine(cfg, run, problems, retry)
    assert {problem_number(r) for r in retry.requests} == {1}
    # The candidate that arrived before the failure is not asked again.
    assert [r.missing for r in retry.requests if step_of(r) == 1] == [(1, 2), (1, 2)]
    final = read_events(run)
    assert failure_rows(final) == []
    assert summarize(final, problems, 2, cfg.teacher).trajectories.failed == 0
    assert rows(run, problems) == expected
