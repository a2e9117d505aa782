"""`genssd bench scoring`: the engine's prefix-cached scorer against a naive full recompute, same
model, same shapes, one process. Each prints one JSON line; then one line with the ratio.

The workload is the engine's in steady state: `trajectories` accepted prefixes of `prefix`
tokens; per step, `n` candidates of `chunk` tokens each; the lowest-PPL candidate is appended
and the next step scores `n` new ones. In a run, a prefix was built chunk by chunk by earlier
steps (each kept chunk's keys and values are those computed when it was scored), so the cached
scorer starts with the prefixes in its cache; building them is timed apart (`prefill_seconds`)
and not counted in candidate tokens/s. Token ids are random (no tokenizer needed, so
`--random-init` shapes work offline); speed does not depend on which ids they are.
"""

from __future__ import annotations

import json
import random
import resource
import time
from types import SimpleNamespace

from genssd_cli.errors import UsageError

# Config-only shapes (no download): for speed measurements on a GPU.
RANDOM_INIT_SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}  # fmt: skip


def load_bench_scorer(model: str, random_init: str | None, device: str, dtype: str, batch_tokens: int | None):
    import torch

    from genssd_cli.config import StudentConfig
    from genssd_cli.models import load_causal_lm, pick_device
    from genssd_cli.student import StudentScorer, default_batch_tokens

    device = pick_device(device)
    if random_init is None:
        cfg = StudentConfig(model=model, device=device, dtype=dtype)
        lm, tokenizer = load_causal_lm(cfg.model, None, None, device, cfg.dtype)
        name = model
    else:
        if random_init not in RANDOM_INIT_SHAPES:
            raise UsageError(f"--random-init: unknown shape {random_init!r} (known: {', '.join(RANDOM_INIT_SHAPES)})")
        from transformers import AutoModelForCausalLM, Qwen2Config

        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            dtype, torch.bfloat16 if device == "cuda" else torch.float32
        )
        config = Qwen2Config(**RANDOM_INIT_SHAPES[random_init], max_position_embeddings=32768)
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(config, dtype=torch_dtype).to(device).eval()
        tokenizer = SimpleNamespace(pad_token_id=0)
        name = f"random-init {random_init}"
    batch_tokens = default_batch_tokens(device, batch_tokens)  # what `genssd run` would use
    return StudentScorer(lm, tokenizer, device, "{question}", batch_tokens, cache_bytes=1 << 40), name


