"""What the engine keeps, in process (a scripted teacher, a stub student, a real run directory):
Gen-SSD keeps the lowest-PPL candidate of every step, with the scorer keeping the same one's cache;
the baselines (standard-kd, posthoc-ppl, morsd) keep what their rules say; a row is correct only
when its trace ended and stated the right answer; the teacher is asked the rendered template."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from engine_helpers import (
    STOP,
    TEMPLATE,
    by_trajectory,
    candidate_texts,
    ladder,
    make_config,
    make_problems,
    of_type,
    problem_number,
    rows,
    run_engine,
    step_of,
)
from engine_stubs import Call, StubScorer, StubTeacher, chunk, default_ppl

from genssd_cli.answers import answers_match, extract_answer
from genssd_cli.methods import METHODS
from genssd_cli.problems import render_prompt
from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import Candidate
from genssd_cli.rundir.replay import summarize
from genssd_cli.student.scorer import Score

# ---- genssd selection ------------------------------------------------------------------------


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

# ---- the baselines ---------------------------------------------------------------------------


def test_standard_kd_keeps_its_one_whole_trajectory(tmp_path):
    cfg = make_config(method="standard-kd", search={"samples": 2, "max_new_tokens": 48})
    problems = make_problems(2)

    def script(request: Call, index: int) -> Candidate:
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

    def script(request: Call, index: int) -> Candidate:
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


# ---- strict rows: only an ended trace that states its answer is correct ----------------------


def test_a_truncated_trace_is_never_correct_even_when_its_last_number_is_right(tmp_path):
    """p0 states the right answer but runs out of steps; p1 ends without stating an answer,
    though its last number is the reference; p2 ends and states it: only p2 is correct."""
    cfg = make_config(search={"max_steps": 2, "max_new_tokens": 64})
    problems = make_problems(3)

    def script(request: Call, index: int) -> Candidate:
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

    def script(request: Call, index: int) -> Candidate:
        return chunk(texts[index], "length" if index == 0 else "stop")  # the first hit max_tokens

    run_engine(cfg, tmp_path, problems, StubTeacher(script), StubScorer(ppl.__getitem__))
    [choice] = of_type(read_events(tmp_path), "choice")
    assert (choice.correct, choice.chosen) == ([False, True, False], 1)
    [row] = rows(tmp_path, problems)
    assert (row["completion"][0]["content"], row["correct"], row["finish"]) == (texts[1], True, "stop")

def test_the_teacher_prompt_is_the_template_rendered(tmp_path):
    teacher = StubTeacher(lambda request, index: chunk("The answer is 7.", "stop"))
    problems = make_problems(1)
    run_engine(make_config(), tmp_path, problems, teacher)
    assert teacher.requests[0].head == render_prompt(TEMPLATE, problems[0].question)
    assert math.isfinite(rows(tmp_path, problems)[0]["student_ppl"])
