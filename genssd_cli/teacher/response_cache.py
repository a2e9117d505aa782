"""The teacher response cache (`teacher.cache: PATH`, opt-in): a response any run received is
reused by any later run that sends the same request, so a sweep, a rerun with another `prune_ppl`
or a baseline scored by another student pays only for requests never sent before.

A request is identified by what decides its answer: the model (for a server genssd launches, the
GGUF file and context it serves, not only its alias), how it is asked (mode, prefill,
system message, assistant prefix), the sampling settings (temperature, top_p, stop, logprobs), the
prompt and accepted trace, n, max_tokens and the seed. Not by the endpoint: every server of a
pool serves the same model. With a teacher that honours seeds, a hit is the answer the server
would give again; with one that does not, it is one legitimate sample for that request.

A server that ignores `n` answers an n-choice request with the one choice a single request of
the same seed gets: that answer is stored as the single request's, and the fact that the model's
servers ignore `n` is kept too, so a later run asks one choice at a time from its first step and
finds every answer, whatever order its requests came in.

The store is sqlite (WAL): one row per request key, written once (`INSERT OR IGNORE`), each write
its own transaction, so concurrent runs share it and a `kill -9` leaves it consistent.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import UsageError
from genssd_cli.files import WriteFailed, write_failed
from genssd_cli.teacher.endpoint import Candidate, Prompt
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


@dataclass(frozen=True)
class CachedResponse:
    candidates: list[Candidate]
    prompt_tokens: int
    completion_tokens: int
    endpoint: str | None
    token_source: str


def model_identity(cfg: TeacherConfig) -> str:
    """The model that answers. A server genssd launches serves `launch.gguf` under the alias
    `teacher.model`, so the alias alone would let two models' answers pass for each other."""
    if cfg.launch is None:
        return cfg.model
    return f"{cfg.model} (launched: {cfg.launch.gguf}, n_ctx {cfg.launch.n_ctx})"


def request_identity(cfg: TeacherConfig, prompt: Prompt, n: int, max_tokens: int, seed: int) -> dict:
    return {
        "model": model_identity(cfg), "mode": cfg.mode,
        "prefill": cfg.prefill if cfg.mode == "chat-continue" else None, "system": cfg.system,
        "assistant_prefix": cfg.assistant_prefix, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "stop": cfg.stop, "logprobs": cfg.logprobs, "head": prompt.head, "trace": prompt.trace, "n": n,
        "max_tokens": max_tokens, "seed": seed,
    }  # fmt: skip


class ResponseCache:
    """Used from the event loop's thread only; each call is one short sqlite statement."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = open_shared(path, SCHEMA, timeout=60)
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"teacher.cache {path} is not a genssd response cache ({exc})") from None
        except OSError as exc:
            raise write_failed(path, exc) from None

    def get(self, identity: dict) -> CachedResponse | None:
        row = self._db.execute("SELECT response FROM responses WHERE key = ?", (_key(identity),)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        return CachedResponse(
            [Candidate(**c) for c in data["candidates"]], data["prompt_tokens"], data["completion_tokens"],
            data["endpoint"], data["token_source"],
        )  # fmt: skip

    def put(self, identity: dict, response: CachedResponse) -> None:
        blob = json.dumps({**asdict(response), "candidates": [asdict(c) for c in response.candidates]})
        try:
            self._db.execute("INSERT OR IGNORE INTO responses (key, request, response, created) VALUES (?, ?, ?, ?)",
                             (_key(identity), json.dumps(identity, sort_keys=True), blob, time.time()))  # fmt: skip
        except sqlite3.OperationalError as exc:  # a full disk, a read-only file
            raise WriteFailed(self.path, str(exc)) from None

    def fact(self, model: str, name: str) -> object:
        row = self._db.execute("SELECT value FROM facts WHERE model = ? AND name = ?", (model, name)).fetchone()
        return None if row is None else json.loads(row[0])

    def learn(self, model: str, name: str, value: object) -> None:
        try:
            self._db.execute("INSERT OR REPLACE INTO facts (model, name, value) VALUES (?, ?, ?)",
                             (model, name, json.dumps(value)))  # fmt: skip
        except sqlite3.OperationalError as exc:
            raise WriteFailed(self.path, str(exc)) from None

    def close(self) -> None:
        self._db.close()


def _key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
