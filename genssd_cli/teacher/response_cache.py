"""The teacher response cache (`teacher.cache: PATH`, opt-in): a response any run received is
reused by any later run that sends the same request, so a sweep, a rerun with another `prune_ppl`
or a baseline scored by another student pays only for requests never sent before.

A request is identified by what decides its answer: the model (for a server genssd launches, the
GGUF file and context it serves, not only its alias), how it is asked (mode, prefill,
system message, assistant prefix), the sampling settings (temperature, top_p, stop, logprobs, and
`teacher.extra_body`: the server's own sampler fields), the
prompt and accepted trace, n, max_tokens and the seed. Not by the endpoint: every server of a
pool serves the same model. With a teacher that honours seeds, a hit is the answer the server
would give again; with one that does not, it is one legitimate sample for that request.

A server that ignores `n` answers an n-choice request with the one choice a single request of
the same seed gets: that answer is stored as the single request's, and the fact that the model's
servers ignore `n` is kept too, so a later run asks one choice at a time from its first step and
finds every answer, whatever order its requests came in.

The cache wraps sending (`ResponseCache.reply`): one identity per request, then a hit, or the
server's reply stored on its way up. A write that fails (a full disk, a read-only file) ends the
cache's part in the run, never the run: `failure` says why, for a warning.

A row is checked when read (its JSON, its types, a sqlite error on reading it): one that fails is
ignored, removed, counted (`ignored`, the pool's `cache_invalid` retries) and the request sent to
the server again. What failed validation at the endpoint never reaches the cache.

The store is sqlite (WAL): one row per request key, written once (`INSERT OR IGNORE`), each write
its own transaction, so concurrent runs share it and a `kill -9` leaves it consistent.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, StrictInt, StrictStr, ValidationError

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import UsageError
from genssd_cli.files import WriteFailed, write_failed
from genssd_cli.rundir.records import Candidate, TeacherReply, TokenSource
from genssd_cli.teacher.endpoint import Request
from genssd_cli.teacher.shared_sqlite import open_shared

SCHEMA = """CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    request TEXT NOT NULL,   -- the request's identity, JSON (for inspection)
    response TEXT NOT NULL,  -- candidates, tokens, the endpoint that answered, JSON
    created REAL NOT NULL    -- unix time
);
CREATE TABLE IF NOT EXISTS facts (  -- what was learnt about a model's servers, e.g. that they ignore n
    model TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (model, name)
)"""

Send = Callable[[Request], Awaitable[TeacherReply]]
Count = Annotated[StrictInt, Field(ge=0)]


class _StoredCandidate(BaseModel):
    text: StrictStr
    finish_reason: StrictStr
    completion_tokens: Count


class _Stored(BaseModel):
    """A row's `response` as put() writes it (and earlier genssd versions wrote it)."""

    candidates: list[_StoredCandidate] = Field(min_length=1)
    prompt_tokens: Count
    completion_tokens: Count
    endpoint: StrictStr | None = None
    token_source: TokenSource | None = None


def model_identity(cfg: TeacherConfig) -> str:
    """The model that answers. A server genssd launches serves `launch.gguf` under the alias
    `teacher.model`, so the alias alone would let two models' answers pass for each other."""
    if cfg.launch is None:
        return cfg.model
    return f"{cfg.model} (launched: {cfg.launch.gguf}, n_ctx {cfg.launch.n_ctx})"


def request_identity(cfg: TeacherConfig, request: Request) -> dict:
    prompt = request.prompt
    return {
        "model": model_identity(cfg), "mode": cfg.mode,
        "prefill": cfg.prefill if cfg.mode == "chat-continue" else None, "system": cfg.system,
        "assistant_prefix": cfg.assistant_prefix, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "stop": cfg.stop, "logprobs": cfg.logprobs, "head": prompt.head, "trace": prompt.trace, "n": request.n,
        "max_tokens": request.max_tokens, "seed": request.seed,
        # Only when set: the keys of caches written before teacher.extra_body existed stay valid.
        **({"extra_body": cfg.extra_body} if cfg.extra_body else {}),
    }  # fmt: skip


