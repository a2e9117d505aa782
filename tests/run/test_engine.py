"""The engine's rules in process: a scripted teacher and a stub student drive
`genssd_cli.run.engine.Engine` directly over a real run directory (events.jsonl), in milliseconds.

Selection, pruning, stop strings, limits, replay and resume, stop requests, budgets, the
baselines' selection and teacher failures are all checked here against the typed records and
the materialised rows. The end-to-end tests (test_run.py, test_resume.py, …) keep proving the
real components: the student model, the teacher server and client, signals and kill -9.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from engine_stubs import Request, StubScorer, StubTeacher, chunk, default_ppl, timeout

from genssd_cli.answers import answers_match, extract_answer
from genssd_cli.config import RunConfig
from genssd_cli.errors import ContextTooLong
from genssd_cli.methods import METHODS
from genssd_cli.problems import Problem, render_prompt
from genssd_cli.run.control import RunControl
from genssd_cli.run.counters import RunStats
from genssd_cli.run.engine import Engine
from genssd_cli.rundir.records import Event, FailureRow
from genssd_cli.rundir.replay import Replay, failure_rows, spent, summarize, trajectory_rows
from genssd_cli.rundir.store import EVENTS, RunStore, read_events
from genssd_cli.student.scorer import Score
from genssd_cli.student.scoring_queue import ScoringQueue
from genssd_cli.teacher.pool import Candidate, request_seed

TEMPLATE = "Question: {question}\nAnswer:"
STOP = "\nQuestion:"
PRICE = {"input": 100.0, "output": 400.0}  # per million tokens: big, so that a few requests cost something


# ---- set-up ---------------------------------------------------------------------------------


def make_config(**sections) -> RunConfig:
    raw = {
        "method": "genssd",
        "teacher": {"model": "stub-teacher", "base_url": "http://127.0.0.1:9/v1", "stop": [STOP]},
        "student": {"model": "stub-student"},
        "search": {"n": 3, "chunk_tokens": 8, "max_steps": 6, "max_new_tokens": 64,
                   "prune_ppl": None, "retries": 1, "samples": 1},
        "data": {"source": "arith", "count": 4, "seed": 0},
        "engine": {"max_active_problems": 4, "fsync": "never"},
    }  # fmt: skip
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return RunConfig.model_validate(raw)


def make_problems(count: int) -> list[Problem]:
    return [Problem(f"p{i}", f"Problem {i}: what is {i} + 7 - {i}?", "7") for i in range(count)]


def problem_number(request: Request) -> int:
    return int(re.search(r"Problem (\d+):", request.head).group(1))


def step_of(request: Request) -> int:
    """The scripts below write one line per chunk: the step is the number of lines so far."""
    return request.trace.count("\n")


@dataclass
class Session:
    control: RunControl
    stats: RunStats


def run_engine(cfg: RunConfig, run_dir: Path, problems: list[Problem], teacher: StubTeacher,
               scorer: StubScorer | None = None) -> Session:  # fmt: skip
    """One session as runner.py wires it: replay of what run_dir's log holds, the cost spent so
    far, a RunControl made inside the event loop, and the engine over all problems."""
    events = read_events(run_dir)
    stats = RunStats(problems_total=len(problems))

    async def main() -> RunControl:
        control = RunControl(anyio.Event(), spent=spent(events, cfg.teacher), max_cost=cfg.max_cost)
        teacher.control = control
        with RunStore(run_dir, fsync="never") as store:
            store.open_log()
            scoring = ScoringQueue(scorer or StubScorer(), control.stop)
            engine = Engine(cfg, teacher, scoring, store, stats, TEMPLATE, Replay(events), control)
            with anyio.fail_after(10):
                await engine.run(problems)
        return control

    return Session(anyio.run(main), stats)


def rows(run_dir: Path, problems: list[Problem]) -> list[dict]:
    return [r.model_dump() for r in trajectory_rows(read_events(run_dir), problems)]


def of_type(events: list[Event], kind: str) -> list:
    return [e for e in events if e.type == kind]


def by_trajectory(events: list[Event], kind: str) -> dict[tuple[str, int], list]:
    out: dict[tuple[str, int], list] = {}
    for e in of_type(events, kind):
        out.setdefault((e.problem_id, e.sample), []).append(e)
    return out


def received(events: list[Event]) -> dict[tuple, list[int]]:
    """(problem, sample, step, attempt) -> the candidate indices its responses held."""
    out: dict[tuple, list[int]] = {}
    for e in of_type(events, "response"):
        out.setdefault((e.problem_id, e.sample, e.step, e.attempt), []).extend(
            range(e.start, e.start + len(e.candidates))
        )
    return out


def candidate_texts(events: list[Event]) -> dict[tuple, dict[int, str]]:
    out: dict[tuple, dict[int, str]] = {}
    for e in of_type(events, "response"):
        step = out.setdefault((e.problem_id, e.sample, e.step, e.attempt), {})
        step.update({e.start + i: c.text for i, c in enumerate(e.candidates)})
    return out


def copy_log(src: Path, dst: Path, keep: Callable[[int, Event], bool]) -> None:
    """A run directory whose log holds the lines of src's that `keep(index, event)` accepts."""
    lines = (src / EVENTS).read_text(encoding="utf-8").splitlines(keepends=True)
    events = read_events(src)
    dst.mkdir()
    kept = [line for i, (line, event) in enumerate(zip(lines, events, strict=True)) if keep(i, event)]
    (dst / EVENTS).write_text("".join(kept), encoding="utf-8")


