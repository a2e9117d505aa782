"""The real thing: llama.cpp's OpenAI-compatible server with the demo teacher (Gemma-3-270M GGUF),
started by genssd, and the real demo student. Slow; run in .ci/run. Without llama-cpp-python, or when
the module's server cannot start, they fail in CI (CI set) and are skipped elsewhere."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import anyio
import pytest
from conftest import collect, genssd
from test_resume import steps_cut_half_way

from genssd_cli.config import LaunchConfig, TeacherConfig
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.problems import load_prompt, render_prompt
from genssd_cli.rundir.layout import TRAJECTORIES
from genssd_cli.rundir.log import read_events
from genssd_cli.teacher.pool import TeacherClient
from genssd_cli.teacher.servers.llama_cpp import LocalServer, launched

pytestmark = pytest.mark.slow


def unavailable(why: str) -> NoReturn:
    """As the vLLM tests do (test_eval_vllm.vllm_python): skipped on a developer's machine, a
    failure in CI, which must run these tests."""
    if os.environ.get("CI"):
        pytest.fail(f"{why}: CI runs the real llama.cpp tests (`make setup` installs the demo extra)")
    pytest.skip(why)


def need_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        unavailable("llama-cpp-python (the demo extra) is not installed")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    need_llama_cpp()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    try:
        server = LocalServer(LaunchConfig(gguf="gemma-3-270m", n_ctx=2048), "gemma-3-270m", log)
    except UsageError as exc:  # the teacher GGUF's package is missing
        unavailable(f"cannot start llama.cpp's server: {exc}")
    with launched(server):
        try:
            server.wait_ready()
        except RuntimeFailure as exc:
            ends = log.read_text(errors="replace")[-3000:]
            unavailable(f"llama.cpp's server did not start: {exc}; its log ends:\n{ends}")
        yield server
    assert server.process.poll() is not None, "the server must be stopped"


def test_steps_through_the_real_client(llama_server):
    cfg = TeacherConfig(
        model="gemma-3-270m", base_url=llama_server.base_url, max_concurrency=1, stop=["\nQuestion:"], temperature=0.8
    )
    prompt = render_prompt(load_prompt("teacher_fewshot"), "Tom has 3 bags of 5 apples. How many apples?")

    async def steps():
        teacher = TeacherClient(cfg, llama_server.base_url, api_key=llama_server.api_key)
        try:
            await teacher.check()
            first = await collect(teacher, prompt, 3, 12, 1234)
            again = await collect(teacher, prompt, 3, 12, 1234)
            continued, _ = await collect(teacher, prompt + first[0][0].text, 2, 12, 99)
            return teacher, first, again, continued
        finally:
            await teacher.aclose()

    teacher, (first, parts), (again, _), continued = anyio.run(steps)
    assert teacher.honours_n is False  # llama.cpp answers one choice: topped up with seed+i
    assert len(first) == 3 and len(parts) == 3
    assert first == again  # per-request seeds are honoured: a resumed run asks the same
    assert len({c.text for c in first}) > 1
    for candidate in first + continued:
        assert candidate.finish_reason in ("stop", "length")
        assert 0 < candidate.tokens <= 12
        assert "\nQuestion:" not in candidate.text
    assert teacher.prompt_tokens > 0 and teacher.completion_tokens > 0


def test_demo_run_limit_2(tmp_path):
    need_llama_cpp()
    result = genssd("run", "--limit", "2", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    t = summary["trajectories"]
    assert summary["problems"] == 2
    assert t["finished"] + t["truncated"] + t["pruned"] + t["failed"] == 2 and t["failed"] == 0
    assert summary["teacher"]["requests"] >= 4 and summary["steps"] >= 1
    rows = [json.loads(line) for line in (run / "trajectories.jsonl").read_text().splitlines()]
    assert len(rows) == t["finished"] + t["truncated"]
    for row in rows:
        assert row["completion"][0]["content"].strip()
        assert row["student_ppl"] > 1.0
    server = read_events(run)[0].teacher_server
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)  # stopped with the run


@pytest.mark.parametrize(("method", "candidates"), [("standard-kd", 1), ("posthoc-ppl", 4)])
def test_baselines_on_the_demo_limit_2(tmp_path, method, candidates):
    need_llama_cpp()
    run = tmp_path / "run"
    result = genssd("run", "--limit", "2", "--set", f"method={method}", "--out", str(run))
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    # Whole trajectories: one step each, never pruned; n candidates for post-hoc selection.
    assert summary["trajectories"]["pruned"] == 0 and summary["steps"] == 2
    assert summary["teacher"]["candidates"] == 2 * candidates
    rows = [json.loads(line) for line in (run / "trajectories.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["method"] == method and r["steps"] == 1 for r in rows)
    assert all(r["student_ppl"] > 1.0 and r["completion"][0]["content"].strip() for r in rows)


def test_doctor_on_the_demo_teacher():
    need_llama_cpp()
    from doctor_table import rows

    result = genssd("doctor")  # launches llama.cpp's server for the probes, then stops it
    assert result.returncode == 0, result.stderr
    found = rows(result.stdout)
    assert all(found[check].startswith("ok") for check in (
        "reachable", "model listed", "completion", "seed honoured", "continues the prefix", "stop strings honoured",
        "context length"))  # fmt: skip
    assert found["n > 1 honoured"].startswith("no asked 3 choices, got 1")  # llama.cpp answers one choice
    assert "2048 tokens" in found["context length"]  # the demo's launch.n_ctx
    assert found["continues the prefix"].startswith("ok '1, 2, 3, 4, 5, 6, 7, 8, 9, 1' -> '0")


def test_chat_continue_on_llama_cpp_is_caught_by_doctor_and_refused_by_run(tmp_path):
    """llama.cpp's chat API ignores continue_final_message and answers in a new turn: doctor says
    so and `genssd run` refuses to start in that mode."""
    need_llama_cpp()
    from doctor_table import rows

    chat = ["--set", "teacher.mode=chat-continue", "--set", "prompts.teacher=teacher_user"]
    result = genssd("doctor", *chat)
    assert result.returncode == 1
    found = rows(result.stdout)
    assert found["completion"].startswith("ok /v1/chat/completions answers")
    assert found["continues the prefix"].startswith("no '1, 2, 3, 4, 5, 6, 7, 8, 9, 1' -> ")
    assert "try teacher.prefill: prefix" in found["continues the prefix"]
    assert result.stderr.strip() == "error: the teacher endpoint cannot serve a run: continues the prefix failed"

    run = genssd("run", *chat, "--limit", "1", "--out", str(tmp_path / "run"))
    assert run.returncode == 1
    [line] = run.stderr.strip().splitlines()
    assert "does not continue a partial trace in chat-continue mode" in line
    assert not (tmp_path / "run" / "events.jsonl").exists()


def run_until_a_response(run: Path, *args: str, responses: int = 1) -> subprocess.Popen:
    """`genssd run` on the demo, returned once its log holds `responses` teacher responses (mid-run)."""
    process = subprocess.Popen([sys.executable, "-m", "genssd_cli", "run", *args, "--out", str(run)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if sum(1 for e in read_events(run) if e.type == "response") >= responses:
            break
        time.sleep(0.05)
    return process


def test_ctrl_c_stops_the_server_and_says_how_to_resume(tmp_path):
    need_llama_cpp()
    run = tmp_path / "run"
    process = run_until_a_response(run, "--limit", "4")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "resume with: genssd run --limit 4 --out" in stderr
    assert "Traceback" not in stderr
    server = read_events(run)[0].teacher_server
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher"]["requests"] >= 1


def test_kill_9_leaves_no_server_behind_and_the_run_resumes(tmp_path):
    need_llama_cpp()
    run = tmp_path / "run"
    process = run_until_a_response(run, "--limit", "3")
    process.send_signal(signal.SIGKILL)
    process.communicate()
    server = read_events(run)[0].teacher_server
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{server.pid}"):
        state = open(f"/proc/{server.pid}/stat").read().rsplit(")", 1)[1].split()[0]  # noqa: SIM115
        if state == "Z":  # dead, waiting for its reaper
            break
        time.sleep(0.1)
    else:
        assert not os.path.exists(f"/proc/{server.pid}"), "the launched server outlived genssd"
    resumed = genssd("run", "--limit", "3", "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert "earlier session left running" not in resumed.stdout  # nothing was left to stop


def received(run: Path) -> list[tuple]:
    """Every response of the run's log: which candidates of which step, asked with which seed,
    and what came back (not `n`: a resumed session relearns that llama.cpp answers one choice)."""
    return sorted(
        (e.problem_id, e.sample, e.step, e.attempt, e.start, e.seed, tuple(c.text for c in e.candidates))
        for e in read_events(run)
        if e.type == "response"
    )


def test_kill_9_mid_step_and_resume_writes_what_an_uninterrupted_run_writes(tmp_path):
    """SIGKILL with a step half received, resume: llama.cpp answers a request by its seed alone
    (whatever it served before, in a fresh server process), so the run ends byte-identical."""
    need_llama_cpp()
    demo = ("--limit", "2")
    reference = genssd("run", *demo, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "run"
    # Both problems' first steps ask 4 candidates, one request each: after 6 responses at
    # least one step is half received.
    process = run_until_a_response(run, *demo, responses=6)
    assert process.poll() is None, "the run ended before the kill"
    process.send_signal(signal.SIGKILL)
    process.communicate()
    events = read_events(run)
    assert steps_cut_half_way(events, 0, n=4), "the kill cut no step half-way"
    before = received(run)
    resumed = genssd("run", *demo, "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr

    trajectories = (run / TRAJECTORIES).read_bytes()
    assert trajectories == (tmp_path / "reference" / TRAJECTORIES).read_bytes()
    assert trajectories.count(b"\n") >= 1
    # The same responses as the uninterrupted run, each once: nothing received before the kill
    # was asked again, nothing was lost.
    after = received(run)
    assert after == received(tmp_path / "reference")
    assert len(set(after)) == len(after)
    print(f"responses before the kill={len(before)} after the resume={len(after)}")
