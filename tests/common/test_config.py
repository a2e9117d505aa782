"""Run configuration (genssd_cli/config.py) loaded in process: --set overrides, every bad setting or
file (unknown key, wrong type, bad YAML, not a mapping, not UTF-8) as one line, the results hash
(genssd_cli/rundir/results_hash.py) changed by what changes results and by nothing else, and every
bundled config under configs/ valid for its kind."""

from pathlib import Path

import pytest
import yaml

from genssd_cli.config import load_run_config
from genssd_cli.errors import UsageError
from genssd_cli.rundir.results_hash import changed_keys, results_settings, settings_hash


def test_demo_config_loads_with_overrides():
    cfg = load_run_config(None, ["search.n=8", "search.prune_ppl=null", "teacher.stop=['x', 'y']"])
    assert cfg.search.n == 8
    assert cfg.search.prune_ppl is None
    assert cfg.teacher.stop == ["x", "y"]
    assert cfg.teacher.launch is not None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.n=0", "search.n: Input should be greater than or equal to 1"),
        ("search.chunk_tokens=0", "search.chunk_tokens"),
        ("search.n=many", "search.n: Input should be a valid integer"),
        ("search.bogus=1", "search.bogus: unknown key"),
        ("method=beam", "method"),
        ("teacher.base_url=http://x/v1", "set exactly one of teacher.base_url, teacher.endpoints and teacher.launch"),
        ("n", "--set expects KEY=VALUE"),
        ("search.n.x=1", "'n' is not a section"),
    ],
)
def test_bad_settings_give_one_line(override, message):
    with pytest.raises(UsageError) as info:
        load_run_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path: Path):
    with pytest.raises(UsageError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_run_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(UsageError, match="must be a mapping"):
        load_run_config(scalar)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_run_config(binary)


def test_results_hash_tracks_what_changes_results():
    prompts = {"teacher": "T {question}", "student": "S {question}"}
    base = results_settings(load_run_config(None), prompts)
    same = results_settings(load_run_config(None, ["teacher.max_concurrency=9", "data.limit=3"]), prompts)
    assert settings_hash(base) == settings_hash(same)  # speed and selection do not change results
    other = results_settings(load_run_config(None, ["search.n=2", "teacher.temperature=0.1"]), prompts)
    assert changed_keys(base, other) == ["search.n", "teacher.temperature"]
    edited = results_settings(load_run_config(None), {**prompts, "teacher": "T2 {question}"})
    assert changed_keys(base, edited) == ["prompts.teacher.sha256"]


def test_every_bundled_config_is_valid():
    from genssd_cli.config import load_eval_config, load_pipeline_config, load_train_config
    from genssd_cli.paths import bundled_dir
    from genssd_cli.problems import load_prompt

    configs = bundled_dir("configs")
    kinds: dict[str, list[Path]] = {"pipeline": [], "train": [], "eval": [], "run": []}
    marks = {"run_config": "pipeline", "lora": "train", "prompt": "eval"}  # a key only that kind has
    for path in sorted(configs.glob("*.yaml")):
        keys = set(yaml.safe_load(path.read_text()))
        kind = next((kind for key, kind in marks.items() if key in keys), "run")
        kinds[kind].append(path)
    assert {p.name for p in kinds["pipeline"]} >= {"pipeline-demo.yaml", "compare-demo.yaml", "paper-pipeline.yaml"}
    assert {p.name for p in kinds["train"]} >= {"train.yaml", "paper-train.yaml"}
    assert {p.name for p in kinds["eval"]} >= {"eval.yaml", "paper-eval.yaml"}
    assert {p.name for p in kinds["run"]} >= {"demo.yaml", "vllm.yaml", "hosted.yaml", "paper-run.yaml"}
    for path in kinds["pipeline"]:
        pipeline = load_pipeline_config(path)
        for name in (pipeline.run_config, pipeline.train_config, *([pipeline.eval.config] if pipeline.eval else [])):
            assert (configs / name).is_file(), (path, name)
    for path in kinds["train"]:
        load_train_config(path)
    for path in kinds["eval"]:
        load_prompt(load_eval_config(path).prompt)
    for path in kinds["run"]:
        cfg = load_run_config(path)
        load_prompt(cfg.prompts.teacher)
        load_prompt(cfg.prompts.student)


def test_teacher_extra_body_is_part_of_the_results_hash():
    """teacher.extra_body (the server's own sampler fields) changes the results hash, as one key
    whatever its nesting; an empty one adds no key, so runs made before it existed keep their hash."""
    prompts = {"teacher": "T {question}", "student": "S {question}"}
    plain = results_settings(load_run_config(None, ["teacher.extra_body={}"]), prompts)
    assert "teacher.extra_body" not in plain
    pinned = results_settings(load_run_config(None, ["teacher.extra_body={repeat_penalty: 1.0}"]), prompts)
    assert changed_keys(plain, pinned) == ["teacher.extra_body"]
    other = results_settings(load_run_config(None, ["teacher.extra_body={repeat_penalty: 1.1}"]), prompts)
    assert settings_hash(other) != settings_hash(pinned)
    nested = results_settings(load_run_config(None, ["teacher.extra_body={chat_template_kwargs: {}}"]), prompts)
    assert settings_hash(nested) != settings_hash(plain)  # an empty nested mapping is still a setting


@pytest.mark.parametrize("field", ["seed", "temperature", "n", "stop", "max_tokens", "messages"])
def test_teacher_extra_body_refuses_what_genssd_sets_itself(field):
    """A field genssd sets itself in extra_body is refused in one line naming it, not silently
    sent twice (or overriding genssd's own value)."""
    with pytest.raises(UsageError) as info:
        load_run_config(None, [f"teacher.extra_body={{{field}: 1, top_k: 20}}"])
    message = str(info.value)
    assert f"teacher.extra_body: {field} genssd sets itself" in message and "\n" not in message
    assert load_run_config(None, ["teacher.extra_body={top_k: 20, min_p: 0.0}"]).teacher.extra_body["top_k"] == 20
