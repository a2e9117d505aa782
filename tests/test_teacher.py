"""The teacher client against a real local OpenAI-compatible server process (tests/fake_teacher.py)."""

import anyio
import pytest

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import RuntimeFailure, TeacherFatalError, TeacherUnavailable
from genssd_cli.teacher import TeacherClient, request_seed


def client(url: str, **kw) -> TeacherClient:
    cfg = TeacherConfig(model=kw.pop("model", "fake-teacher"), base_url=url, retries=kw.pop("retries", 3), **kw)
    return TeacherClient(cfg, url, backoff_s=0.01)


def sample(teacher: TeacherClient, *args):
    async def go():
        try:
            return await teacher.sample(*args)
        finally:
            await teacher.aclose()

    return anyio.run(go)


def test_n_is_used_when_honoured(fake_teacher):
    server = fake_teacher()
    teacher = client(server.base_url)
    response = sample(teacher, "Q: 1+1?\nA:", 4, 8, 100)
    assert len(response.candidates) == 4 and response.requests == 1
    assert teacher.honours_n is True
    assert [(r["n"], r["seed"]) for r in server.requests()] == [(4, 100)]


def test_servers_ignoring_n_are_topped_up_with_seed_plus_i(fake_teacher):
    server = fake_teacher("--ignore-n")
    teacher = client(server.base_url)
    response = sample(teacher, "Q: 1+1?\nA:", 4, 8, 100)
    assert len(response.candidates) == 4 and response.requests == 4
    assert teacher.honours_n is False
    assert sorted(r["seed"] for r in server.requests()) == [100, 101, 102, 103]
    # The fan-out used once n is known to be ignored asks exactly the same requests.
    again = client(server.base_url)
    again.honours_n = False
    assert sample(again, "Q: 1+1?\nA:", 4, 8, 100).candidates == response.candidates


def test_same_seed_same_candidates_and_usage(fake_teacher):
    server = fake_teacher()
    first = sample(client(server.base_url), "prompt", 3, 16, 7)
    second = sample(client(server.base_url), "prompt", 3, 16, 7)
    assert first == second
    assert first.completion_tokens == sum(c.completion_tokens for c in first.candidates) > 0


def test_retryable_faults_are_retried(fake_teacher):
    server = fake_teacher("--fault-rate", "0.5", "--fault-seed", "1")
    teacher = client(server.base_url, retries=8, timeout_s=5)

    async def steps():
        return [await teacher.sample(f"p{step}", 2, 8, step) for step in range(6)]

    assert all(len(r.candidates) == 2 for r in anyio.run(steps))
    faults = [r["fault"] for r in server.requests() if r["fault"]]
    assert faults, "the fault seed should inject some faults"
    assert sum(teacher.retries.values()) == len(faults)


def test_retries_run_out(fake_teacher):
    server = fake_teacher("--status", "503")
    with pytest.raises(TeacherUnavailable, match="after 3 attempts: http_503"):
        sample(client(server.base_url, retries=2), "p", 1, 8, 0)


@pytest.mark.parametrize(("status", "message"), [(401, "rejected the API key"), (403, "denied access"),
                                                 (404, "not found")])
def test_fatal_statuses_fail_fast(fake_teacher, status, message):
    server = fake_teacher("--status", str(status))
    teacher = client(server.base_url, retries=5)
    with pytest.raises(TeacherFatalError, match=message):
        sample(teacher, "p", 1, 8, 0)
    assert teacher.retries == {}


def test_check_names_the_problem(fake_teacher, monkeypatch):
    server = fake_teacher()
    anyio.run(client(server.base_url).check)
    with pytest.raises(TeacherFatalError, match="'other' is not served"):
        anyio.run(client(server.base_url, model="other").check)
    with pytest.raises(RuntimeFailure, match="unreachable"):
        anyio.run(client("http://127.0.0.1:9/v1").check)
    monkeypatch.delenv("GENSSD_TEST_KEY", raising=False)
    with pytest.raises(RuntimeFailure, match="GENSSD_TEST_KEY is not set"):
        client(server.base_url, api_key_env="GENSSD_TEST_KEY")


def test_never_zero_max_tokens(fake_teacher):
    with pytest.raises(ValueError):
        sample(client("http://127.0.0.1:9/v1"), "p", 1, 0, 0)


def test_request_seed_is_stable_and_spread():
    assert request_seed(0, "p1", 0, 2, 0) == request_seed(0, "p1", 0, 2, 0)
    seeds = {request_seed(0, f"p{i}", 0, s, a) for i in range(20) for s in range(5) for a in range(2)}
    assert len(seeds) == 200