def ladder(request: Request, index: int) -> Candidate:
    """A problem-dependent number of reasoning lines (1 to 3), then the answer (wrong for problem
    2), which stops. Every candidate depends on the step's seed, as a sampling teacher's does."""
    draw = (request.seed + index) % 1000
    if step_of(request) >= 1 + problem_number(request) % 3:
        answer = 8 if problem_number(request) == 2 else 7
        return chunk(f"After {draw} checks, the answer is {answer}.", "stop")
    return chunk(f"Step {step_of(request)}: idea {draw}.\n")


# ---- 1. genssd selection --------------------------------------------------------------------


def test_genssd_keeps_the_lowest_ppl_candidate_every_step(tmp_path):
    cfg = make_config(search={"samples": 2})
    problems = make_problems(3)
    teacher, scorer = StubTeacher(ladder), StubScorer()
    run_engine(cfg, tmp_path, problems, teacher, scorer)
    events = read_events(tmp_path)
    texts = candidate_texts(events)
    choices = by_trajectory(events, "choice")
    finishes = {key: f.row for key, [f] in by_trajectory(events, "finish").items()}
    assert set(finishes) == {(p.id, s) for p in problems for s in range(2)}
    kept = {}
    for k in scorer.kept:
        kept.setdefault(k.key, []).append(k)
    chosen_indices = set()
    for key, steps in choices.items():
        assert [(c.step, c.attempt) for c in steps] == [(i, 0) for i in range(len(steps))]
        problem = next(p for p in problems if p.id == key[0])
        prefix = ""
        for choice in steps:
            candidates = texts[(*key, choice.step, choice.attempt)]
            ppls = [default_ppl(candidates[i]) for i in range(3)]
            assert choice.ppl == pytest.approx(ppls)
            assert choice.chosen == METHODS["genssd"].select(ppls) == ppls.index(min(ppls))
            # The scorer was handed the same rule and kept the same candidate, after the same prefix.
            step_kept = kept[key][choice.step]
            assert (step_kept.index, step_kept.text) == (choice.chosen, candidates[choice.chosen])
            assert step_kept.context == scorer.prompt_text(problem.question) + prefix
            prefix += candidates[choice.chosen]
            chosen_indices.add(choice.chosen)
        row = finishes[key]
        assert row.completion[0].content == prefix and row.steps == len(steps)
        assert row.finish == "stop" and row.method == "genssd"
        assert row.student_ppl == round(default_ppl(prefix), 6)
        assert row.answer == extract_answer(prefix) and row.correct == answers_match("7", row.answer)
        assert row.prompt[0].content == scorer.user_message(problem.question)
        responses = by_trajectory(events, "response")[key]
        assert row.teacher_tokens == sum(r.completion_tokens for r in responses)
    assert len(chosen_indices) > 1, "the script must make different candidates win"
    assert Counter(scorer.forgotten) == Counter(list(finishes))  # every trajectory's cache was let go
    # The two samples of a problem are asked with their own seeds.
    seeds = {e.seed for e in of_type(events, "response") if e.step == 0 and e.problem_id == "p0"}
    assert len(seeds) == 2
    assert {r.correct for r in finishes.values()} == {True, False}


