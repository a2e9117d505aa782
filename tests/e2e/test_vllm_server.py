"""genssd against real vLLM: `python -m vllm.entrypoints.openai.api_server` (its CPU build, in the
venv `make setup-vllm` makes) serving the demo student's converted folder as the teacher, started
once for the module. `genssd doctor` and `genssd run` in both teacher modes (raw completions, and a
partial assistant message continued through the chat API): one request per step, exact token
counts (checked against the server's own tokens and the model's tokenizer), and a second fresh
run byte-identical to the first. Slow; run in .ci/run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import QUESTIONS, ROOT, STUDENT, genssd, write_config
from doctor_table import rows
from test_eval_vllm import vllm_python

from genssd_cli.config import DataConfig, RunConfig, load_run_config
from genssd_cli.problems import Problem, load_problems, render_prompt, teacher_template
from genssd_cli.rundir.layout import TRAJECTORIES
from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import Choice, Response
from genssd_cli.teacher.endpoint import Prompt, chat_messages
from genssd_cli.teacher.servers.local import NotServing, free_port, local_base_url, wait_until_serving

pytestmark = pytest.mark.slow

MODES = ("completions", "chat-continue")
STARTUP_S = 600  # about a minute on 2 CPU cores; the first start of a machine compiles more
STOP_S = 30
N = 3


@dataclass(frozen=True)
class VllmServer:
    base_url: str
    model_dir: Path  # what it serves: its tokenizer is the teacher's
    log: Path


def group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            alive.append(int(stat.parent.name))
    return alive


def stop_group(process: subprocess.Popen) -> None:
    """The server is a process group of its own (API server, engine core, its worker, the resource
    tracker): SIGTERM to all of it, SIGKILL to whatever is left after STOP_S, and make sure none
    is left."""
    pgid = process.pid  # start_new_session: the leader's pid is the group's id
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + STOP_S
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not group_alive(pgid):
            break
    process.wait(timeout=STOP_S)
    assert not group_alive(pgid), f"vLLM server processes left behind: {group_alive(pgid)}"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    from genssd_cli.models import student_model_dir

    python = vllm_python()  # skipped without vLLM's venv, a failure in CI
    model_dir = student_model_dir(STUDENT)  # converted once, by this venv's genssd
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", STUDENT, "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
               "--seed", "0", "--enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"},
                                   start_new_session=True)  # its own process group, stopped as one; fmt: skip
    try:
        try:
            wait_until_serving(f"{local_base_url(port)}/models", process, STARTUP_S, "vLLM server")
        except NotServing as exc:
            pytest.fail(f"{exc}; its log ends:\n{log.read_text(errors='replace')[-3000:]}")
        yield VllmServer(local_base_url(port), model_dir, log)
    finally:
        stop_group(process)


@pytest.fixture(scope="module")
def tokenizer(vllm_server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vllm_server.model_dir)


def problems() -> list[Problem]:
    """Two short questions, whose candidates often end (on the end-of-turn token) within 48 tokens,
    and an arithmetic word problem, whose candidates run on (here one writes "\n\n" as one token)."""
    short = [Problem(i, q, a) for i, q, a in QUESTIONS[:2]]
    return [*short, load_problems(DataConfig(source="arith", count=3, seed=0))[2]]


def config(server: VllmServer, mode: str, where: Path) -> Path:
    """The shipped vLLM config of the mode (configs/vllm.yaml, configs/vllm-chat.yaml), made small
    and pointed at the test server: the served demo student as the teacher and as the student."""
    shipped = ROOT / "configs" / ("vllm.yaml" if mode == "completions" else "vllm-chat.yaml")
    cfg = yaml.safe_load(shipped.read_text())
    assert cfg["teacher"].get("mode", "completions") == mode
    cfg["teacher"].update(model=STUDENT, base_url=server.base_url, max_concurrency=4)
    if mode == "chat-continue":
        cfg["teacher"]["assistant_prefix"] = ""  # QwQ opens its turn with <think>; SmolLM2 does not
    questions = where / "questions.jsonl"
    questions.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.reference}) + "\n"
                                 for p in problems()))  # fmt: skip
    cfg.update(
        student={"model": STUDENT},
        search={"n": N, "chunk_tokens": 16, "max_steps": 3, "max_new_tokens": 48, "prune_ppl": None, "retries": 1},
        data={"source": str(questions)},
        engine={"max_active_problems": 3, "progress_interval_s": 60},
    )  # fmt: skip
    return write_config(where / f"{mode}.yaml", cfg)


def run(server: VllmServer, mode: str, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    out = where / "run"
    result = genssd("run", str(config(server, mode, where)), "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def first_run(vllm_server, tmp_path_factory):
    """One run per mode for the module (a run takes about a minute here)."""
    made: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in made:
            made[mode] = run(vllm_server, mode, tmp_path_factory.mktemp(mode.replace("-", "_")))
        return made[mode]

    return get


@pytest.mark.parametrize("mode", MODES)
def test_doctor_finds_n_seeds_and_continuation_honoured(vllm_server, tmp_path, mode):
    result = genssd("doctor", str(config(vllm_server, mode, tmp_path)), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    found = rows(result.stdout)
    for check in ("reachable", "model listed", "completion", "n > 1 honoured", "seed honoured", "continues the prefix",
                  "stop strings honoured", "context length"):  # fmt: skip
        assert found[check].startswith("ok"), (check, found[check])
    assert found["n > 1 honoured"].strip() == "ok asked 3 choices, got 3 one request per step"
    assert found["continues the prefix"].startswith("ok '1, 2, 3, 4, 5, 6, 7, 8, 9, 1' -> '0")
    assert "2048 tokens" in found["context length"]  # --max-model-len, as /v1/models lists it
    api = "/v1/completions" if mode == "completions" else "/v1/chat/completions"
    assert found["completion"].startswith(f"ok {api} answers")


def replay(server: VllmServer, cfg: RunConfig, prompt: Prompt, r: Response, max_tokens: int) -> list[tuple[str, list]]:
    """The response's request sent again as genssd sends it (same prompt, n, seed, sampling), with
    the chosen tokens returned as ids: each choice's text and the token ids the server generated."""
    t = cfg.teacher
    body = {"model": t.model, "n": r.n, "seed": r.seed, "max_tokens": max_tokens, "temperature": t.temperature,
            "top_p": t.top_p, "stop": t.stop or None, "return_tokens_as_token_ids": True}  # fmt: skip
    if t.mode == "completions":
        body.update(prompt=prompt.head + prompt.trace, logprobs=0)
        answer = httpx.post(f"{server.base_url}/completions", json=body, timeout=120).raise_for_status().json()
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        return [(c["text"], [int(s.split(":")[1]) for s in c["logprobs"]["tokens"]]) for c in choices]
    body.update(messages=chat_messages(t, prompt), logprobs=True, continue_final_message=True,
                add_generation_prompt=False)  # fmt: skip
    answer = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120).raise_for_status().json()
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    return [(c["message"]["content"], [int(lp["token"].split(":")[1]) for lp in c["logprobs"]["content"]])
            for c in choices]  # fmt: skip


