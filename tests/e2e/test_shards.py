"""Sharded runs (`genssd run --shards N`, `--shard K/N`): the assignment, the plan fixed in the run
directory, the endpoint limits and the budget shared out, and end to end on the real CLI with the
deterministic test teacher and the real student — local processes and a local Ray cluster, one
shard killed mid-run: the merged trajectories.jsonl is byte-identical to an unsharded run's and no
recorded response is asked for again; the local Ray cluster (RAY_ADDRESS set or not) listens on
loopback only."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, genssd, run_config, write_config
from rich.console import Console

from genssd_cli.config import LaunchConfig, RunConfig
from genssd_cli.errors import UsageError
from genssd_cli.rundir.layout import EVENTS
from genssd_cli.rundir.log import read_events
from genssd_cli.shards.local import run_local
from genssd_cli.shards.plan import (
    Shard,
    SharedSpend,
    check_plan,
    parse_shard,
    record_spent,
    shard_dir,
    shard_of,
    share_limits,
    write_plan,
)
from genssd_cli.shards.process import ShardCommand
from genssd_cli.teacher.endpoint import Endpoint

PRICE = {"input": 1.0, "output": 4.0}


def test_assignment_is_stable_and_covers_every_problem():
    ids = [f"arith-{i}" for i in range(400)]
    shards = [shard_of(i, 4) for i in ids]
    # The same in a fresh interpreter (hash() would differ per process; the assignment may not).
    code = "from genssd_cli.shards.plan import shard_of; print([shard_of(f'arith-{i}', 4) for i in range(400)])"
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(again.stdout) == shards
    counts = [shards.count(k) for k in range(4)]
    assert all(70 < c < 130 for c in counts), counts  # every shard gets a fair part
    assert [shard_of(i, 1) for i in ids] == [0] * 400


def test_parse_shard():
    assert parse_shard("2/5") == Shard(2, 5)
    for bad in ("5/5", "-1/3", "a/b", "3", "1/0"):
        with pytest.raises(UsageError, match="--shard"):
            parse_shard(bad)


def test_endpoint_limits_are_shared_out():
    cfg = RunConfig.model_validate(run_config("http://127.0.0.1:9/v1", teacher={
        "max_concurrency": 8, "requests_per_minute": 60, "tokens_per_minute": 9000}))  # fmt: skip
    part = share_limits(cfg, 4)
    assert (part.teacher.max_concurrency, part.teacher.requests_per_minute, part.teacher.tokens_per_minute) == (
        2, 15, 2250)  # fmt: skip
    with pytest.raises(UsageError, match="cannot be shared by 16 shards"):
        share_limits(cfg, 16)
    # A pool whose every server has its own concurrency: the teacher-wide one is unused.
    pool = RunConfig.model_validate(run_config(None, teacher={"base_url": None, "max_concurrency": 1, "endpoints": [
        {"base_url": "http://127.0.0.1:9/v1", "max_concurrency": 8},
        {"base_url": "http://127.0.0.1:10/v1", "max_concurrency": 4}]}))  # fmt: skip
    assert [e.max_concurrency for e in share_limits(pool, 4).teacher.endpoints] == [2, 1]


def test_a_launched_teacher_is_each_shards_own_and_its_limits_are_not_shared():
    cfg = RunConfig.model_validate(run_config("http://127.0.0.1:9/v1"))
    launched = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={
        "base_url": None, "launch": LaunchConfig(gguf="gemma-3-270m"), "max_concurrency": 2})})  # fmt: skip
    assert share_limits(launched, 8) is launched


def test_a_minute_of_requests_shared_below_one_is_still_kept():
    """A shard's share of a small rate (10 a minute over 16 shards) is one request per 96 s."""
    cfg = RunConfig.model_validate(run_config("http://127.0.0.1:9/v1", teacher={
        "max_concurrency": 16, "requests_per_minute": 10}))  # fmt: skip
    part = share_limits(cfg, 16).teacher
    limiter = Endpoint(part, part.base_url, None, None).rpm
    assert (limiter.max_rate, limiter.time_period) == (1, pytest.approx(96.0))


def test_the_budget_is_every_shards_spend(tmp_path):
    for k in range(3):
        shard_dir(tmp_path, k).mkdir()
    record_spent(shard_dir(tmp_path, 2), 4.0)  # a shard that ended earlier, with nothing left to ask
    zero, one = (SharedSpend(tmp_path, Shard(k, 3), 0.0) for k in range(2))
    assert zero.add(1.0) == 5.0
    assert one.add(2.0) == 7.0
    assert zero.add(0.5) == 7.5
    assert SharedSpend(tmp_path, Shard(1, 3), 2.0).total() == 7.5  # a shard's restart: its own from its log


def test_a_shard_of_another_split_started_together_stops_before_its_log(tmp_path):
    write_plan(tmp_path, 4, "h1", force=False)
    with pytest.raises(UsageError, match="split into 4 shards"):
        write_plan(tmp_path, 2, "h1", force=False)
    with pytest.raises(UsageError, match="made with other settings"):
        write_plan(tmp_path, 4, "h2", force=False)
    write_plan(tmp_path, 4, "h2", force=True)  # forced once: later resumes of those settings need no --force
    check_plan(tmp_path, 4, "h2", force=False)


