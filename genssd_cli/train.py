"""`genssd train`: LoRA fine-tuning of the student on kept trajectories, with TRL's SFTTrainer.

The rows of trajectories.jsonl are already TRL conversational prompt-completion rows, so TRL
applies the student's chat template and computes the loss on the completion only. What genssd
adds: choosing and de-duplicating rows across runs (with a manifest), CPU/GPU settings, resume
from the last checkpoint, progress lines, and the adapter saved where `student.adapter` and
`genssd eval --adapter` expect it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from genssd_cli.config import StudentConfig, load_run_config, load_train_config
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.files import WriteFailed, is_write_error, write_atomic, write_failed
from genssd_cli.records import TrajectoryRow, read_rows
from genssd_cli.store import CONFIG, TRAJECTORIES
from genssd_cli.trainer import CHECKPOINTS, make_trainer, rows_over_length

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
        path = run_dir / TRAJECTORIES
        if not run_dir.is_dir():
            raise UsageError(f"run directory not found: {run_dir}")
        if not path.is_file():
            raise UsageError(f"{run_dir} has no {TRAJECTORIES}: not a genssd run directory, or no session ended")
        try:
            trajectories = read_rows(path, TrajectoryRow, "run `genssd run` on it again to rewrite it")
        except RuntimeFailure as exc:
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


def train_command(
    run_dirs: list[Path],
    out: Path,
    config_path: Path | None,
    overrides: list[str],
    include_incorrect: bool,
    merge: bool,
    console: Console,
) -> dict[str, Any]:
    cfg = load_train_config(config_path, overrides)
    if include_incorrect:
        cfg.include_incorrect = True
    rows, manifest = build_dataset(run_dirs, cfg.include_incorrect)
    if not rows:
        what = "trajectory" if cfg.include_incorrect else "correct trajectory (--include-incorrect trains on all)"
        raise UsageError(f"nothing to train on: no {what} in {', '.join(map(str, run_dirs))}")
    cfg.student = cfg.student or run_student(run_dirs[0])
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    import yaml

    resolved = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    inputs = hashlib.sha256(json.dumps([resolved, [r["sha256"] for r in rows], merge]).encode()).hexdigest()[:16]
    done = _read_done(out)
    if done.get("inputs") == inputs:
        console.print(f"already trained on these rows with these settings: {out / ADAPTER}")
        return done["result"]
    trainer = make_trainer(cfg, rows, out, console)  # a student or adapter that will not load: refused here
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write to {out}: {exc.strerror}") from None
    write_atomic(out / CONFIG, resolved)
    cut = rows_over_length(trainer.processing_class, rows, cfg.training.max_length)
    manifest["cut_at_max_length"] = cut
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    if cut:
        console.print(f"warning: {cut} of {len(rows)} rows are longer than training.max_length "
                      f"({cfg.training.max_length} tokens) and train on a cut trace; raise it to keep them whole",
                      markup=False)  # fmt: skip

    last = last_complete_checkpoint(out / CHECKPOINTS, console)
    if last:
        console.print(f"resuming from {last}")
    started = time.monotonic()
    with _writes_to(out):
        trainer.train(resume_from_checkpoint=last)
        trainer.save_model(str(out / ADAPTER))
        trainer.processing_class.save_pretrained(str(out / ADAPTER))
        if merge:
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(str(out / MERGED))
            trainer.processing_class.save_pretrained(str(out / MERGED))
    history = trainer.state.log_history
    write_atomic(out / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    losses = [h["loss"] for h in history if "loss" in h]
    result = {
        "rows": len(rows),
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "wall_s": round(time.monotonic() - started, 1),
        "adapter": str(out / ADAPTER),
    }
    # Written last: a re-run with the same rows and settings has nothing to do.
    write_atomic(out / DONE, json.dumps({"inputs": inputs, "result": result}) + "\n")
    return result


def last_complete_checkpoint(checkpoints: Path, console: Console) -> str | None:
    """The newest checkpoint that was saved whole. transformers writes trainer_state.json last,
    so a checkpoint cut short (killed mid-save, disk full) lacks a readable one: it is removed,
    and training resumes from the one before."""
    if not checkpoints.is_dir():
        return None
    steps = sorted((p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)  # fmt: skip
    for path in steps:
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
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
