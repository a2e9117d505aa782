"""Teacher-replica affinity (`teacher.routing: affinity`): the pool's pick in process (stable per
trajectory, spread by weight, moving off a sidelined endpoint and back, spilling past the load
bound), then `genssd run` against two real test teacher processes: every step of a trajectory
answered by one server, and a trajectory whose server goes down moving to the other and back."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from contextlib import asynccontextmanager

import anyio
import pytest
from conftest import ROOT, check_run_is_consistent, genssd, run_config, write_config

from genssd_cli.config import TeacherConfig, load_run_config
from genssd_cli.errors import UsageError
from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import Response
from genssd_cli.rundir.results_hash import results_settings, settings_hash
from genssd_cli.teacher.endpoint import SIDELINE_AFTER, Endpoint
from genssd_cli.teacher.pool import AFFINITY_LOAD_BOUND, TeacherClient
from genssd_cli.teacher.servers.local import start_fake_teacher

KEYS = [(f"p{i}", sample) for i in range(1000) for sample in (0, 1)]


def pool(*weights: float, routing: str = "affinity", max_concurrency: int = 4) -> TeacherClient:
    """A pool of endpoints named a, b, c, … (nothing is sent: only the pick is used)."""
    endpoints = [{"base_url": f"http://127.0.0.1:9/v{i}", "name": "abcdefgh"[i], "weight": w}
                 for i, w in enumerate(weights)]  # fmt: skip
    cfg = TeacherConfig(model="m", endpoints=endpoints, routing=routing, max_concurrency=max_concurrency)
    return TeacherClient(cfg)


def homes(teacher: TeacherClient, keys=KEYS, avoid=()) -> dict[tuple[str, int], str]:
    return {key: teacher.route(key, avoid).name for key in keys}


def test_a_trajectory_keeps_its_endpoint_and_trajectories_spread_by_weight():
    teacher = pool(1, 1, 2)
    first = homes(teacher)
    assert homes(teacher) == first  # stable
    assert homes(pool(1, 1, 2)) == first  # and across processes: a hash of names and keys, not Python's hash()
    shares = Counter(first.values())
    assert abs(shares["a"] / len(KEYS) - 0.25) < 0.03
    assert abs(shares["b"] / len(KEYS) - 0.25) < 0.03
    assert abs(shares["c"] / len(KEYS) - 0.50) < 0.03
    # The sample is part of the key: two samples of a problem share an endpoint about as often as
    # two independent draws do (0.25² + 0.25² + 0.5²).
    together = sum(first[(f"p{i}", 0)] == first[(f"p{i}", 1)] for i in range(1000)) / 1000
    assert abs(together - 0.375) < 0.05
    # Least-loaded routing ignores the key: with every endpoint idle, the first in config order.
    assert set(homes(pool(1, 1, 2, routing="least-loaded")).values()) == {"a"}


def test_requests_of_no_trajectory_go_to_the_least_loaded():
    teacher = pool(1, 1)
    a, b = teacher.endpoints
    a.in_flight = 1
    assert teacher.route(None) is b
    assert {teacher.route(key).name for key in KEYS[:50]} == {"a", "b"}  # trajectories keep their homes


def test_a_sidelined_endpoints_trajectories_move_to_their_next_choice_and_come_back():
    teacher = pool(1, 1, 1)
    before = homes(teacher)
    b = teacher.endpoints[1]
    for _ in range(SIDELINE_AFTER):
        b.failed("connection")  # as three failed requests in a row sideline it
    assert not b.healthy(time.monotonic())
    during = homes(teacher)
    moved = {key: home for key, home in during.items() if before[key] == "b"}
    # Only b's trajectories move, and to their next choice: the endpoint a retry avoiding b picks
    # (which is a or c, per trajectory, not all to one), the others stay where they were.
    assert all(during[key] == before[key] for key in KEYS if before[key] != "b")
    assert set(moved.values()) == {"a", "c"}
    assert abs(Counter(moved.values())["a"] / len(moved) - 0.5) < 0.06
    b.sidelined_until = 0.0  # its pause is over
    assert homes(teacher, moved) == {key: "b" for key in moved}  # back home
    # The same order decides where a retry goes: avoiding b, while b is healthy, gives the same moves.
    assert homes(teacher, moved, avoid={b}) == moved


@asynccontextmanager
async def holding(endpoint: Endpoint, requests: int):
    """`requests` requests holding their place at the endpoint (in flight, or queued behind its
    concurrency limit) through its real slot, until the block ends."""
    release = anyio.Event()

    async def one() -> None:
        async with endpoint.slot(0):
            await release.wait()

    async with anyio.create_task_group() as group:
        for _ in range(requests):
            group.start_soon(one)
        await anyio.sleep(0.01)
        yield
        release.set()


def test_a_full_home_spills_only_past_the_load_bound():
    teacher = pool(1, 1, max_concurrency=2)
    a, b = teacher.endpoints
    key = next(k for k in KEYS if teacher.route(k) is a)
    assert AFFINITY_LOAD_BOUND == 1.25

    async def go() -> list[tuple[str, int, int]]:
        picks = []

        async def pick(held_a: int, held_b: int) -> None:
            async with holding(a, held_a), holding(b, held_b):
                assert (a.held(), b.held()) == (held_a, held_b)
                picks.append((teacher.route(key).name, held_a, held_b))

        await pick(1, 0)  # a free slot at home: stay, however idle the other
        await pick(2, 0)  # home full, and 3 > 1.25 x (2 + 0 + 1) / 2: spill to b
        await pick(3, 4)  # both full; home's 4 ≤ 1.25 x 8 / 2 = 5: wait at home
        await pick(4, 2)  # both full; home's 5 > 1.25 x 7 / 2 = 4.375: b, whose 3 is within it
        await pick(6, 6)  # both far past their slots, evenly: home
        return picks

    assert [name for name, *_ in anyio.run(go)] == ["a", "b", "a", "b", "a"]
    # Least-loaded routing goes by the load alone.
    other = pool(1, 1, routing="least-loaded")
    other.endpoints[0].in_flight = 1
    assert other.route(key) is other.endpoints[1]


def test_weights_scale_the_load_bound():
    """Both endpoints full, the home holding 4 and the other 2: with equal weights the home is past
    1.25 x its share (5 > 1.25 x 7 / 2) and the request spills; a home of three times the weight
    has three times the share (5 ≤ 1.25 x 7 x 3/4) and keeps it."""
    even, heavy = pool(1, 1, max_concurrency=1), pool(1, 3, max_concurrency=1)
    key = next(k for k in KEYS if even.route(k).name == heavy.route(k).name == "b")
    for teacher in (even, heavy):
        a, b = teacher.endpoints
        a.in_flight, a.waiting = 1, 1
        b.in_flight, b.waiting = 1, 3
    assert even.route(key).name == "a"
    assert heavy.route(key).name == "b"


def test_routing_is_checked_and_is_not_a_results_setting():
    prompts = {"teacher": "T {question}", "student": "S {question}"}
    affinity = results_settings(load_run_config(None), prompts)
    least = results_settings(load_run_config(None, ["teacher.routing=least-loaded"]), prompts)
    assert load_run_config(None).teacher.routing == "affinity"
    assert settings_hash(affinity) == settings_hash(least)  # a run may resume with the other
    with pytest.raises(UsageError, match=r"teacher\.routing: Input should be 'affinity' or 'least-loaded'"):
        load_run_config(None, ["teacher.routing=random"])


def responses_by_trajectory(run) -> dict[tuple[str, int], list[str]]:
    """Each trajectory's answering endpoints, step by step (the Response records of events.jsonl)."""
    by: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for event in read_events(run):
        if isinstance(event, Response):
            by.setdefault((event.problem_id, event.sample), []).append((event.step, event.endpoint))
    return {key: [endpoint for _, endpoint in sorted(steps)] for key, steps in by.items()}