def test_a_stop_is_passed_on_and_no_shard_starts_again(tmp_path, monkeypatch):
    """A shard still starting up dies of the SIGTERM it cannot catch yet: that is a stop, not a
    death to recover from."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    commands = [ShardCommand(k, sleeper, tmp_path / f"shard-{k}.log") for k in range(2)]

    def stop_once_started() -> None:  # the logs are opened after the stop relay is in place
        while not all(c.log.exists() for c in commands):
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_once_started, daemon=True).start()
    started = time.monotonic()
    run_local(commands, max_restarts=3, console=Console(file=io.StringIO()))
    assert time.monotonic() - started < 30
    assert [(c.code, c.restarts) for c in commands] == [(130, 0), (130, 0)]


def test_refusals_leave_nothing(tmp_path, fake_teacher):
    server = fake_teacher()
    path = write_config(tmp_path / "c.yaml", run_config(server.base_url, teacher={"max_concurrency": 2}))
    run = tmp_path / "run"
    both = genssd("run", str(path), "--out", str(run), "--shards", "2", "--shard", "0/2")
    too_many = genssd("run", str(path), "--out", str(run), "--shards", "3")
    for result in (both, too_many):
        assert result.returncode == 2 and result.stderr.startswith("error: ")
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "max_concurrency 2 cannot be shared by 3 shards" in too_many.stderr
    assert not run.exists()
    assert len(server.requests()) == 0


def _kill_a_shard_mid_run(run: Path, index: int, process: subprocess.Popen, kill_parent: bool) -> tuple[int, set]:
    """Once shard `index` has recorded a few responses, SIGKILL its process (or, with kill_parent,
    the process that started it: a Ray actor). Returns the recorded seeds at that moment."""
    log = shard_dir(run, index) / EVENTS
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and log.read_bytes().count(b'"type": "response"') >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the sharded run ended before the kill"
    pid = int((shard_dir(run, index) / ".lock").read_text())
    if kill_parent:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    seeds = {e.seed for e in read_events(shard_dir(run, index)) if e.type == "response"}
    os.kill(pid, signal.SIGKILL)
    return pid, seeds


def _listening_addresses(pid: int) -> set[tuple[str, str]]:
    """(process name, address) of every listening TCP socket of `pid` and its descendants."""
    import psutil

    found = set()
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker that ended meanwhile
            name = process.name()
            found |= {(name, c.laddr.ip) for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    return found


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sharded_run_equals_an_unsharded_one(tmp_path, fake_teacher, executor):
    server = fake_teacher()
    config = run_config(server.base_url, data={"source": "arith", "count": 6, "seed": 0})
    path = write_config(tmp_path / "c.yaml", config)
    whole = tmp_path / "whole"
    assert genssd("run", str(path), "--out", str(whole)).returncode == 0
    asked_whole = len(server.requests())

    run = tmp_path / "sharded"
    command = [sys.executable, "-m", "genssd_cli", "run", str(path), "--out", str(run), "--shards", "2",
               "--executor", executor]  # fmt: skip
    # Ray: a local cluster of the run's own, whatever RAY_ADDRESS names (here: nothing listens there).
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "COLUMNS": "200"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)  # fmt: skip
    killed, seeds = _kill_a_shard_mid_run(run, 0, process, kill_parent=executor == "ray")
    if executor == "ray":  # every service of the local cluster (GCS, raylet, workers, agents) on loopback
        listening = _listening_addresses(process.pid)
        assert {"gcs_server", "raylet"} <= {name for name, _ in listening}, listening
        print("listening:", sorted(listening))
        assert all(_is_loopback(ip) for _, ip in listening), listening
    asked_at_kill = len(server.requests())
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out + err
    print(out)

    assert (run / "trajectories.jsonl").read_bytes() == (whole / "trajectories.jsonl").read_bytes()
    merged, single = (json.loads((d / "summary.json").read_text()) for d in (run, whole))
    assert merged["trajectories"] == single["trajectories"] and merged["correct"] == single["correct"]
    assert merged["problems_sha256"] == single["problems_sha256"]
    # The killed shard was started again and resumed: two sessions in its log, none of its
    # recorded responses asked for again.
    starts = [e for e in read_events(shard_dir(run, 0)) if e.type == "run_start"]
    assert len(starts) == 2, f"shard 0 was not restarted after pid {killed} was killed"
    repeated = [r["seed"] for r in server.requests()[asked_at_kill:] if r["seed"] in seeds]
    assert repeated == []
    # Every request of the sharded run was one the unsharded run made too, each once, except those
    # in flight at the kill (sent, never recorded).
    sharded_seeds = [r["seed"] for r in server.requests()[asked_whole:]]
    whole_seeds = {r["seed"] for r in server.requests()[:asked_whole]}
    assert set(sharded_seeds) == whole_seeds
    assert len(sharded_seeds) - len(set(sharded_seeds)) <= 2  # at most its 2 requests in flight, asked again
    # report and export read a sharded run as they read the unsharded one: the teacher tokens of each
    # problem from every shard's log (the paired differences need them), every shard's sessions.
    report = genssd("report", str(whole), str(run), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    columns = json.loads((tmp_path / "report" / "report.json").read_text())["columns"]
    apart = {"dir": None, "wall_s": None, "shards": None}
    assert columns[0]["run"] | apart == columns[1]["run"] | apart
    assert (merged["shards"], single["shards"]) == (2, 1)
    warnings = json.loads((tmp_path / "report" / "report.json").read_text())["warnings"]
    assert f"{run}: its wall time sums its 2 shards', which ran side by side" in warnings
    differences = json.loads((tmp_path / "report" / "report.json").read_text())["differences"]
    tokens = next(d[key] for d in differences.values() for key in d if key == "teacher_tokens_per_kept_token")
    assert tokens["pairs"] == single["trajectories"]["finished"] + single["trajectories"]["truncated"]
    assert tokens["delta"] == 0
    assert genssd("export", str(run), "--out", str(tmp_path / "export")).returncode == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"| `sharded` | 6 | 0 | {merged['sessions']} | 0.1.0 | `{merged['config_hash']}` |" in card
    assert "`teacher.model` | `fake-teacher`" in card  # the settings, from the shards' run_start events
    # A finished sharded run again: nothing asked, the same files.
    again = genssd("run", str(path), "--out", str(run), "--shards", "2", "--executor", "local")
    assert again.returncode == 0, again.stderr
    assert (run / "trajectories.jsonl").read_bytes() == (whole / "trajectories.jsonl").read_bytes()
    # Another N is refused in one line; so is an unsharded start on the sharded directory.
    other = genssd("run", str(path), "--out", str(run), "--shards", "3", "--set", "teacher.max_concurrency=6")
    assert other.returncode == 2 and "split into 2 shards" in other.stderr
    plain = genssd("run", str(path), "--out", str(run))
    assert plain.returncode == 2 and "is a sharded run (2 shards)" in plain.stderr


@pytest.mark.slow
def test_max_cost_is_one_budget_for_all_shards(tmp_path, fake_teacher):
    server = fake_teacher()
    config = run_config(server.base_url, teacher={"price": PRICE, "max_concurrency": 2},
                        data={"source": "arith", "count": 6, "seed": 0})  # fmt: skip
    path = write_config(tmp_path / "c.yaml", config)
    whole = tmp_path / "whole"
    assert genssd("run", str(path), "--out", str(whole)).returncode == 0
    total = json.loads((whole / "summary.json").read_text())["teacher"]["cost"]

    run = tmp_path / "capped"
    limit = round(total / 3, 6)
    capped = genssd("run", str(path), "--out", str(run), "--shards", "2", "--set", f"max_cost={limit}")
    assert capped.returncode == 1 and "reached max_cost" in capped.stdout + capped.stderr
    costs = [json.loads((shard_dir(run, k) / "summary.json").read_text())["teacher"]["cost"] for k in range(2)]
    # Each shard stopped on the run's total, not its own: together they spent the cap plus what was
    # in flight (a shard learns the total when it pays: at most two responses each), where budgets
    # per shard would have spent up to twice the cap.
    one_response = max(_response_costs(run))
    assert limit <= sum(costs) <= limit + 4 * one_response, (costs, limit)


def _response_costs(run: Path) -> list[float]:
    return [
        (e.prompt_tokens * PRICE["input"] + e.completion_tokens * PRICE["output"]) / 1e6
        for k in range(2)
        for e in read_events(shard_dir(run, k))
        if e.type == "response"
    ]


def test_a_ray_shard_worker_signals_its_process_once_and_starts_none_once_stopped(tmp_path):
    """The driver sends its stop again while stopping (an actor Ray restarted is a new one); the
    shard process must still get one SIGTERM: a second makes a shard stop without draining."""
    from genssd_cli.shards.ray_executor import STOPPED, ShardWorker

    script = ("import signal, sys, time\n"
              "def term(*_):\n"
              "    open(sys.argv[1], 'a').write('TERM\\n')\n"
              "signal.signal(signal.SIGTERM, term)\n"
              "open(sys.argv[1] + '.up', 'w').close()\n"
              "deadline = time.monotonic() + 30\n"
              "while time.monotonic() < deadline and not open(sys.argv[1], 'a+').tell():\n"
              "    time.sleep(0.05)\n"
              "time.sleep(0.5)\n"
              "sys.exit(130)\n")  # fmt: skip
    signals = tmp_path / "signals"
    argv = [sys.executable, "-c", script, str(signals)]
    worker = ShardWorker()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run(argv, "shard-0.log", None, str(tmp_path))))
    thread.start()
    while not (tmp_path / "signals.up").exists():
        time.sleep(0.05)
    for _ in range(3):
        worker.stop()
    thread.join(timeout=60)
    assert codes == [130] and signals.read_text() == "TERM\n"
    assert worker.run(argv, "shard-0.log", None, str(tmp_path)) == STOPPED  # stopped: starts nothing
    assert signals.read_text() == "TERM\n"
