"""Which directories become which columns of `genssd report`, on the recorded pipeline: the
cold-start eval as a reference column of its own (in a pipeline and outside one, by the adapter that
scored the runs), runs given one by one with their evals linked through the adapter's training
manifest, and a warning when the runs were scored by different students."""

import json
import shutil

import pytest
import yaml
from conftest import genssd
from report_helpers import COLD_ADAPTER, COLUMNS, DATASET, copy_recorded, md_row, report


@pytest.fixture
def recorded(tmp_path):
    return copy_recorded(tmp_path)


def test_cold_start_eval_is_a_column_of_its_own(recorded, tmp_path):
    # The pipeline's cold-start/eval: the student every method starts from, a reference column.
    numbers, md = report([recorded], tmp_path / "report")
    columns = {c["label"]: c for c in numbers["columns"]}
    assert list(columns) == list(COLUMNS.values())
    assert columns["cold start"]["run"] is None
    assert columns["cold start"]["evals"][DATASET]["adapter"] == COLD_ADAPTER
    assert list(numbers["differences"]["cold start"]) == [f"accuracy:{DATASET}"]  # a reference column: accuracy only
    assert md_row(md, "Δ student PPL of kept (mean)")[:2] == ["", ""]

    # Outside a pipeline, anywhere: the eval of the adapter that scored the runs is the cold start too.
    loose = tmp_path / "elsewhere"
    shutil.copytree(recorded / "cold-start/eval", loose)
    numbers, _ = report([recorded / "genssd/run"], tmp_path / "alone", [loose])
    assert [c["label"] for c in numbers["columns"]] == ["cold start", "genssd"]
    assert numbers["columns"][0]["evals"][DATASET]["dir"] == str(loose)


def test_runs_given_one_by_one_with_evals_linked_by_training_manifest(recorded, tmp_path):
    # Outside a pipeline the eval is tied to its run through the adapter's training manifest.
    train = tmp_path / "lora"
    (train / "adapter").mkdir(parents=True)
    (train / "manifest.json").write_text(json.dumps({"runs": [{"dir": str(recorded / "genssd/run")}]}))
    loose = tmp_path / "eval-elsewhere"
    shutil.copytree(recorded / "genssd/eval", loose)
    settings = json.loads((loose / "eval.json").read_text())
    (loose / "eval.json").write_text(json.dumps({**settings, "adapter": str(train / "adapter")}))
    out = tmp_path / "report"
    result = genssd("report", str(recorded / "genssd/run"), str(recorded / "standard-kd/run"),
                    "--eval", str(loose), "--eval", str(recorded / "base/eval"), "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    columns = {c["label"]: c for c in json.loads((out / "report.json").read_text())["columns"]}
    assert list(columns) == ["base student", "genssd", "standard-kd"]
    assert columns["genssd"]["evals"][DATASET]["dir"] == str(loose)
    assert columns["standard-kd"]["evals"] == {}


def test_report_says_when_runs_are_not_comparable(recorded, tmp_path):
    config = recorded / "posthoc-ppl/run/config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["student"]["adapter"] = None
    config.write_text(yaml.safe_dump(cfg))
    result = genssd("report", str(recorded), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    warning = "the runs were scored by different students: their PPLs are not comparable"
    assert warning in json.loads((tmp_path / "report/report.json").read_text())["warnings"]
    assert warning in (tmp_path / "report/report.md").read_text()
