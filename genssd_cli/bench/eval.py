"""`genssd bench eval`: `genssd eval`'s generation loop (HF `generate_batch`, or the vLLM
generator with `--backend vllm`) against plain HF `generate` on the same batches of bundled
GSM8K prompts, both greedy with the same new-token limit. Each prints one JSON line; then one
line with the ratio."""

from __future__ import annotations

import tempfile
import time

from genssd_cli.bench import device_name, ratio_line, synchronize
from genssd_cli.bench.models import load_bench_model


def bench_eval(
    model: str, random_init: str | None, rows: int, batch_size: int, max_new_tokens: int, backend: str = "hf"
) -> list[dict]:
    import torch

    from genssd_cli.config import DataConfig, EvalConfig
    from genssd_cli.eval.generation import generate_batch
    from genssd_cli.models import chat_prompt, pick_device
    from genssd_cli.problems import load_problems, load_prompt, render_prompt

    device = pick_device("auto")
    lm, tokenizer = load_bench_model(model, random_init, device)
    template = load_prompt("student")
    prompts = [chat_prompt(tokenizer, render_prompt(template, p.question))
               for p in load_problems(DataConfig(source="gsm8k-test"), rows)]  # fmt: skip
    batches = [prompts[b : b + batch_size] for b in range(0, len(prompts), batch_size)]
    cfg = EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, backend=backend)
    eos = set(_as_list(lm.generation_config.eos_token_id or tokenizer.eos_token_id))

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
    synchronize(device)
    plain = _eval_line("plain_hf_generate", len(prompts), new_tokens, time.perf_counter() - started, device)

    if backend == "vllm":
        ours, name = _vllm_eval_loop(lm, tokenizer, model, random_init, batches, cfg), "genssd_eval_vllm"
    else:

        def ours(batch: list[str]):
            return generate_batch(lm, tokenizer, batch, cfg, 1, 0)

        name = "genssd_eval"
    started = time.perf_counter()
    ours_tokens = sum(g.tokens for batch in batches for [g] in ours(batch))
    synchronize(device)
    line = _eval_line(name, len(prompts), ours_tokens, time.perf_counter() - started, device)
    if backend == "vllm":
        ours.close()
    return [line, plain, ratio_line("eval", line, plain, "new_tokens_per_s")]


class _VllmLoop:
    """The vLLM generator over the bench's batches, warmed up like the HF loops."""

    def __init__(self, source: str, batches: list[list[str]], cfg):
        from genssd_cli.eval.vllm_backend import VllmGenerator, use_vllm

        use_vllm(cfg)  # one line when vLLM is not installed
        self.generate, self.cfg = VllmGenerator(source, None, cfg), cfg
        self.generate(batches[0], cfg.model_copy(update={"max_new_tokens": 8}), 1, 0)

    def __call__(self, batch: list[str]):
        return self.generate(batch, self.cfg, 1, 0)

    def close(self) -> None:
        self.generate.close()


def _vllm_eval_loop(lm, tokenizer, model: str, random_init: str | None, batches, cfg) -> _VllmLoop:
    """vLLM loads from a folder: the model's own, or the random-init weights saved to one."""
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
    return {"bench": "eval", "method": method, "device": device_name(device), "prompts": prompts,
            "new_tokens": tokens, "seconds": round(seconds, 3),
            "new_tokens_per_s": round(tokens / seconds, 1)}  # fmt: skip
