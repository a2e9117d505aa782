"""`genssd bench resume`: what `genssd run` does with a paper-scale run log, timed and with its
peak resident memory. A synthetic run directory is written with the real record classes: per
problem and sample, one `response` per step holding `n` candidate chunks of `chunk_tokens`
tokens of text, a `choice`, then a `finish` with its row; some re-sampled steps, prunes, errors
(some retried and finished in the next session), responses from the cache, two sessions, and a
small share of trajectories left open (a response received but never scored among them), so a
resume has replay work.

Then a child process does what `genssd run` does with that log before it contacts the teacher
(read it, refuse other settings, every trajectory ended?, the cost so far, read it again under
the lock, the replay) and at the end (genssd_cli/run/materialise.py: trajectories.jsonl,
failures.jsonl, summary.json), and reports its time and peak RSS. The child imports genssd from a checkout named
by PYTHONPATH: this one, and with `--baseline DIR` another (`git worktree add DIR c083b59`: the
code before the log was streamed), run on the same log; it takes the streaming path when the
checkout has one (results.RunLog), else the list path of the code before. One JSON line each,
with the materialised files' sha256 (the same files from both codes, or the line says not).
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

import genssd_cli
from genssd_cli.config import load_run_config
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.problems import load_prompt, teacher_template
from genssd_cli.rundir.layout import EVENTS
from genssd_cli.rundir.records import (
    Candidate,
    Choice,
    EndpointUse,
    Event,
    Finish,
    Message,
    Prune,
    Response,
    RunStart,
    SessionEnd,
    TrajectoryError,
    TrajectoryRow,
)
from genssd_cli.rundir.results_hash import results_settings, settings_hash

RUN = "run"  # the run directory, under --out
CHARS_PER_TOKEN = 4.4  # English reasoning text, as a BPE tokenizer splits it
ACTIVE = 32  # trajectories in flight at once: their records interleave, as the engine writes them
STDERR_TAIL_LINES = 10


@dataclass(frozen=True)
class Shape:
    problems: int
    samples: int = 1
    steps: int = 4
    n: int = 4
    chunk_tokens: int = 256
    resample_share: float = 0.05  # steps re-sampled once (the best candidate was too hard)
    prune_share: float = 0.05
    error_share: float = 0.02  # half of them retried and finished in the next session
    open_share: float = 0.01  # never ended: what a resume replays
    cached_share: float = 0.03  # responses answered from teacher.cache
    seed: int = 0


# ---- the synthetic run --------------------------------------------------------------------


def write_run(out: Path, shape: Shape) -> dict:
    """OUT/problems.jsonl, OUT/config.yaml and OUT/run/events.jsonl; what was written."""
    run = out / RUN
    if (run / EVENTS).exists():
        raise UsageError(f"{run / EVENTS} exists: give --out a new directory")
    run.mkdir(parents=True, exist_ok=True)
    rng = random.Random(shape.seed)
    ids = [f"p{i:07d}" for i in range(shape.problems)]
    with open(out / "problems.jsonl", "w", encoding="utf-8") as f:
        for i, pid in enumerate(ids):
            f.write(json.dumps({"id": pid, "question": f"{_words(rng, 60)} (problem {i})", "answer": str(i % 97)}))
            f.write("\n")
    config = {
        "method": "genssd",
        "teacher": {"model": "synthetic-teacher", "base_url": "http://127.0.0.1:9/v1", "stop": ["<|im_end|>"],
                    "price": {"input": 0.15, "output": 0.6}},
        "student": {"model": "smollm2-135m-instruct"},
        "search": {"n": shape.n, "chunk_tokens": shape.chunk_tokens, "max_steps": shape.steps,
                   "max_new_tokens": shape.chunk_tokens * shape.steps, "prune_ppl": 4.0, "retries": 1,
                   "samples": shape.samples},
        "data": {"source": str((out / "problems.jsonl").resolve())},
    }  # fmt: skip
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    cfg = load_run_config(out / "config.yaml")
    settings = results_settings(cfg, {"teacher": teacher_template(cfg.prompts, cfg.teacher),
                                      "student": load_prompt(cfg.prompts.student)})  # fmt: skip
    writer = _LogWriter(run / EVENTS, shape, rng, settings)
    with writer:
        writer.write_all(ids)
    return {"log_bytes": (run / EVENTS).stat().st_size, "events": writer.events, "open": writer.open,
            "problems": shape.problems}  # fmt: skip


class _LogWriter:
    def __init__(self, path: Path, shape: Shape, rng: random.Random, settings: dict):
        self.path, self.shape, self.rng, self.settings = path, shape, rng, settings
        self.chars = int(shape.chunk_tokens * CHARS_PER_TOKEN)
        self.texts = [_words(rng, self.chars) for _ in range(97)]  # candidate texts drawn from these
        self.events = 0
        self.open = 0
        self.session_candidates = 0

    def __enter__(self) -> _LogWriter:
        self.file = open(self.path, "w", encoding="utf-8", buffering=1 << 20)
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def emit(self, event: Event) -> None:
        self.file.write(event.line())
        self.events += 1

    def write_all(self, ids: list[str]) -> None:
        keys = [(pid, s) for pid in ids for s in range(self.shape.samples)]
        half = len(keys) // 2
        retried: list[dict] = []
        for session, part in enumerate((keys[:half], keys[half:])):
            self.emit(RunStart(config_hash=settings_hash(self.settings), settings=self.settings, forced=False,
                               limit=None, problems=len(ids), genssd="bench", time=1.7e9 + session))  # fmt: skip
            self.session_candidates = 0
            for t in retried:  # the errors of the session before: a resume retries them
                self._steps(t, t["error_step"], self.shape.steps)
            retried = []
            for first in range(0, len(part), ACTIVE):
                retried += self._window(part[first : first + ACTIVE], retry=session == 0)
            end = "stopped" if session == 1 else "completed"
            requests = self.session_candidates // self.shape.n
            self.emit(SessionEnd(
                wall_s=3600.0 + session, end=end, retries={"timeout": 3 + session}, teacher_busy_s=3000.0,
                max_concurrency=32, endpoints={"teacher": EndpointUse(requests=requests, failures={"timeout": 3})},
                engine_wall_s=3590.0, loop_cpu_s=120.5, candidates=self.session_candidates,
                student_cache_peak_mb=900.0,
            ))  # fmt: skip

    def _window(self, keys: list[tuple[str, int]], retry: bool) -> list[dict]:
        """Trajectories in flight together: their steps interleave; returns the failed ones to retry."""
        shape, rng = self.shape, self.rng
        active = []
        for pid, sample in keys:
            fate = rng.choices(["finish", "prune", "error", "open"],
                               [1 - shape.prune_share - shape.error_share - shape.open_share, shape.prune_share,
                                shape.error_share, shape.open_share])[0]  # fmt: skip
            active.append({"pid": pid, "sample": sample, "fate": fate, "at": rng.randrange(shape.steps),
                           "chosen": [], "paid": 0, "kept": 0, "error_step": 0})  # fmt: skip
        for step in range(shape.steps):
            for t in active:
                if not t.get("done"):
                    self._step(t, step)
        for t in active:
            if t["fate"] == "finish":
                self._finish(t)
        return [t for t in active if t["fate"] == "error" and retry and rng.random() < 0.5]

    def _steps(self, t: dict, first: int, last: int) -> None:
        """A failed trajectory retried by the next session: from the step that failed to its end."""
        t["fate"], t["done"] = "finish", False
        for step in range(first, last):
            self._step(t, step)
        self._finish(t)

    def _step(self, t: dict, step: int) -> None:
        shape, rng = self.shape, self.rng
        fate, at = t["fate"], t["at"]
        if fate == "error" and step == at and not t.get("retrying"):
            self.emit(TrajectoryError(problem_id=t["pid"], sample=t["sample"], step=step, error_class="timeout",
                                      message="the teacher did not answer in 600 s (3 attempts)"))  # fmt: skip
            t["done"], t["error_step"], t["retrying"] = True, step, True
            return
        attempts = 2 if fate == "prune" and step == at else 1 + (rng.random() < shape.resample_share)
        for attempt in range(attempts):
            candidates = [self._candidate(step) for _ in range(shape.n)]
            completion = sum(c.tokens for c in candidates)
            self.emit(Response(
                problem_id=t["pid"], sample=t["sample"], step=step, attempt=attempt, start=0,
                seed=rng.randrange(1 << 31), n=shape.n, prompt_tokens=400 + step * shape.chunk_tokens,
                completion_tokens=completion, endpoint="teacher", token_source="logprobs", candidates=candidates,
                cached=rng.random() < shape.cached_share,
            ))  # fmt: skip
            self.session_candidates += shape.n
            t["paid"] += completion
            if fate == "open" and step == at and attempt == attempts - 1:
                self.open += 1
                t["done"] = True  # received, never scored: the session stopped here
                return
            ppl = [round(rng.uniform(1.2, 6.0), 6) for _ in candidates]
            best = min(range(shape.n), key=ppl.__getitem__)
            self.emit(Choice(problem_id=t["pid"], sample=t["sample"], step=step, attempt=attempt, chosen=best,
                             ppl=ppl, tokens=[c.tokens for c in candidates]))  # fmt: skip
        if fate == "prune" and step == at:
            self.emit(Prune(problem_id=t["pid"], sample=t["sample"], step=step, best_ppl=min(ppl)))
            t["done"] = True
            return
        t["chosen"].append(candidates[best].text)
        t["kept"] += candidates[best].tokens

    def _candidate(self, step: int) -> Candidate:
        text = self.texts[self.rng.randrange(len(self.texts))]
        last = step == self.shape.steps - 1
        return Candidate(text=text, finish_reason="stop" if last else "length", tokens=self.shape.chunk_tokens)

    def _finish(self, t: dict) -> None:
        rng = self.rng
        stop = rng.random() < 0.9
        answer = str(rng.randrange(97))
        row = TrajectoryRow(
            problem_id=t["pid"], sample=t["sample"], method="genssd",
            prompt=[Message(role="user", content=f"Solve problem {t['pid']}.")],
            completion=[Message(role="assistant", content="".join(t["chosen"]) + f" The answer is {answer}.")],
            reference=answer, answer=answer, correct=stop and rng.random() < 0.6,
            finish="stop" if stop else "truncated", steps=len(t["chosen"]),
            student_ppl=round(rng.uniform(1.2, 3.5), 6), teacher_tokens=t["paid"], completion_tokens=t["kept"],
        )  # fmt: skip
        self.emit(Finish(problem_id=t["pid"], sample=t["sample"], row=row))
        t["done"] = True


def _words(rng: random.Random, chars: int) -> str:
    words = ("so the total is", "we need", "let x be", "then", "which gives", "because", "each of", "the number",
             "minus", "times", "equals", "therefore", "check:", "wait,", "per hour", "so far")  # fmt: skip
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(words) if rng.random() < 0.7 else str(rng.randrange(1000))
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


# ---- the measured child -------------------------------------------------------------------

# Run as `python -P -c CHILD RUN_DIR CONFIG` with PYTHONPATH naming a checkout; only functions
# of both the streaming code and the list code before it. One JSON line on stdout.
CHILD = r"""
import hashlib, json, resource, sys, time
from pathlib import Path

