"""`genssd bench affinity`: the teacher pool's routing (`teacher.routing`) measured on real
servers' prefix caches. The same `genssd run` (the real student, a pool of vLLM servers with
prefix caching on) runs once per routing, `affinity` then `least-loaded`; before each run every
server's prefix cache is reset (vLLM's /reset_prefix_cache), and its Prometheus counters
`vllm:prefix_cache_queries_total` and `vllm:prefix_cache_hits_total` are read before and after:
hit rate = Δhits / Δqueries, per server and overall, and the prompt tokens computed anew
(Δqueries - Δhits). The run's events.jsonl tells how often a trajectory's next step went to
another server (a hop).

Without --endpoint it starts the servers itself: vLLM's OpenAI-compatible server from a Python
with vLLM (--vllm-python; default $GENSSD_VLLM_PYTHON, else .venv-vllm/bin/python), serving the
teacher model (default: the demo student's converted folder), VLLM_SERVER_DEV_MODE=1 for the
reset; on CPU settings by default (float32, eager, 2,048-token context), --vllm-arg adds others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import httpx
import yaml

from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.procs import die_with_parent
from genssd_cli.rundir.layout import SUMMARY
from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import Response
from genssd_cli.teacher.servers.local import NotServing, free_port, local_base_url, wait_until_serving

ROUTINGS = ("affinity", "least-loaded")
QUERIES, HITS = "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"
# The CPU build's settings; its prefix cache works in blocks of --block-size tokens (default 128
# there): 32, the smallest it allows, is closer to a GPU server's 16.
CPU_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--seed", "0", "--block-size", "32"]
STOP_S = 30.0
TAIL_LINES = 10


@dataclass(frozen=True)
class AffinityBench:
    """`genssd bench affinity`'s flags: the pool of servers, and the run each routing gets."""

    endpoints: list[str]  # running vLLM servers' base URLs; none: start `servers`
    servers: int
    teacher: str  # the model they serve: shipped name, HF id or folder
    student: str
    problems: int
    samples: int  # trajectories per problem
    n: int
    chunk: int
    steps: int  # steps per trajectory
    concurrency: int  # requests in flight per server
    vllm_python: str | None = None  # a Python with vLLM
    vllm_args: list[str] = field(default_factory=list)  # extra server arguments
    startup_timeout_s: float = 900.0


def bench_affinity(bench: AffinityBench) -> list[dict]:
    endpoints = bench.endpoints
    if endpoints and len(endpoints) < 2:
        raise UsageError("--endpoint: give at least two servers of one model (a pool), or none to start them")
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="genssd-bench-")))
        if endpoints:
            urls, model = endpoints, _served_model(endpoints[0])
        else:
            python = _vllm_python(bench.vllm_python)
            urls = stack.enter_context(vllm_servers(bench.servers, python, bench.teacher, bench.vllm_args,
                                                    bench.startup_timeout_s, tmp))  # fmt: skip
            model = bench.teacher
        lines = []
        for routing in ROUTINGS:
            for url in urls:
                _reset_prefix_cache(url)
            before = [_prefix_counters(url) for url in urls]
            print(f"genssd run with teacher.routing {routing}", file=sys.stderr, flush=True)
            config = _config(urls, model, routing, bench)
            summary, hops = _run(config, tmp / routing)
            after = [_prefix_counters(url) for url in urls]
            per_server = {}
            for i, (url, (q0, h0), (q1, h1)) in enumerate(zip(urls, before, after, strict=True)):
                per_server[f"s{i}"] = {"url": url, "requests": summary["teacher"]["endpoints"][f"s{i}"]["requests"],
                                       **_rate(q1 - q0, h1 - h0)}  # fmt: skip
            queries = sum(s["queries"] for s in per_server.values())
            hits = sum(s["hits"] for s in per_server.values())
            lines.append({
                "bench": "affinity", "routing": routing, "model": model, "student": bench.student,
                "problems": bench.problems, "samples": bench.samples, "n": bench.n, "chunk": bench.chunk,
                "max_steps": bench.steps, "concurrency": bench.concurrency,
                "requests": summary["teacher"]["requests"], "wall_s": summary["wall_s"], **hops,
                **_rate(queries, hits), "servers": per_server,
            })  # fmt: skip
    ours, theirs = lines
    ratio = {key: round(ours[key] / theirs[key], 3) if ours[key] is not None and theirs[key] else None
             for key in ("hit_rate", "prefilled")}  # fmt: skip
    lines.append({"bench": "affinity", "ratio": "affinity / least-loaded", **ratio})
    return lines


def _rate(queries: float, hits: float) -> dict:
    """Prompt tokens looked up in the prefix cache, found there, and computed (prefilled) anew."""
    return {"queries": int(queries), "hits": int(hits), "hit_rate": round(hits / queries, 4) if queries else None,
            "prefilled": int(queries - hits)}  # fmt: skip


def _config(urls: list[str], model: str, routing: str, bench: AffinityBench) -> dict:
    """A run whose every trajectory grows for `bench.steps` steps (no stop string ends one early, only
    the model's end of text), all problems in flight at once."""
    student, problems, samples, n, chunk = bench.student, bench.problems, bench.samples, bench.n, bench.chunk
    steps, concurrency = bench.steps, bench.concurrency
    return {
        "teacher": {"model": model, "endpoints": [{"base_url": u, "name": f"s{i}"} for i, u in enumerate(urls)],
                    "routing": routing, "max_concurrency": concurrency, "stop": [], "timeout_s": 600},
        "student": {"model": student},
        "search": {"n": n, "chunk_tokens": chunk, "max_steps": steps, "max_new_tokens": chunk * steps,
                   "prune_ppl": None, "samples": samples},
        "data": {"source": "arith", "count": problems, "seed": 0},
        "engine": {"max_active_problems": problems, "progress_interval_s": 3600},
    }  # fmt: skip


