"""The control methods through the engine, in process (stub teacher and student): `random-pick`
keeps a seeded random candidate per step (the same on a rerun, not the student's lowest PPL, marked
with its seed, the scorer's cache following it) and prunes on the step's lowest PPL as genssd does;
`posthoc-random` picks only among the correct whole trajectories; `standard-kd-budget` writes one
row per correct whole trajectory."""

from __future__ import annotations

import pytest
from engine_helpers import (
    STOP,
    by_trajectory,
    candidate_texts,
    ladder,
    make_config,
    make_problems,
    of_type,
    problem_number,
    rows,
    run_engine,
)
from engine_stubs import Call, StubScorer, StubTeacher, chunk
from pydantic import ValidationError

from genssd_cli.methods import lowest_index
from genssd_cli.run.engine import request_seed
from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import Candidate


def picks(run_dir) -> dict[tuple, int]:
    return {(c.problem_id, c.sample, c.step, c.attempt): c.chosen for c in of_type(read_events(run_dir), "choice")}


def test_random_pick_is_seeded_marked_and_not_the_students(tmp_path):
    """The same seed keeps the same candidates on a rerun; the pick is not always the lowest PPL;
    each choice carries the seed derived from teacher.seed and its step; the scorer keeps the
    picked candidate's cache; another teacher.seed picks otherwise."""
    cfg = make_config(method="random-pick", search={"samples": 2})
    problems = make_problems(4)
    scorer = StubScorer()
    run_engine(cfg, tmp_path / "a", problems, StubTeacher(ladder), scorer)
    run_engine(cfg, tmp_path / "b", problems, StubTeacher(ladder))
    first = picks(tmp_path / "a")
    assert first == picks(tmp_path / "b") and len(first) >= 8
    events = read_events(tmp_path / "a")
    not_lowest = 0
    for c in of_type(events, "choice"):
        assert c.pick_seed == request_seed(cfg.teacher.seed, "pick", c.problem_id, c.sample, c.step, c.attempt)
        not_lowest += c.chosen != lowest_index(c.ppl)
    assert not_lowest > 0
    texts = candidate_texts(events)
    kept = [(k.key, k.text) for k in scorer.kept]
    assert kept == [((c.problem_id, c.sample), texts[(c.problem_id, c.sample, c.step, c.attempt)][c.chosen])
                    for c in of_type(events, "choice")]  # fmt: skip
    other = make_config(method="random-pick", search={"samples": 2}, teacher={"seed": 12345})
    run_engine(other, tmp_path / "c", problems, StubTeacher(ladder))
    assert [c.pick_seed for c in of_type(read_events(tmp_path / "c"), "choice")] != [
        c.pick_seed for c in of_type(events, "choice")]  # fmt: skip


def test_random_pick_prunes_on_the_steps_lowest_ppl_as_genssd(tmp_path):
    """A step whose lowest PPL is under prune_ppl goes on whatever was picked; one whose every
    candidate is above it is re-sampled, then pruned, with the lowest PPL recorded."""
    ppl = {"easy": 1.0, "hard": 50.0, "harder": 60.0}

    def script(request: Call, index: int) -> Candidate:
        if problem_number(request) == 0:  # one easy candidate among hard ones, then the answer
            if request.trace:
                return chunk("The answer is 7.", "stop")
            return chunk(["hard", "easy", "harder"][index] + "\n")
        return chunk(["hard", "harder", "hard"][index] + "\n")  # all hard: pruned

    cfg = make_config(method="random-pick", search={"prune_ppl": 10.0, "retries": 1, "max_steps": 3})
    scorer = StubScorer(lambda text: ppl.get(text.strip(), 2.0))
    run_engine(cfg, tmp_path, make_problems(2), StubTeacher(script), scorer)
    events = read_events(tmp_path)
    choices = by_trajectory(events, "choice")
    assert choices[("p0", 0)][0].chosen != 1  # a hard one was picked: pruning on it would re-sample
    assert [(c.step, c.attempt) for c in choices[("p0", 0)]] == [(0, 0), (1, 0)]  # never re-sampled
    assert [(c.step, c.attempt) for c in choices[("p1", 0)]] == [(0, 0), (0, 1)]
    [prune] = of_type(events, "prune")
    assert (prune.problem_id, prune.best_ppl) == ("p1", 50.0)