import genssd_cli
from genssd_cli.config import load_run_config
try:  # this checkout's layout, or a baseline's from before the families
    from genssd_cli.problems import load_problems
    from genssd_cli.rundir import replay as results, store
    from genssd_cli.run.materialise import materialise
    from genssd_cli.rundir.replay import scan_events
except ImportError:
    from genssd_cli import results, runner, store
    from genssd_cli.data import load_problems
    materialise = runner._materialise
    scan_events, read_events = getattr(store, "scan_events", None), store.read_events

run_dir, config = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_run_config(config)
problems = load_problems(cfg.data)
samples = cfg.search.samples
with open(run_dir / "events.jsonl", "rb") as f:
    settings = json.loads(f.readline())["settings"]  # a resume with the config the run started with
began = time.perf_counter()
if hasattr(results, "RunLog"):  # the streaming code
    code = "streaming"
    log = scan_events(run_dir, cfg.teacher)
    log.check_resume(settings, False)
    ended = bool(log.events) and log.all_ended(problems, samples)
    already = log.spent
    log = scan_events(run_dir, cfg.teacher, previous=log)  # again under the lock
    log.check_resume(settings, False)
    replay = log.replay
else:  # the code before: the log as a list of events, read as often as runner.py read it
    code = "list"
    log = read_events(run_dir)
    results.check_resume(log, settings, False)
    ended = bool(log) and results.all_ended(log, problems, samples)
    already = results.spent(log, cfg.teacher)
    log = read_events(run_dir)
    results.check_resume(log, settings, False)
    replay = results.Replay(log)
