"""Teacher endpoints as users have them, end to end through `genssd run` against real server
processes on 127.0.0.1 (genssd_cli/teacher/servers/test_teacher.py): a vLLM-like chat API continuing a partial
assistant message (with a reasoning parser, refusing n > 1), one that restarts instead, and a
pool of two servers of which one is killed mid-run."""

import json
import subprocess
import sys
import time

import pytest
from conftest import ROOT, check_run_is_consistent, genssd, load_jsonl, run_config, write_config

from genssd_cli.rundir.log import read_events


def test_chat_continue_run_on_a_reasoning_api_that_refuses_n(tmp_path, fake_teacher):
    server = fake_teacher("--reasoning", "--reject-n")
    cfg = run_config(server.base_url, teacher={"mode": "chat-continue"}, data={"count": 3})
    result = genssd("run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    summary = check_run_is_consistent(tmp_path / "run", problems=3, n=3)
    asked = server.requests()
    # The preflight probe; the first steps of the problems started together ask n=3 and are
    # refused; from then on one request per candidate, none refused.
    many = [r for r in asked if r["n"] == 3]
    assert 1 <= len(many) <= 3 and all(r["fault"] == "400" for r in many)
    assert all(r["fault"] is None for r in asked if r["n"] == 1)
    assert asked.index(many[-1]) < len(many) + 3  # learnt at once, not once per step
    assert summary["teacher"]["retries"] == {"n_refused": len(many)}
    rows = load_jsonl(tmp_path / "run" / "trajectories.jsonl")
    texts = [row["completion"][0]["content"] for row in rows]
    for row, text in zip(rows, texts, strict=True):
        if "The answer is" in text:  # the thinking came back apart; its </think> is put back
            assert "</think> The answer is" in text and row["answer"] is not None
    # Every step after the first sent the accepted trace as the assistant message to continue.
    traces = [r["prompt"].split("<assistant>", 1)[1] for r in asked if "Count from 1" not in r["prompt"]]
    steps = sum(1 for e in read_events(tmp_path / "run") if e.type == "choice" and e.step > 0)
    assert steps > 0 and sum(1 for trace in traces if trace) >= steps
    for trace in filter(None, traces):
        assert any(text.startswith(trace) for text in texts)
    name = server.base_url.split("//")[1].removesuffix("/v1")
    assert summary["teacher"]["endpoints"][name]["requests"] == summary["teacher"]["requests"]


def test_chat_continue_on_a_server_that_restarts_is_refused_before_the_run(tmp_path, fake_teacher):
    server = fake_teacher("--prefill", "none")  # ignores continue_final_message: a new answer starts
    cfg = run_config(server.base_url, teacher={"mode": "chat-continue"}, data={"count": 2})
    result = genssd("run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: teacher http://127.0.0.1:") and "does not continue a partial trace" in line
    assert "genssd doctor CONFIG" in line
    assert not (tmp_path / "run" / "events.jsonl").exists()
    assert len(server.requests()) == 1  # the 4-token probe, nothing else


@pytest.mark.slow
def test_a_pool_survives_losing_an_endpoint_mid_run(tmp_path, fake_teacher):
    """Two servers; one is killed once it has answered a few requests. The run completes, nothing
    is lost, and its trajectories are byte for byte those of a run against one healthy server."""
    slow = ("--latency-per-token", "0.01")
    first, second, alone = fake_teacher(*slow), fake_teacher(*slow), fake_teacher()
    base = run_config(first.base_url, data={"count": 8})
    del base["teacher"]["base_url"]
    base["teacher"]["endpoints"] = [{"base_url": first.base_url, "name": "first"},
                                    {"base_url": second.base_url, "name": "second", "weight": 2}]  # fmt: skip
    config = write_config(tmp_path / "pool.yaml", base)
    run = subprocess.Popen(
        [sys.executable, "-m", "genssd_cli", "run", str(config), "--out", str(tmp_path / "pool")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while len(second.requests()) < 6 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before the endpoint could be killed"
    before = len(first.requests())
    second.stop()  # mid-run: requests in flight there are cut off
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    assert "warning" not in out + err

    summary = check_run_is_consistent(tmp_path / "pool", problems=8, n=3)
    assert summary["trajectories"]["failed"] == 0
    endpoints = summary["teacher"]["endpoints"]
    # It answered some (the server logs a request on arrival, so fewer than it logged) then failed.
    assert 1 <= endpoints["second"]["requests"] < len(second.requests())
    assert endpoints["second"]["failures"].get("connection", 0) >= 1
    assert endpoints["first"]["requests"] > before  # the other server took the rest
    assert endpoints["first"]["requests"] + endpoints["second"]["requests"] == summary["teacher"]["requests"]

    cfg_alone = run_config(alone.base_url, data={"count": 8})
    result = genssd("run", str(write_config(tmp_path / "alone.yaml", cfg_alone)), "--out", str(tmp_path / "alone"))
    assert result.returncode == 0, result.stderr
    pooled = (tmp_path / "pool" / "trajectories.jsonl").read_bytes()
    assert pooled == (tmp_path / "alone" / "trajectories.jsonl").read_bytes()
    assert json.loads((tmp_path / "alone" / "summary.json").read_text())["teacher"]["requests"] == len(alone.requests())


def test_endpoint_settings_are_checked(tmp_path):
    cfg = run_config("http://127.0.0.1:9/v1")
    cfg["teacher"]["endpoints"] = [{"base_url": "http://127.0.0.1:9/v1"}]
    both = genssd("run", str(write_config(tmp_path / "both.yaml", cfg)))
    assert both.returncode == 2
    assert "set exactly one of teacher.base_url, teacher.endpoints and teacher.launch" in both.stderr
    del cfg["teacher"]["base_url"]
    cfg["teacher"]["endpoints"].append({"base_url": "http://127.0.0.1:9/v1", "weight": 2})
    same = genssd("run", str(write_config(tmp_path / "same.yaml", cfg)))
    assert same.returncode == 2 and "give each endpoint its own name" in same.stderr
    cfg["teacher"]["endpoints"] = [{"base_url": "http://127.0.0.1:9/v1", "weight": 0}]
    zero = genssd("run", str(write_config(tmp_path / "zero.yaml", cfg)))
    assert zero.returncode == 2 and "teacher.endpoints.0.weight" in zero.stderr


def test_completions_prompt_in_the_teachers_chat_template(tmp_path, fake_teacher):
    from genssd_cli.config import DataConfig
    from genssd_cli.models import load_tokenizer
    from genssd_cli.problems import load_problems, load_prompt

    server = fake_teacher()
    cfg = run_config(server.base_url, teacher={"assistant_prefix": "<think>\n", "system": "Be brief."},
                     prompts={"teacher": "teacher_user", "teacher_chat_template": "smollm2-135m-instruct"},
                     data={"count": 1}, search={"max_steps": 1})  # fmt: skip
    result = genssd("run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer("smollm2-135m-instruct", "test")
    [problem] = load_problems(DataConfig(**cfg["data"]))
    user = load_prompt("teacher_user").replace("{question}", problem.question)
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}],
        tokenize=False, add_generation_prompt=True,
    ) + "<think>\n"  # fmt: skip
    assert server.requests()[0]["prompt"] == expected
    assert expected.startswith("<|im_start|>system\nBe brief.<|im_end|>")

    cfg["prompts"]["teacher_chat_template"] = str(tmp_path / "no-such-tokenizer")
    bad = genssd("run", str(write_config(tmp_path / "bad.yaml", cfg)), "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: prompts.teacher_chat_template: no tokenizer at '{tmp_path / 'no-such-tokenizer'}' (a shipped name, "
        "a local model folder, or a model id in the local Hugging Face cache)"
    ]
