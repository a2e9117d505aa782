"""Eval generation through vLLM, when it is installed and a GPU is there (`backend: auto`), or
when asked for (`backend: vllm`, which also runs vLLM's CPU build). The adapter goes in as vLLM's
LoRA request, no merged copy of the model; prompts go in as token ids, tokenized as the HF path
does (no second BOS); each generation comes back as the same `Generated` row the HF path writes."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from genssd_cli.config import EvalConfig
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.eval.generation import Generated
from genssd_cli.models import resolve_dtype

# vLLM preallocates LoRA buffers for one of these ranks.
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)

# vLLM's CPU build: its default reserves 92 % of the memory (refused on any machine already in
# use), and compiling the model costs minutes per shape, more than a short eval generates.
_CPU_DEFAULTS = {"gpu_memory_utilization": 0.3, "enforce_eager": True}


def use_vllm(cfg: EvalConfig) -> bool:
    installed = importlib.util.find_spec("vllm") is not None
    if cfg.backend == "vllm":
        if not installed:
            raise UsageError("backend vllm: vLLM is not installed (pip install vllm); or use backend auto or hf")
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


def engine_args(source: str, adapter: str | None, cfg: EvalConfig, platform: str) -> dict[str, Any]:
    """What `LLM(...)` gets: the model, its LoRA slot, the platform's defaults, then the config's
    `vllm_args` (the user's word wins)."""
    if cfg.device not in ("auto", platform):
        raise UsageError(f"backend vllm: this vLLM runs on {platform}, not on device {cfg.device}")
    args: dict[str, Any] = {"model": source, "dtype": resolve_dtype(cfg.dtype, platform), "seed": cfg.seed}
    if adapter:
        args |= {"enable_lora": True, "max_loras": 1, "max_lora_rank": _lora_rank(adapter)}
    if platform == "cpu":
        args |= _CPU_DEFAULTS
    return args | cfg.vllm_args


class VllmGenerator:
    def __init__(self, source: str, adapter: str | None, cfg: EvalConfig):
        # vLLM logs every engine setting at INFO: the progress bar would drown; warnings still show.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM
        from vllm.lora.request import LoRARequest
        from vllm.platforms import current_platform

        args = engine_args(source, adapter, cfg, current_platform.device_type)
        try:
            self.llm = LLM(**args)
        except TypeError as exc:  # an unknown name in vllm_args
            raise UsageError(f"vllm_args: {exc}") from None
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

    def close(self) -> None:
        """Stop the engine's processes now, so the memory it holds (90 % of a GPU by default) is
        free for whatever runs next in this process (the pipeline's next stage), not at the
        garbage collector's leisure."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