resumed = time.perf_counter()
with store.RunStore(run_dir) as files:
    summary = materialise(files, problems, cfg)  # `log` still held, as in a session
done = time.perf_counter()
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
hwm_mb = None
try:
    with open("/proc/self/status") as status:
        hwm_mb = next((int(s.split()[1]) / 1024 for s in status if s.startswith("VmHWM:")), None)
except OSError:
    pass
sha = {}
for name in ("trajectories.jsonl", "failures.jsonl", "summary.json"):
    digest = hashlib.sha256()
    with open(run_dir / name, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    sha[name] = digest.hexdigest()[:16]
print(json.dumps({
    "code": code, "genssd_cli": str(Path(genssd_cli.__file__).parent), "all_ended": ended,
    "spent": round(already, 6) if already is not None else None,
    "open_steps_replayed": len(replay.responses), "ended_trajectories": len(replay.ended),
    "rows": summary.trajectories.finished + summary.trajectories.truncated,
    "resume_s": round(resumed - began, 2), "materialise_s": round(done - resumed, 2),
    "seconds": round(done - began, 2), "peak_rss_mb": round(max(rss_mb, hwm_mb or 0), 1), "files_sha256": sha,
}))
"""


def measure(checkout: Path, run_dir: Path, config: Path, memory_limit_gb: float | None) -> dict:
    """The child's JSON line, run with `checkout` first on its path. A child that ran out of the
    memory limit (or died) gives a line with `error` instead."""
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
    limit = int(memory_limit_gb * 2**30) if memory_limit_gb else None

    def cap() -> None:  # in the child: a baseline that needs more fails alone, not the machine
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-P", "-c", CHILD, str(run_dir), str(config)], capture_output=True, text=True, env=env,
        stdin=subprocess.DEVNULL, preexec_fn=cap,
    )  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-STDERR_TAIL_LINES:])
        out_of_memory = "MemoryError" in done.stderr or done.returncode < 0
        return {"error": f"exited with code {done.returncode}" + (" (out of memory)" if out_of_memory else ""),
                "memory_limit_gb": memory_limit_gb, "seconds": round(time.perf_counter() - started, 1),
                "stderr_tail": tail}  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def warm(path: Path) -> None:
    """Read the log once so each child finds it in the page cache, not the first one alone."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def bench_resume(
    shape: Shape, out: Path | None, baseline: Path | None, memory_limit_gb: float | None,
    emit: Callable[[dict], None],
) -> list[dict]:  # fmt: skip
    """Write the synthetic run (kept under `out` when given, else removed), measure this checkout
    and the baseline's on it; each line goes to `emit` as it is measured."""
    layouts = ("rundir/replay.py", "results.py")  # the families, or the flat package before them
    if baseline is not None and not any((baseline / "genssd_cli" / f).is_file() for f in layouts):
        raise UsageError(f"--baseline {baseline} is not a genssd checkout (no genssd_cli/rundir/replay.py)")
    if out is not None:
        return _bench(shape, out, baseline, memory_limit_gb, emit)
    with tempfile.TemporaryDirectory(prefix="genssd-bench-resume-") as tmp:
        return _bench(shape, Path(tmp), baseline, memory_limit_gb, emit)


