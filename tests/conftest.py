"""What the tests of every folder share (importable as `conftest`: pyproject puts tests/ on the path):
the `fake_teacher` fixture (real test-teacher server processes on 127.0.0.1), `genssd(...)` (the
real CLI as a subprocess), small run configs, and hand-made trajectories and adapters for train and
eval. No subfolder has a conftest.py of its own: it would shadow this one for `from conftest import`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import TeacherReply
from genssd_cli.teacher.endpoint import Prompt, Request
from genssd_cli.teacher.pool import TeacherClient
from genssd_cli.teacher.servers.local import free_port, local_base_url, start_fake_teacher

ROOT = Path(__file__).resolve().parent.parent


class FakeTeacher:
    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.log = tmp / f"requests-{self.port}.jsonl"
        self.base_url = local_base_url(self.port)
        self.process = start_fake_teacher(self.port, "--log", str(self.log), *args)

    def requests(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def fake_teacher(tmp_path):
    servers: list[FakeTeacher] = []

    def start(*args: str) -> FakeTeacher:
        server = FakeTeacher(tmp_path, *args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def run_config(base_url: str, **sections) -> dict:
    """A small run config against a test teacher and the real demo student."""
    config = {
        "method": "genssd",
        "teacher": {"model": "fake-teacher", "base_url": base_url, "stop": ["\nQuestion:"],
                    "max_concurrency": 4, "retries": 3, "timeout_s": 10},
        "student": {"model": "smollm2-135m-instruct"},
        "search": {"n": 3, "chunk_tokens": 8, "max_steps": 4, "max_new_tokens": 64,
                   "prune_ppl": None, "retries": 1, "samples": 1},
        "data": {"source": "arith", "count": 4, "seed": 0},
        "engine": {"max_active_problems": 4, "progress_interval_s": 60},
    }  # fmt: skip
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def genssd(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None,
           **popen) -> subprocess.CompletedProcess:  # fmt: skip
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "genssd_cli", *args],
        capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout, env=env, **popen,
    )  # fmt: skip


async def collect(teacher: TeacherClient, prompt, n, max_tokens, seed, have=None):
    """The step's candidates in index order, and the responses as they were reported."""
    have = dict(have or {})
    parts: list[TeacherReply] = []
    prompt = Prompt(prompt) if isinstance(prompt, str) else prompt

    def on_response(part: TeacherReply) -> None:
        parts.append(part)
        for offset, candidate in enumerate(part.candidates):
            have[part.start + offset] = candidate

    await teacher.sample(Request(prompt, n, max_tokens, seed), have, on_response)
    return [have[i] for i in sorted(have)], parts


def save_adapter_of_another_model(path: Path) -> None:
    """A LoRA adapter for a tiny Llama of another shape: loading it onto the student must fail."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = get_peft_model(
        LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, vocab_size=49152)),
        LoraConfig(r=4, target_modules="all-linear"),
    )  # fmt: skip
    other.save_pretrained(path)


QUESTIONS = [("q1", "What is 2 + 3?", "5"), ("q2", "What is 10 - 4?", "6"), ("q3", "What is 3 * 3?", "9"),
             ("q4", "What is 8 / 2?", "4")]  # fmt: skip
STUDENT = "smollm2-135m-instruct"


def bench_file(path: Path) -> Path:
    """QUESTIONS as a benchmark JSONL file."""
    path.write_text("".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in QUESTIONS))
    return path


def trajectory_row(problem_id: str, question: str, completion: str, correct: bool) -> dict:
    """A whole trajectories.jsonl row (records.TrajectoryRow), as `genssd run` writes it."""
    from genssd_cli.answers import extract_answer
    from genssd_cli.rundir.records import TrajectoryRow

    return TrajectoryRow(
        problem_id=problem_id, sample=0, method="genssd",
        prompt=[{"role": "user", "content": question}], completion=[{"role": "assistant", "content": completion}],
        reference="?", answer=extract_answer(completion, explicit=True), correct=correct, finish="stop",
        steps=1, student_ppl=None, teacher_tokens=0, completion_tokens=0,
    ).model_dump(mode="json")  # fmt: skip


def train_adapter_on_questions(tmp: Path) -> Path:
    """`genssd train` on QUESTIONS answered right: an adapter that changes what the student writes."""
    from genssd_cli.rundir.layout import CONFIG, TRAJECTORIES

    run = tmp / "run"
    run.mkdir()
    trajectories = [trajectory_row(i, f"Question: {q}", f"The answer is {a}.", True) for i, q, a in QUESTIONS]
    (run / TRAJECTORIES).write_text("".join(json.dumps(t) + "\n" for t in trajectories))
    (run / CONFIG).write_text(f"teacher: {{model: t, base_url: 'http://127.0.0.1:9/v1'}}\nstudent: {{model: {STUDENT}}}"
                              "\ndata: {source: arith}\n")  # fmt: skip
    trained = genssd("train", str(run), "--out", str(tmp / "train"), "--set", "training.epochs=4",
                     "--set", "training.learning_rate=0.003", "--set", "training.batch_size=2")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    return tmp / "train" / "adapter"


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_run_is_consistent(run: Path, problems: int, n: int) -> dict:
    events = read_events(run)
    summary = json.loads((run / "summary.json").read_text())
    t = summary["trajectories"]
    assert t["finished"] + t["truncated"] + t["pruned"] + t["failed"] == problems
    assert t["pending"] == 0
    received: dict[tuple, list[int]] = {}
    for event in events:
        if event.type == "response":
            key = (event.problem_id, event.sample, event.step, event.attempt)
            received.setdefault(key, []).extend(range(event.start, event.start + len(event.candidates)))
        if event.type == "choice":
            ppl = [math.inf if p is None else p for p in event.ppl]
            assert event.chosen == ppl.index(min(ppl))
    # Every scored step got its n candidates, each received exactly once: nothing asked for twice.
    # Only the step a trajectory failed at (listed in failures.jsonl, never scored) may lack some.
    failed = {(f["problem_id"], f["sample"], f["step"]) for f in load_jsonl(run / "failures.jsonl")}
    chosen = {(e.problem_id, e.sample, e.step, e.attempt) for e in events if e.type == "choice"}
    for key, indices in received.items():
        if key[:3] in failed and key not in chosen:
            assert len(set(indices)) == len(indices) and set(indices) < set(range(n)), key
        else:
            assert sorted(indices) == list(range(n)), key
    rows = load_jsonl(run / "trajectories.jsonl")
    assert len(rows) == t["finished"] + t["truncated"]
    for row in rows:
        assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
        assert row["method"] == "genssd" and row["steps"] >= 1
        assert row["teacher_tokens"] >= row["completion_tokens"] > 0
    assert yaml_has_no_secret(run / "config.yaml")
    return summary


def yaml_has_no_secret(path: Path) -> bool:
    return "sk-" not in path.read_text()
