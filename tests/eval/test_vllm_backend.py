"""genssd eval's vLLM backend in process (genssd_cli/eval/), against a stand-in `vllm` module (a
GPU build's platform) and the demo student's real tokenizer, no generation: what is handed to vLLM
(model folder, LoRA request for the adapter, sampling settings, prompts as token ids without a
second BOS), what comes back into samples.jsonl, the engine arguments per platform with the
user's own on top, and one clear error without vLLM or on the wrong device. Real vLLM is in
tests/e2e/test_eval_vllm.py."""

import importlib.machinery
import importlib.util
import json
import sys
import types
from dataclasses import dataclass, field

import pytest
from conftest import save_adapter_of_another_model
from rich.console import Console

from genssd_cli.config import EvalConfig
from genssd_cli.errors import UsageError
from genssd_cli.eval.command import EvalOptions, eval_command
from genssd_cli.eval.vllm_backend import engine_args


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
    module("vllm.platforms", current_platform=types.SimpleNamespace(device_type="cuda"))
    module("vllm.lora")
    module("vllm.lora.request", LoRARequest=lambda name, id_, path: ("lora", name, id_, path))
    return calls


def test_eval_through_vllm_with_an_adapter(tmp_path, monkeypatch):
    from genssd_cli.models import student_model_dir

    trained_adapter = tmp_path / "adapter"
    save_adapter_of_another_model(trained_adapter)  # vLLM's stand-in reads only its rank (4)
    calls = stand_in_vllm(monkeypatch)
    out = tmp_path / "eval"
    options = EvalOptions("smollm2-135m-instruct", "gsm8k", str(trained_adapter), limit=3, samples=2, out=out,
                          overrides=["backend=vllm", "temperature=0.7", "max_new_tokens=32", "batch_size=2"])
    metrics = eval_command(options, Console(quiet=True))
    assert calls.init["model"] == str(student_model_dir("smollm2-135m-instruct"))
    assert calls.init["enable_lora"] is True and calls.init["max_lora_rank"] == 8  # vLLM's smallest rank
    assert "enforce_eager" not in calls.init  # the CPU build's defaults stay off a GPU
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
        eval_command(EvalOptions("smollm2-135m-instruct", "gsm8k", limit=1, out=tmp_path / "e",
                                 overrides=["backend=vllm"]), Console(quiet=True))  # fmt: skip
    with pytest.raises(UsageError, match="this vLLM runs on cuda, not on device cpu"):
        stand_in_vllm(monkeypatch)
        eval_command(EvalOptions("smollm2-135m-instruct", "gsm8k", limit=1, out=tmp_path / "e",
                                 overrides=["backend=vllm", "device=cpu"]), Console(quiet=True))  # fmt: skip


def test_engine_args_platform_defaults_then_the_users_own():
    cfg = EvalConfig(vllm_args={"gpu_memory_utilization": 0.5, "max_model_len": 4096})
    on_gpu = engine_args("m", None, cfg, "cuda")
    assert on_gpu == {"model": "m", "dtype": "bfloat16", "seed": 0, "gpu_memory_utilization": 0.5,
                      "max_model_len": 4096}  # fmt: skip
    on_cpu = engine_args("m", None, EvalConfig(), "cpu")
    assert on_cpu["enforce_eager"] is True and on_cpu["gpu_memory_utilization"] == 0.3
    assert on_cpu["dtype"] == "float32"  # as the HF path: both backends write the same samples
    assert engine_args("m", None, cfg, "cpu")["gpu_memory_utilization"] == 0.5
    with pytest.raises(UsageError, match="runs on cpu, not on device cuda"):
        engine_args("m", None, EvalConfig(device="cuda"), "cpu")
