"""The teacher side: an OpenAI-compatible `/v1/completions` endpoint asked for `n` candidate
continuations of a prompt, with retries, a concurrency limit and usage accounting."""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio
import openai
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import (
    ContextTooLong,
    RuntimeFailure,
    StopRequested,
    TeacherFatalError,
    TeacherUnavailable,
    UsageError,
)


@dataclass(frozen=True)
class Candidate:
    text: str
    finish_reason: str  # "stop" or "length"
    completion_tokens: int


@dataclass(frozen=True)
class TeacherPart:
    """One received response: candidates `start, start+1, …` of a step (logged on arrival)."""

    start: int
    seed: int
    n: int  # choices asked for
    candidates: list[Candidate]
    prompt_tokens: int
    completion_tokens: int


class _ShortResponse(Exception):
    """Malformed or empty body: worth another try."""


def request_seed(base: int, *key: object) -> int:
    """A stable per-step seed: the same (problem, sample, step, attempt) always asks the same."""
    digest = hashlib.blake2b(repr((base, *key)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1024)


def error_class(exc: BaseException) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, (_ShortResponse, openai.APIResponseValidationError, ValueError)):
        return "malformed"
    return type(exc).__name__


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, (openai.APIConnectionError, openai.APIResponseValidationError, _ShortResponse, ValueError))


class _WaitRetryAfter:
    """Exponential backoff with jitter, but never sooner than the server's Retry-After."""

    def __init__(self, initial: float, maximum: float):
        self._backoff = wait_exponential_jitter(multiplier=initial, jitter=initial, max=maximum)
        self._max = maximum

    def __call__(self, state) -> float:
        wait = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        response = getattr(exc, "response", None)
        header = response.headers.get("retry-after") if response is not None else None
        try:
            return max(wait, min(float(header), self._max)) if header else wait
        except ValueError:
            return wait