def pool_config(first, second, names=("first", "second"), **sections) -> dict:
    cfg = run_config(first.base_url, **sections)
    del cfg["teacher"]["base_url"]
    cfg["teacher"]["endpoints"] = [{"base_url": server.base_url, "name": name}
                                   for server, name in zip((first, second), names, strict=True)]  # fmt: skip
    cfg["teacher"]["max_concurrency"] = 8  # never full here: no spill
    cfg["teacher"]["stop"] = []  # no answer ends a trajectory early: each runs max_steps steps
    return cfg


def test_every_step_of_a_trajectory_is_answered_by_one_endpoint(tmp_path, fake_teacher):
    slow = ("--latency-per-token", "0.01")  # requests overlap, as on real servers
    first, second = fake_teacher(*slow), fake_teacher(*slow)
    # Two problems, two samples each: four trajectories in flight together, three steps each.
    cfg = pool_config(first, second, data={"count": 2}, search={"n": 2, "max_steps": 3, "max_new_tokens": 24,
                                                                "samples": 2})  # fmt: skip
    result = genssd("run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    check_run_is_consistent(tmp_path / "run", problems=4, n=2)
    answered = responses_by_trajectory(tmp_path / "run")
    assert len(answered) == 4 and all(len(steps) == 3 for steps in answered.values())
    assert all(len(set(steps)) == 1 for steps in answered.values()), answered
    homes = Counter(steps[0] for steps in answered.values())
    assert set(homes) == {"first", "second"}  # spread, not all on one
    # The servers' own logs agree: each answered 3 requests per trajectory it is home to.
    assert (len(first.requests()), len(second.requests())) == (3 * homes["first"], 3 * homes["second"])


@pytest.mark.slow
def test_a_trajectory_whose_endpoint_goes_down_moves_to_the_other_and_comes_back(tmp_path, fake_teacher):
    """Two trajectories, one at home on each server. The right server is killed while it answers
    its trajectory's third step, and started again on its port at once. The step is retried on the
    left server (a retry avoids the endpoint that failed it); the trajectory comes back once the
    right server answers again; the left server's trajectory never leaves it."""
    slow = ("--latency-per-token", "0.05")  # 0.8 s a request: the kill finds one in flight
    left, right = fake_teacher(*slow), fake_teacher(*slow)
    search = {"n": 2, "chunk_tokens": 8, "max_steps": 6, "max_new_tokens": 48}
    cfg = pool_config(left, right, ("left", "right"), data={"count": 2}, search=search)
    config = write_config(tmp_path / "c.yaml", cfg)
    run = subprocess.Popen([sys.executable, "-m", "genssd_cli", "run", str(config), "--out", str(tmp_path / "run")],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(right.requests()) < 3 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run.poll() is None, "the run ended before the endpoint could be killed"
    right.stop()  # the request in flight there (logged on arrival) is cut off
    right.process = start_fake_teacher(right.port, "--log", str(right.log), *slow)  # back on its port
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err

    summary = check_run_is_consistent(tmp_path / "run", problems=2, n=2)
    assert summary["trajectories"]["failed"] == 0
    assert summary["teacher"]["endpoints"]["right"]["failures"].get("connection", 0) >= 1
    answered = responses_by_trajectory(tmp_path / "run")
    assert sorted(steps[0] for steps in answered.values()) == ["left", "right"]
    assert all(len(steps) == 6 for steps in answered.values())
    [stayed] = [steps for steps in answered.values() if steps[0] == "left"]
    [away] = [steps for steps in answered.values() if steps[0] == "right"]
    assert set(stayed) == {"left"}  # never moved
    # Its first two steps at home, the third (cut off) and any sent while it was down on the left
    # server, then home again to the end.
    assert away[:2] == ["right", "right"] and away[2] == "left" and away[-1] == "right", away
    back = away.index("right", 2)
    assert set(away[2:back]) == {"left"} and set(away[back:]) == {"right"}, away