class ResponseCache:
    """Used from the event loop's thread only; each call is one short sqlite statement."""

    def __init__(self, path: Path):
        self.path = path
        self.failure: str | None = None  # why the cache stopped (a failed write); None while it works
        self.ignored = 0  # rows that failed their check on read, asked again
        self.on_ignored: Callable[[], None] | None = None  # the pool counts them with its retries
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Prompts and replies: the owner's only (sqlite gives its -wal/-shm files this mode too).
            if not path.exists():
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            self._db = open_shared(path, SCHEMA, timeout=60)
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"teacher.cache {path} is not a genssd response cache ({exc})") from None
        except OSError as exc:
            raise write_failed(path, exc) from None

    async def reply(self, cfg: TeacherConfig, request: Request, send: Send) -> TeacherReply:
        """The reply to `request`: the stored one (marked cached), else `send`'s, stored. A reply
        of one choice to an n-choice request (n ignored) is stored as the single request's of its
        seed, which is the answer it is."""
        if self.failure is not None:
            return await send(request)
        identity = request_identity(cfg, request)
        hit = self.get(identity, request)
        if hit is not None:
            return hit
        reply = await send(request)
        if request.n > 1 and len(reply.candidates) == 1:
            identity = {**identity, "n": 1}
        self.put(identity, reply)
        return reply

    def get(self, identity: dict, request: Request) -> TeacherReply | None:
        """The stored reply to `identity`, placed where `request` puts its candidates."""
        key = _key(identity)
        try:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            stored = _Stored.model_validate_json(row[0])
            if len(stored.candidates) > request.n:
                raise ValueError("more candidates than the request asked for")
        except (sqlite3.Error, ValidationError, ValueError, TypeError):  # a damaged row: the server answers again
            self._ignore(key)
            return None
        return TeacherReply(
            start=request.start, seed=request.seed, n=request.n, prompt_tokens=stored.prompt_tokens,
            completion_tokens=stored.completion_tokens, endpoint=stored.endpoint,
            token_source=stored.token_source, cached=True,
            candidates=[Candidate(text=c.text, finish_reason=c.finish_reason, tokens=c.completion_tokens)
                        for c in stored.candidates],
        )  # fmt: skip

    def _ignore(self, key: str) -> None:
        """Count a row that failed its check and remove it, so the new answer takes its place."""
        self.ignored += 1
        if self.on_ignored is not None:
            self.on_ignored()
        self._write("DELETE FROM responses WHERE key = ?", (key,))

    def put(self, identity: dict, reply: TeacherReply) -> None:
        # The stored JSON keeps the shape earlier genssd versions wrote (and read): caches are shared.
        stored = {
            "candidates": [{"text": c.text, "finish_reason": c.finish_reason, "completion_tokens": c.tokens}
                           for c in reply.candidates],
            "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "endpoint": reply.endpoint, "token_source": reply.token_source,
        }  # fmt: skip
        row = (_key(identity), json.dumps(identity, sort_keys=True), json.dumps(stored), time.time())
        self._write("INSERT OR IGNORE INTO responses (key, request, response, created) VALUES (?, ?, ?, ?)", row)

    def fact(self, model: str, name: str) -> object:
        """What was learnt about a model's servers (a hint: this run may learn otherwise); None
        once the cache stopped."""
        if self.failure is not None:
            return None
        try:
            row = self._db.execute("SELECT value FROM facts WHERE model = ? AND name = ?", (model, name)).fetchone()
            return None if row is None else json.loads(row[0])
        except (sqlite3.Error, ValueError, TypeError):  # a damaged row: nothing learnt
            return None

    def learn(self, model: str, name: str, value: object) -> None:
        self._write("INSERT OR REPLACE INTO facts (model, name, value) VALUES (?, ?, ?)",
                    (model, name, json.dumps(value)))  # fmt: skip

    def _write(self, statement: str, values: tuple) -> None:
        """One write; a failed one (a full disk, a read-only file) stops the cache, not the run."""
        if self.failure is not None:
            return
        try:
            self._db.execute(statement, values)
        except sqlite3.Error as exc:  # OperationalError (full, read-only), DatabaseError (damaged file)
            self.failure = str(WriteFailed(self.path, str(exc)))

    def close(self) -> None:
        self._db.close()


def _key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