def _run(config: dict, where: Path) -> tuple[dict, dict]:
    """`genssd run` on `config`: its summary, and how its trajectories moved between servers."""
    where.mkdir(parents=True)
    path, out = where / "bench.yaml", where / "run"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "genssd_cli", "run", str(path), "--out", str(out)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-TAIL_LINES:])
        raise RuntimeFailure(f"the bench's run (genssd run) exited with code {done.returncode}:\n{tail}")
    answered: dict[tuple, list[tuple]] = {}
    for event in read_events(out):
        if isinstance(event, Response):
            answered.setdefault((event.problem_id, event.sample), []).append(
                (event.step, event.attempt, event.start, event.endpoint)
            )
    paths = [[endpoint for *_, endpoint in sorted(steps)] for steps in answered.values()]
    hops = sum(a != b for path in paths for a, b in pairwise(path))
    steps = sum(len(path) - 1 for path in paths)
    moves = {"trajectories": len(paths), "on_one_server": sum(len(set(path)) == 1 for path in paths),
             "hops": hops, "hop_rate": round(hops / steps, 4) if steps else None}  # fmt: skip
    return json.loads((out / SUMMARY).read_text(encoding="utf-8")), moves


def _root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def _prefix_counters(url: str) -> tuple[float, float]:
    """The server's prefix-cache queries and hits so far (summed over its engines)."""
    try:
        text = httpx.get(f"{_root(url)}/metrics", timeout=10).raise_for_status().text
    except httpx.HTTPError as exc:
        raise RuntimeFailure(f"{_root(url)}/metrics did not answer ({exc}): the bench needs vLLM servers") from None
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else line.partition(" ")
        if name in (QUERIES, HITS):
            found[name] = found.get(name, 0.0) + float(rest.rsplit("}", 1)[-1].split()[0])
    if QUERIES not in found or HITS not in found:
        raise RuntimeFailure(f"{_root(url)}/metrics has no {QUERIES}: start the server with --enable-prefix-caching")
    return found[QUERIES], found[HITS]


def _reset_prefix_cache(url: str) -> None:
    """Both runs start cold: the second run asks what the first asked (the same seeds)."""
    for _ in range(20):
        try:
            answer = httpx.post(f"{_root(url)}/reset_prefix_cache", timeout=30)
        except httpx.HTTPError as exc:
            raise RuntimeFailure(f"{_root(url)}/reset_prefix_cache did not answer ({exc})") from None
        if answer.status_code == 404:
            raise RuntimeFailure(f"{_root(url)} cannot reset its prefix cache (404): start it with "
                                 "VLLM_SERVER_DEV_MODE=1, so both routings start from a cold cache")  # fmt: skip
        answer.raise_for_status()
        if not answer.content or answer.json().get("success", True):
            return
        time.sleep(0.5)  # blocks still held by a request finishing
    raise RuntimeFailure(f"{_root(url)} did not reset its prefix cache (requests still running?)")


def _served_model(url: str) -> str:
    try:
        return httpx.get(f"{url.rstrip('/')}/models", timeout=10).raise_for_status().json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        raise RuntimeFailure(f"{url}/models did not list a model: is it an OpenAI-compatible server?") from None


def _vllm_python(given: str | None) -> Path:
    path = Path(given or os.environ.get("GENSSD_VLLM_PYTHON") or ".venv-vllm/bin/python")
    if not path.exists():
        raise UsageError(f"no Python with vLLM at {path}: pass --vllm-python (make setup-vllm makes .venv-vllm), "
                         "or --endpoint URL for servers already running")  # fmt: skip
    return path


def _model_dir(teacher: str) -> str:
    """A shipped model's converted folder (vLLM reads no GGUF of ours); else as given (folder or id)."""
    from genssd_cli.models import SHIPPED, student_model_dir

    return str(student_model_dir(teacher)) if teacher in SHIPPED else teacher


@contextmanager
def vllm_servers(count: int, python: Path, teacher: str, extra: list[str], timeout_s: float,
                 logs: Path) -> Iterator[list[str]]:  # fmt: skip
    """`count` vLLM servers of `teacher` with prefix caching, started together; their base URLs.
    Each is a process group of its own (API server, engine core), stopped as one."""
    model_dir = _model_dir(teacher)
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB, on the CPU build
    started: list[tuple[subprocess.Popen, str, Path]] = []
    print(f"starting {count} vLLM servers of {teacher} (about a minute each on a CPU)", file=sys.stderr, flush=True)
    try:
        for i in range(count):
            port, log = free_port(), logs / f"vllm-{i}.log"
            command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                       "--served-model-name", teacher, *CPU_ARGS, "--enable-prefix-caching", *extra,
                       "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
            with open(log, "wb") as out:
                process = subprocess.Popen(die_with_parent(command), stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env, start_new_session=True)  # fmt: skip
            started.append((process, local_base_url(port), log))
        for process, url, log in started:
            try:
                wait_until_serving(f"{url}/models", process, timeout_s, "vLLM server")
            except NotServing as exc:
                tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-TAIL_LINES:])
                raise RuntimeFailure(f"{exc}; its log ends:\n{tail}") from None
        yield [url for _, url, _ in started]
    finally:
        for process, _, _ in started:
            _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it leads it), then SIGKILL to whatever of it is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_S)
        time.sleep(1.0)  # its engine core exits after it
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
