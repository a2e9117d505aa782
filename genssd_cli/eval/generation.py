"""Eval generation with HF `generate`: batched, left-padded, the student's chat template already
applied to the prompts. `Generated` is the row both backends (this one and vllm_generate.py)
hand back to `genssd eval`."""

from __future__ import annotations

from dataclasses import dataclass

from genssd_cli.config import EvalConfig


@dataclass
class Generated:
    text: str
    tokens: int
    hit_limit: bool  # stopped by max_new_tokens, not by the model


def generate_batch(
    model, tokenizer, prompts: list[str], cfg: EvalConfig, samples: int, seed: int
) -> list[list[Generated]]:
    """One batched `generate`: per prompt, `samples` generations."""
    import torch
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow each prompt directly
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = cfg.temperature > 0
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tokenizer.eos_token_id])
    settings = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=sampling, num_return_sequences=samples,
        temperature=cfg.temperature if sampling else None, top_p=cfg.top_p if sampling else None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_ids),
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(**encoded, generation_config=settings)
    new = output[:, encoded["input_ids"].shape[1] :].tolist()
    results = []
    for p in range(len(prompts)):
        row = []
        for ids in new[p * samples : (p + 1) * samples]:
            end = next((i for i, t in enumerate(ids) if t in eos_ids), None)
            kept = ids if end is None else ids[:end]
            text = tokenizer.decode(kept, skip_special_tokens=True)
            row.append(Generated(text, len(kept) + (end is not None), end is None))
        results.append(row)
    return results
