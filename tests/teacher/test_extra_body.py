"""teacher.extra_body reaches the server with every request, on both APIs (the test teacher logs
the fields beyond genssd's own); and it is part of the
response cache's identity: the same request with another extra_body is a miss, sent again."""

from __future__ import annotations

import anyio
import pytest

from genssd_cli.config import TeacherConfig
from genssd_cli.rundir.records import Candidate, TeacherReply
from genssd_cli.teacher.endpoint import Endpoint, Prompt, Request
from genssd_cli.teacher.response_cache import ResponseCache, request_identity

PINNED = {"repeat_penalty": 1.0, "top_k": 0, "chat_template_kwargs": {"enable_thinking": False}}


@pytest.mark.parametrize("mode", ["completions", "chat-continue"])
def test_extra_body_reaches_the_server_with_every_request(fake_teacher, mode):
    """Each request the endpoint sends, on either API, carries extra_body's fields as top-level body
    fields; an empty extra_body adds none."""
    server = fake_teacher()
    cfg = TeacherConfig(model="fake-teacher", base_url=server.base_url, mode=mode, extra_body=PINNED)
    endpoint = Endpoint(cfg, server.base_url)

    async def ask() -> None:
        for seed in (1, 2):
            await endpoint.create(Request(Prompt("Question: 2 + 2?", " It is"), 2, 4, seed))
        await endpoint.client.close()

    anyio.run(ask)
    sent = server.requests()
    assert len(sent) == 2
    for request in sent:
        assert request["extra"] == PINNED
    plain = fake_teacher()
    anyio.run(Endpoint(cfg.model_copy(update={"base_url": plain.base_url, "extra_body": {}}), plain.base_url).create,
              Request(Prompt("Q", " It is"), 1, 4, 1))  # fmt: skip
    assert plain.requests()[0]["extra"] == {}  # nothing added when it is empty


class Server:
    def __init__(self) -> None:
        self.sent: list[Request] = []

    async def send(self, request: Request) -> TeacherReply:
        self.sent.append(request)
        candidates = [Candidate(text="x", finish_reason="length", tokens=1)]
        return TeacherReply(start=0, seed=request.seed, n=1, prompt_tokens=1, completion_tokens=1, endpoint="e",
                            token_source="usage", candidates=candidates)  # fmt: skip


def test_extra_body_is_part_of_the_cache_identity(tmp_path):
    """A request answered with one extra_body is a miss with another (sent again), a hit with the
    same; an empty extra_body leaves the identity as before it existed (old caches stay valid)."""
    plain = TeacherConfig(model="m", base_url="http://127.0.0.1:9/v1")
    pinned = plain.model_copy(update={"extra_body": {"repeat_penalty": 1.0}})
    request = Request(Prompt("Q", "so far"), 1, 8, 40)
    assert "extra_body" not in request_identity(plain, request)
    cache, server = ResponseCache(tmp_path / "c.sqlite"), Server()
    for cfg in (plain, pinned, pinned, pinned.model_copy(update={"extra_body": {"repeat_penalty": 1.1}})):
        anyio.run(cache.reply, cfg, request, server.send)
    assert len(server.sent) == 3  # plain, 1.0 and 1.1 sent; the second 1.0 a hit


def test_doctor_reads_llama_cpp_python_sampler_defaults_and_what_is_pinned():
    """The sampling-defaults row from llama-cpp-python's request schema (as its /openapi.json
    serves it) and from llama.cpp's /props; an unpinned repeat penalty is flagged, a pinned one not."""
    from llama_cpp.server.types import CreateCompletionRequest

    from genssd_cli.teacher.probes import defaults_from_openapi, defaults_from_props

    openapi = {"components": {"schemas": {"CreateCompletionRequest": CreateCompletionRequest.model_json_schema()}}}
    found = defaults_from_openapi(openapi)
    assert found["repeat_penalty"] == 1.1 and found["top_k"] == 40 and found["min_p"] == 0.05
    props = {"default_generation_settings": {"params": {"repeat_penalty": 1.0, "top_k": 40, "seed": 1}}}
    assert defaults_from_props(props) == {"repeat_penalty": 1.0, "top_k": 40}
    assert defaults_from_props({"default_generation_settings": {"min_p": 0.1}}) == {"min_p": 0.1}  # older servers
    assert defaults_from_props({"unrelated": 1}) == defaults_from_openapi({"openapi": "3"}) == {}


def test_doctor_says_unknown_when_the_server_tells_no_sampler_defaults(fake_teacher):
    """The test teacher serves neither /props nor /openapi.json: the row says unknown and how to pin them."""
    from genssd_cli.teacher.probes import sampler_defaults

    server = fake_teacher()
    endpoint = Endpoint(TeacherConfig(model="fake-teacher", base_url=server.base_url), server.base_url)
    ok, found, then = anyio.run(sampler_defaults, endpoint)
    assert ok is None and found.startswith("unknown") and "teacher.extra_body" in then
