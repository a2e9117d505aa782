"""The model a bench measures: a student by name (shipped, HF id or folder), or with
`--random-init` a config-only shape (nothing downloaded, random weights) to time a bigger
model's shape on a GPU."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, get_args

from genssd_cli.config import StudentConfig
from genssd_cli.errors import UsageError

RANDOM_INIT_SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}  # fmt: skip
DTYPES = get_args(StudentConfig.model_fields["dtype"].annotation)  # what student.dtype accepts


def model_label(model: str, random_init: str | None) -> str:
    """What a bench's JSON lines call the model."""
    return model if random_init is None else f"random-init {random_init}"


def load_bench_model(model: str, random_init: str | None, device: str, dtype: str = "auto",
                     text: bool = True) -> tuple[Any, Any]:  # fmt: skip
    """(model, tokenizer) on `device`, in eval mode. A random-init shape reads `model`'s tokenizer
    and takes its vocabulary when the bench feeds text (`text`); a bench feeding random ids needs
    no tokenizer, so the shape keeps its own vocabulary and works offline."""
    import torch

    from genssd_cli.models import load_causal_lm, load_tokenizer, resolve_dtype

    if dtype not in DTYPES:
        raise UsageError(f"--dtype: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if random_init is None:
        return load_causal_lm(model, None, None, device, dtype)
    if random_init not in RANDOM_INIT_SHAPES:
        raise UsageError(f"--random-init: unknown shape {random_init!r} (known: {', '.join(RANDOM_INIT_SHAPES)})")
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = dict(RANDOM_INIT_SHAPES[random_init], max_position_embeddings=32768)
    if text:
        tokenizer = load_tokenizer(model, "--model")
        if tokenizer.pad_token_id is None:  # as load_causal_lm: batches are padded
            tokenizer.pad_token = tokenizer.eos_token
        shape["vocab_size"] = len(tokenizer)
    else:
        tokenizer = SimpleNamespace(pad_token_id=0)
    torch.manual_seed(0)  # the same weights in every process, and for every load in one
    config = Qwen2Config(**shape)
    lm = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, resolve_dtype(dtype, device)))
    return lm.to(device).eval(), tokenizer