# ---- 2. pruning -----------------------------------------------------------------------------


def test_a_step_too_hard_after_every_retry_is_pruned(tmp_path):
    cfg = make_config(search={"prune_ppl": 5.0, "retries": 2})
    problems = make_problems(1)
    hard = {"Hard 0.\n": 21.0, "Hard 1.\n": 20.5, "Hard 2.\n": 22.0}

    def script(request: Request, index: int) -> Candidate:
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

    def script(request: Request, index: int) -> Candidate:
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

    def script(request: Request, index: int) -> Candidate:
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


# ---- 3. stop strings and limits -------------------------------------------------------------


@pytest.mark.parametrize("split", range(1, len(STOP)))
def test_a_stop_string_across_two_chunks_ends_the_trajectory(tmp_path, split):
    body = "Seven it is. The answer is 7."

    def script(request: Request, index: int) -> Candidate:
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
    def fail(request: Request):
        return (0, ContextTooLong("the prompt does not fit")) if step_of(request) == 2 else None

    teacher = StubTeacher(lambda request, index: chunk(f"Line {index}.\n"), fail=fail)
    run_engine(make_config(), tmp_path, make_problems(1), teacher)
    events = read_events(tmp_path)
    assert of_type(events, "error") == []
    [row] = rows(tmp_path, make_problems(1))
    assert (row["finish"], row["steps"]) == ("truncated", 2)


# ---- 4. replay ------------------------------------------------------------------------------


@pytest.fixture
def reference(tmp_path):
    """A whole run with one response per candidate (a server that ignores n), and its rows."""
    cfg = make_config(search={"samples": 2})
    problems = make_problems(3)
    run = tmp_path / "reference"
    teacher = StubTeacher(ladder, per_candidate=True)
    run_engine(cfg, run, problems, teacher)
    return cfg, problems, run, rows(run, problems), teacher


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


# ---- 5. stop requests -----------------------------------------------------------------------


def four_steps(request: Request, index: int) -> Candidate:
    if step_of(request) == 3:
        return chunk("The answer is 7.", "stop")
    return chunk(f"Step {step_of(request)}: {(request.seed + index) % 1000}\n")


def test_a_stop_request_sends_nothing_more_and_resuming_ends_as_an_uninterrupted_run(tmp_path):
    cfg = make_config(engine={"max_active_problems": 2})
    problems = make_problems(4)
    whole = StubTeacher(four_steps)
    run_engine(cfg, tmp_path / "whole", problems, whole)

    def stop_at_fifth(request: Request, control: RunControl) -> None:
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


# ---- 6. budgets -----------------------------------------------------------------------------


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


# ---- 7. the baselines -----------------------------------------------------------------------


