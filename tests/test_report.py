"""`genssd report` on fixed recorded runs: a small `genssd pipeline configs/compare-demo.yaml`
(3 problems per method, 4 GSM8K rows per eval; adapters and checkpoints left out). The expected
numbers are recomputed here from the raw records (events.jsonl, samples.jsonl), not from the
summary.json the report reads."""

import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import genssd

RECORDED = Path(__file__).parent / "data" / "compare-recorded"
METHODS = ("genssd", "standard-kd", "posthoc-ppl")


def expected_run(run_dir: Path) -> dict:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    rows = [e["row"] for e in events if e["type"] == "finish"]
    responses = [e for e in events if e["type"] == "response"]
    ppls = [r["student_ppl"] for r in rows]
    lengths = [r["completion_tokens"] for r in rows]
    generated = sum(e["completion_tokens"] for e in responses)
    return {
        "kept": len(rows),
        "correct": sum(r["correct"] for r in rows),
        "pruned": sum(e["type"] == "prune" for e in events),
        "ppl": (statistics.fmean(ppls), statistics.median(ppls)),
        "length": (statistics.fmean(lengths), statistics.median(lengths)),
        "teacher_tokens": generated,
        "per_kept_token": generated / sum(lengths),
        "requests": len(responses),
    }


def expected_accuracy(eval_dir: Path) -> float:
    samples = [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines()]
    return sum(s["correct"] for s in samples) / len(samples)


@pytest.fixture
def recorded(tmp_path):
    copy = tmp_path / "compare"
    shutil.copytree(RECORDED, copy)
    return copy


def test_report_numbers_match_the_raw_records(recorded, tmp_path):
    out = tmp_path / "report"
    result = genssd("report", str(recorded), "--out", str(out))
    assert result.returncode == 0, result.stderr
    numbers = json.loads((out / "report.json").read_text())
    columns = {c["label"]: c for c in numbers["columns"]}
    assert list(columns) == ["base student", *METHODS]
    assert numbers["warnings"] == []
    pruned_somewhere = False
    for method in METHODS:
        run, want = columns[method]["run"], expected_run(recorded / method / "run")
        assert run["method"] == method
        assert (run["kept"], run["correct"], run["pruned"]) == (want["kept"], want["correct"], want["pruned"])
        assert run["student_ppl"]["mean"] == pytest.approx(want["ppl"][0], abs=1e-3)
        assert run["student_ppl"]["median"] == pytest.approx(want["ppl"][1], abs=1e-3)
        assert run["length_tokens"]["mean"] == pytest.approx(want["length"][0], abs=1e-3)
        assert run["length_tokens"]["median"] == pytest.approx(want["length"][1], abs=1e-3)
        assert run["teacher_tokens"] == want["teacher_tokens"]
        assert run["teacher_tokens_per_kept_token"] == pytest.approx(want["per_kept_token"], abs=1e-3)
        assert run["requests"] == want["requests"]
        pruned_somewhere |= want["pruned"] > 0
        [evaluation] = columns[method]["evals"].values()
        assert evaluation["accuracy"] == pytest.approx(expected_accuracy(recorded / method / "eval"))
        # The markdown shows the same numbers, one column per method.
        md = (out / "report.md").read_text()
        assert f"{want['ppl'][0]:.3f} / {want['ppl'][1]:.3f}" in md
    [base] = columns["base student"]["evals"].values()
    assert base["accuracy"] == pytest.approx(expected_accuracy(recorded / "base" / "eval"))
    assert columns["base student"]["run"] is None
    # Standard KD asks one whole trajectory per sample: one request each, never pruned.
    assert columns["standard-kd"]["run"]["requests"] == columns["standard-kd"]["run"]["kept"]
    # The recorded runs as golden numbers: 3 problems each.
    assert [columns[m]["run"]["problems"] for m in METHODS] == [3, 3, 3]
    md_header = (out / "report.md").read_text().splitlines()[2]
    assert md_header == "| | base student | genssd | standard-kd | posthoc-ppl |"
    assert "genssd report" in result.stdout and "student PPL" in result.stdout


def test_plots_are_valid_pngs(recorded, tmp_path):
    import matplotlib.image

    out = tmp_path / "report"
    assert genssd("report", str(recorded), "--out", str(out)).returncode == 0
    for name in ("ppl.png", "length.png", "teacher_tokens.png", "accuracy.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        pixels = matplotlib.image.imread(out / name)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0.01, f"{name} is blank"


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
    assert columns["genssd"]["evals"]["gsm8k"]["dir"] == str(loose)
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


@pytest.mark.parametrize(
    ("make_args", "message", "code"),
    [
        (lambda r, t: [str(t / "missing")], "not a directory", 2),
        (lambda r, t: [str(t)], "has no trajectories.jsonl", 2),
        (lambda r, t: [str(r / "base/eval")], "is an eval directory: pass it with --eval", 2),
        (lambda r, t: [str(r / "genssd/run"), "--eval", str(r / "genssd/run")], "has no metrics.json", 2),
        (lambda r, t: [str(r / "genssd/run"), "--eval", str(t / "nope")], "--eval: not a directory", 2),
    ],
)
def test_bad_report_inputs_are_one_line(recorded, tmp_path, make_args, message, code):
    result = genssd("report", *make_args(recorded, tmp_path), "--out", str(tmp_path / "report"))
    assert result.returncode == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unreadable_summary_is_one_line(recorded, tmp_path):
    (recorded / "genssd/run/summary.json").write_text("{not json")
    result = genssd("report", str(recorded), "--out", str(tmp_path / "report"))
    assert result.returncode == 1
    assert "summary.json: unreadable summary (Invalid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
