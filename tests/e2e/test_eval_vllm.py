"""genssd eval's vLLM path against real vLLM (its CPU build, in the venv `make setup-vllm` makes),
through the real CLI: the same samples as HF generate, adapter included, and `genssd bench eval`
comparing the same prompts. What genssd hands to vLLM and reads back, against a stand-in `vllm`
module, is in tests/eval/test_vllm_backend.py."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, STUDENT, genssd, train_adapter_on_questions


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
