"""Replies of the wrong shape or size, from a real test teacher process: each is a retried fault
of its own class (`malformed`, `too_large`, `deadline`), counted in the pool's retries, never a
traceback and never cached; the step ends with the candidates a fault-free server gives. And the
shapes' own rules, in process: what is refused, what is let through, server text made one line."""

from __future__ import annotations

import anyio
import pytest
from conftest import collect

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import TeacherUnavailable
from genssd_cli.teacher.pool import TeacherClient
from genssd_cli.teacher.response_cache import ResponseCache
from genssd_cli.teacher.servers.test_teacher import SHAPE_FAULTS
from genssd_cli.teacher.shapes import ChatCompletion, Completion, ErrorBody, server_text


def client(url: str, cache: ResponseCache | None = None, **kw) -> TeacherClient:
    cfg = TeacherConfig(model="fake-teacher", base_url=url, **kw)
    return TeacherClient(cfg, url, backoff_s=0.01, cache=cache)


def steps(teacher: TeacherClient, mode_n: int = 2, count: int = 10) -> list:
    async def go():
        try:
            return [(await collect(teacher, f"p{step}", mode_n, 8, step))[0] for step in range(count)]
        finally:
            await teacher.aclose()

    return anyio.run(go)


@pytest.mark.parametrize("mode", ["completions", "chat-continue"])
def test_shape_faults_are_retried_by_class_and_end_as_a_clean_run(fake_teacher, tmp_path, mode):
    """Every shape fault is injected; each is retried under its class; the candidates equal a
    fault-free server's; the response cache holds only good replies (a second pass, from the
    cache alone, gives the same candidates)."""
    kinds = ",".join(SHAPE_FAULTS)
    server = fake_teacher("--fault-kinds", kinds, "--fault-rate", "0.5", "--fault-seed", "1846",
                          "--oversize-bytes", str(2**18), "--trickle-gap-s", "0.05")  # fmt: skip
    clean = fake_teacher()
    limits = {"mode": mode, "retries": 12, "timeout_s": 2, "request_deadline_s": 0.6, "max_reply_bytes": 2**16}
    cache = ResponseCache(tmp_path / "c.sqlite")
    teacher = client(server.base_url, cache, **limits)
    teacher.honours_n = teacher.n_seen = True  # as learned: a fault is never taken for "ignores n"
    got = steps(teacher)
    faults = [r["fault"] for r in server.requests() if r["fault"]]
    assert set(faults) == set(SHAPE_FAULTS), faults
    expected = {"wrong-type": "malformed", "null-index": "malformed", "error-object": "malformed",
                "oversize": "too_large", "trickle": "deadline"}  # fmt: skip
    by_class = {kind: sum(1 for f in faults if expected[f] == kind) for kind in set(expected.values())}
    assert dict(teacher.retries) == by_class
    assert got == steps(client(clean.base_url, mode=mode))
    # Nothing that failed was cached: the cache alone answers every step, and the same.
    replay = client(server.base_url, ResponseCache(tmp_path / "c.sqlite"), **limits)
    before = len(server.requests())
    assert steps(replay) == got and len(server.requests()) == before


def test_a_malformed_reply_that_never_heals_fails_the_trajectory_in_one_line(fake_teacher):
    """Retries run out on a server that always answers of the wrong shape: TeacherUnavailable
    (the trajectory fails, the run goes on), class `malformed`, never a traceback."""
    server = fake_teacher("--fault-kinds", "null-index", "--fault-rate", "1")
    with pytest.raises(TeacherUnavailable, match="after 3 attempts: malformed") as caught:
        steps(client(server.base_url, retries=2), 1, 1)
    assert caught.value.error_class == "malformed"


@pytest.mark.parametrize(
    ("body", "ok"),
    [({"choices": [{"text": "a"}]}, True),  # index, finish_reason, usage absent: fine
     ({"choices": [{"index": 1, "text": "b"}, {"index": 0, "text": "a"}], "usage": {}, "extra": [1]}, True),
     ({"choices": [{"index": 0, "text": 12}]}, False),
     ({"choices": [{"index": 0, "text": "a"}, {"index": None, "text": "b"}]}, False),
     ({"choices": [{"index": 0, "text": "a"}, {"index": 0, "text": "b"}]}, False),
     ({"choices": [{"index": "0", "text": "a"}]}, False),
     ({"choices": {"0": {"text": "a"}}}, False),
     ({"choices": [{"text": "a"}], "usage": "lots"}, False),
     ({"choices": [{"text": "a", "logprobs": 3}]}, False)],
)  # fmt: skip
def test_the_completion_shape(body, ok):
    """What a completions reply may and may not be; choices come back in index order."""
    try:
        reply = Completion.model_validate(body)
    except ValueError:
        assert not ok
    else:
        assert ok and [c.text for c in reply.in_order()] == ["a", "b"][: len(body["choices"])]


def test_the_chat_shape():
    """A chat choice needs a message whose content is text or null."""
    ChatCompletion.model_validate({"choices": [{"message": {"content": None, "reasoning_content": "r"}}]})
    for message in ({"content": 5}, None, "text"):
        with pytest.raises(ValueError):
            ChatCompletion.model_validate({"choices": [{"message": message}]})


def test_error_text_is_one_bounded_line_without_control_characters():
    """A 400's message, read from the usual places; an object where its text belongs is refused;
    what is shown has no escape sequences, newlines or bidi overrides and at most 200 characters."""
    assert ErrorBody.model_validate({"error": {"message": "too long"}}).text() == "too long"
    assert ErrorBody.model_validate({"error": "plain"}).text() == "plain"
    assert ErrorBody.model_validate({"message": "vllm style"}).text() == "vllm style"
    with pytest.raises(ValueError):
        ErrorBody.model_validate({"error": {"message": {"detail": "x"}}})
    shown = server_text("bad\x1b]0;pwned\x07 request\n\r\tline two \u202e" + "x" * 1000)
    assert shown.startswith("bad request line two") and len(shown) == 200
    assert all(ch.isprintable() for ch in shown)
