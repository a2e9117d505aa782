"""genssd eval's vLLM path against a stand-in `vllm` module (vLLM needs a CUDA GPU, which this
machine lacks): what is handed to vLLM (model folder, LoRA request for the adapter, sampling
settings, prompts as token ids without a second BOS) and what comes back into samples.jsonl."""

import importlib.machinery
import importlib.util
import json
import sys
import types
from dataclasses import dataclass, field

import pytest
from conftest import save_adapter_of_another_model
from rich.console import Console

from genssd_cli.errors import UsageError
from genssd_cli.eval import eval_command


@dataclass
class Output:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class Calls:
    init: dict = field(default_factory=dict)
    generate: list = field(default_factory=list)


def stand_in_vllm(monkeypatch) -> Calls:
    from transformers import AutoTokenizer

    calls = Calls()

    class LLM:
        def __init__(self, **kwargs):
            calls.init = kwargs
            self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"])

        def get_tokenizer(self):
            return self.tokenizer

        def generate(self, inputs, params, lora_request=None, use_tqdm=True):
            calls.generate.append((inputs, params, lora_request))
            return [types.SimpleNamespace(outputs=[
                Output(f"So the answer is {k}.", [5] * (3 + k), "length" if k else "stop") for k in range(params.n)
            ]) for _ in inputs]  # fmt: skip

    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    module("vllm", LLM=LLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw))
    module("vllm.lora")
    module("vllm.lora.request", LoRARequest=lambda name, id_, path: ("lora", name, id_, path))
    return calls


def test_eval_through_vllm_with_an_adapter(tmp_path, monkeypatch):
    from genssd_cli.models import student_model_dir

    trained_adapter = tmp_path / "adapter"
    save_adapter_of_another_model(trained_adapter)  # vLLM's stand-in reads only its rank (4)
    calls = stand_in_vllm(monkeypatch)
    out = tmp_path / "eval"
    metrics = eval_command("smollm2-135m-instruct", str(trained_adapter), "gsm8k", 3, 2, out, None,
                           ["backend=vllm", "temperature=0.7", "max_new_tokens=32", "batch_size=2"],
                           Console(quiet=True))  # fmt: skip
    assert calls.init["model"] == str(student_model_dir("smollm2-135m-instruct"))
    assert calls.init["enable_lora"] is True and calls.init["max_lora_rank"] == 8  # vLLM's smallest rank
    assert len(calls.generate) == 2  # 3 problems in batches of 2
    _, params, lora = calls.generate[0]
    assert lora == ("lora", "adapter", 1, str(trained_adapter.resolve()))
    assert (params.n, params.temperature, params.max_tokens) == (2, 0.7, 32)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    tokenizer = calls_tokenizer(calls)
    for row in samples:
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert {"prompt_token_ids": ids} in [i for inputs, _, _ in calls.generate for i in inputs]
        k = row["sample"]
        assert row["generation"] == f"So the answer is {k}." and row["answer"] == str(k)
        assert row["tokens"] == 3 + k and row["hit_limit"] == bool(k)
    assert metrics["problems"] == 3 and "pass_at_k" in metrics


def calls_tokenizer(calls: Calls):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(calls.init["model"])


def test_backend_vllm_without_vllm_is_one_clear_error(tmp_path, monkeypatch):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(UsageError, match="vLLM is not installed"):
        eval_command("smollm2-135m-instruct", None, "gsm8k", 1, 1, tmp_path / "e", None, ["backend=vllm"],
                     Console(quiet=True))  # fmt: skip
    with pytest.raises(UsageError, match="needs a CUDA device"):
        stand_in_vllm(monkeypatch)
        eval_command("smollm2-135m-instruct", None, "gsm8k", 1, 1, tmp_path / "e", None,
                     ["backend=vllm", "device=cpu"], Console(quiet=True))  # fmt: skip
