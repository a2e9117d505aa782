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
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from genssd_cli.config import StudentConfig, TrainConfig, load_run_config, load_train_config
from genssd_cli.errors import UsageError
from genssd_cli.store import CONFIG, TRAJECTORIES

ADAPTER = "adapter"
MERGED = "merged"
CHECKPOINTS = "checkpoints"
DONE = "done.json"


def build_dataset(run_dirs: list[Path], include_incorrect: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows to train on (correct ones unless asked otherwise), duplicates dropped, and a manifest."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    manifest: dict[str, Any] = {"runs": [], "include_incorrect": include_incorrect, "duplicates_dropped": 0}
    for run_dir in run_dirs:
        path = run_dir / TRAJECTORIES
        if not run_dir.is_dir():
            raise UsageError(f"run directory not found: {run_dir}")
        if not path.is_file():
            raise UsageError(f"{run_dir} has no {TRAJECTORIES}: not a genssd run directory, or no session ended")
        found = used = correct = 0
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                row = json.loads(line)
                prompt, completion, is_correct = row["prompt"], row["completion"], bool(row["correct"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{path} line {number}: not a trajectory row") from None
            found += 1
            correct += is_correct
            if not (is_correct or include_incorrect):
                continue
            digest = hashlib.sha256(json.dumps([prompt, completion], sort_keys=True).encode()).hexdigest()
            if digest in seen:
                manifest["duplicates_dropped"] += 1
                continue
            seen.add(digest)
            rows.append({"prompt": prompt, "completion": completion, "problem_id": row.get("problem_id"),
                         "run": str(run_dir), "sha256": digest[:16]})  # fmt: skip
            used += 1
        manifest["runs"].append({"dir": str(run_dir), "trajectories": found, "correct": correct, "used": used})
    manifest["rows"] = len(rows)
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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write to {out}: {exc.strerror}") from None
    import yaml

    resolved = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    inputs = hashlib.sha256(json.dumps([resolved, [r["sha256"] for r in rows], merge]).encode()).hexdigest()[:16]
    done = _read_done(out)
    if done.get("inputs") == inputs:
        console.print(f"already trained on these rows with these settings: {out / ADAPTER}")
        return done["result"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (out / CONFIG).write_text(resolved, encoding="utf-8")

    trainer = make_trainer(cfg, rows, out, console)
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out / CHECKPOINTS)) if (out / CHECKPOINTS).is_dir() else None
    if last:
        console.print(f"resuming from {last}")
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(out / ADAPTER))
    trainer.processing_class.save_pretrained(str(out / ADAPTER))
    history = trainer.state.log_history
    (out / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
    if merge:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(out / MERGED))
        trainer.processing_class.save_pretrained(str(out / MERGED))
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
    (out / DONE).write_text(json.dumps({"inputs": inputs, "result": result}) + "\n", encoding="utf-8")
    return result


def _read_done(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def make_trainer(cfg: TrainConfig, rows: list[dict[str, Any]], out: Path, console: Console, loaded=None):
    """`loaded`: an already loaded (model, tokenizer), e.g. a random-init shape for `genssd bench train`."""
    import warnings

    import datasets
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()  # our progress lines are the terminal's output
    # transformers renames gradient_checkpointing; TRL still passes the old name. Not the user's to fix.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)

    from genssd_cli.models import load_causal_lm, pick_device

    student, training, lora = cfg.student, cfg.training, cfg.lora
    device = pick_device(student.device)
    if loaded is None:
        loaded = load_causal_lm(
            student.model, student.gguf_file, student.adapter, device, student.dtype, trainable=True
        )
    model, tokenizer = loaded
    on_gpu = device == "cuda"
    args = SFTConfig(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=training.epochs,
        learning_rate=training.learning_rate,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.grad_accum,
        warmup_steps=training.warmup_steps,
        seed=training.seed,
        max_length=training.max_length,
        logging_steps=training.logging_steps,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=2,
        completion_only_loss=True,  # prompt tokens are labelled -100
        report_to="none",
        disable_tqdm=True,  # our own progress lines (ProgressLines) instead
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=on_gpu,
    )
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    # A student that already has an adapter (e.g. cold-started) trains that adapter further, so
    # the result is still one adapter on the base model; its LoRA shape is the adapter's own.
    peft_config = None if student.adapter else LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer_class = SFTTrainer if on_gpu else plain_loss_trainer(SFTTrainer)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[progress_lines(console)],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts
    return trainer


def plain_loss_trainer(sft_trainer: type) -> type:
    """SFTTrainer with the model's own cross-entropy loss. TRL's fused LM head saves GPU memory
    (no full logits) but off Triton it scores every position and adds entropy and accuracy
    metrics: on 2 CPU cores it took ~1/3 of each step (profiled). Same loss, same masking."""
    from transformers import Trainer

    class PlainLossSFTTrainer(sft_trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training and "attention_mask" in inputs:  # TRL's token count, for tokens/s
                self._total_train_tokens += int(inputs["attention_mask"].sum())
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return PlainLossSFTTrainer


def progress_lines(console: Console):
    """A line per logging step: step/total, loss, tokens/s, ETA."""
    from transformers import TrainerCallback

    class ProgressLines(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()
            self.first_step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            elapsed = time.monotonic() - self.started
            done = max(state.global_step - self.first_step, 1)
            eta = elapsed / done * (state.max_steps - state.global_step)
            tokens = float(logs.get("num_tokens", 0))  # TRL: tokens seen so far
            rate = f" | {tokens / elapsed:.0f} tokens/s" if tokens and elapsed > 0 else ""
            console.print(
                f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f}{rate} | "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s",
                highlight=False,
            )

    return ProgressLines()
