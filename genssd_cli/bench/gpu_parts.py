"""The parts of `genssd bench gpu`, each run in a process of its own by bench/gpu.py:
`python -m genssd_cli.bench.gpu_parts PART SPEC RESULT`. A part measures, writes what it has
measured so far to RESULT (JSON) at each step, and prints the bench lines; the parent turns them
into figures and verdicts. Torch and the benches are imported here, never in the parent."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genssd_cli.bench.gpu import SHIPPED_TOKENIZER, atomic_write, last_error
from genssd_cli.bench.models import RANDOM_INIT_SHAPES
from genssd_cli.errors import UsageError


class _Result:
    """What a part has measured so far, rewritten to RESULT at each step: a part killed halfway
    keeps the figures it already had."""

    def __init__(self, path: Path):
        self.path, self.state = path, {"figures": {}, "bench": [], "info": {}}

    def emit(self, figures: dict | None = None, bench: list[dict] | None = None, info: dict | None = None) -> None:
        self.state["figures"].update(figures or {})
        self.state["bench"].extend(bench or [])
        self.state["info"].update(info or {})
        atomic_write(self.path, json.dumps(self.state))
        for line in bench or []:
            print(json.dumps(line), flush=True)


def _part_device(spec: dict, result: _Result) -> None:
    import importlib.metadata

    import torch

    from genssd_cli import __version__
    from genssd_cli.bench import device_name

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "device": device_name("cuda" if cuda else "cpu"), "cuda": cuda, "cuda_runtime": torch.version.cuda,
        "driver": _driver_version() if cuda else None, "python": platform.python_version(), "genssd": __version__,
        "commit": _commit(),
    }  # fmt: skip
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                    bf16=torch.cuda.is_bf16_supported(), gpus=torch.cuda.device_count())  # fmt: skip
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "tokenizers", "pydantic",
                 "openai", "math-verify"):  # fmt: skip
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "missing"
    result.emit(info=info)


def _driver_version() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:
        return None


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _tokenizer_dir(spec: dict, shape: str) -> str:
    """The tokenizer the text benches read, in the work folder, its vocabulary padded with unused
    entries up to the shape's size (load_bench_model sizes the model to the tokenizer)."""
    from genssd_cli.models import SHIPPED, student_model_dir

    vocab = RANDOM_INIT_SHAPES[shape]["vocab_size"]
    target = Path(spec["work"]) / f"tokenizer-{vocab}"
    if (target / "tokenizer.json").is_file():
        return str(target)
    source = spec["tokenizer"]
    folder = student_model_dir(source) if source in SHIPPED else Path(source)
    if not (folder / "tokenizer.json").is_file():
        raise UsageError(f"--tokenizer: no tokenizer.json in {folder} (make gpu-wheels writes .whl/tokenizer)")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in folder.iterdir():
        if path.is_file() and (path.name.startswith(("tokenizer", "special_tokens", "chat_template", "added_tokens"))):
            shutil.copy2(path, tmp / path.name)
    data = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
    entries = data["model"]["vocab"]
    if not isinstance(entries, dict):
        raise UsageError(f"--tokenizer: {folder}'s model ({data['model'].get('type')}) has no vocabulary to pad")
    size = 1 + max([*entries.values(), *(t["id"] for t in data.get("added_tokens", []))])
    for i in range(size, vocab):
        entries[f"<|genssd_unused_{i}|>"] = i
    (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, target)
    return str(target)


def _student_folder(spec: dict, shape: str, name: str) -> str:
    """A random-init shape saved as a model folder, for the commands that load a student by path."""
    from genssd_cli.bench.models import load_bench_model

    target = Path(spec["work"]) / f"student-{name}"
    lm, tokenizer = load_bench_model(_tokenizer_dir(spec, shape), shape, "cpu",
                                     "float32" if spec["tiny"] else "bfloat16", text=True)  # fmt: skip
    lm.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def _part_scoring(spec: dict, result: _Result) -> None:
    from genssd_cli.bench.scoring import ScoringBench, bench_scoring

    w = spec["workload"]
    lines = bench_scoring(ScoringBench(SHIPPED_TOKENIZER, w["shape"], w["prefix"], w["n"], w["chunk"],
                                       w["trajectories"], w["steps"]))  # fmt: skip
    naive, cached, ratio = lines
    result.emit({"cached_tokens_per_s": cached["candidate_tokens_per_s"],
                 "naive_tokens_per_s": naive["candidate_tokens_per_s"], "speedup": ratio["speedup"],
                 "peak_memory_mb": cached["peak_memory_mb"], "peak_cache_mb": cached["peak_cache_mb"]},
                lines)  # fmt: skip