class TeacherClient:
    """One endpoint. Servers that ignore `n` (llama.cpp's) are detected on the first short
    answer and from then on asked once per candidate with seeds seed+i, which gives the same
    candidates as the top-up path, so the mode switch never changes results.

    Every received response goes to the caller's `on_response` as soon as it arrives, so a
    step interrupted half-way (a sibling failed, the process was killed) keeps what it got and
    a resumed run asks only for the missing candidates. Once `stop` is set no request is sent
    (requests already in flight finish and are reported)."""

    def __init__(self, cfg: TeacherConfig, base_url: str, backoff_s: float = 0.5):
        self.cfg = cfg
        self.base_url = base_url
        # Retries are ours (tenacity), so the SDK's own are off.
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key(cfg), max_retries=0, timeout=cfg.timeout_s)
        self._limit = anyio.CapacityLimiter(cfg.max_concurrency)
        self._backoff_s = backoff_s
        self.honours_n: bool | None = None
        self.in_flight = 0
        self.busy_s = 0.0  # integral of requests in flight over time: how full the limit was kept
        self._busy_since = time.monotonic()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.retries: Counter[str] = Counter()
        self.stop: anyio.Event | None = None  # set by the runner inside the event loop

    async def aclose(self) -> None:
        await self._client.close()

    async def check(self) -> None:
        """Reachable and serving the configured model, or one clear line."""
        try:
            models = await self._client.models.list()
        except openai.AuthenticationError:
            raise TeacherFatalError(f"teacher {self.base_url} rejected the API key (401)") from None
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            reason = error_class(exc)
            raise RuntimeFailure(f"teacher endpoint {self.base_url} is unreachable ({reason})") from None
        served = [m.id for m in models.data]
        if served and self.cfg.model not in served:
            listed = ", ".join(served[:5])
            raise TeacherFatalError(
                f"teacher model {self.cfg.model!r} is not served at {self.base_url} (it serves: {listed})"
            )

    async def sample(
        self,
        prompt: str,
        n: int,
        max_tokens: int,
        seed: int,
        have: Mapping[int, Candidate],
        on_response: Callable[[TeacherPart], None],
    ) -> None:
        """Ask for the candidates of a step that are not in `have` (index → candidate)."""
        if max_tokens < 1:  # 0 or None makes some servers generate to the end of the context
            raise ValueError("max_tokens must be at least 1")
        missing = [i for i in range(n) if i not in have]
        if not missing:
            return
        if len(missing) == n and n > 1 and self.honours_n is not False:
            first = await self._request(prompt, n, max_tokens, seed, start=0)
            on_response(first)
            got = len(first.candidates)
            if got == n:
                self.honours_n = True
                return
            if got == 1 and self.honours_n is not True:
                self.honours_n = False  # llama.cpp and friends answer one choice whatever n says
            else:
                self.retries.update(["fewer_choices"])  # topped up below, never asked again
            missing = missing[got:]
        await self._fan_out(prompt, missing, max_tokens, seed, on_response)

    async def _fan_out(self, prompt: str, indices: list[int], max_tokens: int, seed: int, on_response) -> None:
        """One request per candidate (seed+i). A failing request does not cancel its siblings:
        what they receive is reported, then the most serious error is raised."""
        errors: list[Exception] = []

        async def one(index: int) -> None:
            try:
                on_response(await self._request(prompt, 1, max_tokens, seed + index, start=index))
            except Exception as exc:  # collected, the worst re-raised below
                errors.append(exc)

        async with anyio.create_task_group() as group:
            for index in indices:
                group.start_soon(one, index)
        if errors:
            raise min(errors, key=_severity)

    async def _request(self, prompt: str, n: int, max_tokens: int, seed: int, start: int) -> TeacherPart:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.cfg.retries + 1),
            wait=_WaitRetryAfter(self._backoff_s, 30.0),
            retry=retry_if_exception(_retryable),
            before_sleep=lambda state: self.retries.update([error_class(state.outcome.exception())]),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    self._check_stop()
                    async with self._limit:
                        self._check_stop()
                        return await self._request_once(prompt, n, max_tokens, seed, start)
        except openai.BadRequestError as exc:
            if "context" in str(exc).lower():
                raise ContextTooLong(str(exc)) from None
            raise TeacherFatalError(f"teacher {self.base_url} refused the request (400): {_brief(exc)}") from None
        except openai.AuthenticationError:
            raise TeacherFatalError(f"teacher {self.base_url} rejected the API key (401)") from None
        except openai.PermissionDeniedError:
            raise TeacherFatalError(f"teacher {self.base_url} denied access (403)") from None
        except openai.NotFoundError:
            raise TeacherFatalError(f"teacher model {self.cfg.model!r} not found at {self.base_url} (404)") from None
        except Exception as exc:
            if _retryable(exc):
                kind = error_class(exc)
                raise TeacherUnavailable(
                    f"teacher failed after {self.cfg.retries + 1} attempts: {kind}", kind
                ) from None
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _in_flight_changes(self, delta: int) -> None:
        now = time.monotonic()
        self.busy_s += self.in_flight * (now - self._busy_since)
        self._busy_since = now
        self.in_flight += delta

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise StopRequested

    async def _sleep(self, seconds: float) -> None:
        """Backoff that a stop request cuts short (the next attempt then raises StopRequested)."""
        if self.stop is None:
            await anyio.sleep(seconds)
            return
        with anyio.move_on_after(seconds):
            await self.stop.wait()

    async def _request_once(self, prompt: str, n: int, max_tokens: int, seed: int, start: int) -> TeacherPart:
        self._in_flight_changes(+1)
        try:
            response = await self._client.completions.create(
                model=self.cfg.model,
                prompt=prompt,
                max_tokens=max_tokens,
                n=n,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                stop=self.cfg.stop or None,
                seed=seed,
            )
        finally:
            self._in_flight_changes(-1)
        choices = sorted(response.choices or [], key=lambda c: c.index)[:n]
        if not choices or any(c.text is None for c in choices):
            raise _ShortResponse("response had no choices")
        usage = response.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        completion_tokens = usage.completion_tokens if usage else 0
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        # Usage is per request; split it over choices for the per-candidate count.
        per_choice = completion_tokens // len(choices) if completion_tokens else 0
        candidates = [Candidate(c.text, c.finish_reason or "length", per_choice) for c in choices]
        return TeacherPart(start, seed, n, candidates, prompt_tokens, completion_tokens)


def api_key(cfg: TeacherConfig) -> str:
    """The key, read only from the environment variable the config names (never from a file)."""
    if not cfg.api_key_env:
        return "EMPTY"  # local servers ignore it; the SDK insists on one
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise UsageError(f"teacher.api_key_env: environment variable {cfg.api_key_env} is not set")
    return key


def _severity(exc: Exception) -> int:
    """Which of several sibling errors decides what happens to the step."""
    for rank, kind in enumerate((TeacherFatalError, ContextTooLong, StopRequested, TeacherUnavailable)):
        if isinstance(exc, kind):
            return rank
    return -1  # anything unexpected is a bug: surface it first


def _brief(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    message = body.get("message") or (body.get("error") or {}).get("message") if body else None
    return (message or str(exc)).splitlines()[0][:200]