POSTHOC_ANSWERS = [[8, 7, 7, 9], [7, 9, 7, 7], [8, 9, 6, 5], [9, 9, 9, 7]]  # reference 7; p2 has none right


def posthoc_script(request: Call, index: int) -> Candidate:
    answer = POSTHOC_ANSWERS[problem_number(request)][index]
    return chunk(f"Route {index} of problem {problem_number(request)}: the answer is {answer}.{STOP} More", "stop")


def test_posthoc_random_picks_only_among_the_correct(tmp_path):
    """Each kept whole trajectory is a correct one (any, when none is), picked with the step's
    seed, and nothing is scored before the pick."""
    cfg = make_config(method="posthoc-random", search={"n": 4, "max_new_tokens": 32, "samples": 3})
    problems = make_problems(4)
    scorer = StubScorer()
    run_engine(cfg, tmp_path, problems, StubTeacher(posthoc_script), scorer)
    events = read_events(tmp_path)
    chosen = set()
    for c in of_type(events, "choice"):
        right = [a == 7 for a in POSTHOC_ANSWERS[int(c.problem_id[1:])]]
        assert c.correct == right and (right[c.chosen] or not any(right))
        assert c.pick_seed == request_seed(cfg.teacher.seed, "pick", c.problem_id, c.sample, 0, 0)
        assert c.ppl == [None] * 4
        chosen.add((c.problem_id, c.chosen))
    assert len(chosen) > 4  # it does pick among them, not always the same one
    assert not [r for r in scorer.requests if len(r.candidates) > 1]  # only the kept rows are scored
    assert {r["correct"] for r in rows(tmp_path, problems) if r["problem_id"] != "p2"} == {True}


def test_standard_kd_budget_writes_a_row_per_correct_sample(tmp_path):
    """n whole trajectories per sample; every correct one is a row (rank 0, 1, …, in index order,
    the teacher's tokens on rank 0 only); none correct: the first, marked incorrect."""
    cfg = make_config(method="standard-kd-budget", search={"n": 4, "max_new_tokens": 32})
    problems = make_problems(3)
    teacher = StubTeacher(posthoc_script)
    run_engine(cfg, tmp_path, problems, teacher)
    assert [(r.n, r.trace) for r in teacher.requests] == [(4, "")] * 3
    result = rows(tmp_path, problems)
    kept = [(r["problem_id"], r["rank"], r["completion"][0]["content"].split(":")[0], r["correct"]) for r in result]
    assert kept == [
        ("p0", 0, "Route 1 of problem 0", True), ("p0", 1, "Route 2 of problem 0", True),
        ("p1", 0, "Route 0 of problem 1", True), ("p1", 1, "Route 2 of problem 1", True),
        ("p1", 2, "Route 3 of problem 1", True), ("p2", 0, "Route 0 of problem 2", False),
    ]  # fmt: skip
    assert [r["teacher_tokens"] > 0 for r in result] == [True, False, True, False, False, True]
    assert {r["method"] for r in result} == {"standard-kd-budget"}
    kept_of = {c.problem_id: c.kept for c in of_type(read_events(tmp_path), "choice")}
    assert kept_of == {"p0": [1, 2], "p1": [0, 2, 3], "p2": [0]}


def test_an_unknown_method_is_refused_with_the_controls_listed():
    """`--set method=…` of a method that does not exist names every method, the controls too."""
    with pytest.raises(ValidationError) as refused:
        make_config(method="random")
    assert all(f"'{m}'" in str(refused.value) for m in ("random-pick", "posthoc-random", "standard-kd-budget"))
