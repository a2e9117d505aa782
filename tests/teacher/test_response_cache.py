"""The response cache wraps sending, in process (no server): a request it answered before is not
sent again and comes back marked cached, placed where the new request puts it; a miss is sent once
and stored; an answer of one choice to an n-choice request (n ignored) is stored as the single
request's; the stored JSON keeps the shape earlier genssd versions wrote and read; a failed write
ends the cache's part in the run, not the run, and the pool says why; a damaged row (bad JSON,
wrong types, an sqlite error on read) is ignored, counted and asked again."""

from __future__ import annotations

import json
import sqlite3

import anyio
import pytest

from genssd_cli.config import TeacherConfig
from genssd_cli.rundir.records import Candidate, TeacherReply
from genssd_cli.teacher.endpoint import Prompt, Request
from genssd_cli.teacher.pool import TeacherClient
from genssd_cli.teacher.response_cache import ResponseCache, model_identity

CFG = TeacherConfig(model="m", base_url="http://127.0.0.1:9/v1")


class Server:
    """`send` as the pool's: records what was sent; answers `choices` candidates (n unless set)."""

    def __init__(self, choices: int | None = None):
        self.choices = choices
        self.sent: list[Request] = []

    async def send(self, request: Request) -> TeacherReply:
        self.sent.append(request)
        count = self.choices or request.n
        candidates = [Candidate(text=f"{request.seed + i}.", finish_reason="length", tokens=2) for i in range(count)]
        return TeacherReply(start=request.start, seed=request.seed, n=request.n, prompt_tokens=5,
                            completion_tokens=2 * count, endpoint="node1", token_source="usage",
                            candidates=candidates)  # fmt: skip


def ask(cache: ResponseCache, server: Server, request: Request) -> TeacherReply:
    return anyio.run(cache.reply, CFG, request, server.send)


def test_a_hit_is_not_sent_and_comes_back_cached_where_the_request_puts_it(tmp_path):
    cache, server = ResponseCache(tmp_path / "c.sqlite"), Server()
    request = Request(Prompt("Q", "so far"), 3, 8, 40)
    sent = ask(cache, server, request)
    assert not sent.cached and server.sent == [request]
    hit = ask(cache, server, Request(request.prompt, 3, 8, 40, start=2))
    assert server.sent == [request]  # not sent again
    assert hit.cached and hit.start == 2
    assert hit.model_dump(exclude={"cached", "start"}) == sent.model_dump(exclude={"cached", "start"})
    ask(cache, server, Request(Prompt("Q", "so far!"), 3, 8, 40))  # another trace: another request
    assert len(server.sent) == 2


def test_an_answer_to_ignored_n_is_the_single_requests_of_its_seed(tmp_path):
    cache, server = ResponseCache(tmp_path / "c.sqlite"), Server(choices=1)
    ask(cache, server, Request(Prompt("Q"), 3, 8, 40))
    hit = ask(cache, server, Request(Prompt("Q"), 1, 8, 40))
    assert len(server.sent) == 1 and hit.cached and [c.text for c in hit.candidates] == ["40."]
    ask(cache, server, Request(Prompt("Q"), 3, 8, 40))  # the n-choice request itself was never answered
    assert len(server.sent) == 2


def test_the_stored_json_keeps_its_shape(tmp_path):
    """Caches are shared between runs and genssd versions: candidates keep `completion_tokens`."""
    cache = ResponseCache(tmp_path / "c.sqlite")
    ask(cache, Server(), Request(Prompt("Q"), 2, 8, 7))
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        [(stored,)] = db.execute("SELECT response FROM responses").fetchall()
    assert stored == json.dumps({
        "candidates": [{"text": "7.", "finish_reason": "length", "completion_tokens": 2},
                       {"text": "8.", "finish_reason": "length", "completion_tokens": 2}],
        "prompt_tokens": 5, "completion_tokens": 4, "endpoint": "node1", "token_source": "usage",
    })  # fmt: skip


class FullDisk:
    """A connection whose writes fail as on a full disk; reads go through."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def execute(self, statement: str, values: tuple = ()):
        if statement.startswith("INSERT"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(statement, values)


def test_a_failed_write_stops_the_cache_not_the_run(tmp_path):
    cache, server = ResponseCache(tmp_path / "c.sqlite"), Server()
    pool = TeacherClient(CFG, cache=cache)
    cache._db = FullDisk(cache._db)
    reply = ask(cache, server, Request(Prompt("Q"), 2, 8, 7))
    assert len(reply.candidates) == 2 and not reply.cached  # the reply is still the run's
    assert pool.cache_failure is not None and "disk is full" in pool.cache_failure
    ask(cache, server, Request(Prompt("Q"), 2, 8, 7))  # from now on every request is sent
    assert len(server.sent) == 2
    cache.learn(model_identity(CFG), "honours_n", True)  # no raise: nothing more is written
    assert cache.fact(model_identity(CFG), "honours_n") is None


@pytest.mark.parametrize(
    "damage",
    ["{not json", json.dumps({"candidates": [{"text": 7, "finish_reason": "length", "completion_tokens": 2}],
                              "prompt_tokens": 5, "completion_tokens": 2, "endpoint": "node1"}),
     json.dumps({"candidates": [], "prompt_tokens": 5, "completion_tokens": 2}),
     json.dumps({"candidates": [{"text": "x", "finish_reason": "stop", "completion_tokens": -1}],
                 "prompt_tokens": None, "completion_tokens": 2}),
     json.dumps({"candidates": [{"text": "x", "finish_reason": "stop", "completion_tokens": 1}] * 3,
                 "prompt_tokens": 5, "completion_tokens": 3})],
    ids=["not-json", "text-a-number", "no-candidates", "wrong-counts", "more-than-asked"],
)  # fmt: skip
def test_a_damaged_row_is_ignored_counted_and_asked_again(tmp_path, damage):
    """A row corrupted in the sqlite file is not trusted: the request goes to the server again, the
    pool counts it (retries `cache_invalid`), and the new answer replaces the row."""
    cache, server = ResponseCache(tmp_path / "c.sqlite"), Server()
    pool = TeacherClient(CFG, cache=cache)
    request = Request(Prompt("Q"), 2, 8, 7)
    first = ask(cache, server, request)
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        db.execute("UPDATE responses SET response = ?", (damage,))
    again = ask(cache, server, request)
    assert len(server.sent) == 2 and not again.cached and again == first
    assert cache.ignored == 1 and pool.retries["cache_invalid"] == 1
    hit = ask(cache, server, request)  # the fresh answer took the damaged row's place
    assert hit.cached and len(server.sent) == 2


class BrokenRead:
    """A connection whose reads fail as on a damaged file; writes go through."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def execute(self, statement: str, values: tuple = ()):
        if statement.startswith("SELECT"):
            raise sqlite3.DatabaseError("database disk image is malformed")
        return self.db.execute(statement, values)


def test_an_sqlite_error_on_read_is_a_miss_not_a_crash(tmp_path):
    """sqlite errors on read (a damaged file) are caught: the server answers, nothing is learnt."""
    cache, server = ResponseCache(tmp_path / "c.sqlite"), Server()
    ask(cache, server, Request(Prompt("Q"), 2, 8, 7))
    cache._db = BrokenRead(cache._db)
    reply = ask(cache, server, Request(Prompt("Q"), 2, 8, 7))
    assert len(server.sent) == 2 and not reply.cached and cache.ignored == 1
    assert cache.fact(model_identity(CFG), "honours_n") is None