def test_standard_kd_keeps_its_one_whole_trajectory(tmp_path):
    cfg = make_config(method="standard-kd", search={"samples": 2, "max_new_tokens": 48})
    problems = make_problems(2)

    def script(request: Request, index: int) -> Candidate:
        answer = 7 if problem_number(request) == 0 else 9  # p0 right, p1 wrong
        return chunk(f"Thinking ({request.seed}). The answer is {answer}.{STOP} What is 1 + 1?", "stop")

    teacher, scorer = StubTeacher(script), StubScorer()
    run_engine(cfg, tmp_path, problems, teacher, scorer)
    assert len(teacher.requests) == 4
    assert all((r.n, r.missing, r.max_tokens, r.trace) == (1, (0,), 48, "") for r in teacher.requests)
    assert scorer.step_requests() == []  # one candidate: nothing to choose from
    events = read_events(tmp_path)
    for choice in of_type(events, "choice"):
        assert (choice.step, choice.attempt, choice.chosen, choice.ppl, choice.tokens, choice.correct) == (
            0, 0, 0, [None], [0], None)  # fmt: skip
    responses = {(e.problem_id, e.sample): e for e in of_type(events, "response")}
    result = rows(tmp_path, problems)
    assert len(result) == 4
    for row in result:
        [candidate] = responses[(row["problem_id"], row["sample"])].candidates
        text = candidate.text.split(STOP)[0]
        assert row["completion"][0]["content"] == text
        assert (row["method"], row["steps"], row["finish"]) == ("standard-kd", 1, "stop")
        assert row["correct"] == (row["problem_id"] == "p0")
        assert row["completion_tokens"] == row["teacher_tokens"] == candidate.tokens
        assert row["student_ppl"] == round(default_ppl(text), 6)
    assert sorted(r.candidates for r in scorer.requests) == sorted([r["completion"][0]["content"]] for r in result)


# (answers, student PPLs) of each problem's four whole trajectories.
POSTHOC = {
    0: ([8, 7, 7, 9], [1.0, 3.0, 2.0, 0.5]),  # two correct: the easier of them, though 3 is easiest
    1: ([8, 9, 6, 5], [3.0, 2.0, 4.0, 5.0]),  # none correct: the easiest, marked incorrect
}


def posthoc_text(problem: int, index: int) -> str:
    return f"Route {index} of problem {problem}: the answer is {POSTHOC[problem][0][index]}."


def test_posthoc_ppl_keeps_the_easiest_correct_trajectory(tmp_path):
    cfg = make_config(method="posthoc-ppl", search={"n": 4, "max_new_tokens": 32})
    problems = make_problems(2)
    ppl = {posthoc_text(p, i): POSTHOC[p][1][i] for p in POSTHOC for i in range(4)}

    def script(request: Request, index: int) -> Candidate:
        return chunk(posthoc_text(problem_number(request), index) + STOP + " Next one", "stop")

    teacher, scorer = StubTeacher(script), StubScorer(ppl.__getitem__)
    run_engine(cfg, tmp_path, problems, teacher, scorer)
    assert [(r.n, r.missing, r.max_tokens) for r in teacher.requests] == [(4, (0, 1, 2, 3), 32)] * 2
    events = read_events(tmp_path)
    choices = {c.problem_id: c for c in of_type(events, "choice")}
    assert (choices["p0"].correct, choices["p0"].chosen) == ([False, True, True, False], 2)
    assert (choices["p1"].correct, choices["p1"].chosen) == ([False] * 4, 1)
    result = {r["problem_id"]: r for r in rows(tmp_path, problems)}
    for p, problem in enumerate(problems):
        choice = choices[problem.id]
        assert choice.chosen == METHODS["posthoc-ppl"].select(POSTHOC[p][1], choice.correct)
        assert choice.ppl == POSTHOC[p][1]
        row = result[problem.id]
        assert row["completion"][0]["content"] == posthoc_text(p, choice.chosen)
        assert (row["correct"], row["method"], row["steps"]) == (p == 0, "posthoc-ppl", 1)
        assert row["student_ppl"] == POSTHOC[p][1][choice.chosen]
    # The candidates were scored cut at the stop string, against the student's prompt alone.
    whole_scored = [r for r in scorer.requests if len(r.candidates) == 4]
    assert sorted(r.candidates for r in whole_scored) == [[posthoc_text(p, i) for i in range(4)] for p in POSTHOC]
    assert {r.context for r in whole_scored} == {scorer.prompt_text(p.question) for p in problems}