def _part_agreement(spec: dict, result: _Result) -> None:
    """The same random-init weights in fp32 (the reference, naive) and rounded to bf16 (naive, and
    the prefix-cached path the engine runs), on the same random ids."""
    import copy
    import math
    import random

    import torch

    from genssd_cli.bench import device_name
    from genssd_cli.bench.models import load_bench_model
    from genssd_cli.methods import METHODS
    from genssd_cli.models import pick_device
    from genssd_cli.student.scorer import Step, StudentScorer, Tokenized, default_batch_tokens

    w = spec["workload"]
    device = pick_device("auto")
    fp32, tokenizer = load_bench_model(SHIPPED_TOKENIZER, w["shape"], device, "float32", text=False)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    budget = default_batch_tokens(device, None)
    keep = METHODS["genssd"].select
    vocab = fp32.config.get_text_config(decoder=True).vocab_size
    rng = random.Random(1)
    prefixes = [[rng.randrange(100, vocab) for _ in range(w["prefix"])] for _ in range(w["trajectories"])]
    candidates = [[[rng.randrange(100, vocab) for _ in range(w["chunk"])] for _ in range(w["n"])] for _ in prefixes]
    sequences = [Tokenized(p + c, len(p)) for p, cs in zip(prefixes, candidates, strict=True) for c in cs]

    def ppls(totals: list[float]) -> list[float]:
        return [math.exp(t / w["chunk"]) for t in totals]

    started = time.perf_counter()
    reference = ppls(StudentScorer(fp32, tokenizer, device, "{question}", budget).sequence_nll(sequences))
    del fp32
    naive = ppls(StudentScorer(bf16, tokenizer, device, "{question}", budget).sequence_nll(sequences))
    scorer = StudentScorer(bf16, tokenizer, device, "{question}", budget, cache_bytes=1 << 40)
    for t, prefix in enumerate(prefixes):
        scorer.prefill(("agree", t), prefix[:-1])
    steps = [Step(("agree", t), p, [Tokenized(p + c, len(p)) for c in candidates[t]], keep)
             for t, p in enumerate(prefixes)]  # fmt: skip
    cached = [s.ppl for scores in scorer.score_steps(steps) for s in scores]
    n = w["n"]

    def worst(ppl: list[float]) -> float:
        return round(max(abs(a / b - 1) for a, b in zip(ppl, reference, strict=True)), 6)

    same = sum(keep(cached[t * n : (t + 1) * n]) == keep(reference[t * n : (t + 1) * n]) for t in range(len(prefixes)))
    line = {"bench": "scoring-agreement", "model": f"random-init {w['shape']}", "device": device_name(device),
            **{k: w[k] for k in ("prefix", "n", "chunk", "trajectories")}, "candidates": len(reference),
            "mean_ppl_fp32": round(sum(reference) / len(reference), 3), "max_rel_ppl_naive": worst(naive),
            "max_rel_ppl_cached": worst(cached), "same_choice": round(same / len(prefixes), 3),
            "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
    result.emit({k: line[k] for k in ("max_rel_ppl_cached", "max_rel_ppl_naive", "same_choice")}, [line])


def _part_engine(spec: dict, result: _Result) -> None:
    from genssd_cli.bench.engine import EngineBench, bench_engine

    w = spec["workload"]
    folder = _student_folder(spec, w["shape"], "engine")
    lines = bench_engine(EngineBench(folder, w["problems"], w["n"], w["chunk"], w["steps"], w["concurrency"],
                                     w["latency_per_token"]))  # fmt: skip
    [line] = lines
    line["model"] = f"random-init {w['shape']}"
    result.emit({k: line.get(k) for k in ("teacher_busy_fraction", "loop_cpu_ms_per_candidate",
                                          "student_cache_peak_mb", "wall_s")}, lines)  # fmt: skip


def _part_train(spec: dict, result: _Result) -> None:
    """`bench train` on rows longer than max_length (TRL cuts them there), so every row is
    max_length tokens: the bench's own rows are short arithmetic traces."""
    import genssd_cli.problems
    from genssd_cli.bench.train import TrainBench, bench_train

    w = spec["workload"]
    short = genssd_cli.problems.generate_arith

    def long_rows(count: int, seed: int, steps: int | None = None) -> list[dict]:
        rows = short(count, seed, steps)
        for row in rows:  # no tokenizer has fewer than 1 token per 8 characters of such text
            row["answer"] = "\n".join([row["answer"]] * (1 + 8 * w["max_length"] // len(row["answer"])))
        return rows

    genssd_cli.problems.generate_arith = long_rows
    lines = bench_train(TrainBench(_tokenizer_dir(spec, w["shape"]), w["shape"], w["steps"] * w["batch_size"],
                                   w["steps"], w["batch_size"], w["max_length"], w["lora_r"]))  # fmt: skip
    ours, plain, ratio = lines
    for line in (ours, plain):
        line["model"], line["max_length"] = f"random-init {w['shape']}", w["max_length"]
    result.emit({"speedup": ratio["speedup"], "ours_tokens_per_s": ours["tokens_per_s"],
                 "plain_tokens_per_s": plain["tokens_per_s"],
                 "tokens_per_row": round(ours["tokens"] / (w["steps"] * w["batch_size"]), 1)}, lines)  # fmt: skip


def _part_eval(spec: dict, result: _Result) -> None:
    from genssd_cli.bench.eval import bench_eval

    w = spec["workload"]
    lines = bench_eval(_tokenizer_dir(spec, w["shape"]), w["shape"], w["rows"], w["batch_size"], w["max_new_tokens"])
    ours, plain, ratio = lines
    for line in (ours, plain):
        line["model"], line["batch_size"] = f"random-init {w['shape']}", w["batch_size"]
    result.emit({"ours_tokens_per_s": ours["new_tokens_per_s"], "plain_tokens_per_s": plain["new_tokens_per_s"],
                 "speedup": ratio["speedup"]}, lines)  # fmt: skip


def _part_smoke(spec: dict, result: _Result) -> None:
    """The three commands as a user runs them, each in its own process, on a random-init model
    folder against the test teacher. A command that fails is recorded with its error line (a
    missing package shows as `No module named …`) and the ones that need its output are not run."""
    import yaml

    from genssd_cli.teacher.servers.local import free_port, local_base_url, start_fake_teacher

    w = spec["workload"]
    folder = _student_folder(spec, w["shape"], "smoke")
    work = Path(spec["work"]) / "smoke"
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_fake_teacher(port)
    try:
        config = {
            "teacher": {"model": "fake-teacher", "base_url": local_base_url(port), "stop": ["\nQuestion:"],
                        "max_concurrency": 4},
            "student": {"model": folder},
            "search": {"n": 2, "chunk_tokens": 16, "max_steps": 2, "max_new_tokens": 32},
            "data": {"source": "arith", "count": 4, "seed": 0},
            "engine": {"max_active_problems": 4, "progress_interval_s": 3600},
        }  # fmt: skip
        (work / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        commands = [
            ("run", ["run", str(work / "run.yaml"), "--out", str(work / "run")], work / "run" / "trajectories.jsonl"),
            ("train", ["train", str(work / "run"), "--out", str(work / "train"), "--include-incorrect",
                       "--set", "training.epochs=1", "--set", "training.batch_size=2",
                       "--set", "training.max_length=256"], work / "train" / "adapter" / "adapter_config.json"),
            ("eval", [ "eval", folder, "--adapter", str(work / "train" / "adapter"), "--dataset", "arith1-heldout",
                       "--limit", "4", "--out", str(work / "eval"), "--set", "max_new_tokens=16",
                       "--set", "batch_size=4"], work / "eval" / "metrics.json"),
        ]  # fmt: skip
        failed = None
        for name, args, product in commands:
            if failed:
                result.emit({name: f"not run ({failed} failed)"})
                continue
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "genssd_cli", *args], capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL)  # fmt: skip
            seconds = round(time.perf_counter() - started, 1)
            print(f"--- genssd {name}: exit {done.returncode} in {seconds} s\n{done.stdout}{done.stderr}", flush=True)
            ok = done.returncode == 0 and product.is_file() and product.stat().st_size > 0
            missing = sorted(set(re.findall(r"No module named '([\w.]+)'", done.stderr)))
            why = last_error(done.stderr) or f"exit {done.returncode}, no {product.name}"
            result.emit({name: "ok" if ok else f"failed: {why}"},
                        [{"bench": "smoke", "command": f"genssd {name}", "exit": done.returncode, "seconds": seconds,
                          "output": product.name if ok else None, "missing_modules": missing}])  # fmt: skip
            failed = None if ok else name
    finally:
        server.kill()
        server.wait()


PART_RUNNERS: dict[str, Callable[[dict, _Result], None]] = {
    "device": _part_device, "scoring-1.5b": _part_scoring, "scoring-bf16-fp32": _part_agreement,
    "engine": _part_engine, "train": _part_train, "eval": _part_eval, "smoke": _part_smoke, "scoring-7b": _part_scoring,
}  # fmt: skip


def _child(argv: list[str]) -> None:
    name, spec, path = argv[0], json.loads(argv[1]), Path(argv[2])
    PART_RUNNERS[name](spec, _Result(path))


if __name__ == "__main__":
    _child(sys.argv[1:])
