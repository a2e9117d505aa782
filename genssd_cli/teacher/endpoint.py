"""One teacher endpoint: its OpenAI client, how it continues a trace (raw completions, or a
partial assistant message continued through the chat API), its concurrency and rate limits, its
health, its rendezvous score for a trajectory (the pool's affinity routing), and what it was
asked and paid.

One `create` is one HTTP request, no retries: the pool (pool.py) decides where a retry goes.
Its reply is untrusted: validated once here (shapes.py), read no further than
`teacher.max_reply_bytes` and given `teacher.request_deadline_s` in all; a reply that fails any of
these is a fault the pool retries (`malformed`, `too_large`, `deadline`).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import anyio
import httpx
import openai
from aiolimiter import AsyncLimiter
from pydantic import ValidationError

from genssd_cli.config import EndpointConfig, TeacherConfig, endpoint_label
from genssd_cli.errors import UsageError
from genssd_cli.redact import looks_like_key, redact
from genssd_cli.rundir.records import Candidate, TeacherReply
from genssd_cli.teacher.shapes import (
    ChatCompletion,
    ChatMessage,
    Completion,
    ErrorBody,
    ModelEntry,
    ModelList,
    server_text,
    shape_error,
)
from genssd_cli.teacher.token_counts import Counted, listed_tokens, per_choice_tokens, token_warning, usage_count

# A server that failed this many times in a row is sidelined: its work goes to the others.
SIDELINE_AFTER = 3
SIDELINE_FIRST_S = 2.0
SIDELINE_MAX_S = 60.0

T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    """What the teacher continues: the rendered problem and the trace accepted so far, and whose
    trace it is: the trajectory's (problem id, sample), which the pool routes by (None: a request
    of no trajectory, as checks and probes send; it goes to the least-loaded endpoint)."""

    head: str
    trace: str = ""
    trajectory: tuple[str, int] | None = None


@dataclass(frozen=True)
class Request:
    """One request: `n` choices continuing the prompt's trace, at most `max_tokens` each, sampled
    with `seed`; `start` is where its candidates sit among the step's (a step asked one choice at
    a time sends candidate i as its own request, with seed + i)."""

    prompt: Prompt
    n: int
    max_tokens: int
    seed: int
    start: int = 0


class ShortResponse(Exception):
    """Malformed or empty body: worth another try. `kind` is its fault class (the pool counts
    retries by it)."""

    kind = "malformed"


class ReplyTooLarge(ShortResponse):
    """A reply past `teacher.max_reply_bytes`: read no further; worth another try."""

    kind = "too_large"


class DeadlinePassed(ShortResponse):
    """A request past `teacher.request_deadline_s` in all (a server trickling its bytes outlasts
    any per-read timeout); worth another try."""

    kind = "deadline"


class ForeignAnswer(ShortResponse):
    """A 2xx answer that is not the OpenAI-compatible API's: a web or proxy login page (HTML), a
    JSON body of another shape, an error object under status 200, an empty body. Retried during
    a run like any malformed body; refused at start (genssd run, doctor)."""

    def __init__(self, base_url: str, response: httpx.Response) -> None:
        kind = response.headers.get("content-type", "no content type").split(";")[0].strip()
        body = response.text.strip()
        error = _error_message(body) if "json" in kind else None
        shown = f"body {body[:60]!r}" if body else "empty body"
        what = f"an error object ({error})" if error else f"{kind}, {shown}"
        moved = f", redirected to {redact(str(response.url))}" if response.history else ""
        super().__init__(f"teacher {base_url} did not answer as an OpenAI-compatible API (HTTP {response.status_code}"
                         f"{moved}: {what}); check its base_url (it ends in /v1 on most servers)")  # fmt: skip


def _error_message(body: str) -> str | None:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(error, dict):
        return server_text(error.get("message") or error, 120)
    return server_text(error, 120) if error else None


def parsed(raw, base_url: str, key: str) -> dict:
    """The body of a raw SDK response when it is a JSON object holding `key` (`choices`, `data`),
    else ForeignAnswer (an HTML page, a foreign JSON object, an error object under 200). Its
    shape is checked by the caller (shapes.py)."""
    response: httpx.Response = raw.http_response
    try:
        body = response.json() if "json" in response.headers.get("content-type", "") else None
    except ValueError:
        body = None
    if not isinstance(body, dict) or key not in body or "error" in body:
        raise ForeignAnswer(base_url, response)
    return body


def validated(shape: type[Completion] | type[ChatCompletion] | type[ModelList], body: dict, base_url: str):
    """`body` as `shape`, else ShortResponse (a `malformed` fault) saying what was wrong."""
    try:
        return shape.model_validate(body)
    except ValidationError as exc:
        raise ShortResponse(f"teacher {base_url} sent a malformed reply ({shape_error(exc)})") from None


def refusal_text(exc: openai.APIStatusError) -> str:
    """A 4xx's message in one bounded line without control characters; ShortResponse when its
    body is JSON of the wrong shape (an error object whose message is no text)."""
    response = exc.response
    try:
        body = response.json()
    except ValueError:  # not JSON: its text, if any
        return server_text(response.text or f"HTTP {exc.status_code}")
    if not isinstance(body, dict):
        return server_text(body)
    try:
        message = ErrorBody.model_validate(body).text()
    except ValidationError as err:
        raise ShortResponse(f"teacher answered HTTP {exc.status_code} with a malformed error ({shape_error(err)})"
                            ) from None  # fmt: skip
    return server_text(message or body)


@functools.cache
def _bounded_stream_class(base: type) -> type:
    """A byte stream (of the HTTP library's own stream type, which it checks) that raises
    ReplyTooLarge once more than `limit` bytes came through."""

    class Bounded(base):  # type: ignore[misc, valid-type]
        def __init__(self, stream, limit: int, base_url: str) -> None:
            self.stream, self.limit, self.base_url = stream, limit, base_url

        async def __aiter__(self):
            seen = 0
            async for chunk in self.stream:
                seen += len(chunk)
                if seen > self.limit:
                    raise ReplyTooLarge(f"teacher {self.base_url} sent a reply over teacher.max_reply_bytes "
                                        f"({self.limit} bytes)")  # fmt: skip
                yield chunk

        async def aclose(self) -> None:
            await self.stream.aclose()

    return Bounded


class Endpoint:
    def __init__(
        self,
        teacher: TeacherConfig,
        base_url: str,
        own: EndpointConfig | None = None,
        count_tokens: Callable[[str], int] | None = None,
        key: str | None = None,
    ):
        self.teacher = teacher
        self.count_tokens = count_tokens  # the teacher's tokenizer, when known
        self.base_url = redact(base_url)  # what is shown and written; only the client gets the real URL
        self.name = own.label if own else endpoint_label(base_url)
        self.weight = own.weight if own else 1.0
        # `key`: a launched server's own; else the endpoint's variable's (shared_key_withheld).
        # Retries are the pool's (tenacity), so the SDK's own are off. Bodies uncompressed, so the
        # bytes counted against max_reply_bytes are the bytes parsed (no gzip bomb).
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key=key or api_key(key_env_of(teacher, own)), max_retries=0,
            timeout=teacher.timeout_s, default_headers={"Accept-Encoding": "identity"},
            http_client=openai.DefaultAsyncHttpxClient(event_hooks={"response": [self._bound_reply]}),
        )  # fmt: skip
        # A total bound per request: the SDK's timeout is per read, which a trickling server never trips.
        self.deadline_s = teacher.request_deadline_s or 2 * teacher.timeout_s
        self.limit = anyio.CapacityLimiter((own and own.max_concurrency) or teacher.max_concurrency)
        rpm = (own and own.requests_per_minute) or teacher.requests_per_minute
        tpm = (own and own.tokens_per_minute) or teacher.tokens_per_minute
        # Token buckets that sleep until capacity frees up (no polling).
        # Below one a minute (a shard's share of a small limit), one request per 60/rpm seconds:
        # a bucket smaller than one request would refuse every request.
        self.rpm = (AsyncLimiter(rpm, 60) if rpm >= 1 else AsyncLimiter(1, 60 / rpm)) if rpm else None
        self.tpm = AsyncLimiter(tpm, 60) if tpm else None
        self.waiting = 0  # requests queued for this endpoint's limits
        self.in_flight = 0
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.failures: Counter[str] = Counter()
        # What was wrong with a bill ("missing", "underbilled", "unchecked") -> the line to warn with.
        self.token_notes: dict[str, str] = {}
        self.strikes = 0  # failures in a row
        self.sidelined_until = 0.0
        self.sidelined = 0  # times sidelined

    async def models(self) -> list[ModelEntry]:
        """The models the endpoint lists (GET /v1/models); ForeignAnswer when it is no such API,
        ShortResponse when the list is of the wrong shape."""
        raw = await self._bounded(self.client.models.with_raw_response.list)
        return list(validated(ModelList, parsed(raw, self.base_url, "data"), self.base_url).data)

    async def _bound_reply(self, response: httpx.Response) -> None:
        """Every response's body is read through a counter that stops past max_reply_bytes (a
        declared length past it, or a compressed body, stops it before reading)."""
        limit = self.teacher.max_reply_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ReplyTooLarge(f"teacher {self.base_url} announced a reply of {declared} bytes, over "
                                f"teacher.max_reply_bytes ({limit})")  # fmt: skip
        if response.headers.get("content-encoding", "identity").lower() != "identity":
            raise ShortResponse(f"teacher {self.base_url} compressed its reply though asked not to")
        base = next(k for k in type(response.stream).__mro__ if k.__name__ == "AsyncByteStream")
        response.stream = _bounded_stream_class(base)(response.stream, limit, self.base_url)

    async def _bounded(self, call: Callable[..., Awaitable[T]], *args, **kwargs) -> T:
        """One SDK call within the request deadline; our own faults raised as themselves (the SDK
        hands an error raised while reading as a connection error caused by it)."""
        with anyio.move_on_after(self.deadline_s):
            try:
                return await call(*args, **kwargs)
            except openai.APIConnectionError as exc:
                if isinstance(exc.__cause__, ShortResponse):
                    raise exc.__cause__ from None
                raise
            except openai.BadRequestError as exc:
                refusal_text(exc)  # a malformed error body is a malformed reply (ShortResponse)
                raise
        raise DeadlinePassed(f"teacher {self.base_url} did not finish within teacher.request_deadline_s "
                             f"({self.deadline_s:g} s)")  # fmt: skip

    def held(self) -> int:
        """Requests routed here and not answered yet: queued for the limits or in flight."""
        return self.waiting + self.in_flight

    def load(self) -> float:
        return self.held() / self.weight

    @property
    def slots(self) -> int:
        return int(self.limit.total_tokens)

    def affinity(self, key: str) -> float:
        """This endpoint's rendezvous (highest-random-weight) score for a trajectory key: the
        pool's healthy endpoint with the highest score is the trajectory's home. A hash of (name,
        key) gives u, uniform in (0, 1); weight / -ln(u) makes each endpoint the home of a share of
        the keys proportional to its weight (the logarithmic method of weighted rendezvous
        hashing). By name, not URL: a server that moves keeps its trajectories."""
        digest = hashlib.blake2b(f"{self.name}\x00{key}".encode(), digest_size=8).digest()
        u = ((int.from_bytes(digest, "big") >> 12) + 0.5) / 2**52  # 52 bits: exact, strictly inside (0, 1)
        return self.weight / -math.log(u)

    def healthy(self, now: float) -> bool:
        return now >= self.sidelined_until

    def succeeded(self) -> None:
        self.strikes = 0

    def failed(self, kind: str) -> None:
        self.failures.update([kind])
        self.strikes += 1
        if self.strikes >= SIDELINE_AFTER:
            # Each failure past the threshold (a trial after one included) doubles the time sidelined.
            seconds = min(SIDELINE_MAX_S, SIDELINE_FIRST_S * 2 ** (self.strikes - SIDELINE_AFTER))
            self.sidelined_until = time.monotonic() + seconds
            self.sidelined += 1

    @asynccontextmanager
    async def slot(self, tokens: int, stop: anyio.Event | None = None) -> AsyncIterator[None]:
        """Wait for this endpoint's concurrency and rate limits, then hold a request's place.
        A stop request ends the wait for the rate limits (which can be long) at once."""
        self.waiting += 1
        admitted = False
        try:
            async with self.limit:
                if self.rpm or self.tpm:
                    await self._rate(tokens, stop)
                self.waiting -= 1
                admitted = True
                self.in_flight += 1
                try:
                    yield
                finally:
                    self.in_flight -= 1
        finally:
            if not admitted:
                self.waiting -= 1

    async def _rate(self, tokens: int, stop: anyio.Event | None) -> None:
        async def acquire() -> None:
            if self.rpm:
                await self.rpm.acquire()
            if self.tpm:
                await self.tpm.acquire(min(tokens, self.tpm.max_rate))
            waits.cancel_scope.cancel()

        async with anyio.create_task_group() as waits:
            waits.start_soon(acquire)
            if stop is not None:
                await stop.wait()
                waits.cancel_scope.cancel()  # the caller sees the stop and sends nothing

    async def create(
        self, request: Request, *, temperature: float | None = None, stop: list[str] | None = None
    ) -> TeacherReply:
        """One request, answered by this endpoint (temperature and stop: the config's unless given)."""
        t = self.teacher
        prompt, n, max_tokens, seed = request.prompt, request.n, request.max_tokens, request.seed
        options = {
            "model": t.model, "max_tokens": max_tokens, "n": n, "seed": seed, "top_p": t.top_p,
            "temperature": t.temperature if temperature is None else temperature,
            "stop": (t.stop if stop is None else stop) or None,
        }  # fmt: skip
        # Usage is per request: with several choices, only their tokens tell each one's share.
        # With no usage at all (a server that omits it), one choice needs them too.
        want_tokens = t.logprobs and (n > 1 or "missing" in self.token_notes)
        if t.mode == "completions":
            if want_tokens:
                # The chosen tokens and one alternative: llama.cpp's llama-server lists none for 0.
                options["logprobs"] = 1
            raw = await self._bounded(
                self.client.completions.with_raw_response.create,
                prompt=prompt.head + prompt.trace, extra_body=t.extra_body or None, **options,
            )  # fmt: skip
            response = validated(Completion, parsed(raw, self.base_url, "choices"), self.base_url)
            choices = response.in_order()[:n]
            if not choices:
                raise ShortResponse("response had no choices")
            texts = [(c.text, c.finish_reason) for c in choices]
            listed = [listed_tokens(c.logprobs) for c in choices]
        else:
            if want_tokens:
                options["logprobs"] = True
            extra = {"continue_final_message": True, "add_generation_prompt": False}
            raw = await self._bounded(
                self.client.chat.completions.with_raw_response.create,
                messages=chat_messages(t, prompt),
                extra_body={**t.extra_body, **(extra if t.prefill == "continue_final_message" else {})} or None,
                **options,
            )
            response = validated(ChatCompletion, parsed(raw, self.base_url, "choices"), self.base_url)
            choices = response.in_order()[:n]
            if not choices:
                raise ShortResponse("response had no choices")
            texts = [(continued_text(c.message), c.finish_reason) for c in choices]
            listed = [listed_tokens(c.logprobs) for c in choices]
        counted, prompt_tokens = self._counted(response.usage, listed, [text for text, _ in texts], prompt)
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += counted.total
        candidates = [Candidate(text=text, finish_reason=finish or "length", tokens=count)
                      for (text, finish), count in zip(texts, counted.tokens, strict=True)]  # fmt: skip
        return TeacherReply(start=request.start, seed=seed, n=n, prompt_tokens=prompt_tokens,
                            completion_tokens=counted.total, endpoint=self.name, token_source=counted.source,
                            candidates=candidates)  # fmt: skip

    def _counted(self, usage, listed: list[int | None], texts: list[str], prompt: Prompt) -> tuple[Counted, int]:
        """The reply's token counts (per_choice_tokens) and its prompt tokens (without a bill: the
        teacher's tokenizer's count, else 0); what was wrong with the bill is noted once per kind
        in `token_notes`, the line the pool warns with."""
        billed_prompt = usage_count(usage, "prompt_tokens")
        counted = per_choice_tokens(usage_count(usage, "completion_tokens"), listed, texts, self.count_tokens)
        if billed_prompt is None:
            counted = counted._replace(problem="missing")
        if counted.problem is not None and counted.problem not in self.token_notes:
            self.token_notes[counted.problem] = token_warning(counted, self.name, self.count_tokens is not None)
        if billed_prompt is not None:
            return counted, billed_prompt
        return counted, self.count_tokens(prompt.head + prompt.trace) if self.count_tokens else 0


def chat_messages(teacher: TeacherConfig, prompt: Prompt) -> list[dict]:
    partial = {"role": "assistant", "content": teacher.assistant_prefix + prompt.trace}
    if teacher.prefill == "prefix":
        partial["prefix"] = True  # the hosted-API variant of continuing the last assistant message
    system = [{"role": "system", "content": teacher.system}] if teacher.system else []
    return [*system, {"role": "user", "content": prompt.head}, partial]


def continued_text(message: ChatMessage) -> str:
    """The continuation as one string. A server with a reasoning parser hands the thinking back
    apart (`reasoning_content`, or `reasoning` in newer vLLM) and drops the `</think>` between
    the two parts; genssd puts it back, so the trace reads as the model wrote it."""
    reasoning = message.reasoning_content or message.reasoning
    content = message.content or ""
    if reasoning and content:
        return f"{reasoning}</think>{content}"
    return reasoning or content


def api_key(env_name: str | None) -> str:
    """The key, read only from the environment variable the config names (never from a file)."""
    if not env_name:
        return "EMPTY"  # local servers ignore it; the SDK insists on one
    key = os.environ.get(env_name, "")
    if not key and looks_like_key(env_name):  # the key itself typed there: never echoed
        raise UsageError("teacher.api_key_env holds what looks like a key, not the name of a variable that is set: "
                         "put the key in an environment variable and give that variable's name")  # fmt: skip
    if not key:
        raise UsageError(f"teacher.api_key_env: environment variable {env_name} is not set")
    return key


def key_env_of(teacher: TeacherConfig, own: EndpointConfig | None) -> str | None:
    """The variable whose key an endpoint is sent: its own; else the teacher's, unless withheld."""
    if own is None or own.api_key_env:
        return own.api_key_env if own else teacher.api_key_env
    return None if shared_key_withheld(teacher, own) else teacher.api_key_env


def shared_key_withheld(teacher: TeacherConfig, own: EndpointConfig) -> bool:
    """A pool's teacher-wide key is sent only to an endpoint that names no key of its own and is
    https or on this machine: plain http elsewhere would show it to the network."""
    if not teacher.api_key_env or own.api_key_env:
        return False
    url = urlsplit(own.base_url)
    if url.scheme == "https" or url.hostname == "localhost":
        return False
    try:
        return not ipaddress.ip_address(url.hostname or "").is_loopback
    except ValueError:  # a host name other than localhost
        return True
