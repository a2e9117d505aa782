"""MoRSD end to end: a local teacher server process and the real demo student. The logged
Rationale Difficulty is checked against the student's perplexities computed here directly (one
unpadded forward per text, no scorer code), and the kept rationale against MoRSD's rule."""

import json
import math

import pytest
from conftest import genssd, run_config, write_config

from genssd_cli.answers import answer_statement_start
from genssd_cli.rundir.log import read_events

pytestmark = pytest.mark.slow


def answer_ppl(model, tokenizer, context: str, answer: str) -> float:
    """The student's perplexity of `answer` after `context`: the tokens of context+answer past
    their common prefix with the context's own tokens (a token merged at the seam is the answer's)."""
    import torch

    ids = tokenizer(context + answer, add_special_tokens=False)["input_ids"]
    alone = tokenizer(context, add_special_tokens=False)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(ids, alone, strict=False)) if a != b), len(alone))
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[start - 1 : len(ids) - 1], dim=-1)
    nll = -logprobs.gather(-1, torch.tensor(ids[start:])[:, None]).sum().item()
    return math.exp(nll / (len(ids) - start))


def test_morsd_run_logs_rationale_difficulty_the_student_agrees_with(tmp_path, fake_teacher):
    from genssd_cli.models import chat_prompt, load_causal_lm
    from genssd_cli.problems import load_prompt

    server = fake_teacher("--answer-range", "2")  # the teacher's answers are 0 or 1: about half right
    rows = [{"id": f"p{i}", "question": f"Question number {i}: what is {i} - {i} + 1?", "answer": "1"}
            for i in range(8)]  # fmt: skip
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = run_config(server.base_url, method="morsd", data={"source": str(data)},
                        search={"n": 4, "max_new_tokens": 32}, morsd={"keep": 2})  # fmt: skip
    run = tmp_path / "run"
    result = genssd("run", str(write_config(tmp_path / "c.yaml", config)), "--out", str(run))
    assert result.returncode == 0, result.stderr

    model, tokenizer = load_causal_lm("smollm2-135m-instruct", None, None, "cpu", "float32")
    template = load_prompt("student")  # the run's prompts.student
    events = read_events(run)
    texts = {}
    for e in events:
        if e.type == "response":
            texts.setdefault(e.problem_id, {}).update(
                {e.start + i: c.text.split("\nQuestion:")[0] for i, c in enumerate(e.candidates)})  # fmt: skip
    checked = 0
    choices = [e for e in events if e.type == "choice"]
    for choice in choices:
        question = next(r["question"] for r in rows if r["id"] == choice.problem_id)
        context = chat_prompt(tokenizer, template.replace("{question}", question))
        assert choice.base_ppl == pytest.approx(answer_ppl(model, tokenizer, context, "The answer is 1."), rel=1e-3)
        for i, text in texts[choice.problem_id].items():
            if choice.rd[i] is None:
                assert not choice.correct[i]
                continue
            rationale = text[: answer_statement_start(text)]
            direct = answer_ppl(model, tokenizer, context + rationale, "The answer is 1.")
            assert choice.answer_ppl[i] == pytest.approx(direct, rel=1e-3)
            assert choice.rd[i] == pytest.approx(direct / choice.base_ppl, rel=1e-3)
            checked += 1
        ranked = sorted((i for i in range(4) if choice.rd[i] is not None), key=lambda i: (choice.rd[i], i))
        assert choice.kept[0] == (ranked[0] if ranked else 0)
    assert checked >= 3  # several correct rationales were scored
    out = [json.loads(line) for line in (run / "trajectories.jsonl").read_text().splitlines()]
    assert {r["method"] for r in out} == {"morsd"}
    assert sorted((r["problem_id"], r["rank"]) for r in out) == sorted(
        (c.problem_id, rank) for c in choices for rank in range(len(c.kept)))  # fmt: skip