# MoRSD: four whole trajectories of problem p0 (reference 7); the student's PPL of "The answer is 7."
# after each rationale (the text before its answer sentence), and after the prompt alone (4.0).
MORSD_TEXTS = [
    "Three plus four makes seven here. The answer is 7.",
    "Three plus four makes seven here. The answer is 7.",  # the same rationale: redundant
    "Start at 3 and count 4 more to reach 7. The answer is 7.",
    "Three plus four makes eight. The answer is 8.",  # wrong: never ranked
]
MORSD_ANSWER_PPL = {"Three plus four makes seven here. ": 2.0, "Start at 3 and count 4 more to reach 7. ": 3.0, "": 4.0}


class RationaleScorer(StubScorer):
    """The answer's PPL depends on the rationale before it (the context past the prompt)."""

    def score(self, requests):
        out = []
        for request in requests:
            if request.candidates == ["The answer is 7."]:
                self.requests.append(request)
                rationale = request.context.rpartition("<assistant>")[2]
                out.append([Score(MORSD_ANSWER_PPL[rationale], 5)])
            else:
                out += super().score([request])
        return out


def independent_morsd_pick(rd: list, texts: list[str], keep: int, threshold: float, n: int) -> list[int]:
    """MoRSD's selection written again from its definition, to check the logged choice."""
    def grams(text):
        words = text.lower().split()
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    kept = []
    for i in sorted((i for i in range(len(rd)) if rd[i] is not None), key=lambda i: (rd[i], i)):
        if len(kept) < keep and all(len(grams(texts[i]) & grams(texts[k])) / len(grams(texts[i]) | grams(texts[k]))
                                    < threshold for k in kept):  # fmt: skip
            kept.append(i)
    return kept


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_morsd_keeps_correct_non_redundant_rationales_of_lowest_difficulty(tmp_path, keep):
    cfg = make_config(method="morsd", search={"n": 4, "max_new_tokens": 40}, morsd={"keep": keep})
    problems = make_problems(1)
    teacher = StubTeacher(lambda request, index: chunk(MORSD_TEXTS[index] + STOP, "stop"))
    run_engine(cfg, tmp_path, problems, teacher, RationaleScorer())
    [choice] = of_type(read_events(tmp_path), "choice")
    assert choice.correct == [True, True, True, False]
    assert (choice.base_ppl, choice.answer_ppl) == (4.0, [2.0, 2.0, 3.0, None])
    assert choice.rd == [0.5, 0.5, 0.75, None]
    rationales = [text.rpartition("The answer")[0] for text in MORSD_TEXTS]
    expected = independent_morsd_pick(choice.rd, rationales, keep, cfg.morsd.duplicate_threshold, 3)
    assert choice.kept == expected == [0, 2][:keep] and choice.chosen == 0
    result = rows(tmp_path, problems)
    assert [(r["rank"], r["completion"][0]["content"], r["correct"]) for r in result] == [
        (rank, MORSD_TEXTS[i], True) for rank, i in enumerate(expected)]  # fmt: skip
    assert [r["teacher_tokens"] > 0 for r in result] == [True] + [False] * (len(result) - 1)  # paid once
    # Replayed: nothing asked, nothing scored, the same rows.
    again = RationaleScorer()
    run_engine(cfg, tmp_path, problems, StubTeacher(teacher.script), again)
    assert again.requests == [] and rows(tmp_path, problems) == result


