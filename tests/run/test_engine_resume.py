"""Resume, in process: a log is replayed as a cache (nothing received is asked again, nothing
scored is scored again, a step cut half-way asks only for its missing candidates); a stop request
or max_cost sends nothing more and a resume ends as an uninterrupted run would; a session counts
only what it received."""

from __future__ import annotations

import pytest
from engine_helpers import (
    PRICE,
    by_trajectory,
    copy_log,
    ladder,
    make_config,
    make_problems,
    of_type,
    received,
    reference_run,
    rows,
    run_engine,
    step_of,
)
from engine_stubs import Call, StubScorer, StubTeacher, chunk

from genssd_cli.run.control import RunControl
from genssd_cli.run.engine import request_seed
from genssd_cli.rundir.layout import EVENTS
from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import Candidate
from genssd_cli.rundir.replay import spent, summarize


@pytest.fixture
def reference(tmp_path):
    """A whole run with one response per candidate, its rows and its teacher (reference_run)."""
    return reference_run(tmp_path)


# ---- replay ----------------------------------------------------------------------------------


def test_replaying_a_finished_log_asks_and_scores_nothing(reference):
    cfg, problems, run, expected, _ = reference
    before = (run / EVENTS).read_bytes()
    teacher, scorer = StubTeacher(ladder, per_candidate=True), StubScorer()
    session = run_engine(cfg, run, problems, teacher, scorer)
    assert teacher.requests == [] and scorer.requests == []
    assert (run / EVENTS).read_bytes() == before
    assert rows(run, problems) == expected
    assert session.stats.finished + session.stats.truncated == 6


def test_replaying_recorded_steps_asks_nothing_and_scores_only_the_finishes(reference, tmp_path):
    cfg, problems, run, expected, _ = reference
    copy_log(run, tmp_path / "resumed", lambda i, e: e.type != "finish")
    teacher, scorer = StubTeacher(ladder, per_candidate=True), StubScorer()
    run_engine(cfg, tmp_path / "resumed", problems, teacher, scorer)
    assert teacher.requests == []
    assert scorer.step_requests() == []  # every step's choice came from the log
    assert len(scorer.requests) == 6  # the kept trajectories' PPL, scored whole at the finish
    assert rows(tmp_path / "resumed", problems) == expected


def test_a_step_cut_after_its_first_response_asks_only_for_the_missing_candidates(reference, tmp_path):
    cfg, problems, run, expected, original = reference
    events = read_events(run)
    cut = next(i for i, e in enumerate(events) if e.type == "response" and e.step == 1 and e.start == 0)
    copy_log(run, tmp_path / "resumed", lambda i, e: i <= cut)
    kept_log = read_events(tmp_path / "resumed")
    have = received(kept_log)
    key = (events[cut].problem_id, events[cut].sample, 1, 0)
    assert have[key] == [0]

    teacher = StubTeacher(ladder, per_candidate=True)
    run_engine(cfg, tmp_path / "resumed", problems, teacher)
    base_seeds = {request_seed(0, *k): k for k in received(events)}
    for request in teacher.requests:
        step = base_seeds[request.seed]
        assert request.missing == tuple(i for i in range(3) if i not in have.get(step, [])), step
    [cut_step] = [r for r in teacher.requests if base_seeds[r.seed] == key]
    assert cut_step.missing == (1, 2)
    # Steps whose candidates were all logged are never asked again; the rest costs what it did.
    assert all(sorted(have.get(base_seeds[r.seed], [])) != [0, 1, 2] for r in teacher.requests)
    assert sum(len(v) for v in have.values()) + sum(len(r.missing) for r in teacher.requests) == sum(
        len(r.missing) for r in original.requests
    )
    final = read_events(tmp_path / "resumed")
    assert all(sorted(indices) == [0, 1, 2] for indices in received(final).values())
    assert rows(tmp_path / "resumed", problems) == expected


def test_a_step_cut_before_its_choice_is_scored_once_and_asks_nothing(reference, tmp_path):
    cfg, problems, run, expected, _ = reference
    events = read_events(run)
    choice = next(i for i, e in enumerate(events) if e.type == "choice" and e.step == 1)
    key = (events[choice].problem_id, events[choice].sample)
    # Every response of the step arrived, then the process died before the choice was logged.
    copy_log(run, tmp_path / "resumed", lambda i, e: i < choice)
    teacher, scorer = StubTeacher(ladder, per_candidate=True), StubScorer()
    run_engine(cfg, tmp_path / "resumed", problems, teacher, scorer)
    assert not any(request_seed(0, *key, 1, 0) == r.seed for r in teacher.requests)
    assert [k.key for k in scorer.kept].count(key) == len(by_trajectory(events, "choice")[key]) - 1
    assert rows(tmp_path / "resumed", problems) == expected

