"""Problem sets (genssd_cli/problems.py), in process: the arithmetic generator deterministic with
solutions that add up, the held-out eval sets in no training set, the bundled GSM8K rows, JSONL with
field mapping and its bad rows as one line each, and prompt files."""

import json
import re
from pathlib import Path

import pytest

from genssd_cli.config import DataConfig
from genssd_cli.errors import UsageError
from genssd_cli.problems import final_answer, generate_arith, load_problems, load_prompt, render_prompt


@pytest.mark.parametrize("steps", [None, 1, 2, 3])
def test_arith_is_deterministic_and_its_solutions_add_up(steps):
    rows = generate_arith(60, seed=3, steps=steps)
    assert rows == generate_arith(60, seed=3, steps=steps)
    assert rows != generate_arith(60, seed=4, steps=steps)
    assert generate_arith(10, seed=3, steps=steps) == rows[:10]  # a longer list starts with a shorter one
    assert len({r["id"] for r in rows}) == 60
    for row in rows:
        solution, answer = row["answer"].split("\n#### ")
        # Every "x op y = z" in the worked solution is true, and the last result is the answer.
        operations = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", solution)
        assert operations
        for x, op, y, z in operations:
            assert eval(f"{x} {op} {y}") == int(z), row
        assert int(operations[-1][3]) == int(answer) >= 0
        if steps is not None:  # the difficulty is the number of operations a solution needs
            assert len(operations) == steps, row


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_held_out_eval_problems_are_in_no_training_set(steps):
    from genssd_cli.eval.command import BUNDLED, load_eval_problems
    from genssd_cli.problems import HELDOUT_COUNT, HELDOUT_SEED

    heldout = load_eval_problems(f"arith{steps}-heldout", None, None)
    assert len(heldout) == HELDOUT_COUNT and heldout == load_problems(BUNDLED[f"arith{steps}-heldout"])
    assert {p.question for p in heldout} == {r["question"] for r in generate_arith(HELDOUT_COUNT, HELDOUT_SEED, steps)}
    questions = {p.question for p in heldout}
    for seed in range(12):  # the demo's, the cold start's, and others
        training = generate_arith(300, seed, steps)
        assert not questions & {r["question"] for r in training}, seed


def test_gsm8k_rows_are_bundled():
    problems = load_problems(DataConfig(source="gsm8k-test"))
    assert len(problems) == 100
    assert len({p.id for p in problems}) == 100
    assert all(re.fullmatch(r"-?[\d,.]+", p.reference) for p in problems)
    assert load_problems(DataConfig(source="gsm8k-test"), limit=5) == problems[:5]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_with_field_mapping(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"q": "1+1?", "a": "#### 2", "key": 7}, {"q": "2+2?", "a": "4"}])
    cfg = DataConfig(source=str(path), question_field="q", answer_field="a", id_field="key")
    problems = load_problems(cfg)
    assert [(p.id, p.reference) for p in problems] == [("7", "2"), ("row-2", "4")]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"question": "q"}], "line 1: missing field 'answer'"),
        ([{"answer": "1"}], "line 1: missing field 'question'"),
        ([{"question": "q", "answer": "1"}, "{oops"], "line 2: not valid JSON"),
        ([[1, 2]], "line 1: expected a JSON object"),
        ([{"id": 1, "question": "q", "answer": "1"}, {"id": 1, "question": "r", "answer": "2"}], "duplicate"),
        ([], "has no problems"),
        ([{"question": "  ", "answer": "1"}], "missing field 'question'"),
    ],
)
def test_bad_rows(tmp_path, rows, message):
    path = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(UsageError, match=re.escape(message)):
        load_problems(DataConfig(source=str(path)))


def test_missing_and_non_utf8_datasets(tmp_path):
    with pytest.raises(UsageError, match="dataset not found"):
        load_problems(DataConfig(source=str(tmp_path / "nope.jsonl")))
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(UsageError, match="not UTF-8"):
        load_problems(DataConfig(source=str(path)))


def test_final_answer():
    assert final_answer("work\n#### 1,234") == "1,234"
    assert final_answer("42") == "42"


def test_prompts(tmp_path):
    text = load_prompt("teacher_fewshot")
    assert text.endswith("Answer:")
    rendered = render_prompt(text, "What is {x}?")
    assert rendered.endswith("Question: What is {x}?\nAnswer:")
    with pytest.raises(UsageError, match="not found"):
        load_prompt("no_such_prompt")
    plain = tmp_path / "p.txt"
    plain.write_text("no placeholder")
    with pytest.raises(UsageError, match="placeholder"):
        load_prompt(str(plain))
