"""The response cache (`teacher.cache`), on the real CLI against the deterministic test teacher
(which logs every request it receives): a second run of the same requests pays for none of them
and writes the same trajectories; another `prune_ppl` pays only for what is new; concurrent runs
and a `kill -9` leave the cache consistent."""

import json
import signal
import sqlite3
import subprocess
import sys

import pytest
from conftest import ROOT, genssd, run_config, write_config
from test_resume import start_run, wait_for_lines

from genssd_cli.rundir.log import read_events

pytestmark = pytest.mark.slow

PRICE = {"input": 1.0, "output": 4.0}


def config_with_cache(tmp_path, base_url, cache, name="c.yaml", **sections):
    sections.setdefault("data", {"count": 3})
    teacher = {"cache": str(cache), "price": PRICE, **sections.pop("teacher", {})}
    return write_config(tmp_path / name, run_config(base_url, teacher=teacher, **sections))


def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def integrity(cache) -> tuple[str, int]:
    with sqlite3.connect(cache) as db:
        status = db.execute("PRAGMA integrity_check").fetchone()[0]
        return status, db.execute("SELECT count(*) FROM responses").fetchone()[0]


def test_a_second_run_pays_for_nothing_and_writes_the_same_trajectories(tmp_path, fake_teacher):
    server = fake_teacher("--ignore-n")
    cache = tmp_path / "cache" / "responses.sqlite"
    config = config_with_cache(tmp_path, server.base_url, cache)
    first = genssd("run", str(config), "--out", str(tmp_path / "first"))
    assert first.returncode == 0, first.stderr
    sent = len(server.requests())
    one = summary(tmp_path / "first")
    assert one["teacher"]["cache"] == {"hits": 0, "misses": one["teacher"]["requests"], "saved_completion_tokens": 0,
                                       "saved_cost": 0.0}  # fmt: skip
    assert integrity(cache) == ("ok", sent)

    second = genssd("run", str(config), "--out", str(tmp_path / "second"))
    assert second.returncode == 0, second.stderr
    assert len(server.requests()) == sent  # not one request more
    two = summary(tmp_path / "second")
    assert two["teacher"]["cache"]["hits"] == two["teacher"]["requests"] == one["teacher"]["requests"]
    assert two["teacher"]["cache"]["saved_cost"] == pytest.approx(one["teacher"]["cost"])
    assert two["teacher"]["cost"] == 0.0 and two["teacher"]["completion_tokens"] == one["teacher"]["completion_tokens"]
    assert all(e.cached for e in read_events(tmp_path / "second") if e.type == "response")
    # The same trajectories as without a cache: hits are the answers the server gives again.
    plain = write_config(tmp_path / "plain.yaml", run_config(server.base_url, data={"count": 3}))
    assert genssd("run", str(plain), "--out", str(tmp_path / "plain")).returncode == 0
    expected = (tmp_path / "plain" / "trajectories.jsonl").read_bytes()
    assert (tmp_path / "first" / "trajectories.jsonl").read_bytes() == expected
    assert (tmp_path / "second" / "trajectories.jsonl").read_bytes() == expected


def test_another_prune_ppl_pays_only_for_the_new_requests(tmp_path, fake_teacher):
    server = fake_teacher("--ignore-n")
    cache = tmp_path / "responses.sqlite"
    loose = config_with_cache(tmp_path, server.base_url, cache, "loose.yaml", search={"prune_ppl": None})
    assert genssd("run", str(loose), "--out", str(tmp_path / "loose")).returncode == 0
    before = len(server.requests())
    # A threshold every step's best candidate exceeds: each step is re-sampled (new seeds) until pruned.
    strict = config_with_cache(tmp_path, server.base_url, cache, "strict.yaml", search={"prune_ppl": 1.0001})
    result = genssd("run", str(strict), "--out", str(tmp_path / "strict"))
    assert result.returncode == 0, result.stderr
    totals = summary(tmp_path / "strict")["teacher"]
    assert totals["cache"]["hits"] > 0 and totals["cache"]["misses"] > 0
    assert len(server.requests()) - before == totals["cache"]["misses"]  # paid for exactly the misses
    hits = [e for e in read_events(tmp_path / "strict") if e.type == "response" and e.cached]
    assert {(e.step, e.attempt) for e in hits} == {(0, 0)}  # the requests both runs sent


def test_concurrent_and_killed_runs_leave_the_cache_consistent(tmp_path, fake_teacher):
    server = fake_teacher("--ignore-n", "--latency-per-token", "0.01")
    cache = tmp_path / "responses.sqlite"
    configs = [config_with_cache(tmp_path, server.base_url, cache, f"c{i}.yaml", data={"count": 3, "seed": i})
               for i in range(2)]  # fmt: skip
    together = [subprocess.Popen([sys.executable, "-m", "genssd_cli", "run", str(c), "--out", str(tmp_path / f"r{i}")],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i, c in enumerate(configs)]  # fmt: skip
    for process in together:
        _out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    status, rows = integrity(cache)
    # One row per distinct request: a request retried after a timeout on a loaded machine reaches
    # the server twice and is stored once.
    assert status == "ok" and rows == len({json.dumps(r, sort_keys=True) for r in server.requests()})

    killed = config_with_cache(tmp_path, server.base_url, cache, "k.yaml", data={"count": 4, "seed": 7})
    process = start_run(killed, tmp_path / "k")
    wait_for_lines(process, tmp_path / "k", 6)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    status, stored = integrity(cache)
    assert status == "ok"
    resumed = genssd("run", str(killed), "--out", str(tmp_path / "k"))
    assert resumed.returncode == 0, resumed.stderr
    assert integrity(cache)[0] == "ok" and integrity(cache)[1] >= stored
    # Everything the killed and resumed sessions received is in the cache: a fresh run asks nothing.
    sent = len(server.requests())
    again = genssd("run", str(killed), "--out", str(tmp_path / "k-again"))
    assert again.returncode == 0, again.stderr
    assert len(server.requests()) == sent
    same = (tmp_path / "k" / "trajectories.jsonl").read_bytes()
    assert (tmp_path / "k-again" / "trajectories.jsonl").read_bytes() == same


def test_a_file_that_is_not_a_cache_is_one_line(tmp_path, fake_teacher):
    server = fake_teacher()
    not_a_cache = tmp_path / "notes.txt"
    not_a_cache.write_text("shopping list\n" * 100)
    config = config_with_cache(tmp_path, server.base_url, not_a_cache)
    result = genssd("run", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = f"error: teacher.cache {not_a_cache} is not a genssd response cache (file is not a database)"
    assert result.stderr.strip() == message
    assert not (tmp_path / "run").exists()
    assert not_a_cache.read_text() == "shopping list\n" * 100
