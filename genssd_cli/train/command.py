"""`genssd train`: LoRA fine-tuning of the student on kept trajectories, with TRL's SFTTrainer.

The rows of trajectories.jsonl are already TRL conversational prompt-completion rows, so TRL
applies the student's chat template and computes the loss on the completion only. What genssd
adds: choosing and de-duplicating rows across runs (with a manifest), CPU/GPU settings, resume
from the last checkpoint, progress lines, and the adapter saved where `student.adapter` and
`genssd eval --adapter` expect it.

Data parallel (genssd_cli/train/processes.py starts the processes): every process trains on its
share of each global batch; rank 0 alone writes genssd's files and prints, the checkpoint to
resume from is the one rank 0 found, and a process's error is reported once.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from genssd_cli.config import StudentConfig, TrainConfig, load_run_config, load_train_config
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.files import (
    WriteFailed,
    check_out_dir,
    is_write_error,
    locked_out_dir,
    make_out_dir,
    write_atomic,
    write_failed,
)
from genssd_cli.rundir.layout import CONFIG, open_finished
from genssd_cli.rundir.records import TrajectoryRow
from genssd_cli.train.processes import die_with_launcher, launch, print_layout, reported_once
from genssd_cli.train.trainer import (
    CHECKPOINTS,
    SAVED_BY_ALL,
    agreed,
    batch_layout,
    end_process_group,
    is_main_process,
    make_trainer,
    rows_over_length,
    world_size,
)

ADAPTER = "adapter"
MERGED = "merged"
DONE = "done.json"


def exclusion(row: TrajectoryRow, include_incorrect: bool) -> str | None:
    """Why a row is not trained on, or None. Only a trace that ended and stated the right answer
    is correct; the check on `finish` also holds for rows an older genssd marked correct."""
    if include_incorrect:
        return None
    if row.finish != "stop":
        return "truncated"
    if row.answer is None:
        return "no_stated_answer"
    return None if row.correct else "wrong_answer"


def build_dataset(run_dirs: list[Path], include_incorrect: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows to train on (correct ones unless asked otherwise), duplicates dropped, and a manifest
    that counts the rows left out by reason."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    excluded_all: Counter[str] = Counter()
    manifest: dict[str, Any] = {"runs": [], "include_incorrect": include_incorrect}
    for run_dir in run_dirs:
        try:
            trajectories = open_finished(run_dir).rows
        except RuntimeFailure as exc:  # the user's files to fix
            raise UsageError(str(exc)) from None
        excluded: Counter[str] = Counter()
        used = 0
        for row in trajectories:
            prompt = [m.model_dump() for m in row.prompt]
            completion = [m.model_dump() for m in row.completion]
            digest = hashlib.sha256(json.dumps([prompt, completion], sort_keys=True).encode()).hexdigest()
            reason = exclusion(row, include_incorrect) or ("duplicate" if digest in seen else None)
            if reason:
                excluded[reason] += 1
                continue
            seen.add(digest)
            rows.append({"prompt": prompt, "completion": completion, "problem_id": row.problem_id,
                         "run": str(run_dir), "sha256": digest[:16]})  # fmt: skip
            used += 1
        correct = sum(1 for row in trajectories if exclusion(row, False) is None)
        manifest["runs"].append({"dir": str(run_dir), "trajectories": len(trajectories), "correct": correct,
                                 "used": used, "excluded": dict(sorted(excluded.items()))})  # fmt: skip
        excluded_all += excluded
    manifest["rows"] = len(rows)
    manifest["excluded"] = dict(sorted(excluded_all.items()))
    return rows, manifest


def run_student(run_dir: Path) -> StudentConfig:
    """The student a run scored with, from its resolved config.yaml."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise UsageError(f"{run_dir} has no {CONFIG}; set student.model in the train config")
    return load_run_config(path).student


@dataclass
class Plan:
    """A training's inputs, checked before any process loads a model."""

    cfg: TrainConfig
    rows: list[dict[str, Any]]
    manifest: dict[str, Any]
    resolved: str  # config.yaml
    inputs: str  # what done.json was trained on


