"""`genssd bench gpu`: every GPU figure in one call, sized to fit ~8 minutes of one H100/H200.

Parts, in order: the device and versions; `bench scoring` on a Qwen2.5-1.5B shape (naive against
the prefix cache); bf16 against fp32 PPLs on the same inputs; `bench engine` with the test
teacher and a 1.5B student; `bench train` at 4,096-token rows; `bench eval` (HF generate, batch
64); an end-to-end smoke (`genssd run` -> `train` -> `eval` on a random-init model); `bench
scoring` on a 7B shape. Each part runs in a process of its own (`python -m
genssd_cli.bench.gpu_parts PART SPEC RESULT`, its own process group) with a deadline: its share of
`--budget-s`, plus what earlier parts left unused. A part that runs past it is killed with its
children and recorded as timed out; a crash is recorded as failed; the next part goes on.

The benches are called through their public functions (scoring.py, engine.py, train.py, eval.py).
Models are random-init shapes (bench/models.py), so nothing is downloaded; the text benches need
a tokenizer: `--tokenizer` (default `.whl/tokenizer` when present, which scripts/gpu-wheels.sh
writes, else the shipped student's), its vocabulary padded with unused entries to the shape's
size so that the shape keeps its real embedding and LM-head size. `--tiny` swaps in a tiny shape
and tiny workloads: the same code paths in about a minute on a CPU, where the targets do not apply.

Output in DIR: gpu-check.jsonl (a `device` line, then per part a `part` line and one `figure`
line per figure, every declared figure present whatever happened to its part), summary.md (one
table: value, target, verdict), parts.log (every part's own output). The parent imports no torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from genssd_cli.bench.models import RANDOM_INIT_SHAPES
from genssd_cli.errors import UsageError
from genssd_cli.files import make_out_dir
from genssd_cli.procs import die_with_parent

JSONL, SUMMARY_MD, PARTS_LOG = "gpu-check.jsonl", "summary.md", "parts.log"
FULL_BUDGET_S = 480.0  # the parts' budgets below add up to this; --budget-s scales them
MIN_PART_S = 5.0  # a part left with less is skipped
DEFAULT_TOKENIZER_DIR = Path(".whl") / "tokenizer"  # scripts/gpu-wheels.sh writes it
SHIPPED_TOKENIZER = "smollm2-135m-instruct"
LOG_TAIL_CHARS = 200_000  # of a part's output kept in parts.log

# A tiny Qwen2 shape for --tiny: the random-init code paths in seconds on a CPU. Its vocabulary is
# a little larger than the shipped student's tokenizer, so the padding path runs too.
TINY_SHAPE = "gpu-check-tiny"
RANDOM_INIT_SHAPES.setdefault(TINY_SHAPE, dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=50000, tie_word_embeddings=True,
))  # fmt: skip

# FACTS.md, "GPU reference (H200, random-init weights, bf16, one run)": where a figure has one.
H200 = {"scoring-1.5b": (82_200.0, 15_600.0), "scoring-7b": (27_500.0, 4_200.0), "train": 18_400.0, "eval": 2_900.0}


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str = ""
    target: tuple[str, Any] | None = None  # (">=" | "<=" | "==", bound)
    reference: float | None = None  # measured on an H200 (FACTS.md)
    gpu_only: bool = True  # a speed or bf16 target: it holds on a GPU at full size only

    def target_text(self) -> str:
        if self.target is None:
            return ""
        op, bound = self.target
        sign = {">=": "≥", "<=": "≤", "==": "="}[op]
        return f"{sign} {bound:,}" if isinstance(bound, int | float) else f"{sign} {bound}"

    def met(self, value: Any) -> bool:
        op, bound = self.target
        if op == "==":
            return value == bound
        return value >= bound if op == ">=" else value <= bound


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float  # its share of FULL_BUDGET_S
    what: str
    full: dict[str, Any]  # the workload on a GPU
    tiny: dict[str, Any]  # the workload with --tiny
    figures: tuple[Figure, ...] = ()


def _scoring_figures(name: str, targets: bool) -> tuple[Figure, ...]:
    cached, naive = H200[name]
    return (
        Figure("cached_tokens_per_s", "prefix cache, candidate tokens/s", "tok/s",
               (">=", 65_000) if targets else None, cached),
        Figure("naive_tokens_per_s", "naive recompute, candidate tokens/s", "tok/s", None, naive),
        Figure("speedup", "prefix cache / naive", "x", (">=", 5) if targets else None, round(cached / naive, 2)),
        Figure("peak_memory_mb", "peak memory (prefix-cache pass)", "MiB"),
        Figure("peak_cache_mb", "peak prefix-cache size", "MiB"),
    )  # fmt: skip


def _scoring_workload(shape: str, steps: int) -> dict[str, Any]:
    return {"shape": shape, "prefix": 2048, "n": 8, "chunk": 256, "trajectories": 16, "steps": steps}


TINY_SCORING = {"shape": TINY_SHAPE, "prefix": 64, "n": 2, "chunk": 8, "trajectories": 2, "steps": 1}

PARTS: tuple[Part, ...] = (
    Part("device", 20, "the device, its driver and the library versions", {}, {}),
    Part("scoring-1.5b", 55, "`bench scoring`, Qwen2.5-1.5B shape: naive recompute against the prefix cache",
         _scoring_workload("qwen2.5-1.5b", 3), TINY_SCORING, _scoring_figures("scoring-1.5b", True)),
    Part("scoring-bf16-fp32", 45, "PPLs in bf16 (naive and prefix cache) against fp32, same weights and inputs",
         {"shape": "qwen2.5-1.5b", "prefix": 2048, "n": 8, "chunk": 256, "trajectories": 4},
         {"shape": TINY_SHAPE, "prefix": 32, "n": 2, "chunk": 8, "trajectories": 2},
         (Figure("max_rel_ppl_cached", "largest relative PPL difference, bf16 prefix cache vs fp32", "", ("<=", 0.02)),
          Figure("max_rel_ppl_naive", "largest relative PPL difference, bf16 naive vs fp32", ""),
          Figure("same_choice", "trajectories keeping the same candidate in bf16 as in fp32", "share"))),
    Part("engine", 75, "`bench engine`: `genssd run` with a 1.5B student against the test teacher (fixed latency)",
         {"shape": "qwen2.5-1.5b", "problems": 64, "n": 8, "chunk": 128, "steps": 4, "concurrency": 32,
          "latency_per_token": 0.002},
         {"shape": TINY_SHAPE, "problems": 3, "n": 2, "chunk": 8, "steps": 2, "concurrency": 2,
          "latency_per_token": 0.01},
         (Figure("teacher_busy_fraction", "teacher concurrency kept busy", "share", (">=", 0.95)),
          Figure("loop_cpu_ms_per_candidate", "engine loop CPU per candidate", "ms"),
          Figure("student_cache_peak_mb", "student prefix-cache peak", "MiB"),
          Figure("wall_s", "run wall time", "s"))),
    Part("train", 75, "`bench train`: TRL + peft (`genssd train`) against a plain peft loop, 4,096-token rows",
         {"shape": "qwen2.5-1.5b", "steps": 8, "batch_size": 1, "max_length": 4096, "lora_r": 16},
         {"shape": TINY_SHAPE, "steps": 2, "batch_size": 1, "max_length": 128, "lora_r": 4},
         (Figure("speedup", "genssd train / plain peft loop", "x", (">=", 0.9)),
          Figure("ours_tokens_per_s", "genssd train, tokens/s", "tok/s", None, H200["train"]),
          Figure("plain_tokens_per_s", "plain peft loop, tokens/s", "tok/s"),
          Figure("tokens_per_row", "tokens per row", "tokens"))),
    Part("eval", 50, "`bench eval`: `genssd eval`'s loop against plain HF generate, batch 64, 256 new tokens",
         {"shape": "qwen2.5-1.5b", "rows": 64, "batch_size": 64, "max_new_tokens": 256},
         {"shape": TINY_SHAPE, "rows": 2, "batch_size": 2, "max_new_tokens": 4},
         (Figure("ours_tokens_per_s", "genssd eval, new tokens/s", "tok/s"),
          Figure("plain_tokens_per_s", "plain HF generate, new tokens/s", "tok/s", None, H200["eval"]),
          Figure("speedup", "genssd eval / plain HF generate", "x"))),
    Part("smoke", 60, "`genssd run` -> `genssd train` -> `genssd eval` end to end, random-init Qwen2.5-0.5B shape",
         {"shape": "qwen2.5-0.5b"}, {"shape": TINY_SHAPE},
         tuple(Figure(f"{c}", f"`genssd {c}` exits 0 and writes its output", "", ("==", "ok"), gpu_only=False)
               for c in ("run", "train", "eval"))),
    Part("scoring-7b", 100, "`bench scoring`, Qwen2.5-7B shape: naive recompute against the prefix cache",
         _scoring_workload("qwen2.5-7b", 2), TINY_SCORING, _scoring_figures("scoring-7b", False)),
)  # fmt: skip
PART_NAMES = tuple(p.name for p in PARTS)


@dataclass
class PartResult:
    part: Part
    status: str  # ok | failed | timed_out | skipped
    seconds: float
    timeout_s: float
    figures: dict[str, Any] = field(default_factory=dict)
    bench: list[dict] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# The parent: parts in processes of their own, under deadlines; the files.


def gpu_check(out: Path, tiny: bool, budget_s: float, tokenizer: str | None, only: list[str],
              say: Callable[[str], None] = print) -> list[PartResult]:  # fmt: skip
    unknown = [name for name in only if name not in PART_NAMES]
    if unknown:
        raise UsageError(f"--part: unknown part {unknown[0]!r} (known: {', '.join(PART_NAMES)})")
    parts = [p for p in PARTS if p.name == "device" or not only or p.name in only]
    if tokenizer is None:
        tokenizer = str(DEFAULT_TOKENIZER_DIR) if (DEFAULT_TOKENIZER_DIR / "tokenizer.json").is_file() \
            else SHIPPED_TOKENIZER  # fmt: skip
    make_out_dir(out)
    for name in (JSONL, SUMMARY_MD, PARTS_LOG):
        (out / name).unlink(missing_ok=True)
    scale = budget_s / FULL_BUDGET_S
    planned = sum(p.budget_s for p in parts) * scale
    say(f"genssd bench gpu: {len(parts)} parts in {planned:.0f} s at most{' (tiny)' if tiny else ''} -> {out}")
    work = Path(tempfile.mkdtemp(prefix="genssd-gpu-check-"))
    results: list[PartResult] = []
    started, deadline = time.monotonic(), 0.0
    try:
        for part in parts:
            deadline += part.budget_s * scale  # what earlier parts left unused goes to the later ones
            timeout = started + deadline - time.monotonic()
            device = results[0].info if results else {}
            workload = part.tiny if tiny else part.full
            spec = {"tiny": tiny, "tokenizer": tokenizer, "work": str(work), "workload": workload}
            if part.name != "device" and not tiny and results[0].status == "ok" and not device.get("cuda"):
                result = PartResult(part, "skipped", 0.0, round(timeout, 1),
                                    error="no CUDA device (--tiny checks the check on a CPU)")  # fmt: skip
            elif timeout < MIN_PART_S:
                result = PartResult(part, "skipped", 0.0, round(timeout, 1), error="no time left in --budget-s")
            else:
                result = _run_part(part, spec, timeout, out / PARTS_LOG)
            results.append(result)
            _write(out, results, tiny, budget_s, tokenizer)
            note = f" ({result.error.splitlines()[-1]})" if result.error else ""
            say(f"{part.name}: {result.status.replace('_', ' ')} in {result.seconds:.1f} s "
                f"(deadline {result.timeout_s:.0f} s){note}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _run_part(part: Part, spec: dict, timeout: float, log: Path) -> PartResult:
    result_file = Path(spec["work"]) / f"{part.name}.result.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("HF_HUB_OFFLINE", "1")  # random-init shapes and local folders only: never wait on a network
    command = [sys.executable, "-m", "genssd_cli.bench.gpu_parts", part.name, json.dumps(spec), str(result_file)]
    started = time.monotonic()
    process = subprocess.Popen(die_with_parent(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)
        output, _ = process.communicate()
        status = "timed_out"
    except BaseException:  # Ctrl-C: take the part's whole process group down with us
        _kill_group(process.pid)
        raise
    _kill_group(process.pid)  # a server or worker the part left behind
    seconds = round(time.monotonic() - started, 1)
    with log.open("a", encoding="utf-8") as f:
        f.write(f"===== {part.name}: {status}, exit {process.returncode}, {seconds} s of {timeout:.0f} s\n")
        f.write(output[-LOG_TAIL_CHARS:] + ("" if output.endswith("\n") or not output else "\n"))
    state = json.loads(result_file.read_text(encoding="utf-8")) if result_file.is_file() else {}
    error = None
    if status == "timed_out":
        error = f"timed out after {timeout:.0f} s"
    elif status == "failed":
        error = last_error(output) or f"exit code {process.returncode}"
    return PartResult(part, status, seconds, round(timeout, 1), state.get("figures", {}), state.get("bench", []),
                      state.get("info", {}), error)  # fmt: skip


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def last_error(output: str) -> str | None:
    """The line that says why a part failed: a traceback's last line, or genssd's `error:` line."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^([\w.]+(Error|Exception|Failure|Interrupt)\b|error:)", line):
            return line[:500]
    return lines[-1][:500] if lines else None


