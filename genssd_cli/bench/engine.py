"""`genssd bench engine`: the whole engine (`genssd run` with real student scoring) against the
bundled deterministic teacher server with a fixed latency per token: is the allowed teacher
concurrency kept busy, and what does the engine's own loop cost per candidate? The run is the
real command in its own process; its summary.json holds the figures."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from genssd_cli.errors import RuntimeFailure
from genssd_cli.rundir.layout import SUMMARY
from genssd_cli.teacher.servers.local import free_port, local_base_url, start_fake_teacher

STDERR_TAIL_LINES = 10


@dataclass(frozen=True)
class EngineBench:
    """`genssd bench engine`'s flags."""

    model: str  # the student: shipped name, HF id or folder
    problems: int
    n: int
    chunk: int
    steps: int  # max steps per trajectory
    concurrency: int  # teacher requests allowed in flight
    latency_per_token: float  # teacher seconds per token


def bench_engine(bench: EngineBench) -> list[dict]:
    model, problems, n, chunk, steps = bench.model, bench.problems, bench.n, bench.chunk, bench.steps
    concurrency, latency_per_token = bench.concurrency, bench.latency_per_token
    port = free_port()
    server = start_fake_teacher(port, "--ignore-n", "--latency-per-token", str(latency_per_token))
    try:
        with tempfile.TemporaryDirectory(prefix="genssd-bench-") as tmp:
            config = {
                "teacher": {"model": "fake-teacher", "base_url": local_base_url(port), "stop": ["\nQuestion:"],
                            "max_concurrency": concurrency},
                "student": {"model": model},
                "search": {"n": n, "chunk_tokens": chunk, "max_steps": steps, "max_new_tokens": chunk * steps},
                "data": {"source": "arith", "count": problems, "seed": 0},
                "engine": {"max_active_problems": problems, "progress_interval_s": 3600},
            }  # fmt: skip
            summary = _run(config, Path(tmp))
    finally:
        server.kill()
        server.wait()
    return [{
        "bench": "engine", "model": model, "problems": problems, "n": n, "chunk": chunk, "max_steps": steps,
        "teacher_concurrency": concurrency, "latency_per_token_s": latency_per_token,
        "requests": summary["teacher"]["requests"], "candidates": summary["teacher"]["candidates"],
        "wall_s": summary["wall_s"], **summary["engine"],
    }]  # fmt: skip


def _run(config: dict, tmp: Path) -> dict:
    """`genssd run` on `config`; its summary. Its output is kept from ours: ours is JSON lines."""
    path, out = tmp / "bench.yaml", tmp / "run"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "genssd_cli", "run", str(path), "--out", str(out)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-STDERR_TAIL_LINES:])
        raise RuntimeFailure(f"the engine's run (genssd run) exited with code {done.returncode}:\n{tail}")
    return json.loads((out / SUMMARY).read_text(encoding="utf-8"))
