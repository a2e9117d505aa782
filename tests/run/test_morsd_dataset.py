"""MoRSD as its paper reads, in process (stub teacher and student): the answer sentence scored
after a rationale is in the student prompt's answer format; the dataset-level selection
(`morsd.rows`, `morsd.fraction`) keeps the lowest Rationale Difficulty across problems, where the
denominator PPL(answer | question) changes the pick (within one problem it never can)."""

from __future__ import annotations

import json
import re

from engine_helpers import STOP, make_config, make_problems, of_type, problem_number, run_engine
from engine_stubs import StubScorer, StubTeacher, chunk

from genssd_cli.run.materialise import materialise
from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.store import RunStore
from genssd_cli.student.scorer import Score

# Per problem: one correct rationale and one wrong answer. The student's PPL of the answer after
# the question alone (the denominator) and after the rationale (the numerator): p0's numerator is
# the lower (1.5 < 4.0), but its RD the higher (1.5 / 2.0 = 0.75 > 4.0 / 8.0 = 0.5).
RATIONALE = {0: "Seven stays seven here. ", 1: "Adding and removing the same leaves seven. "}
BASE_PPL = {0: 2.0, 1: 8.0}
AFTER_RATIONALE_PPL = {0: 1.5, 1: 4.0}


def script(request, index):
    p = problem_number(request)
    text = RATIONALE[p] + "The answer is 7." if index == 0 else "Maybe it is eight. The answer is 8."
    return chunk(text + STOP, "stop")


class AnswerScorer(StubScorer):
    """The answer sentence's PPL by problem and by whether a rationale precedes it."""

    def __init__(self, answer: str):
        super().__init__()
        self.answer = answer

    def score(self, requests):
        out = []
        for request in requests:
            if request.candidates == [self.answer]:
                self.requests.append(request)
                p = int(re.search(r"Problem (\d+):", request.context).group(1))
                after = request.context.rpartition("<assistant>")[2]
                out.append([Score(AFTER_RATIONALE_PPL[p] if after else BASE_PPL[p], 3)])
            else:
                out += super().score([request])
        return out


def materialised(cfg, run_dir, problems) -> list[dict]:
    with RunStore(run_dir, fsync="never") as store:
        materialise(store, problems, cfg)
    return [json.loads(line) for line in (run_dir / "trajectories.jsonl").read_text().splitlines()]


def test_the_denominator_changes_the_pick_across_problems(tmp_path):
    """With a budget of one row over two problems, MoRSD keeps p1's rationale: the lower RD,
    though p0's has the lower numerator (the student's PPL of the answer after it). Without the
    dataset-level selection both rows are kept, each carrying its RD."""
    problems = make_problems(2)
    everything = tmp_path / "all"
    cfg = make_config(method="morsd", search={"n": 2, "max_new_tokens": 40})
    run_engine(cfg, everything, problems, StubTeacher(script), AnswerScorer("The answer is 7."))
    choices = {c.problem_id: c for c in of_type(read_events(everything), "choice")}
    assert (choices["p0"].rd, choices["p1"].rd) == ([0.75, None], [0.5, None])
    assert choices["p0"].answer_ppl[0] < choices["p1"].answer_ppl[0]  # the numerators order the other way
    rows = materialised(cfg, everything, problems)
    assert [(r["problem_id"], r["rd"]) for r in rows] == [("p0", 0.75), ("p1", 0.5)]

    for name, setting in (("rows", {"rows": 1}), ("fraction", {"fraction": 0.5})):
        budget = make_config(method="morsd", search={"n": 2, "max_new_tokens": 40}, morsd=setting)
        run_engine(budget, tmp_path / name, problems, StubTeacher(script), AnswerScorer("The answer is 7."))
        kept = materialised(budget, tmp_path / name, problems)
        assert [(r["problem_id"], r["rd"], r["correct"]) for r in kept] == [("p1", 0.5, True)], setting


def test_the_answer_sentence_is_in_the_student_prompts_format(tmp_path):
    """With the \\boxed{} student prompt the answer scored after each rationale (and alone) is
    `\\boxed{7}`, not "The answer is 7."; with the demo's prompt it is its answer line."""
    problems = make_problems(1)
    for student, answer in (("student_boxed", "\\boxed{7}"), ("student", "The answer is 7.")):
        cfg = make_config(method="morsd", search={"n": 2, "max_new_tokens": 40}, prompts={"student": student})
        scorer = AnswerScorer(answer)
        run_engine(cfg, tmp_path / student, problems, StubTeacher(script), scorer)
        answers = [r for r in scorer.requests if len(r.candidates) == 1 and "Seven" not in r.candidates[0]]
        assert [r.candidates for r in answers] == [[answer], [answer]]  # alone, after the rationale
        [choice] = of_type(read_events(tmp_path / student), "choice")
        assert choice.rd == [0.75, None]
