"""`genssd bench train`: `genssd train`'s loop (TRL SFTTrainer + peft) against a plain peft loop
on the same model shape, LoRA settings and tokenized batches: forward, backward, AdamW step,
nothing else. Each prints one JSON line; then one line with the ratio."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from genssd_cli.bench import device_name, ratio_line, synchronize
from genssd_cli.bench.models import load_bench_model


@dataclass(frozen=True)
class TrainBench:
    """`genssd bench train`'s flags."""

    model: str  # shipped name, HF id or folder
    random_init: str | None  # a config-only shape, e.g. qwen2.5-1.5b
    rows: int
    steps: int
    batch_size: int
    max_length: int
    lora_r: int


def bench_train(bench: TrainBench) -> list[dict]:
    import torch
    from rich.console import Console

    from genssd_cli.config import LoraSettings, StudentConfig, TrainConfig, TrainingSettings
    from genssd_cli.models import pick_device
    from genssd_cli.problems import generate_arith
    from genssd_cli.train.trainer import make_trainer

    model, random_init, steps, batch_size = bench.model, bench.random_init, bench.steps, bench.batch_size
    rows, max_length, lora_r = bench.rows, bench.max_length, bench.lora_r
    device = pick_device("auto")
    examples = [
        {"prompt": [{"role": "user", "content": r["question"]}],
         "completion": [{"role": "assistant", "content": r["answer"]}]}
        for r in generate_arith(rows, seed=0)
    ]  # fmt: skip
    cfg = TrainConfig(
        student=StudentConfig(model=model),
        lora=LoraSettings(r=lora_r, alpha=2 * lora_r),
        training=TrainingSettings(epochs=1, batch_size=batch_size, max_length=max_length, save_steps=10**9,
                                  logging_steps=10**9, learning_rate=1e-4),
    )  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="genssd-bench-train-") as tmp:
        loaded = load_bench_model(model, random_init, device)
        # Exactly `steps` batches of rows, one epoch: both loops see the same rows and tokens.
        trainer = make_trainer(cfg, examples[: steps * batch_size], Path(tmp), Console(quiet=True), loaded=loaded)
        data = trainer.train_dataset
        batches = [trainer.data_collator([data[i] for i in range(b, min(b + batch_size, len(data)))])
                   for b in range(0, len(data), batch_size)]  # fmt: skip
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)

        # The plain loop first, so that any first-use cost of the process lands on it, not on ours.
        plain = _plain_peft_model(load_bench_model(model, random_init, device)[0], cfg)
        optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-4)
        plain.train()
        started = time.perf_counter()
        for batch in batches:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            plain(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        plain_line = _train_line("plain_peft_loop", len(batches), tokens, time.perf_counter() - started, device)
        del plain, optimizer

        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        ours = _train_line("genssd_train", trainer.state.global_step, tokens, seconds, device)
    return [ours, plain_line, ratio_line("train", ours, plain_line, "tokens_per_s")]


def _plain_peft_model(lm, cfg):
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    return get_peft_model(lm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                         target_modules=lora.target_modules, task_type="CAUSAL_LM"))  # fmt: skip


def _train_line(method: str, steps: int, tokens: int, seconds: float, device: str) -> dict:
    return {"bench": "train", "method": method, "device": device_name(device), "steps": steps, "tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}  # fmt: skip