def key(e: Response | Choice) -> tuple:
    return e.problem_id, e.sample, e.step, e.attempt


def words(tokenizer, ids: list[int]) -> list[str]:
    """The tokens that are not whitespace alone, stripped of leading whitespace."""
    pieces = [tokenizer.decode([i]) for i in ids]
    return [p.lstrip() for p in pieces if p.strip()]


@pytest.mark.parametrize("mode", MODES)
def test_run_asks_once_per_step_and_counts_tokens_exactly(vllm_server, tokenizer, first_run, mode):
    out = first_run(mode)
    cfg = load_run_config(out / "config.yaml", [])
    events = read_events(out)
    responses = [e for e in events if isinstance(e, Response)]
    choices = [e for e in events if isinstance(e, Choice)]
    assert not [e for e in events if e.type in ("error", "prune")]

    # One request per step: n honoured, so no top-ups (a top-up is a response with start > 0).
    assert len(responses) == len(choices) > 0
    assert sorted(map(key, responses)) == sorted(map(key, choices))
    for r in responses:
        assert (r.n, r.start, len(r.candidates)) == (N, 0, N)
        # Exact token counts: each choice's own tokens (logprobs) add up to the server's bill.
        assert r.token_source == "logprobs"
        assert sum(c.tokens for c in r.candidates) == r.completion_tokens
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["requests"] == len(responses)
    assert summary["teacher"]["completion_tokens"] == sum(r.completion_tokens for r in responses)

    # The counts checked independently: every request sent again (the seed makes it answer the
    # same) with the tokens as ids, and the teacher's tokenizer on prompts and candidates.
    heads = {p.id: render_prompt(teacher_template(cfg.prompts, cfg.teacher), p.question)
             for p in load_problems(cfg.data)}  # fmt: skip
    chosen = {key(c): c.chosen for c in choices}
    by_step = {key(r): r for r in responses}
    eos, encoded, regrouped = tokenizer.eos_token_id, 0, 0
    for r in responses:
        kept = [by_step[(r.problem_id, r.sample, s, 0)].candidates[chosen[(r.problem_id, r.sample, s, 0)]]
                for s in range(r.step)]  # fmt: skip
        prompt = Prompt(heads[r.problem_id], "".join(c.text for c in kept))
        if mode == "completions":
            prompt_ids = tokenizer(prompt.head + prompt.trace)["input_ids"]
        else:  # the chat template applied as vLLM applies it: the last assistant message left open
            prompt_ids = tokenizer.apply_chat_template(chat_messages(cfg.teacher, prompt), continue_final_message=True,
                                                       tokenize=True, return_dict=True)["input_ids"]  # fmt: skip
        assert len(prompt_ids) == r.prompt_tokens, r
        max_tokens = min(cfg.search.chunk_tokens, cfg.search.max_new_tokens - sum(c.tokens for c in kept))
        again = replay(vllm_server, cfg, prompt, r, max_tokens)
        assert [text for text, _ in again] == [c.text for c in r.candidates], "the seed was not honoured"
        for c, (_, ids) in zip(r.candidates, again, strict=True):
            # The recorded count is the number of tokens the server generated, an end-of-turn
            # token (<|im_end|>, SmolLM2's EOS) included: the server counts it, and only a choice
            # that ended on it has one (finish "stop": the only stop string here, completions mode's
            # "<|im_end|>", is that token itself).
            assert c.tokens == len(ids)
            ended = ids[-1] == eos
            assert ended == (c.finish_reason == "stop") and eos not in ids[:-1]
            body = ids[:-1] if ended else ids
            assert tokenizer.decode(body) == c.text  # the model's tokenizer reads them as the recorded text
            # The tokenizer on the text alone agrees on the count except where the model wrote a
            # whitespace run as one token that the tokenizer cuts otherwise (":\n\n1" generated as
            # ":", "\n\n", "1"; the tokenizer's pre-tokenizer gives ":", "\n", "\n", "1"): the same
            # tokens, whitespace-only ones aside, in the same order.
            ids_of_text = tokenizer(c.text, add_special_tokens=False)["input_ids"]
            assert words(tokenizer, ids_of_text) == words(tokenizer, body), (c.text, body, ids_of_text)
            encoded += len(ids_of_text) + ended
            regrouped += len(ids_of_text) != len(body)
    billed = sum(r.completion_tokens for r in responses)
    stops = sum(c.finish_reason == "stop" for r in responses for c in r.candidates)
    candidates = sum(len(r.candidates) for r in responses)
    print(f"\n{mode}: {len(responses)} requests for {len(choices)} steps "
          f"({len(responses) / len(choices):g} per step, n {N}); candidates' tokens "
          f"{sum(c.tokens for r in responses for c in r.candidates)} = usage {billed} = the server's tokens sent "
          f"again; the tokenizer on the texts, +1 per end-of-turn token ({stops} of {candidates} candidates "
          f"ended): {encoded} ({encoded - billed:+d}: {regrouped} candidates with a whitespace run generated as "
          f"one token); prompt tokens {sum(r.prompt_tokens for r in responses)} = the tokenizer's")  # fmt: skip
    assert stops > 0  # the end-of-turn token's count was checked too


@pytest.mark.parametrize("mode", MODES)
def test_a_second_fresh_run_writes_the_same_bytes(vllm_server, first_run, tmp_path, mode):
    first = first_run(mode)
    second = run(vllm_server, mode, tmp_path)
    assert (second / TRAJECTORIES).read_bytes() == (first / TRAJECTORIES).read_bytes()
    print(f"\n{mode}: a second fresh run wrote the same {TRAJECTORIES} "
          f"({len((first / TRAJECTORIES).read_bytes())} bytes)")  # fmt: skip
