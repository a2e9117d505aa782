"""`genssd pipeline`: end to end (slow: a local teacher server process, the real demo student, real
TRL), and its stage plan and refusals (fast: nothing is run)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import genssd, run_config, write_config

from genssd_cli.config import load_pipeline_config
from genssd_cli.paths import bundled_dir
from genssd_cli.pipeline.command import stage_names


@pytest.mark.slow
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
    # A stage's time is the whole stage's (loading the student included), not its command's own part.
    training = json.loads((out / "genssd/train/done.json").read_text())["result"]["wall_s"]
    assert record["stages"]["genssd/train"]["wall_s"] > training
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
    one = ["eval.dataset=gsm8k", "eval.limit=20"]
    evals, names = stage_names(load_pipeline_config(bundled_dir("configs") / "compare-demo.yaml", one))
    assert evals == {"eval": "gsm8k"}
    # The cold start is evaluated right after its training: the reference every method starts from.
    assert names[:4] == ["base/eval", "cold-start/run", "cold-start/train", "cold-start/eval"]
    assert names[4:7] == ["genssd/run", "genssd/train", "genssd/eval"] and names[-1] == "report"
    assert len(names) == 4 + 4 * 3 + 1
    evals, names = stage_names(load_pipeline_config(bundled_dir("configs") / "compare-demo.yaml"))
    assert evals == {"eval-arith1-heldout": "arith1-heldout", "eval-gsm8k": "gsm8k"}
    assert names[:2] == ["base/eval-arith1-heldout", "base/eval-gsm8k"]
    assert "morsd/eval-gsm8k" in names and len(names) == 2 + 4 + 4 * 4 + 1
    evals, names = stage_names(load_pipeline_config(bundled_dir("configs") / "paper-pipeline.yaml"))
    assert evals == {"eval-gsm8k-hf": "gsm8k-hf", "eval-math-500": "math-500", "eval-aime24": "aime24"}
    assert names[:3] == ["base/eval-gsm8k-hf", "base/eval-math-500", "base/eval-aime24"]
    assert names[3:8] == ["cold-start/run", "cold-start/train", "cold-start/eval-gsm8k-hf", "cold-start/eval-math-500",
                          "cold-start/eval-aime24"]  # fmt: skip
    assert names[8] == "genssd/run" and "posthoc-ppl/eval-math-500" in names
    mine = ["eval.dataset=[gsm8k, data/my-set.jsonl]", "eval.limit=5"]
    evals, _ = stage_names(load_pipeline_config(bundled_dir("configs") / "pipeline-demo.yaml", mine))
    assert evals == {"eval-gsm8k": "gsm8k", "eval-my-set": "data/my-set.jsonl"}


@pytest.mark.parametrize("bench", ["[]", "[gsm8k, gsm8k]"])
def test_eval_benchmarks_are_some_and_each_once(tmp_path, bench):
    (tmp_path / "pipe.yaml").write_text(f"eval:\n  bench: {bench}\n")
    result = genssd("pipeline", str(tmp_path / "pipe.yaml"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "give at least one eval dataset, each once" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("overrides", "evaluated"),
    [
        (["eval=null"], []),  # a cold start, no eval
        (["eval=null", "cold_start=null"], []),
        (["cold_start=null"], ["base/eval-arith1-heldout", "base/eval-gsm8k", "genssd/eval-arith1-heldout",
                               "genssd/eval-gsm8k"]),  # an eval, no cold start
    ],
)
def test_no_cold_start_eval_without_a_cold_start_or_an_eval(overrides, evaluated):
    _, names = stage_names(load_pipeline_config(bundled_dir("configs") / "pipeline-demo.yaml", overrides))
    assert [n for n in names if "/eval" in n] == evaluated


def pipeline_yaml(tmp_path: Path, **sections) -> Path:
    """A pipeline config on the bundled demo run config, with an eval of bundled GSM8K rows."""
    config = {"run_config": "demo.yaml", "methods": ["genssd"], "eval": {"dataset": "gsm8k", "limit": 2}}
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(config.get(key), dict) else value
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        # demo.yaml lets trajectories reach 64 tokens; the bundled eval.yaml caps answers at 256.
        ({"eval": {"set": ["max_new_tokens=40"]}},
         "the eval's max_new_tokens 40 (eval.yaml with eval.set) is below the runs' search.max_new_tokens 64 "
         "(demo.yaml): "),
        ({"set": ["search.max_new_tokens=300"]},
         "the eval's max_new_tokens 256 (eval.yaml) is below the runs' search.max_new_tokens 300 "
         "(demo.yaml with the pipeline's set): "),
        # The cold start's student is evaluated too: its trajectories count.
        ({"cold_start": {"set": ["method=standard-kd", "search.max_new_tokens=512"]}},
         "search.max_new_tokens 512 (demo.yaml with cold_start.set): "),
        ({"eval": {"samples": 4}},
         "eval.samples 4 (gsm8k) needs sampling, but the eval's temperature is 0 (eval.yaml): set temperature > 0"),
        ({"eval": {"dataset": ["gsm8k", "math-500"], "samples": {"math-500": 16}}},
         "eval.samples 16 (math-500) needs sampling"),
    ],
)
def test_unfair_or_impossible_eval_is_refused_before_any_stage(tmp_path, sections, message):
    out = tmp_path / "out"
    result = genssd("pipeline", str(pipeline_yaml(tmp_path, **sections)), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()  # no stage directory, not even the pipeline's own
    if "max_new_tokens" in message:  # says how to fix it
        assert "raise the eval's max_new_tokens to" in result.stderr


def test_eval_samples_must_name_eval_datasets(tmp_path):
    result = genssd("pipeline", str(pipeline_yaml(tmp_path, eval={"samples": {"aime24": 16}})),
                    "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2
    assert "eval: samples names aime24, not among the eval datasets" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_stages_in_order_with_the_cold_start_evaluated_and_samples_passed(tmp_path, monkeypatch):
    """The pipeline's plan with every command stubbed: what each stage is asked, in which order."""
    from rich.console import Console

    import genssd_cli.eval.command
    import genssd_cli.report.command
    import genssd_cli.run.command
    import genssd_cli.train.command
    from genssd_cli.pipeline.command import pipeline_command

    calls: list[tuple] = []
    done = SimpleNamespace(trajectories=SimpleNamespace(failed=0, pending=0), model_dump=lambda include: {})

    def run(options, console, hint):
        calls.append(("run", options.out.relative_to(out).as_posix(),
                      [s for s in options.overrides if s.startswith("student.")]))  # fmt: skip
        return done

    def train(options, console):
        calls.append(("train", options.out.relative_to(out).as_posix()))
        return {}

    def evaluate(options, console):
        samples = options.samples
        calls.append(("eval", options.out.relative_to(out).as_posix(), options.adapter, options.dataset, samples))
        return {"accuracy": 0.5, "ci95": [0.1, 0.9], "problems": 2, "samples_per_problem": samples,
                "mean_generated_tokens": 9.0, **({"pass_at_k": {"1": 0.5, str(samples): 1.0}} if samples > 1 else {})}

    def report(runs, eval_dirs, report_dir, console):
        calls.append(("report", [d.relative_to(out).as_posix() for d in eval_dirs]))
        return {}

    monkeypatch.setattr(genssd_cli.run.command, "run_command", run)
    monkeypatch.setattr(genssd_cli.train.command, "train_command", train)
    monkeypatch.setattr(genssd_cli.eval.command, "eval_command", evaluate)
    monkeypatch.setattr(genssd_cli.report.command, "report_command", report)
    out = tmp_path / "out"
    config = pipeline_yaml(tmp_path, eval={"dataset": ["gsm8k", "math-500"], "samples": {"math-500": 4},
                                           "set": ["temperature=0.6"]})  # fmt: skip
    record = pipeline_command(config, out, [], Console(quiet=True), "again")

    cold = str(out / "cold-start/train/adapter")
    evals = [c[1:] for c in calls if c[0] == "eval"]
    assert evals == [
        ("base/eval-gsm8k", None, "gsm8k", 1), ("base/eval-math-500", None, "math-500", 4),
        ("cold-start/eval-gsm8k", cold, "gsm8k", 1), ("cold-start/eval-math-500", cold, "math-500", 4),
        ("genssd/eval-gsm8k", str(out / "genssd/train/adapter"), "gsm8k", 1),
        ("genssd/eval-math-500", str(out / "genssd/train/adapter"), "math-500", 4),
    ]  # fmt: skip
    order = [c[1] for c in calls if c[0] != "report"]
    assert order == stage_names(load_pipeline_config(config))[1][:-1] == list(record["stages"])[:-1]
    # The method's run is scored by the adapter the cold-start eval evaluated.
    assert ("run", "genssd/run", [f"student.adapter={Path(cold).resolve()}"]) in calls
    assert calls[-1] == ("report", [e[0] for e in evals])
    assert record["stages"]["cold-start/eval-math-500"]["pass_at_k"] == {"1": 0.5, "4": 1.0}
    assert record["stages"]["cold-start/eval-math-500"]["samples_per_problem"] == 4


@pytest.mark.parametrize("name", ["pipeline-demo.yaml", "compare-demo.yaml", "paper-pipeline.yaml"])
def test_bundled_pipelines_evaluate_fairly(name):
    """Their evals give every student room for its longest trajectories, and sample when asked
    for several samples (the paper's: 16,384 new tokens for 12,288-token runs, at temperature 0.6)."""
    from genssd_cli.config import load_eval_config
    from genssd_cli.pipeline.command import _beside, check_eval

    path = bundled_dir("configs") / name
    cfg = load_pipeline_config(path)
    check_eval(cfg, path, _beside(path, cfg.run_config))
    if name == "paper-pipeline.yaml":
        settings = load_eval_config(_beside(path, cfg.eval.config), cfg.eval.set)
        assert (settings.temperature, settings.top_p, settings.max_new_tokens) == (0.6, 0.95, 16384)
        assert {d: cfg.eval.samples_of(d) for d in cfg.eval.datasets} == {"gsm8k-hf": 1, "math-500": 4, "aime24": 16}