def _verdict(figure: Figure, value: Any, result: PartResult, device: dict, tiny: bool) -> tuple[str, bool | None]:
    if value is None:
        return {"timed_out": "timed out", "failed": "failed", "skipped": "skipped"}.get(result.status, "no value"), None
    if figure.target is None:
        return "no target", None
    if figure.gpu_only and (tiny or not device.get("cuda")):
        return f"not applicable ({'cpu' if not device.get('cuda') else 'tiny'})", None
    met = figure.met(value)
    return ("met" if met else "not met"), met


def _lines(results: list[PartResult], tiny: bool, budget_s: float, tokenizer: str) -> list[dict]:
    device = results[0].info if results else {}
    head = {"kind": "device", **device, "tiny": tiny, "budget_s": budget_s, "tokenizer": tokenizer,
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip
    if not device:
        head["error"] = results[0].error if results else "the device part did not run"
    lines = [head]
    for r in results:
        lines.append({"kind": "part", "part": r.part.name, "status": r.status, "seconds": r.seconds,
                      "timeout_s": r.timeout_s, "error": r.error, "workload": r.part.tiny if tiny else r.part.full,
                      "bench": r.bench})  # fmt: skip
        for figure in r.part.figures:
            value = r.figures.get(figure.key)
            verdict, met = _verdict(figure, value, r, device, tiny)
            lines.append({"kind": "figure", "part": r.part.name, "figure": figure.key, "label": figure.label,
                          "value": value, "unit": figure.unit, "target": figure.target_text() or None,
                          "reference_h200": figure.reference, "met": met, "verdict": verdict,
                          "device": device.get("device")})  # fmt: skip
    return lines


def _write(out: Path, results: list[PartResult], tiny: bool, budget_s: float, tokenizer: str) -> None:
    """Both files, rewritten after every part: a check killed halfway still leaves what it measured."""
    lines = _lines(results, tiny, budget_s, tokenizer)
    atomic_write(out / JSONL, "".join(json.dumps(line) + "\n" for line in lines))
    atomic_write(out / SUMMARY_MD, _summary(lines))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _show(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _summary(lines: list[dict]) -> str:
    device = lines[0]
    versions = ", ".join(f"{k} {device[k]}" for k in ("torch", "transformers", "peft", "accelerate", "trl", "datasets")
                         if device.get(k))  # fmt: skip
    text = [
        "# genssd GPU check (`genssd bench gpu`)",
        "",
        f"- device: {device.get('device', '?')}; driver {device.get('driver') or 'n/a'}; "
        f"CUDA {device.get('cuda_runtime') or 'n/a'}; memory {device.get('memory_gib') or 'n/a'} GiB",
        f"- versions: python {device.get('python', '?')}, {versions}; genssd {device.get('genssd', '?')}"
        f"{' (' + device['commit'] + ')' if device.get('commit') else ''}",
        f"- {device['date']}; budget {device['budget_s']:.0f} s; {'--tiny (tiny shapes and workloads)' if device['tiny'] else 'full size'}",  # noqa: E501
    ]
    if device.get("error"):
        text.append(f"- device part: {device['error']}")
    text += ["", "| part | figure | value | target | H200 reference | verdict |", "|---|---|---|---|---|---|"]
    for line in lines:
        if line["kind"] == "figure":
            unit = f" {line['unit']}" if line["unit"] and line["value"] is not None else ""
            text.append(f"| {line['part']} | {line['label']} | {_show(line['value'])}{unit} | {line['target'] or ''} "
                        f"| {_show(line['reference_h200']) if line['reference_h200'] else ''} | {line['verdict']} |")
    text += ["", "| part | status | seconds | deadline (s) | note |", "|---|---|---|---|---|"]
    for line in lines:
        if line["kind"] == "part":
            note = (line["error"] or "").replace("|", "\\|").replace("\n", " ")
            text.append(f"| {line['part']} | {line['status'].replace('_', ' ')} | {line['seconds']} "
                        f"| {line['timeout_s']:.0f} | {note} |")
    text += ["", "Every part's own output is in parts.log; the bench lines each figure comes from are in "
             f"{JSONL} (`part` lines, `bench`).", ""]  # fmt: skip
    return "\n".join(text)


# A part, in its own process: `python -m genssd_cli.bench.gpu PART SPEC RESULT`.