@dataclass(frozen=True)
class TrainOptions:
    """What `genssd train` is asked to do (its flags but --processes)."""

    run_dirs: list[Path]  # whose trajectories.jsonl to train on
    out: Path
    config: Path | None = None  # None: configs/train.yaml
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, in order
    include_incorrect: bool = False
    merge: bool = False  # also write the merged model to OUT/merged


def plan_training(options: TrainOptions) -> Plan:
    run_dirs, out, merge = options.run_dirs, options.out, options.merge
    cfg = load_train_config(options.config, options.overrides)
    if options.include_incorrect:
        cfg.include_incorrect = True
    rows, manifest = build_dataset(run_dirs, cfg.include_incorrect)
    if not rows:
        what = "trajectory" if cfg.include_incorrect else "correct trajectory (--include-incorrect trains on all)"
        raise UsageError(f"nothing to train on: no {what} in {', '.join(map(str, run_dirs))}")
    cfg.student = cfg.student or run_student(run_dirs[0])
    check_out_dir(out)
    import yaml

    resolved = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    inputs = hashlib.sha256(json.dumps([resolved, [r["sha256"] for r in rows], merge]).encode()).hexdigest()[:16]
    return Plan(cfg, rows, manifest, resolved, inputs)


def train_main(options: TrainOptions, processes: int, argv: list[str], console: Console) -> dict[str, Any] | None:
    """`genssd train ARGV`: in this process; in `processes` it launches; or as one of the processes
    a launcher started. The result to print, or None where another process prints it."""
    launched = world_size()
    if launched == 1:
        if processes == 1:
            return train_command(options, console)
        plan = plan_training(options)
        done = _read_done(options.out)
        if done.get("inputs") == plan.inputs:
            console.print(f"already trained on these rows with these settings: {options.out / ADAPTER}")
            return done["result"]
        return launch(argv, processes, plan.cfg.student.device, options.out, console)
    die_with_launcher()
    with reported_once():
        if processes not in (1, launched):
            raise UsageError(f"--processes {processes}, but the launcher started {launched}: give one of the two")
        result = train_command(options, console)
    end_process_group()
    return result if is_main_process() else None


def train_command(options: TrainOptions, console: Console) -> dict[str, Any]:
    if not is_main_process():  # rank 0 holds the folder for every process of the training
        return _train(options, console)
    check_out_dir(options.out)  # a file in its place is said as such, before the lock would try to make it
    with locked_out_dir(options.out):  # a second train here would remove this one's checkpoint in progress
        return _train(options, console)


