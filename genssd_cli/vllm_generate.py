"""Eval generation through vLLM, when it is installed and a GPU is there (`backend: auto`), or
when asked for (`backend: vllm`). The adapter goes in as vLLM's LoRA request, no merged copy of
the model; prompts go in as token ids, tokenized as the HF path does (no second BOS); each
generation comes back as the same `Generated` row the HF path writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from genssd_cli.config import EvalConfig
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.eval import Generated

# vLLM preallocates LoRA buffers for one of these ranks.
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def use_vllm(cfg: EvalConfig) -> bool:
    installed = importlib.util.find_spec("vllm") is not None
    if cfg.backend == "vllm":
        if not installed:
            raise UsageError("backend vllm: vLLM is not installed (pip install vllm); or use backend auto or hf")
        if cfg.device in ("cpu", "mps"):
            raise UsageError(f"backend vllm needs a CUDA device, not device {cfg.device}")
        return True
    if cfg.backend == "hf" or cfg.device in ("cpu", "mps") or not installed:
        return False
    import torch

    return torch.cuda.is_available()


def _lora_rank(adapter: str) -> int:
    path = Path(adapter, "adapter_config.json")
    try:
        rank = int(json.loads(path.read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"student adapter not found: {adapter} (no readable adapter_config.json)") from None
    return next((r for r in _LORA_RANKS if r >= rank), rank)


class VllmGenerator:
    def __init__(self, source: str, adapter: str | None, cfg: EvalConfig):
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        lora = {"enable_lora": True, "max_loras": 1, "max_lora_rank": _lora_rank(adapter)} if adapter else {}
        try:
            self.llm = LLM(model=source, dtype=cfg.dtype, seed=cfg.seed, **lora)
        except (OSError, ValueError, RuntimeError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RuntimeFailure(f"vLLM could not load {source}: {reason}") from None
        self.lora_request = LoRARequest("adapter", 1, str(Path(adapter).resolve())) if adapter else None
        self.tokenizer = self.llm.get_tokenizer()

    def __call__(self, prompts: list[str], cfg: EvalConfig, samples: int, seed: int) -> list[list[Generated]]:
        from vllm import SamplingParams

        params = SamplingParams(n=samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_tokens=cfg.max_new_tokens, seed=seed)  # fmt: skip
        inputs = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        outputs = self.llm.generate(inputs, params, lora_request=self.lora_request, use_tqdm=False)
        return [
            [Generated(c.text, len(c.token_ids), c.finish_reason == "length") for c in output.outputs]
            for output in outputs
        ]
