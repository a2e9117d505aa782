"""The teacher side: a pool of OpenAI-compatible endpoints (one, or several servers of one
model) asked for `n` candidate continuations of a trace, with routing (each trajectory kept on
one server, for its prefix cache), retries, failover and usage accounting. How one request is
made (completions or chat-continue, limits, health) is endpoint.py's; with `teacher.cache`, the
response cache wraps sending (response_cache.py). The pool is the engine's `Teacher` (protocol.py)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace

import anyio
import openai
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import (
    ContextTooLong,
    RequestRefused,
    RuntimeFailure,
    StopRequested,
    TeacherFatalError,
    TeacherUnavailable,
)
from genssd_cli.redact import printable
from genssd_cli.rundir.records import Candidate, TeacherReply
from genssd_cli.teacher.endpoint import (
    SIDELINE_AFTER,
    Endpoint,
    Request,
    ShortResponse,
    api_key,
    refusal_text,
    shared_key_withheld,
)
from genssd_cli.teacher.protocol import OnReply
from genssd_cli.teacher.response_cache import ResponseCache, model_identity

# Affinity routing's load bound (our choice, after "consistent hashing with bounded loads",
# Mirrokni et al. 2018): a request leaves its trajectory's home endpoint only when the home has
# no free concurrency slot AND holds more than this many times its weighted share of the requests
# the pool holds (this one included). A free slot at home is used at once; a full home's queue
# stays within 25 % of its even share, which bounds the imbalance (and the throughput it costs).
AFFINITY_LOAD_BOUND = 1.25


def error_class(exc: BaseException) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, ShortResponse):
        return exc.kind  # malformed, too_large, deadline
    if isinstance(exc, (ShortResponse, openai.APIResponseValidationError, ValueError)):
        return "malformed"
    return type(exc).__name__


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, (openai.APIConnectionError, openai.APIResponseValidationError, ShortResponse, ValueError))


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
    """The pool. With `teacher.routing: affinity` (the default) a trajectory's requests go to its
    home endpoint, the first of the healthy endpoints in the rendezvous order of its (problem id,
    sample), so that server's prefix cache holds its growing trace; past the load bound
    (AFFINITY_LOAD_BOUND) a request goes to the next endpoint of that order within the bound.
    Requests of no trajectory, and every request with `routing: least-loaded`, go to the
    least-loaded healthy endpoint (load: requests queued or in flight there, over its weight;
    ties: the first in config order). A retry avoids the endpoints that already failed it; a
    server that fails SIDELINE_AFTER times in a row is sidelined with a growing backoff and its work
    moves to the others (a trajectory to its next endpoint in the rendezvous order, and back to
    its home once the home is healthy again). With every endpoint sidelined, requests wait for the
    first to return.

    Servers that ignore `n` (llama.cpp's) or refuse it (400, as some hosted APIs do) are found
    on the first step and from then on asked once per candidate with seeds seed+i, which gives
    the same candidates as the top-up path, so the switch never changes results.

    Every received reply goes to the caller's `on_reply` as soon as it arrives, so a
    step interrupted half-way (a sibling failed, the process was killed) keeps what it got and
    a resumed run asks only for the missing candidates. Once `stop` is set no request is sent
    (requests already in flight finish and are reported)."""

    def __init__(
        self,
        cfg: TeacherConfig,
        base_url: str | None = None,
        backoff_s: float = 0.5,
        count_tokens: Callable[[str], int] | None = None,
        cache: ResponseCache | None = None,
        api_key: str | None = None,
    ):
        """`base_url` and `api_key`: a launched server's, instead of the config's."""
        self.cfg = cfg
        self.cache = cache  # wraps sending: a request it has answered before is not sent
        if cache is not None:  # a damaged cache row, asked again, counts as a retry
            cache.on_ignored = lambda: self.retries.update(["cache_invalid"])
        if cfg.endpoints:
            self.endpoints = [Endpoint(cfg, own.base_url, own, count_tokens) for own in cfg.endpoints]
        else:
            self.endpoints = [Endpoint(cfg, base_url or cfg.base_url, None, count_tokens, api_key)]
        self._backoff_s = backoff_s
        # Whether the servers honour n: learnt by an earlier run of this model (a hint), or by this one.
        self.honours_n: bool | None = cache.fact(model_identity(cfg), "honours_n") if cache else None  # type: ignore[assignment]
        self.n_seen = False  # this run has seen how its servers answer n
        self.in_flight = 0
        self.busy_s = 0.0  # integral of requests in flight over time: how full the limits were kept
        self._busy_since = time.monotonic()
        self.retries: Counter[str] = Counter()
        self.stop: anyio.Event | None = None  # set by the runner inside the event loop
        # Told once per kind when a server's bill is missing, too small or unchecked (the session prints it).
        self.warn: Callable[[str], None] | None = None
        self._warned: set[str] = set()

    @property
    def cache_failure(self) -> str | None:
        """Why the response cache stopped during the run (the run did not), for a warning."""
        return self.cache.failure if self.cache is not None else None

    @property
    def prompt_tokens(self) -> int:
        return sum(e.prompt_tokens for e in self.endpoints)

    @property
    def completion_tokens(self) -> int:
        return sum(e.completion_tokens for e in self.endpoints)

    @property
    def max_concurrency(self) -> int:
        return sum(int(e.limit.total_tokens) for e in self.endpoints)

    async def aclose(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.client.close()

    async def check(self) -> list[str]:
        """Every endpoint reachable and serving the model. A refusal (key, model) is fatal; an
        unreachable server of a pool is sidelined and named in the returned warnings; none
        reachable is fatal."""
        warnings = []
        for endpoint in self.endpoints:
            try:
                await _check_endpoint(endpoint, self.cfg.model)
            except TeacherFatalError:
                raise
            except RuntimeFailure as exc:
                if len(self.endpoints) == 1:
                    raise
                endpoint.strikes = SIDELINE_AFTER - 1
                endpoint.failed("connection")
                warnings.append(f"{exc}; its share goes to the other endpoints until it answers")
        if len(warnings) == len(self.endpoints):
            raise RuntimeFailure("no teacher endpoint is reachable: " + "; ".join(warnings))
        withheld = [own.label for own in self.cfg.endpoints if shared_key_withheld(self.cfg, own)]
        if withheld:
            warnings.append(f"teacher.api_key_env's key is not sent to {', '.join(withheld)}: plain http to "
                            "another machine would show it to the network (give such an endpoint its own "
                            "api_key_env)")  # fmt: skip
        return [printable(w) for w in warnings]

    def health(self) -> str:
        """`node1 3 in flight, 120 answered; node2 sidelined 8s` for the progress panel."""
        now = time.monotonic()
        parts = []
        for e in self.endpoints:
            state = f"sidelined {e.sidelined_until - now:.0f}s" if not e.healthy(now) else f"{e.in_flight} in flight"
            parts.append(f"{e.name} {state}, {e.requests} answered")
        return "; ".join(parts)

    def endpoint_stats(self) -> dict[str, dict]:
        return {
            e.name: {"requests": e.requests, "failures": dict(sorted(e.failures.items())), "sidelined": e.sidelined}
            for e in self.endpoints
        }

    async def sample(self, step: Request, have: Mapping[int, Candidate], on_reply: OnReply) -> None:
        """Ask for the candidates of a step that are not in `have` (index → candidate)."""
        n = step.n
        if step.max_tokens < 1:  # 0 or None makes some servers generate to the end of the context
            raise ValueError("max_tokens must be at least 1")
        missing = [i for i in range(n) if i not in have]
        if not missing:
            return
        if len(missing) == n and n > 1 and self.honours_n is not False:
            try:
                first = await self._request(replace(step, start=0))
            except RequestRefused:
                if self.honours_n and self.n_seen:
                    raise  # this run's servers accepted n before: this refusal is about something else
                # Perhaps the API refuses n > 1: one choice at a time is tried below (a refusal
                # of that is raised from there).
                self._learn_honours_n(False)
                self.retries.update(["n_refused"])
            else:
                on_reply(first)
                got = len(first.candidates)
                if got == n:
                    self._learn_honours_n(True)
                    return
                if got == 1 and not (self.honours_n and self.n_seen):
                    self._learn_honours_n(False)  # llama.cpp and friends answer one choice whatever n says
                else:
                    self.retries.update(["fewer_choices"])  # topped up below, never asked again
                missing = missing[got:]
        await self._fan_out(step, missing, on_reply)

    def _learn_honours_n(self, value: bool) -> None:
        self.n_seen = True
        if self.honours_n is value:
            return
        self.honours_n = value
        if self.cache is not None:
            self.cache.learn(model_identity(self.cfg), "honours_n", value)

    async def _fan_out(self, step: Request, indices: list[int], on_reply: OnReply) -> None:
        """One request per candidate (seed+i). A failing request does not cancel its siblings:
        what they receive is reported, then the most serious error is raised."""
        errors: list[Exception] = []

        async def one(index: int) -> None:
            try:
                on_reply(await self._request(replace(step, n=1, seed=step.seed + index, start=index)))
            except Exception as exc:  # collected, the worst re-raised below
                errors.append(exc)

        async with anyio.create_task_group() as group:
            for index in indices:
                group.start_soon(one, index)
        if errors:
            raise min(errors, key=_severity)

    async def _request(self, request: Request) -> TeacherReply:
        if self.cache is None:
            return await self._send(request)
        return await self.cache.reply(self.cfg, request, self._send)

    async def _send(self, request: Request) -> TeacherReply:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.cfg.retries + 1),
            wait=_WaitRetryAfter(self._backoff_s, 30.0),
            retry=retry_if_exception(_retryable),
            before_sleep=lambda state: self.retries.update([error_class(state.outcome.exception())]),
            sleep=self._sleep,
            reraise=True,
        )
        failed_on: set[Endpoint] = set()
        endpoint = self.endpoints[0]
        # A rough count for tokens-per-minute limits: ~4 characters a token, plus all it may write.
        tokens = len(request.prompt.head + request.prompt.trace) // 4 + request.n * request.max_tokens
        try:
            async for attempt in retrying:
                with attempt:
                    self._check_stop()
                    endpoint = await self._pick(failed_on, request.prompt.trajectory)
                    async with endpoint.slot(tokens, self.stop):
                        self._check_stop()
                        return await self._ask(endpoint, failed_on, request)
        except openai.BadRequestError as exc:
            if "context" in str(exc).lower():
                raise ContextTooLong(_brief(exc)) from None
            raise RequestRefused(f"teacher {endpoint.base_url} refused the request (400): {_brief(exc)}") from None
        except openai.AuthenticationError:
            raise TeacherFatalError(f"teacher {endpoint.base_url} rejected the API key (401)") from None
        except openai.PermissionDeniedError:
            raise TeacherFatalError(f"teacher {endpoint.base_url} denied access (403)") from None
        except openai.NotFoundError:
            api = "/v1/completions" if self.cfg.mode == "completions" else "/v1/chat/completions"
            raise TeacherFatalError(
                f"teacher {endpoint.base_url} answered 404: model {self.cfg.model!r} not served or "
                f"no {api} (teacher.mode {self.cfg.mode}; genssd doctor tells)"
            ) from None
        except Exception as exc:
            if _retryable(exc):
                kind = error_class(exc)
                raise TeacherUnavailable(
                    f"teacher failed after {self.cfg.retries + 1} attempts: {kind}", kind
                ) from None
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ask(self, endpoint: Endpoint, failed_on: set[Endpoint], request: Request) -> TeacherReply:
        self._in_flight_changes(+1)
        try:
            reply = await endpoint.create(request)
        except Exception as exc:
            if _server_fault(exc):
                endpoint.failed(error_class(exc))
                failed_on.add(endpoint)
            raise
        finally:
            self._in_flight_changes(-1)
        endpoint.succeeded()
        for kind, line in endpoint.token_notes.items():
            if kind not in self._warned and self.warn is not None:
                self._warned.add(kind)
                self.warn(line)
        return reply

    async def _pick(self, avoid: set[Endpoint], trajectory: tuple[str, int] | None) -> Endpoint:
        """The endpoint for an attempt; with every endpoint sidelined, the wait for the first back."""
        while True:
            endpoint = self.route(trajectory, avoid)
            if endpoint is not None:
                return endpoint
            await self._sleep(min(e.sidelined_until for e in self.endpoints) - time.monotonic())
            self._check_stop()

    def route(self, trajectory: tuple[str, int] | None, avoid: Collection[Endpoint] = ()) -> Endpoint | None:
        """Where a request goes now, preferring the healthy endpoints it has not failed on (None:
        every endpoint is sidelined). A trajectory's request, under affinity routing: the first
        endpoint in its rendezvous order that has a free slot or stays within the load bound; else
        (and for any other request) the least-loaded."""
        now = time.monotonic()
        healthy = [e for e in self.endpoints if e.healthy(now)]
        if not healthy:
            return None
        fresh = [e for e in healthy if e not in avoid] or healthy
        if trajectory is not None and self.cfg.routing == "affinity":
            key = repr(trajectory)
            # The bound per unit of weight: the requests the pool holds, this one included.
            bound = AFFINITY_LOAD_BOUND * (sum(e.held() for e in fresh) + 1) / sum(e.weight for e in fresh)
            for endpoint in sorted(fresh, key=lambda e: e.affinity(key), reverse=True):
                if endpoint.held() < endpoint.slots or endpoint.held() + 1 <= bound * endpoint.weight:
                    return endpoint
        return min(fresh, key=Endpoint.load)  # ties: the first in config order

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


async def _check_endpoint(endpoint: Endpoint, model: str) -> None:
    try:
        models = await endpoint.models()
    except openai.AuthenticationError:
        raise TeacherFatalError(f"teacher {endpoint.base_url} rejected the API key (401)") from None
    except (openai.APIConnectionError, openai.APIStatusError) as exc:
        raise RuntimeFailure(f"teacher endpoint {endpoint.base_url} is unreachable ({error_class(exc)})") from None
    except ShortResponse as exc:  # a web page, a proxy's login, a list of the wrong shape: no run can work with it
        raise TeacherFatalError(str(exc)) from None
    served = [m.id for m in models]
    if served and model not in served:
        listed = ", ".join(printable(str(m))[:80] for m in served[:5])  # a server's text: no escape sequences
        raise TeacherFatalError(f"teacher model {model!r} is not served at {endpoint.base_url} (it serves: {listed})")


def check_api_keys(cfg: TeacherConfig) -> None:
    """Every environment variable the config names is set (before a run directory is touched)."""
    api_key(cfg.api_key_env)
    for own in cfg.endpoints:
        api_key(own.api_key_env or cfg.api_key_env)


def _server_fault(exc: BaseException) -> bool:
    """Failures that say the server is unwell (not that the request or the rate was wrong)."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500
    return isinstance(exc, (openai.APIConnectionError, openai.APIResponseValidationError, ShortResponse, ValueError))


def _severity(exc: Exception) -> int:
    """Which of several sibling errors decides what happens to the step."""
    for rank, kind in enumerate((TeacherFatalError, ContextTooLong, StopRequested, TeacherUnavailable)):
        if isinstance(exc, kind):
            return rank
    return -1  # anything unexpected is a bug: surface it first


def _brief(exc: openai.APIStatusError) -> str:
    return refusal_text(exc)  # one bounded line, control characters removed (a malformed body: the endpoint's)
