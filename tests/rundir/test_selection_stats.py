"""The selection diagnostics of summary.json (`selection`, rundir/replay.py's SelectionTally): on a
hand-written log every figure is the value worked out by hand, and a summary written before they
existed still reads (its `selection` null)."""

from __future__ import annotations

import json

import pytest

from genssd_cli.config import TeacherConfig
from genssd_cli.problems import Problem
from genssd_cli.rundir.records import Candidate, Choice, Finish, Message, Prune, Response, Summary, TrajectoryRow
from genssd_cli.rundir.replay import summarize


def response(pid: str, sample: int, attempt: int, start: int, cands: list[tuple[str, int, str]]) -> Response:
    """A response of step 0 holding candidates start, start + 1, … as (text, tokens, finish_reason)."""
    candidates = [Candidate(text=t, tokens=k, finish_reason=f) for t, k, f in cands]
    return Response(problem_id=pid, sample=sample, step=0, attempt=attempt, start=start, seed=1, n=len(cands),
                    prompt_tokens=5, completion_tokens=sum(c.tokens for c in candidates),
                    candidates=candidates)  # fmt: skip


def choice(pid: str, sample: int, attempt: int, chosen: int, n: int) -> Choice:
    return Choice(problem_id=pid, sample=sample, step=0, attempt=attempt, chosen=chosen, ppl=[2.0] * n, tokens=[1] * n)


def row(pid: str, sample: int, correct: bool, rank: int = 0) -> TrajectoryRow:
    return TrajectoryRow(problem_id=pid, sample=sample, method="genssd", prompt=[Message(role="user", content="Q")],
                         completion=[Message(role="assistant", content="A")], reference="1", answer="1",
                         correct=correct, finish="stop", steps=1, rank=rank, student_ppl=2.0, teacher_tokens=1,
                         completion_tokens=1)  # fmt: skip


def hand_written_log() -> list:
    """p1: one selection of 3 (a, a, b), b kept: it is the shortest (tied) and the one that stops;
    correct. p2: a selection of two identical texts, then a re-sample of two (y long, z short and
    stopping) keeping y, each candidate in a response of its own; pruned (8 + 6 teacher tokens).
    p3/0: one candidate (no selection), a row wrong and a further row right. p3/1: still open."""
    return [
        response("p1", 0, 0, 0, [("a", 2, "length"), ("a", 3, "length"), ("b", 2, "stop")]),
        choice("p1", 0, 0, 2, 3),
        Finish(problem_id="p1", sample=0, row=row("p1", 0, True)),
        response("p2", 0, 0, 0, [("x", 4, "length")]), response("p2", 0, 0, 1, [("x", 4, "length")]),
        choice("p2", 0, 0, 0, 2),
        response("p2", 0, 1, 0, [("y", 5, "length"), ("z", 1, "stop")]),
        choice("p2", 0, 1, 0, 2),
        Prune(problem_id="p2", sample=0, step=0, best_ppl=9.0),
        response("p3", 0, 0, 0, [("w", 5, "stop")]),
        Choice(problem_id="p3", sample=0, step=0, attempt=0, chosen=0, ppl=[None], tokens=[0]),
        Finish(problem_id="p3", sample=0, row=row("p3", 0, False), more=[row("p3", 0, True, rank=1)]),
        response("p3", 1, 0, 0, [("v", 3, "length")]),
    ]  # fmt: skip


def test_every_selection_diagnostic_is_its_hand_worked_value():
    """Each figure of `selection`, on a log whose values were worked out by hand."""
    problems = [Problem(pid, "Q", "1") for pid in ("p1", "p2", "p3", "p4")]
    teacher = TeacherConfig(model="t", base_url="http://t/v1")
    selection = summarize(hand_written_log(), problems, 2, teacher).selection
    third = 1 / 3
    assert selection.model_dump() == pytest.approx({
        "selections": 3,  # p1's, p2's two attempts; p3's one candidate is none
        "distinct_candidates": round((2 + 1 + 2) / 3, 4),
        "with_distinct": round(2 / 3, 4),
        "differs_from_first": round(third, 4),  # only p1's b differs from candidate 0
        "differs_from_random": round((2 / 3 + 0 + 1 / 2) / 3, 4),  # a random pick of an identical text agrees
        "kept_shortest": round(2 / 3, 4),  # b (tied at 2) and x (tied at 4); y is not
        "shortest_base_rate": round((2 / 3 + 1 + 1 / 2) / 3, 4),
        "kept_stopping": round(third, 4),
        "stopping_base_rate": round((1 / 3 + 0 + 1 / 2) / 3, 4),
        "resamples_per_step": round(third, 4),  # one re-sample, three steps
        "prune_rate": round(third, 4),  # p1, p2, p3/0 ended; p2 pruned
        "teacher_tokens_per_correct_row": round((7 + 8 + 6 + 5 + 3) / 2, 2),  # every response / 2 correct rows
        "pruned_branch_tokens": 8 + 6,
        "coverage": 0.5,  # p1 and p3 (by its further row) of four problems
    })  # fmt: skip


def test_a_summary_written_before_the_diagnostics_still_reads():
    """An old summary.json (no `selection`) validates, with `selection` null."""
    problems = [Problem("p1", "Q", "1")]
    teacher = TeacherConfig(model="t", base_url="http://t/v1")
    old = summarize(hand_written_log()[:3], problems, 1, teacher).model_dump(mode="json")
    del old["selection"]
    assert Summary.model_validate(json.loads(json.dumps(old))).selection is None
