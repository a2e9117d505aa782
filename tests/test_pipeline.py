"""`genssd pipeline` end to end: a local teacher server process, the real demo student, real TRL."""

import json

import pytest
import yaml
from conftest import genssd, run_config, write_config

pytestmark = pytest.mark.slow


def test_pipeline_chains_cold_start_run_and_training_and_resumes(tmp_path, fake_teacher):
    server = fake_teacher()
    write_config(tmp_path / "run.yaml", run_config(server.base_url, data={"count": 3}))
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump({
        "run_config": "run.yaml",
        "cold_start": {"set": ["method=standard-kd", "data.seed=1", "search.max_new_tokens=24"]},
        "methods": ["genssd"],
        "distill": {"include_incorrect": True, "set": ["training.epochs=1", "training.batch_size=2"]},
    }))  # fmt: skip
    out = tmp_path / "out"
    first = genssd("pipeline", str(tmp_path / "pipe.yaml"), "--out", str(out))
    assert first.returncode == 0, first.stderr
    record = json.loads((out / "pipeline.json").read_text())
    assert list(record["stages"]) == ["cold-start/run", "cold-start/train", "genssd/run", "genssd/train", "report"]
    assert "done: 5 stages" in first.stdout

    # The cold start used the baseline; the Gen-SSD run was scored by the cold-started student.
    cold = yaml.safe_load((out / "cold-start/run/config.yaml").read_text())
    assert cold["method"] == "standard-kd" and cold["student"]["adapter"] is None
    gen = yaml.safe_load((out / "genssd/run/config.yaml").read_text())
    assert gen["method"] == "genssd"
    assert gen["student"]["adapter"] == str((out / "cold-start/train/adapter").resolve())
    # Distillation continued that adapter: one adapter on the base model, trained further.
    trained = yaml.safe_load((out / "genssd/train/config.yaml").read_text())
    assert trained["student"]["adapter"] == gen["student"]["adapter"]
    assert (out / "genssd/train/adapter/adapter_model.safetensors").is_file()
    assert record["stages"]["genssd/train"]["steps"] == 2  # 3 rows, batch 2, 1 epoch
    assert "| trajectories kept | 3 |" in (out / "report/report.md").read_text()

    # Again: every stage is already done; nothing is asked of the teacher, nothing retrained.
    asked = len(server.requests())
    again = genssd("pipeline", str(tmp_path / "pipe.yaml"), "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert len(server.requests()) == asked
    assert again.stdout.count("nothing to do") == 2 and again.stdout.count("already trained") == 2
    # The first session's stage times are kept: the second adds only its own (short) time.
    rerun = json.loads((out / "pipeline.json").read_text())
    for name, first_stage in record["stages"].items():
        assert rerun["stages"][name]["wall_s"] >= first_stage["wall_s"], name
    assert rerun["wall_s"] >= record["wall_s"]


def test_pipeline_bad_config_is_one_line(tmp_path):
    (tmp_path / "pipe.yaml").write_text("methods: [magic]\n")
    result = genssd("pipeline", str(tmp_path / "pipe.yaml"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: config") and "methods.0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_stage_names_with_one_and_with_several_benchmarks(tmp_path):
    from genssd_cli.config import load_pipeline_config
    from genssd_cli.paths import bundled_dir
    from genssd_cli.pipeline import stage_names

    evals, names = stage_names(load_pipeline_config(bundled_dir("configs") / "compare-demo.yaml"))
    assert evals == {"eval": "gsm8k"}
    assert names[:3] == ["base/eval", "cold-start/run", "cold-start/train"]
    assert names[3:6] == ["genssd/run", "genssd/train", "genssd/eval"] and names[-1] == "report"
    assert len(names) == 3 + 3 * 3 + 1
    evals, names = stage_names(load_pipeline_config(bundled_dir("configs") / "paper-pipeline.yaml"))
    assert evals == {"eval-gsm8k-hf": "gsm8k-hf", "eval-math-500": "math-500"}
    assert names[:2] == ["base/eval-gsm8k-hf", "base/eval-math-500"]
    assert "posthoc-ppl/eval-math-500" in names
    evals, _ = stage_names(load_pipeline_config(bundled_dir("configs") / "pipeline-demo.yaml",
                                                ["eval.dataset=[gsm8k, data/my-set.jsonl]"]))  # fmt: skip
    assert evals == {"eval-gsm8k": "gsm8k", "eval-my-set": "data/my-set.jsonl"}


@pytest.mark.parametrize("bench", ["[]", "[gsm8k, gsm8k]"])
def test_eval_benchmarks_are_some_and_each_once(tmp_path, bench):
    (tmp_path / "pipe.yaml").write_text(f"eval:\n  bench: {bench}\n")
    result = genssd("pipeline", str(tmp_path / "pipe.yaml"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "give at least one eval dataset, each once" in result.stderr and len(result.stderr.strip().splitlines()) == 1
