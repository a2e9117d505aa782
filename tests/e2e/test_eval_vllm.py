"""genssd eval's vLLM path. Against a stand-in `vllm` module (a GPU build's platform): what is
handed to vLLM (model folder, LoRA request for the adapter, sampling settings, prompts as token ids
without a second BOS) and what comes back into samples.jsonl. Against real vLLM (its CPU build, in
the venv `make setup-vllm` makes): the same samples as HF generate, adapter included."""

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, STUDENT, genssd, save_adapter_of_another_model, train_adapter_on_questions
from rich.console import Console

from genssd_cli.config import EvalConfig
from genssd_cli.errors import UsageError
from genssd_cli.eval.command import eval_command
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
    metrics = eval_command("smollm2-135m-instruct", str(trained_adapter), "gsm8k", 3, 2, out, None,
                           ["backend=vllm", "temperature=0.7", "max_new_tokens=32", "batch_size=2"],
                           Console(quiet=True))  # fmt: skip
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
        eval_command("smollm2-135m-instruct", None, "gsm8k", 1, 1, tmp_path / "e", None, ["backend=vllm"],
                     Console(quiet=True))  # fmt: skip
    with pytest.raises(UsageError, match="this vLLM runs on cuda, not on device cpu"):
        stand_in_vllm(monkeypatch)
        eval_command("smollm2-135m-instruct", None, "gsm8k", 1, 1, tmp_path / "e", None,
                     ["backend=vllm", "device=cpu"], Console(quiet=True))  # fmt: skip


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


def vllm_python() -> Path:
    """The venv with real vLLM (`make setup-vllm`; `make test` passes it as GENSSD_VLLM_PYTHON).
    Missing: skipped on a developer's machine, a failure in CI."""
    path = Path(os.environ.get("GENSSD_VLLM_PYTHON") or ROOT / ".venv-vllm/bin/python")
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail("no venv with vLLM: `make test` makes one (make setup-vllm)")
        pytest.skip("no venv with vLLM (make setup-vllm)")
    return path


def genssd_with_vllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(vllm_python()), "-m", "genssd_cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)  # fmt: skip


@pytest.mark.slow
def test_real_vllm_with_an_adapter_writes_what_hf_generate_writes(tmp_path):
    vllm_python()
    adapter = train_adapter_on_questions(tmp_path)
    # Default settings but the size: `backend` is not a results setting, so both must write the same.
    args = ["eval", STUDENT, "--dataset", "gsm8k", "--limit", "4", "--set", "max_new_tokens=40",
            "--set", "batch_size=4"]  # fmt: skip
    vllm = genssd_with_vllm(*args, "--adapter", str(adapter), "--set", "backend=vllm", "--out", str(tmp_path / "vllm"))
    assert vllm.returncode == 0, vllm.stderr[-3000:]
    hf = genssd(*args, "--adapter", str(adapter), "--set", "backend=hf", "--out", str(tmp_path / "hf"))
    assert hf.returncode == 0, hf.stderr
    base = genssd(*args, "--set", "backend=hf", "--out", str(tmp_path / "base"))
    assert base.returncode == 0, base.stderr

    def samples(name: str) -> dict[str, dict]:
        rows = [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        return {row["problem_id"]: row for row in rows}

    through_vllm, through_hf, untuned = samples("vllm"), samples("hf"), samples("base")
    assert len(through_vllm) == 4 and through_vllm.keys() == through_hf.keys()
    for problem_id, row in through_vllm.items():
        other = through_hf[problem_id]
        assert {k: row[k] for k in other} == other, problem_id  # text, tokens, limit, answer, verdict
    # The adapter took effect in vLLM (its LoRA request), not only in HF's peft model.
    assert any(through_vllm[p]["generation"] != untuned[p]["generation"] for p in untuned)
    metrics = json.loads((tmp_path / "vllm" / "metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "hf" / "metrics.json").read_text())


@pytest.mark.slow
def test_bench_eval_through_real_vllm_compares_the_same_prompts():
    result = genssd_with_vllm("bench", "eval", "--backend", "vllm", "--rows", "2", "--batch-size", "2",
                              "--max-new-tokens", "8")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ours, plain, ratio = (json.loads(line) for line in result.stdout.splitlines() if line.startswith("{"))
    assert (ours["method"], plain["method"]) == ("genssd_eval_vllm", "plain_hf_generate")
    # Greedy on both, same dtype: the same tokens come out.
    assert ours["prompts"] == plain["prompts"] == 2 and 0 < ours["new_tokens"] == plain["new_tokens"] <= 16
    assert ratio["ratio"] == "genssd_eval_vllm / plain_hf_generate" and ratio["speedup"] > 0