def _bench(shape: Shape, out: Path, baseline: Path | None, limit: float | None, emit: Callable) -> list[dict]:
    started = time.perf_counter()
    written = write_run(out, shape)
    run_dir = out / RUN
    common = {"bench": "resume", **written, "samples": shape.samples, "steps": shape.steps, "n": shape.n,
              "chunk_tokens": shape.chunk_tokens, "log_mb": round(written["log_bytes"] / 2**20, 1)}  # fmt: skip
    emit({**common, "wrote_log_s": round(time.perf_counter() - started, 1), "run_dir": str(run_dir)})
    lines = []
    checkouts = [("this", Path(genssd_cli.__file__).resolve().parent.parent)]
    if baseline is not None:
        checkouts.append(("baseline", baseline))
    for label, checkout in checkouts:
        warm(run_dir / EVENTS)
        line = {**common, "checkout": label, **measure(checkout, run_dir, out / "config.yaml", limit)}
        if "error" in line and label == "this":
            raise RuntimeFailure(f"the resume of the synthetic log failed: {line['error']}\n{line['stderr_tail']}")
        lines.append(line)
        emit(line)
    if len(lines) == 2 and "error" not in lines[1]:
        ours, theirs = lines
        comparison = {"bench": "resume", "ratio": "this / baseline",
                      "peak_rss": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
                      "seconds": round(ours["seconds"] / theirs["seconds"], 3),
                      "same_files": ours["files_sha256"] == theirs["files_sha256"]}  # fmt: skip
        lines.append(comparison)
        emit(comparison)
    return lines
