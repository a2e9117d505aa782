"""The teacher pool against a real local OpenAI-compatible server process
(genssd_cli/teacher/servers/test_teacher.py)."""

import json
import time

import anyio
import pytest
from conftest import collect

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import RuntimeFailure, StopRequested, TeacherFatalError, TeacherUnavailable, UsageError
from genssd_cli.rundir.records import TeacherReply
from genssd_cli.teacher.endpoint import Prompt, Request
from genssd_cli.teacher.pool import TeacherClient
from genssd_cli.teacher.response_cache import ResponseCache, model_identity, request_identity
from genssd_cli.teacher.servers.test_teacher import continuation
from genssd_cli.teacher.token_counts import per_choice_tokens


def client(url: str, **kw) -> TeacherClient:
    cfg = TeacherConfig(model=kw.pop("model", "fake-teacher"), base_url=url, retries=kw.pop("retries", 3), **kw)
    return TeacherClient(cfg, url, backoff_s=0.01)


def sample(teacher: TeacherClient, *args, **kw):
    async def go():
        try:
            return await collect(teacher, *args, **kw)
        finally:
            await teacher.aclose()

    return anyio.run(go)


def test_n_is_used_when_honoured(fake_teacher):
    server = fake_teacher()
    teacher = client(server.base_url)
    candidates, parts = sample(teacher, "Q: 1+1?\nA:", 4, 8, 100)
    assert len(candidates) == 4 and len(parts) == 1
    assert teacher.honours_n is True
    assert [(r["n"], r["seed"]) for r in server.requests()] == [(4, 100)]


@pytest.mark.parametrize("mode", ["completions", "chat-continue"])
def test_each_candidate_counts_its_own_tokens_from_the_logprobs(fake_teacher, mode):
    """Choices of one response differ in length (some stop early): each candidate's count is its
    own, they add up to the bill, and the response says where they came from."""
    server = fake_teacher()
    counts, sources, prompt, stop = [], set(), "Q: 5-2?\nA:", ["\nQuestion:"]
    for seed in range(6):
        candidates, [part] = sample(client(server.base_url, mode=mode, stop=stop), prompt, 4, 12, seed)
        assert sum(c.tokens for c in candidates) == part.completion_tokens
        counts += [c.tokens for c in candidates]
        sources.add(part.token_source)
    assert sources == {"logprobs"}
    assert len(set(counts)) > 1  # an even split would have hidden this
    if mode == "completions":  # the fake teacher's own count for each choice (seed + i)
        expected = [continuation(prompt, seed + i, 12, stop)[2] for seed in range(6) for i in range(4)]
        assert counts == expected


