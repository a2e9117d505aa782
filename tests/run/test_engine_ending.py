"""How a trajectory ends, in process: a step too hard after every re-sample is pruned (and one
easy enough continues; candidates without tokens are never too hard); a stop string, even one
split across two chunks, ends it; max_steps, max_new_tokens and a context too long for the teacher
end it truncated."""

from __future__ import annotations

import pytest
from engine_helpers import (
    STOP,
    make_config,
    make_problems,
    of_type,
    rows,
    run_engine,
    step_of,
)
from engine_stubs import Call, StubScorer, StubTeacher, chunk

from genssd_cli.errors import ContextTooLong
from genssd_cli.run.engine import request_seed
from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import Candidate
from genssd_cli.rundir.replay import failure_rows, summarize

# ---- pruning ---------------------------------------------------------------------------------


def test_a_step_too_hard_after_every_retry_is_pruned(tmp_path):
    cfg = make_config(search={"prune_ppl": 5.0, "retries": 2})
    problems = make_problems(1)
    hard = {"Hard 0.\n": 21.0, "Hard 1.\n": 20.5, "Hard 2.\n": 22.0}

    def script(request: Call, index: int) -> Candidate:
        return chunk("Easy start.\n") if step_of(request) == 0 else chunk(f"Hard {index}.\n")

    teacher = StubTeacher(script)
    session = run_engine(cfg, tmp_path, problems, teacher, StubScorer(lambda text: hard.get(text, 2.0)))
    events = read_events(tmp_path)
    assert [(e.step, e.attempt) for e in of_type(events, "choice")] == [(0, 0), (1, 0), (1, 1), (1, 2)]
    assert [(e.step, e.attempt) for e in of_type(events, "response")] == [(0, 0), (1, 0), (1, 1), (1, 2)]
    # Each re-sample asks the teacher again, with the attempt's own seed.
    assert [r.seed for r in teacher.requests] == [request_seed(0, "p0", 0, s, a) for s, a in
                                                  [(0, 0), (1, 0), (1, 1), (1, 2)]]  # fmt: skip
    [prune] = of_type(events, "prune")
    assert (prune.problem_id, prune.sample, prune.step, prune.best_ppl) == ("p0", 0, 1, 20.5)
    assert events[-1].type == "prune"
    assert of_type(events, "finish") == [] and rows(tmp_path, problems) == [] and failure_rows(events) == []
    assert summarize(events, problems, 1, cfg.teacher).trajectories.pruned == 1
    assert session.stats.pruned == 1


def test_a_resample_that_is_easy_enough_continues(tmp_path):
    cfg = make_config(search={"prune_ppl": 5.0, "retries": 2})
    first = request_seed(0, "p0", 0, 0, 0)

    def script(request: Call, index: int) -> Candidate:
        return chunk(f"Hard {index}.\n") if request.seed == first else chunk("The answer is 7.", "stop")

    run_engine(cfg, tmp_path, make_problems(1), StubTeacher(script),
               StubScorer(lambda text: 30.0 if text.startswith("Hard") else 2.0))  # fmt: skip
    events = read_events(tmp_path)
    assert [(e.step, e.attempt) for e in of_type(events, "choice")] == [(0, 0), (0, 1)]
    assert of_type(events, "prune") == []
    [row] = rows(tmp_path, make_problems(1))
    assert (row["completion"][0]["content"], row["finish"], row["steps"], row["correct"]) == (
        "The answer is 7.", "stop", 1, True)  # fmt: skip


def test_candidates_without_tokens_are_never_too_hard(tmp_path):
    cfg = make_config(search={"prune_ppl": 1.5, "retries": 2})

    def script(request: Call, index: int) -> Candidate:
        # Step 0 is easy enough; at step 1 the teacher only stops: no candidate has a token.
        return chunk("The answer is 7.") if not request.trace else chunk("", "stop", 0)

    run_engine(cfg, tmp_path, make_problems(1), StubTeacher(script), StubScorer(lambda text: 1.2))
    events = read_events(tmp_path)
    assert of_type(events, "prune") == []
    choices = of_type(events, "choice")
    assert [(c.step, c.attempt) for c in choices] == [(0, 0), (1, 0)]  # no re-sample of step 1
    assert choices[1].ppl == [None, None, None] and choices[1].tokens == [0, 0, 0]
    [row] = rows(tmp_path, make_problems(1))
    assert (row["finish"], row["steps"], row["completion"][0]["content"]) == ("stop", 2, "The answer is 7.")


# ---- stop strings and limits -----------------------------------------------------------------


@pytest.mark.parametrize("split", range(1, len(STOP)))
def test_a_stop_string_across_two_chunks_ends_the_trajectory(tmp_path, split):
    body = "Seven it is. The answer is 7."

    def script(request: Call, index: int) -> Candidate:
        # Neither chunk holds the whole stop string, so no server could have stopped on it.
        if not request.trace:
            return chunk(body + STOP[:split])
        return chunk(STOP[split:] + " What is 1 + 1?\n")

    teacher = StubTeacher(script)
    run_engine(make_config(), tmp_path, make_problems(1), teacher)
    [row] = rows(tmp_path, make_problems(1))
    assert (row["completion"][0]["content"], row["finish"], row["steps"], row["correct"]) == (body, "stop", 2, True)
    assert len(teacher.requests) == 2


def test_max_steps_ends_the_trajectory_truncated(tmp_path):
    teacher = StubTeacher(lambda request, index: chunk(f"Line {step_of(request)}.{index}\n"))
    run_engine(make_config(search={"max_steps": 3}), tmp_path, make_problems(1), teacher)
    [row] = rows(tmp_path, make_problems(1))
    assert (row["finish"], row["steps"]) == ("truncated", 3)
    assert len(teacher.requests) == 3


def test_max_new_tokens_caps_each_request_and_ends_the_trajectory_truncated(tmp_path):
    cfg = make_config(search={"chunk_tokens": 8, "max_new_tokens": 20, "max_steps": 10})
    # The teacher writes as many words (tokens) as it may.
    teacher = StubTeacher(lambda request, index: chunk("w " * request.max_tokens))
    run_engine(cfg, tmp_path, make_problems(1), teacher)
    assert [r.max_tokens for r in teacher.requests] == [8, 8, 4]
    [row] = rows(tmp_path, make_problems(1))
    assert (row["finish"], row["steps"], row["completion_tokens"]) == ("truncated", 3, 20)
    assert row["teacher_tokens"] == 3 * 20  # all three candidates of each step were paid for


def test_a_context_too_long_for_the_teacher_ends_the_trajectory_truncated(tmp_path):
    def fail(request: Call):
        return (0, ContextTooLong("the prompt does not fit")) if step_of(request) == 2 else None

    teacher = StubTeacher(lambda request, index: chunk(f"Line {index}.\n"), fail=fail)
    run_engine(make_config(), tmp_path, make_problems(1), teacher)
    events = read_events(tmp_path)
    assert of_type(events, "error") == []
    [row] = rows(tmp_path, make_problems(1))
    assert (row["finish"], row["steps"]) == ("truncated", 2)
