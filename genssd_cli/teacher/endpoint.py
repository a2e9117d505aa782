"""One teacher endpoint: its OpenAI client, how it continues a trace (raw completions, or a
partial assistant message continued through the chat API), its concurrency and rate limits, its
health, its rendezvous score for a trajectory (the pool's affinity routing), and what it was
asked and paid.

One `create` is one HTTP request, no retries: the pool (pool.py) decides where a retry goes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
import openai
from aiolimiter import AsyncLimiter

from genssd_cli.config import EndpointConfig, TeacherConfig, endpoint_label
from genssd_cli.errors import UsageError
from genssd_cli.rundir.records import Candidate, TeacherReply, TokenSource

# A server that failed this many times in a row is sidelined: its work goes to the others.
SIDELINE_AFTER = 3
SIDELINE_FIRST_S = 2.0
SIDELINE_MAX_S = 60.0


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
    """Malformed or empty body: worth another try."""


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
        moved = f", redirected to {response.url}" if response.history else ""
        super().__init__(f"teacher {base_url} did not answer as an OpenAI-compatible API (HTTP {response.status_code}"
                         f"{moved}: {what}); check its base_url (it ends in /v1 on most servers)")  # fmt: skip


def _error_message(body: str) -> str | None:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(error, dict):
        return str(error.get("message") or error)[:120]
    return str(error)[:120] if error else None


def parsed(raw, base_url: str, key: str):
    """The body of a raw SDK response, parsed, when it is a JSON object holding `key` (`choices`,
    `data`), else ForeignAnswer: the SDK itself hands an HTML page back as a string and a foreign
    JSON object as a model with its fields missing."""
    response: httpx.Response = raw.http_response
    try:
        body = response.json() if "json" in response.headers.get("content-type", "") else None
    except ValueError:
        body = None
    if not isinstance(body, dict) or key not in body or "error" in body:
        raise ForeignAnswer(base_url, response)
    return raw.parse()


class Endpoint:
    def __init__(
        self,
        teacher: TeacherConfig,
        base_url: str,
        own: EndpointConfig | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ):
        self.teacher = teacher
        self.count_tokens = count_tokens  # the teacher's tokenizer, when known
        self.base_url = base_url
        self.name = own.label if own else endpoint_label(base_url)
        self.weight = own.weight if own else 1.0
        key_env = (own.api_key_env if own else None) or teacher.api_key_env
        # Retries are the pool's (tenacity), so the SDK's own are off.
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key(key_env), max_retries=0, timeout=teacher.timeout_s
        )
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
        self.strikes = 0  # failures in a row
        self.sidelined_until = 0.0
        self.sidelined = 0  # times sidelined

    async def models(self) -> list:
        """The models the endpoint lists (GET /v1/models); ForeignAnswer when it is no such API."""
        raw = await self.client.models.with_raw_response.list()
        return list(parsed(raw, self.base_url, "data").data)

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
        want_tokens = t.logprobs and n > 1
        if t.mode == "completions":
            if want_tokens:
                options["logprobs"] = 0  # the chosen tokens only, no alternatives
            raw = await self.client.completions.with_raw_response.create(prompt=prompt.head + prompt.trace, **options)
            response = parsed(raw, self.base_url, "choices")
            choices = sorted(response.choices or [], key=lambda c: c.index)[:n]
            if not choices or any(c.text is None for c in choices):
                raise ShortResponse("response had no choices")
            texts = [(c.text, c.finish_reason) for c in choices]
            listed = [len(c.logprobs.tokens) if c.logprobs and c.logprobs.tokens is not None else None
                      for c in choices]  # fmt: skip
        else:
            if want_tokens:
                options["logprobs"] = True
            extra = {"continue_final_message": True, "add_generation_prompt": False}
            raw = await self.client.chat.completions.with_raw_response.create(
                messages=chat_messages(t, prompt),
                extra_body=extra if t.prefill == "continue_final_message" else None,
                **options,
            )
            response = parsed(raw, self.base_url, "choices")
            choices = sorted(response.choices or [], key=lambda c: c.index)[:n]
            if not choices or any(c.message is None for c in choices):
                raise ShortResponse("response had no choices")
            texts = [(continued_text(c.message), c.finish_reason) for c in choices]
            listed = [len(c.logprobs.content) if c.logprobs and c.logprobs.content is not None else None
                      for c in choices]  # fmt: skip
        usage = response.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        completion_tokens = usage.completion_tokens if usage else 0
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        counts, source = per_choice_tokens(completion_tokens, listed, [text for text, _ in texts], self.count_tokens)
        candidates = [Candidate(text=text, finish_reason=finish or "length", tokens=count)
                      for (text, finish), count in zip(texts, counts, strict=True)]  # fmt: skip
        return TeacherReply(start=request.start, seed=seed, n=n, prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens, endpoint=self.name, token_source=source,
                            candidates=candidates)  # fmt: skip


def per_choice_tokens(
    billed: int, listed: list[int | None], texts: list[str], count_tokens: Callable[[str], int] | None
) -> tuple[list[int], TokenSource]:
    """Each choice's completion tokens, and where they came from. One choice: the bill itself.
    Several: the tokens the server listed per choice (logprobs), trusted only when they add up
    to the bill; else the teacher's tokenizer on each text, when known (close, not exact: the
    server may count an end token or tokenize across the seam); else the bill split evenly."""
    if len(texts) == 1:
        return [billed], "usage"
    if all(count is not None for count in listed) and sum(listed) == billed:
        return list(listed), "logprobs"
    if count_tokens is not None:
        return [count_tokens(text) for text in texts], "tokenizer"
    return [billed // len(texts)] * len(texts), "split"


def chat_messages(teacher: TeacherConfig, prompt: Prompt) -> list[dict]:
    partial = {"role": "assistant", "content": teacher.assistant_prefix + prompt.trace}
    if teacher.prefill == "prefix":
        partial["prefix"] = True  # the hosted-API variant of continuing the last assistant message
    system = [{"role": "system", "content": teacher.system}] if teacher.system else []
    return [*system, {"role": "user", "content": prompt.head}, partial]


def continued_text(message) -> str:
    """The continuation as one string. A server with a reasoning parser hands the thinking back
    apart (`reasoning_content`, or `reasoning` in newer vLLM) and drops the `</think>` between
    the two parts; genssd puts it back, so the trace reads as the model wrote it."""
    extra = message.model_extra or {}
    reasoning = getattr(message, "reasoning_content", None) or extra.get("reasoning_content") or extra.get("reasoning")
    content = message.content or ""
    if reasoning and content:
        return f"{reasoning}</think>{content}"
    return reasoning or content


def api_key(env_name: str | None) -> str:
    """The key, read only from the environment variable the config names (never from a file)."""
    if not env_name:
        return "EMPTY"  # local servers ignore it; the SDK insists on one
    key = os.environ.get(env_name, "")
    if not key:
        raise UsageError(f"teacher.api_key_env: environment variable {env_name} is not set")
    return key