@pytest.mark.parametrize(("flag", "setting", "source"), [("--no-logprobs", True, "split"), (None, False, "split")])
def test_without_logprobs_the_bill_is_split_and_said_so(fake_teacher, flag, setting, source):
    server = fake_teacher(*([flag] if flag else []))
    candidates, [part] = sample(client(server.base_url, logprobs=setting), "Q: 5-2?\nA:", 4, 12, 3)
    assert part.token_source == source
    assert {c.tokens for c in candidates} == {part.completion_tokens // 4}


def test_per_choice_token_counts_prefer_exact_sources():
    words = lambda text: len(text.split())  # noqa: E731 -- a stand-in tokenizer
    assert per_choice_tokens(7, [None], ["a b"], words)[:2] == ([7], "usage")  # one choice: the bill
    assert per_choice_tokens(7, [3, 4], ["a", "b"], words)[:2] == ([3, 4], "logprobs")
    assert per_choice_tokens(8, [3, 4], ["a b", "c"], words)[:2] == ([2, 1], "tokenizer")  # listed ≠ bill
    assert per_choice_tokens(8, [3, None], ["a b", "c"], None)[:2] == ([4, 4], "split")


def test_servers_ignoring_n_are_topped_up_with_seed_plus_i(fake_teacher):
    server = fake_teacher("--ignore-n")
    teacher = client(server.base_url)
    candidates, parts = sample(teacher, "Q: 1+1?\nA:", 4, 8, 100)
    assert len(candidates) == 4 and len(parts) == 4
    assert teacher.honours_n is False
    assert sorted(r["seed"] for r in server.requests()) == [100, 101, 102, 103]
    assert sorted(p.start for p in parts) == [0, 1, 2, 3]
    # The fan-out used once n is known to be ignored asks exactly the same requests.
    again = client(server.base_url)
    again.honours_n = False
    assert sample(again, "Q: 1+1?\nA:", 4, 8, 100)[0] == candidates


def test_only_missing_candidates_are_asked_for(fake_teacher):
    server = fake_teacher("--ignore-n")
    full, _ = sample(client(server.base_url), "prompt", 3, 8, 50)
    before = len(server.requests())
    have = {0: full[0], 2: full[2]}
    candidates, parts = sample(client(server.base_url), "prompt", 3, 8, 50, have=have)
    assert candidates == full
    assert [(p.start, p.seed) for p in parts] == [(1, 51)]
    assert [r["seed"] for r in server.requests()[before:]] == [51]


def test_same_seed_same_candidates_and_usage(fake_teacher):
    server = fake_teacher()
    first = sample(client(server.base_url), "prompt", 3, 16, 7)
    second = sample(client(server.base_url), "prompt", 3, 16, 7)
    assert first == second
    candidates, parts = first
    assert sum(p.completion_tokens for p in parts) == sum(c.tokens for c in candidates) > 0


def test_retryable_faults_are_retried(fake_teacher):
    server = fake_teacher("--fault-rate", "0.5", "--fault-seed", "1", "--hang-s", "2")
    teacher = client(server.base_url, retries=12, timeout_s=0.5)
    teacher.honours_n = teacher.n_seen = True  # as learned; a short first answer would otherwise mean "ignores n"

    async def steps():
        return [await collect(teacher, f"p{step}", 2, 8, step) for step in range(8)]

    assert all(len(candidates) == 2 for candidates, _ in anyio.run(steps))
    faulty = [r for r in server.requests() if r["fault"]]
    faults = [r["fault"] for r in faulty]
    assert {"hang", "fewer", "reset", "malformed"} <= set(faults), "the fault seed should inject these"
    # Every fault is counted once, by class; fewer choices than asked are topped up (n > 1) and
    # one choice short of one is an empty answer.
    assert sum(teacher.retries.values()) == len(faults)
    assert teacher.retries["timeout"] == faults.count("hang")
    assert teacher.retries["fewer_choices"] == sum(1 for r in faulty if r["fault"] == "fewer" and r["n"] > 1)


def test_retries_run_out(fake_teacher):
    server = fake_teacher("--status", "503")
    with pytest.raises(TeacherUnavailable, match="after 3 attempts: http_503"):
        sample(client(server.base_url, retries=2), "p", 1, 8, 0)


def test_a_failing_sibling_does_not_lose_the_others(fake_teacher):
    """Fan-out: one request runs out of retries; the answers of the others are still reported."""
    server = fake_teacher("--ignore-n", "--fault-rate", "0.35", "--fault-seed", "1", "--hang-s", "2")
    teacher = client(server.base_url, retries=0, timeout_s=0.5)
    teacher.honours_n = False
    reported: list[TeacherReply] = []

    async def go():
        with pytest.raises(TeacherUnavailable):
            await teacher.sample(Request(Prompt("p"), 6, 8, 10), {}, reported.append)

    anyio.run(go)
    answered = sorted(r["seed"] - 10 for r in server.requests() if not r["fault"])
    assert answered and sorted(p.start for p in reported) == answered


NOT_SERVED = "answered 404: model .fake-teacher. not served or no /v1/completions"


@pytest.mark.parametrize(("status", "message"), [(401, "rejected the API key"), (403, "denied access"),
                                                 (404, NOT_SERVED)])  # fmt: skip
def test_fatal_statuses_fail_fast(fake_teacher, status, message):
    server = fake_teacher("--status", str(status))
    teacher = client(server.base_url, retries=5)
    with pytest.raises(TeacherFatalError, match=message):
        sample(teacher, "p", 1, 8, 0)
    assert teacher.retries == {}


def test_stop_sends_nothing_more_and_cuts_backoff_short(fake_teacher):
    server = fake_teacher("--status", "503")
    teacher = client(server.base_url, retries=50)
    teacher._backoff_s = 30.0  # without the stop, this would wait for minutes

    async def go():
        teacher.stop = anyio.Event()
        async with anyio.create_task_group() as group:

            async def stop_soon():
                while not server.requests():
                    await anyio.sleep(0.02)
                teacher.stop.set()

            group.start_soon(stop_soon)
            with pytest.raises(StopRequested), anyio.fail_after(20):
                await teacher.sample(Request(Prompt("p"), 1, 8, 0), {}, lambda part: None)

    anyio.run(go)
    assert len(server.requests()) == 1


def test_check_names_the_problem(fake_teacher, monkeypatch):
    server = fake_teacher()
    anyio.run(client(server.base_url).check)
    with pytest.raises(TeacherFatalError, match="'other' is not served"):
        anyio.run(client(server.base_url, model="other").check)
    with pytest.raises(RuntimeFailure, match="unreachable"):
        anyio.run(client("http://127.0.0.1:9/v1").check)
    monkeypatch.delenv("GENSSD_TEST_KEY", raising=False)
    with pytest.raises(UsageError, match="GENSSD_TEST_KEY is not set"):
        client(server.base_url, api_key_env="GENSSD_TEST_KEY")


def test_api_key_comes_from_the_named_variable(fake_teacher, monkeypatch):
    server = fake_teacher("--api-key", "sk-test-123")
    monkeypatch.setenv("GENSSD_TEST_KEY", "sk-test-123")
    candidates, _ = sample(client(server.base_url, api_key_env="GENSSD_TEST_KEY"), "p", 1, 8, 0)
    assert len(candidates) == 1
    monkeypatch.setenv("GENSSD_TEST_KEY", "sk-wrong")
    with pytest.raises(TeacherFatalError, match="rejected the API key"):
        sample(client(server.base_url, api_key_env="GENSSD_TEST_KEY"), "p", 1, 8, 0)


def test_never_zero_max_tokens(fake_teacher):
    with pytest.raises(ValueError):
        sample(client("http://127.0.0.1:9/v1"), "p", 1, 0, 0)


def pool(*endpoints: dict, **kw) -> TeacherClient:
    cfg = TeacherConfig(model="fake-teacher", endpoints=list(endpoints), retries=kw.pop("retries", 3), **kw)
    return TeacherClient(cfg, backoff_s=0.01)


def test_requests_spread_by_weight_over_the_least_loaded(fake_teacher):
    slow = ("--latency-per-token", "0.25")  # a second per answer: all 30 are placed before any comes back
    first, second = fake_teacher(*slow), fake_teacher(*slow)
    teacher = pool({"base_url": first.base_url, "name": "a"}, {"base_url": second.base_url, "name": "b", "weight": 2},
                   max_concurrency=32)  # fmt: skip

    async def burst():
        try:
            async with anyio.create_task_group() as group:
                for i in range(30):
                    group.start_soon(collect, teacher, f"problem {i}", 1, 4, i)
        finally:
            await teacher.aclose()

    anyio.run(burst)
    # All 30 are placed before any answers: loads a = k/1 and b = k/2 stay level, so b takes two thirds.
    assert (len(first.requests()), len(second.requests())) == (10, 20)
    assert teacher.endpoint_stats()["b"]["requests"] == 20


def test_a_failing_endpoint_is_sidelined_and_its_work_moves(fake_teacher):
    from genssd_cli.teacher.servers.local import free_port

    alive = fake_teacher()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    teacher = pool({"base_url": dead, "name": "dead"}, {"base_url": alive.base_url, "name": "alive"}, retries=1)

    async def one_after_another():
        try:
            return [(await collect(teacher, f"p{i}", 2, 4, 0))[0] for i in range(6)]
        finally:
            await teacher.aclose()

    got = anyio.run(one_after_another)
    # The first three go to "dead" first (least loaded, first in order), fail, and are retried on
    # "alive" (retries=1: one more attempt each); the third failure sidelines it, the rest skip it.
    assert all(len(candidates) == 2 for candidates in got)
    stats = teacher.endpoint_stats()
    assert stats["dead"] == {"requests": 0, "failures": {"connection": 3}, "sidelined": 1}
    assert stats["alive"]["requests"] == 6 == len(alive.requests())
    assert not teacher.endpoints[0].healthy(time.monotonic())


def test_with_every_endpoint_sidelined_a_stop_is_not_kept_waiting():
    from genssd_cli.teacher.servers.local import free_port

    teacher = pool({"base_url": f"http://127.0.0.1:{free_port()}/v1"}, retries=10)
    for endpoint in teacher.endpoints:
        endpoint.strikes = 10
        endpoint.failed("connection")  # sidelined for the longest backoff

    async def go():
        teacher.stop = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(collect, teacher, "p", 1, 4, 0)
            await anyio.sleep(0.1)
            teacher.stop.set()

    with pytest.raises(BaseExceptionGroup) as caught:
        anyio.run(go)
    assert isinstance(caught.value.exceptions[0], StopRequested)


def test_requests_per_minute_are_kept_and_a_stop_ends_the_wait(fake_teacher):
    server = fake_teacher()
    teacher = client(server.base_url, requests_per_minute=2)
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            await collect(teacher, f"p{i}", 1, 4, i)
            outcomes.append("answered")
        except StopRequested:
            outcomes.append("stopped")

    async def go():
        teacher.stop = anyio.Event()
        try:
            with anyio.fail_after(20):  # not a speed claim: without the stop it would wait ~30 s
                async with anyio.create_task_group() as group:
                    for i in range(3):
                        group.start_soon(one, i)
                    while outcomes.count("answered") < 2:
                        await anyio.sleep(0.05)
                    await anyio.sleep(0.3)
                    assert teacher.endpoints[0].waiting == 1  # the third waits for the rate limit
                    teacher.stop.set()
        finally:
            await teacher.aclose()

    anyio.run(go)
    assert sorted(outcomes) == ["answered", "answered", "stopped"]
    assert len(server.requests()) == 2  # two a minute: the third was never sent


def test_a_cached_hint_that_n_is_honoured_gives_way_to_a_server_that_refuses_it(fake_teacher, tmp_path):
    """What an earlier run learnt of the model's servers is a hint: this run's servers may be
    another provider's, which refuses n > 1; the step is asked one choice at a time."""
    server = fake_teacher("--reject-n")
    cfg = TeacherConfig(model="fake-teacher", base_url=server.base_url)
    cache = ResponseCache(tmp_path / "responses.sqlite")
    cache.learn(model_identity(cfg), "honours_n", True)
    teacher = TeacherClient(cfg, server.base_url, backoff_s=0.01, cache=cache)
    assert teacher.honours_n is True
    candidates, _ = sample(teacher, "Q: 2+2?\nA:", 3, 8, 40)
    assert len(candidates) == 3 and teacher.honours_n is False
    assert cache.fact(model_identity(cfg), "honours_n") is False
    assert [(r["n"], r["fault"]) for r in server.requests()] == [(3, "400"), (1, None), (1, None), (1, None)]


def test_a_launched_model_is_known_by_its_file_not_its_alias():
    def launched(gguf: str, n_ctx: int = 4096) -> TeacherConfig:
        return TeacherConfig(model="teacher", launch={"gguf": gguf, "n_ctx": n_ctx})

    configs = (launched("gemma-3-270m"), launched("/m/other.gguf"), launched("gemma-3-270m", 2048))
    identities = {json.dumps(request_identity(cfg, Request(Prompt("p"), 2, 8, 0)), sort_keys=True) for cfg in configs}
    assert len(identities) == 3
    assert len({model_identity(launched("a.gguf")), model_identity(launched("b.gguf"))}) == 2