def bench_scoring(
    model: str, random_init: str | None, prefix: int, n: int, chunk: int, trajectories: int, steps: int,
    device: str, dtype: str, batch_tokens: int | None = None,
) -> list[dict]:  # fmt: skip
    import torch

    scorer, name = load_bench_scorer(model, random_init, device, dtype, batch_tokens)
    engine_batch_tokens = scorer.batch_tokens
    vocab = scorer.model.config.get_text_config(decoder=True).vocab_size
    rng = random.Random(0)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(count)]

    prefixes = [tokens(prefix) for _ in range(trajectories)]
    candidates = [[[tokens(chunk) for _ in range(n)] for _ in range(trajectories)] for _ in range(steps)]

    def naive() -> None:
        contexts = [list(p) for p in prefixes]
        for step in range(steps):
            sequences = [(c + cand, len(c)) for t, c in enumerate(contexts) for cand in candidates[step][t]]
            totals = scorer.sequence_nll(sequences)
            for t, context in enumerate(contexts):
                best = min(range(n), key=lambda i: totals[t * n + i])
                context.extend(candidates[step][t][best])

    def prefill() -> None:
        from genssd_cli.kv_cache import PrefixEntry

        for t, context in enumerate(prefixes):
            with torch.inference_mode():
                kv = scorer._extend(None, context[:-1], 0)
            scorer.cache.put(("bench", t), PrefixEntry(context[:-1], kv))

    def cached() -> None:
        contexts = [list(p) for p in prefixes]
        for step in range(steps):  # every trajectory's step in one call, as the scoring queue batches
            batch = [
                (("bench", t), context, [(context + c, len(context)) for c in candidates[step][t]])
                for t, context in enumerate(contexts)
            ]
            for t, scores in enumerate(scorer.score_steps_cached(batch)):
                contexts[t].extend(candidates[step][t][min(range(n), key=lambda i: scores[i].ppl)])
        for t in range(trajectories):
            scorer.forget(("bench", t))

    warm = [(tokens(32), 16)]
    scorer.sequence_nll(warm)  # first-call costs (allocator, kernels) outside the timings
    results = []
    prefill_started = time.perf_counter()
    prefill()
    prefill_seconds = time.perf_counter() - prefill_started
    # The naive scorer batches across trajectories (8192 padded tokens per forward); the cached
    # one uses what `genssd run` would on this device.
    for method, work, budget in (("naive", naive, 8192), ("prefix_cache", cached, engine_batch_tokens)):
        scorer.batch_tokens = budget
        if device_is_cuda := scorer.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before_tokens = scorer.forward_tokens
        started = time.perf_counter()
        work()
        if device_is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        scored = steps * trajectories * n * chunk
        results.append({
            "bench": "scoring", "method": method, "model": name, "device": _device_name(scorer.device),
            "dtype": str(next(scorer.model.parameters()).dtype).removeprefix("torch."),
            "prefix": prefix, "n": n, "chunk": chunk, "trajectories": trajectories, "steps": steps,
            "candidate_tokens": scored, "seconds": round(seconds, 3),
            "candidate_tokens_per_s": round(scored / seconds, 1),
            "forward_tokens": scorer.forward_tokens - before_tokens,
            "peak_memory_mb": _peak_memory_mb(scorer.device),
            "threads": torch.get_num_threads(), "batch_tokens": budget,
        })  # fmt: skip
    results[1]["peak_cache_mb"] = scorer.peak_cache_mb
    results[1]["prefill_seconds"] = round(prefill_seconds, 3)
    results.append({
        "bench": "scoring", "ratio": "prefix_cache / naive",
        "speedup": round(results[1]["candidate_tokens_per_s"] / results[0]["candidate_tokens_per_s"], 2),
    })  # fmt: skip
    return results


def _device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{device} ({platform.processor() or platform.machine()})"


def _peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process peak RSS


def print_lines(results: list[dict]) -> None:
    for line in results:
        print(json.dumps(line), flush=True)


def bench_engine(
    model: str, problems: int, n: int, chunk: int, steps: int, concurrency: int, latency_per_token: float,
) -> list[dict]:  # fmt: skip
    """The whole engine (real student scoring on) against the bundled deterministic teacher
    server with a fixed latency per token: is the allowed teacher concurrency kept busy, and what
    does the engine's own loop cost per candidate?"""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import httpx
    import yaml
    from rich.console import Console

    from genssd_cli.launch import free_port
    from genssd_cli.runner import run_command

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "genssd_cli.fake_teacher", "--port", str(port), "--ignore-n",
         "--latency-per-token", str(latency_per_token)],
    )  # fmt: skip
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base_url}/models", timeout=1.0)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the bench teacher server did not start") from None
                time.sleep(0.1)
        with tempfile.TemporaryDirectory(prefix="genssd-bench-") as tmp:
            config = {
                "teacher": {"model": "fake-teacher", "base_url": base_url, "stop": ["\nQuestion:"],
                            "max_concurrency": concurrency},
                "student": {"model": model},
                "search": {"n": n, "chunk_tokens": chunk, "max_steps": steps, "max_new_tokens": chunk * steps},
                "data": {"source": "arith", "count": problems, "seed": 0},
                "engine": {"max_active_problems": problems, "progress_interval_s": 3600},
            }  # fmt: skip
            path = Path(tmp) / "bench.yaml"
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            summary = run_command(path, Path(tmp) / "run", None, [], False, Console(quiet=True), "")
    finally:
        server.kill()
        server.wait()
    return [{
        "bench": "engine", "model": model, "problems": problems, "n": n, "chunk": chunk, "max_steps": steps,
        "teacher_concurrency": concurrency, "latency_per_token_s": latency_per_token,
        "requests": summary["teacher"]["requests"], "candidates": summary["teacher"]["candidates"],
        "wall_s": summary["wall_s"], **summary["engine"],
    }]  # fmt: skip