def test_morsd_with_no_correct_rationale_keeps_the_first_marked_incorrect(tmp_path):
    cfg = make_config(method="morsd", search={"n": 2, "max_new_tokens": 40})
    teacher = StubTeacher(lambda request, index: chunk(MORSD_TEXTS[3], "stop"))
    run_engine(cfg, tmp_path, make_problems(1), teacher, RationaleScorer())
    [choice] = of_type(read_events(tmp_path), "choice")
    assert (choice.kept, choice.rd, choice.correct) == ([0], [None, None], [False, False])
    [row] = rows(tmp_path, make_problems(1))
    assert (row["correct"], row["answer"]) == (False, "8")


# ---- 7b. strict rows: only an ended trace that states its answer is correct --------------------


def test_a_truncated_trace_is_never_correct_even_when_its_last_number_is_right(tmp_path):
    """p0 states the right answer but runs out of steps; p1 ends without stating an answer,
    though its last number is the reference; p2 ends and states it: only p2 is correct."""
    cfg = make_config(search={"max_steps": 2, "max_new_tokens": 64})
    problems = make_problems(3)

    def script(request: Request, index: int) -> Candidate:
        number = problem_number(request)
        if number == 0:
            return chunk(f"Line {step_of(request)}: so far the answer is 7.\n")  # never stops
        if number == 1:
            return chunk("Adding up gives 7.", "stop")
        return chunk("The answer is 7.", "stop")

    run_engine(cfg, tmp_path, problems, StubTeacher(script))
    result = {r["problem_id"]: r for r in rows(tmp_path, problems)}
    verdicts = {p: (r["finish"], r["answer"], r["correct"]) for p, r in result.items()}
    assert verdicts == {"p0": ("truncated", "7", False), "p1": ("stop", None, False), "p2": ("stop", "7", True)}
    assert summarize(read_events(tmp_path), problems, 1, cfg.teacher).correct == 1


def test_posthoc_ppl_takes_no_candidate_cut_at_max_tokens_for_correct(tmp_path):
    cfg = make_config(method="posthoc-ppl", search={"n": 3, "max_new_tokens": 32})
    problems = make_problems(1)
    texts = ["The answer is 7, and then", "The answer is 7.", "I think the answer is 8."]
    ppl = {texts[0]: 1.0, texts[1]: 3.0, texts[2]: 2.0}

    def script(request: Request, index: int) -> Candidate:
        return chunk(texts[index], "length" if index == 0 else "stop")  # the first hit max_tokens

    run_engine(cfg, tmp_path, problems, StubTeacher(script), StubScorer(ppl.__getitem__))
    [choice] = of_type(read_events(tmp_path), "choice")
    assert (choice.correct, choice.chosen) == ([False, True, False], 1)
    [row] = rows(tmp_path, problems)
    assert (row["completion"][0]["content"], row["correct"], row["finish"]) == (texts[1], True, "stop")


# ---- 8. teacher failures --------------------------------------------------------------------


def test_a_failing_trajectory_gets_an_error_record_the_others_finish_and_resume_retries_it(reference, tmp_path):
    cfg, problems, _, expected, _ = reference

    def fail(request: Request):
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


def test_the_teacher_prompt_is_the_template_rendered(tmp_path):
    teacher = StubTeacher(lambda request, index: chunk("The answer is 7.", "stop"))
    problems = make_problems(1)
    run_engine(make_config(), tmp_path, problems, teacher)
    assert teacher.requests[0].head == render_prompt(TEMPLATE, problems[0].question)
    assert math.isfinite(rows(tmp_path, problems)[0]["student_ppl"])


# ---- bugs found -----------------------------------------------------------------------------


def test_a_session_counts_only_the_candidates_it_received(reference, tmp_path):
    cfg, problems, run, _, _ = reference
    copy_log(run, tmp_path / "resumed", lambda i, e: e.type != "finish")
    teacher = StubTeacher(ladder, per_candidate=True)
    session = run_engine(cfg, tmp_path / "resumed", problems, teacher)
    assert teacher.requests == []
    assert (session.stats.candidates, session.stats.teacher_tokens) == (0, 0)
