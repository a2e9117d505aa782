"""One shape for a teacher reply (records.TeacherReply): the `response` event that logs it extends
it, so the log line is the reply's fields after the step's, byte for byte the format genssd has
always written, and a logged response read back is the reply the engine received."""

from __future__ import annotations

from genssd_cli.rundir.records import Candidate, Response, TeacherReply

REPLY = TeacherReply(
    start=1, seed=5, n=1, prompt_tokens=3, completion_tokens=2, endpoint="node1", token_source="usage",
    candidates=[Candidate(text="é\n", finish_reason="stop", tokens=2)],
)
LINE = (
    '{"v": 2, "type": "response", "problem_id": "p0", "sample": 1, "step": 2, "attempt": 0, "start": 1, '
    '"seed": 5, "n": 1, "prompt_tokens": 3, "completion_tokens": 2, "endpoint": "node1", "token_source": '
    '"usage", "candidates": [{"text": "é\\n", "finish_reason": "stop", "tokens": 2}], "cached": false}\n'
)


def test_the_logged_reply_is_the_response_line_as_ever():
    assert Response.of(REPLY, problem_id="p0", sample=1, step=2, attempt=0).line() == LINE


def test_a_logged_response_is_the_reply_it_logged():
    event = Response.model_validate_json(LINE)
    assert isinstance(event, TeacherReply)
    assert TeacherReply.model_validate(event.model_dump(include=set(TeacherReply.model_fields))) == REPLY
