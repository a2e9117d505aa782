"""The student's LoRA trainer: TRL's SFTTrainer with peft, set up for the device (bf16 and
gradient checkpointing on a GPU, plain fp32 and the model's own loss on a CPU), with progress
lines instead of raw log dicts. `genssd train` drives it; `genssd bench train` times it.

Under a launcher (torchrun, `accelerate launch`, `genssd train --processes N`) every process
builds the same trainer: one device each (its LOCAL_RANK's GPU, or the CPU over gloo), the
global batch of one process kept (`batch_layout`), rank 0 the only one that prints."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from genssd_cli.config import TrainConfig
from genssd_cli.errors import UsageError

CHECKPOINTS = "checkpoints"
SAVED_BY_ALL = "saved-by-all.json"  # in a checkpoint of several processes: every process saved its part
_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")  # as genssd found it


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
    check_trackers(training.report_to)
    if "tensorboard" in training.report_to:
        # Event files beside the adapter, not under checkpoints/ (rotated away); set for each
        # training, since a pipeline trains several times in one process. A user's own setting wins.
        os.environ["TENSORBOARD_LOGGING_DIR"] = _USER_TENSORBOARD_DIR or str(out / "tensorboard")
    device = pick_device(student.device)
    processes = world_size()
    on_gpu = device == "cuda"
    if processes > 1 and on_gpu:
        here = int(os.environ.get("LOCAL_WORLD_SIZE", processes))  # every process of this machine refuses alike
        if here > torch.cuda.device_count():
            raise UsageError(f"{here} training processes on this machine, {torch.cuda.device_count()} GPUs "
                             "visible: one GPU per process")  # fmt: skip
        torch.cuda.set_device(local_rank())  # "cuda" is this process's own GPU from here on
    if loaded is None:
        loaded = load_causal_lm(
            student.model, student.gguf_file, student.adapter, device, student.dtype, trainable=True
        )
    model, tokenizer = loaded
    batch_size, grad_accum = batch_layout(training.batch_size, training.grad_accum, processes)
    args = SFTConfig(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=training.epochs,
        learning_rate=training.learning_rate,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        warmup_steps=training.warmup_steps,
        seed=training.seed,
        max_length=training.max_length,
        logging_steps=training.logging_steps,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=2,
        completion_only_loss=True,  # prompt tokens are labelled -100
        report_to=training.report_to or "none",
        run_name=training.run_name or out.name,
        disable_tqdm=True,  # our own progress lines (ProgressLines) instead
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=on_gpu,
        # Every LoRA weight gets a gradient each step: DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False if processes > 1 else None,
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
        callbacks=[progress_lines(console)] + ([saved_by_all(processes)] if processes > 1 else []),
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts
    return trainer


def world_size() -> int:
    """How many processes train together: the launcher's WORLD_SIZE (torchrun and `accelerate launch`
    set it, with RANK and LOCAL_RANK), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else 0


def is_main_process() -> bool:
    """Rank 0: the one process that writes genssd's files and prints."""
    return rank() == 0


def batch_layout(batch_size: int, grad_accum: int, processes: int) -> tuple[int, int]:
    """Rows per process and accumulation steps for `processes` data-parallel processes that keep
    one process's global batch (batch_size * grad_accum rows per optimizer step), so the steps, the
    learning-rate schedule and a comparison with a one-process training stay the same. The
    accumulation is divided first (each process's memory stays as configured), then the batch.
    When batch_size * grad_accum is no multiple of `processes`, both stay as configured: the global
    batch grows `processes`-fold (the caller warns)."""
    total = batch_size * grad_accum
    if total % processes:
        return batch_size, grad_accum
    share = total // processes
    rows = max(b for b in range(1, min(batch_size, share) + 1) if share % b == 0)
    return rows, share // rows


def agreed(value: Any) -> Any:
    """Rank 0's `value`, on every process (one process: `value`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def end_process_group() -> None:
    """Torn down before exit: NCCL warns about a group left for the interpreter to destroy."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def saved_by_all(processes: int):
    """Rank 0 writes trainer_state.json while another process may still be writing its part of the
    checkpoint (its RNG state): once all have saved (a barrier), rank 0 marks the checkpoint whole."""
    import torch.distributed as dist
    from transformers import TrainerCallback

    from genssd_cli.files import write_atomic

    class SavedByAll(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            dist.barrier()
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                write_atomic(folder / SAVED_BY_ALL, json.dumps({"processes": processes}) + "\n")

    return SavedByAll()


def check_trackers(report_to: list[str]) -> None:
    """Each tracker named is one transformers knows and its package is installed: one line
    before the model loads, not an error from deep inside the trainer."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    for name in report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(INTEGRATION_TO_CALLBACK)
            raise UsageError(f"training.report_to: unknown tracker {name!r} (one of {known})")
        if name not in get_available_reporting_integrations():
            raise UsageError(f"training.report_to: {name} is not installed here (pip install {name})")


def rows_over_length(tokenizer, rows: list[dict[str, Any]], max_length: int) -> int:
    """Rows whose whole conversation (the student's chat template) is longer than max_length:
    TRL cuts them, so they train on a partial trace."""

    def length(row: dict[str, Any]) -> int:
        text = tokenizer.apply_chat_template([*row["prompt"], *row["completion"]], tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return sum(length(r) > max_length for r in rows)


def plain_loss_trainer(sft_trainer: type) -> type:
    """SFTTrainer with the model's own cross-entropy loss. TRL's fused LM head saves GPU memory
    (no full logits) but off Triton it scores every position and adds entropy and accuracy
    metrics: on 2 CPU cores it took ~1/3 of each step (profiled). Same loss, same masking."""
    from transformers import Trainer

    class PlainLossSFTTrainer(sft_trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training and "attention_mask" in inputs:  # TRL's token count (all processes), for tokens/s
                self._total_train_tokens += int(
                    self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum()
                )
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
            if not logs or "loss" not in logs or not state.is_world_process_zero:
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