def bench_train(model: str, random_init: str | None, rows: int, steps: int, batch_size: int, max_length: int,
                lora_r: int) -> list[dict]:  # fmt: skip
    """`genssd train`'s loop (TRL SFTTrainer + peft) against a plain peft loop on the same model
    shape, LoRA settings and tokenized batches: forward, backward, AdamW step, nothing else."""
    import tempfile
    from pathlib import Path

    import torch
    from rich.console import Console

    from genssd_cli.config import LoraSettings, StudentConfig, TrainConfig, TrainingSettings
    from genssd_cli.data import generate_arith
    from genssd_cli.models import pick_device
    from genssd_cli.train import make_trainer

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

    def load():
        return _load_lm(model, random_init, device)

    results = []
    with tempfile.TemporaryDirectory(prefix="genssd-bench-train-") as tmp:
        # Exactly `steps` batches of rows, one epoch: both loops see the same rows and tokens.
        trainer = make_trainer(cfg, examples[: steps * batch_size], Path(tmp), Console(quiet=True), loaded=load())
        data = trainer.train_dataset
        batches = [trainer.data_collator([data[i] for i in range(b, min(b + batch_size, len(data)))])
                   for b in range(0, len(data), batch_size)]  # fmt: skip
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)

        # The plain loop first, so that any first-use cost of the process lands on it, not on ours.
        plain = _plain_peft_model(load()[0], cfg)
        optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-4)
        plain.train()
        started = time.perf_counter()
        for batch in batches:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            plain(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        plain_line = _train_line("plain_peft_loop", len(batches), tokens, time.perf_counter() - started, device)
        del plain, optimizer

        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        results = [_train_line("genssd_train", trainer.state.global_step, tokens, seconds, device), plain_line]
    results.append({"bench": "train", "ratio": "genssd_train / plain_peft_loop",
                    "speedup": round(results[0]["tokens_per_s"] / results[1]["tokens_per_s"], 3)})  # fmt: skip
    return results


def _load_lm(model: str, random_init: str | None, device: str):
    """The model, or a random-init shape with the model's tokenizer (vocabulary, chat template)."""
    import torch

    from genssd_cli.models import load_causal_lm

    lm, tokenizer = load_causal_lm(model, None, None, device, "auto")
    if random_init is not None:
        from transformers import AutoModelForCausalLM, Qwen2Config

        if random_init not in RANDOM_INIT_SHAPES:
            raise UsageError(f"--random-init: unknown shape {random_init!r} (known: {', '.join(RANDOM_INIT_SHAPES)})")
        shape = {**RANDOM_INIT_SHAPES[random_init], "vocab_size": len(tokenizer)}
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=lm.dtype).to(device).eval()
    return lm, tokenizer