def _train(options: TrainOptions, console: Console) -> dict[str, Any]:
    main = is_main_process()
    console = console if main else Console(quiet=True)  # rank 0 alone prints
    out, merge = options.out, options.merge
    plan = plan_training(options)
    cfg, rows, manifest = plan.cfg, plan.rows, plan.manifest
    done = _read_done(out)
    if done.get("inputs") == plan.inputs:
        console.print(f"already trained on these rows with these settings: {out / ADAPTER}")
        return done["result"]
    trainer = make_trainer(cfg, rows, out, console)  # a student or adapter that will not load: refused here
    processes = world_size()
    batch, accum = batch_layout(cfg.training.batch_size, cfg.training.grad_accum, processes)
    last = None
    if main:  # rank 0 alone writes genssd's files; the others wait for it at `agreed` below
        make_out_dir(out)
        write_atomic(out / CONFIG, plan.resolved)
        cut = rows_over_length(trainer.processing_class, rows, cfg.training.max_length)
        manifest["cut_at_max_length"] = cut
        write_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        if cut:
            console.print(f"warning: {cut} of {len(rows)} rows are longer than training.max_length "
                          f"({cfg.training.max_length} tokens) and train on a cut trace; raise it to keep them whole",
                          markup=False)  # fmt: skip
        if processes > 1:
            print_layout(console, cfg.training.batch_size * cfg.training.grad_accum, batch, accum, processes)
        last = last_complete_checkpoint(out / CHECKPOINTS, console)
    last = agreed(last)  # every process resumes from the checkpoint rank 0 found
    if last:
        refuse_unsafe_resume(last)
        console.print(f"resuming from {last}")
    started = time.monotonic()
    with _writes_to(out):
        trainer.train(resume_from_checkpoint=last)
        trainer.save_model(str(out / ADAPTER))  # written by rank 0 only (transformers)
        if main:
            trainer.processing_class.save_pretrained(str(out / ADAPTER))
            if merge:
                merged = trainer.model.merge_and_unload()
                merged.save_pretrained(str(out / MERGED))
                trainer.processing_class.save_pretrained(str(out / MERGED))
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    result = {
        "rows": len(rows),
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "wall_s": round(time.monotonic() - started, 1),
        "adapter": str(out / ADAPTER),
        "processes": processes,
        "global_batch": batch * accum * processes,
    }
    if main:
        write_atomic(out / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        # Written last: a re-run with the same rows and settings has nothing to do.
        write_atomic(out / DONE, json.dumps({"inputs": plan.inputs, "result": result}) + "\n")
    return result


SAFE_TORCH = (2, 6)  # torch.load defaults to weights_only: a checkpoint's RNG state cannot run code


def refuse_unsafe_resume(checkpoint: str, torch_version: str | None = None) -> None:
    """Resuming unpickles the checkpoint's RNG state (transformers' Trainer); below torch 2.6 that
    may run whatever code a planted checkpoint holds, so the resume is refused in one line."""
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    major, minor = (int(part) for part in re.findall(r"\d+", torch_version)[:2])  # "2.5.1+cu121": (2, 5)
    if (major, minor) < SAFE_TORCH:
        raise UsageError(f"{checkpoint}: resuming needs torch >= 2.6 (safe checkpoint loading), torch "
                         f"{torch_version} is installed: upgrade torch, or move the checkpoints away")  # fmt: skip


def last_complete_checkpoint(checkpoints: Path, console: Console) -> str | None:
    """The newest checkpoint that was saved whole. transformers writes trainer_state.json last,
    so a checkpoint cut short (killed mid-save, disk full) lacks a readable one: it is removed,
    and training resumes from the one before. One of several processes (rng_state_0.pth, …) is
    whole once all of them saved their part (SAVED_BY_ALL)."""
    if not checkpoints.is_dir():
        return None
    steps = sorted((p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)  # fmt: skip
    for path in steps:
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            if (path / "rng_state_0.pth").exists():  # saved by several processes: by all of them?
                json.loads((path / SAVED_BY_ALL).read_text(encoding="utf-8"))
            return str(path)
        except (OSError, ValueError):
            console.print(f"removing {path}: saved only in part")
            shutil.rmtree(path, ignore_errors=True)
    return None


@contextmanager
def _writes_to(out: Path) -> Iterator[None]:
    """Training writes checkpoints and the adapter through transformers, safetensors and torch;
    their refusals (torch wraps the OS error in a RuntimeError) become one line naming --out."""
    try:
        yield
    except OSError as exc:
        if not is_write_error(exc):
            raise
        raise write_failed(exc.filename or out, exc) from None
    except RuntimeError as exc:
        if not _raised_while_saving(exc):
            raise
        reason = f"saving a checkpoint or the adapter failed ({_first_line(exc)}); is the disk full?"
        raise WriteFailed(out, reason) from None


def _raised_while_saving(exc: BaseException) -> bool:
    """torch.save reports a refused write as a RuntimeError of its zip writer (`file write failed`,
    `iostream error`, `unexpected pos`): tell it by where it was raised, not by its words."""
    savers = ("torch/serialization.py", "safetensors/torch.py")
    return any(f.filename.replace("\\", "/").endswith(savers) for f in traceback.extract_tb(exc.__traceback__))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _read_done(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