# ---- stop requests ---------------------------------------------------------------------------


def four_steps(request: Call, index: int) -> Candidate:
    if step_of(request) == 3:
        return chunk("The answer is 7.", "stop")
    return chunk(f"Step {step_of(request)}: {(request.seed + index) % 1000}\n")


def test_a_stop_request_sends_nothing_more_and_resuming_ends_as_an_uninterrupted_run(tmp_path):
    cfg = make_config(engine={"max_active_problems": 2})
    problems = make_problems(4)
    whole = StubTeacher(four_steps)
    run_engine(cfg, tmp_path / "whole", problems, whole)

    def stop_at_fifth(request: Call, control: RunControl) -> None:
        if len(first.requests) == 5:
            control.request_stop("signal")  # what the first Ctrl-C does; this request is in flight

    first = StubTeacher(four_steps, on_request=stop_at_fifth)
    run = tmp_path / "run"
    session = run_engine(cfg, run, problems, first)
    assert session.control.reason == "signal"
    assert len(first.requests) == 5 and not any(r.stopping for r in first.requests)
    events = read_events(run)
    # The requests in flight were answered and recorded, no trajectory got an error record.
    assert {e.seed for e in of_type(events, "response")} == first.seeds()
    assert of_type(events, "error") == [] and of_type(events, "prune") == []
    assert not any(e.problem_id == "p3" for e in events if hasattr(e, "problem_id"))  # never started
    # Scoring stops with the run: the step answered after the stop is recorded but not scored
    # (a resume scores it); every earlier step of an interrupted trajectory was chosen.
    ended = set(by_trajectory(events, "finish"))
    responses, choices = by_trajectory(events, "response"), by_trajectory(events, "choice")
    interrupted = set(responses) - ended
    assert interrupted and all(len(responses[k]) - len(choices[k]) in (0, 1) for k in interrupted)
    assert sum(len(responses[k]) - len(choices[k]) for k in interrupted) >= 1  # the one in flight
    assert summarize(events, problems, 1, cfg.teacher).trajectories.pending > 0
    assert session.stats.failed == 0

    second = StubTeacher(four_steps)
    run_engine(cfg, run, problems, second)
    assert not first.seeds() & second.seeds()  # nothing received is asked for again
    assert len(first.requests) + len(second.requests) == len(whole.requests)
    assert rows(run, problems) == rows(tmp_path / "whole", problems)


# ---- budgets ---------------------------------------------------------------------------------


def test_max_cost_stops_the_run_and_raising_it_resumes(tmp_path):
    problems = make_problems(4)
    priced = make_config(teacher={"price": PRICE})
    whole = StubTeacher(ladder)
    run_engine(priced, tmp_path / "whole", problems, whole)
    total = spent(read_events(tmp_path / "whole"), priced.teacher)
    assert total > 0

    capped = make_config(teacher={"price": PRICE}, max_cost=total / 3)
    run = tmp_path / "run"
    first = StubTeacher(ladder)
    session = run_engine(capped, run, problems, first)
    events = read_events(run)
    assert session.control.reason == "budget"
    # The cost is counted from the responses, and nothing was sent once it reached max_cost.
    assert session.control.spent == pytest.approx(spent(events, capped.teacher))
    assert capped.max_cost <= session.control.spent < total
    assert all((r.spent or 0.0) < capped.max_cost for r in first.requests)
    assert {e.seed for e in of_type(events, "response")} == first.seeds()
    assert summarize(events, problems, 1, capped.teacher).trajectories.pending > 0

    raised = make_config(teacher={"price": PRICE}, max_cost=10 * total)
    second = StubTeacher(ladder)
    session = run_engine(raised, run, problems, second)
    assert session.control.reason is None
    assert not first.seeds() & second.seeds()
    assert len(first.requests) + len(second.requests) == len(whole.requests)
    assert spent(read_events(run), raised.teacher) == pytest.approx(total)
    assert rows(run, problems) == rows(tmp_path / "whole", problems)

# ---- what a session counts -------------------------------------------------------------------


def test_a_session_counts_only_the_candidates_it_received(reference, tmp_path):
    cfg, problems, run, _, _ = reference
    copy_log(run, tmp_path / "resumed", lambda i, e: e.type != "finish")
    teacher = StubTeacher(ladder, per_candidate=True)
    session = run_engine(cfg, tmp_path / "resumed", problems, teacher)
    assert teacher.requests == []
    assert (session.stats.candidates, session.stats.teacher_tokens) == (0, 0)