def bench_eval(
    model: str, random_init: str | None, rows: int, batch_size: int, max_new_tokens: int, backend: str = "hf"
) -> list[dict]:
    """`genssd eval`'s generation loop (HF `generate_batch`, or the vLLM generator with `backend`
    vllm) against plain HF `generate` on the same batches of bundled GSM8K prompts, both greedy
    with the same new-token limit."""
    import torch

    from genssd_cli.config import DataConfig, EvalConfig
    from genssd_cli.data import load_problems, load_prompt, render_prompt
    from genssd_cli.eval import generate_batch
    from genssd_cli.models import chat_prompt, pick_device

    device = pick_device("auto")
    lm, tokenizer = _load_lm(model, random_init, device)
    template = load_prompt("student")
    prompts = [chat_prompt(tokenizer, render_prompt(template, p.question))
               for p in load_problems(DataConfig(source="gsm8k-test"), rows)]  # fmt: skip
    batches = [prompts[b : b + batch_size] for b in range(0, len(prompts), batch_size)]
    cfg = EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, backend=backend)
    eos = set(_as_list(lm.generation_config.eos_token_id or tokenizer.eos_token_id))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    # One untimed call first: the process's first-use costs (allocator, kernels) land on neither.
    generate_batch(lm, tokenizer, batches[0], EvalConfig(max_new_tokens=8), 1, 0)
    tokenizer.padding_side = "left"
    new_tokens, started = 0, time.perf_counter()
    for batch in batches:
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            output = lm.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        for ids in output[:, encoded["input_ids"].shape[1] :].tolist():
            end = next((i for i, t in enumerate(ids) if t in eos), None)
            new_tokens += len(ids) if end is None else end + 1
    sync()
    plain = _eval_line("plain_hf_generate", len(prompts), new_tokens, time.perf_counter() - started, device)

    if backend == "vllm":
        ours, name = _vllm_eval_loop(lm, tokenizer, model, random_init, batches, cfg), "genssd_eval_vllm"
    else:
        def ours(batch: list[str]):
            return generate_batch(lm, tokenizer, batch, cfg, 1, 0)

        name = "genssd_eval"
    started = time.perf_counter()
    ours_tokens = sum(g.tokens for batch in batches for [g] in ours(batch))
    sync()
    line = _eval_line(name, len(prompts), ours_tokens, time.perf_counter() - started, device)
    if backend == "vllm":
        ours.close()
    return [line, plain, {"bench": "eval", "ratio": f"{name} / plain_hf_generate",
                          "speedup": round(line["new_tokens_per_s"] / plain["new_tokens_per_s"], 3)}]  # fmt: skip


class _VllmLoop:
    """The vLLM generator over the bench's batches, warmed up like the HF loops."""

    def __init__(self, source: str, batches: list[list[str]], cfg):
        from genssd_cli.vllm_generate import VllmGenerator, use_vllm

        use_vllm(cfg)  # one line when vLLM is not installed
        self.generate, self.cfg = VllmGenerator(source, None, cfg), cfg
        self.generate(batches[0], cfg.model_copy(update={"max_new_tokens": 8}), 1, 0)

    def __call__(self, batch: list[str]):
        return self.generate(batch, self.cfg, 1, 0)

    def close(self) -> None:
        self.generate.close()


def _vllm_eval_loop(lm, tokenizer, model: str, random_init: str | None, batches, cfg) -> _VllmLoop:
    """vLLM loads from a folder: the model's own, or the random-init weights saved to one."""
    import tempfile

    from genssd_cli.models import SHIPPED, student_model_dir

    if random_init is None:
        return _VllmLoop(str(student_model_dir(model)) if model in SHIPPED else model, batches, cfg)
    with tempfile.TemporaryDirectory(prefix="genssd-bench-") as folder:
        lm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return _VllmLoop(folder, batches, cfg)  # the weights are loaded before the folder goes


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _eval_line(method: str, prompts: int, tokens: int, seconds: float, device: str) -> dict:
    return {"bench": "eval", "method": method, "device": _device_name(device), "prompts": prompts,
            "new_tokens": tokens, "seconds": round(seconds, 3),
            "new_tokens_per_s": round(tokens / seconds, 1)}  # fmt: skip


def _plain_peft_model(lm, cfg):
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    return get_peft_model(lm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                         target_modules=lora.target_modules, task_type="CAUSAL_LM"))  # fmt: skip


def _train_line(method: str, steps: int, tokens: int, seconds: float, device: str) -> dict:
    return {"bench": "train", "method": method, "device": _device_name(device), "steps": steps, "tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}  # fmt: skip
