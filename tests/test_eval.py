"""`genssd eval`: metrics computed independently, and end to end on the real demo student (base and
with an adapter from `genssd train`), resume, and bad inputs."""

import json
import math

import pytest
from conftest import STUDENT, bench_file, genssd, save_adapter_of_another_model, train_adapter_on_questions

from genssd_cli.eval import compute_metrics, pass_at_k


def test_pass_at_k_and_the_interval():
    assert pass_at_k(4, 0, 1) == 0 and pass_at_k(4, 4, 2) == 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    from genssd_cli.data import Problem

    problems = [Problem(f"p{i}", "q", "1") for i in range(8)]
    done = {(f"p{i}", 0): {"correct": i < 2, "tokens": 10 + i, "hit_limit": i == 7} for i in range(8)}
    m = compute_metrics(problems, done, 1)
    # Wilson, 2 of 8: centre (p + z²/2n)/(1 + z²/n), half z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n)
    z, n, p = 1.96, 8, 0.25
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert m["accuracy"] == 0.25 and m["ci95"] == [round(centre - half, 4), round(centre + half, 4)]
    assert m["mean_generated_tokens"] == 13.5 and m["hit_token_limit"] == 0.125 and "pass_at_k" not in m

    done = {(f"p{i}", k): {"correct": k == 0 and i < 4, "tokens": 5, "hit_limit": False}
            for i in range(8) for k in range(2)}  # fmt: skip
    m = compute_metrics(problems, done, 2)
    assert m["accuracy"] == 0.25 and m["pass_at_k"] == {"1": 0.25, "2": 0.5}


@pytest.mark.slow
def test_eval_base_then_adapter_and_resume(tmp_path):
    bench = bench_file(tmp_path / "bench.jsonl")
    args = ["eval", STUDENT, "--dataset", str(bench), "--set", "max_new_tokens=24", "--set", "batch_size=2"]
    base = tmp_path / "base"
    first = genssd(*args, "--limit", "3", "--out", str(base))
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in (base / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["problem_id"] for r in rows) == ["q1", "q2", "q3"]
    for row in rows:
        assert "<|im_start|>assistant" in row["prompt"] and 0 < row["tokens"] <= 24
        assert row["reference"] in "569" and isinstance(row["correct"], bool)
    metrics = json.loads((base / "metrics.json").read_text())
    assert metrics["problems"] == 3 and metrics["accuracy"] == round(sum(r["correct"] for r in rows) / 3, 4)
    assert "on 3 problems" in first.stdout

    # Resume: finished samples are kept, only the new problem is generated.
    before = (base / "samples.jsonl").read_text()
    more = genssd(*args, "--limit", "4", "--out", str(base))
    assert more.returncode == 0, more.stderr
    after = (base / "samples.jsonl").read_text()
    assert after.startswith(before) and len(after.splitlines()) == 4
    again = genssd(*args, "--limit", "4", "--out", str(base))
    assert "loading" not in again.stdout and (base / "samples.jsonl").read_text() == after
    changed = genssd(*args, "--out", str(base), "--set", "temperature=0.5")
    assert changed.returncode == 2 and "changed: temperature" in changed.stderr

    # An adapter trained on these very answers changes what the student writes.
    adapter = train_adapter_on_questions(tmp_path)
    tuned = tmp_path / "tuned"
    with_adapter = genssd(*args, "--limit", "4", "--out", str(tuned), "--adapter", str(adapter))
    assert with_adapter.returncode == 0, with_adapter.stderr
    tuned_rows = {json.loads(line)["problem_id"]: json.loads(line) for line in (tuned / "samples.jsonl").open()}
    base_rows = {json.loads(line)["problem_id"]: json.loads(line) for line in after.splitlines()}
    assert any(tuned_rows[q]["generation"] != base_rows[q]["generation"] for q in tuned_rows)
    assert json.loads((tuned / "metrics.json").read_text())["adapter"] == str(adapter.resolve())


@pytest.mark.slow
def test_eval_bad_inputs(tmp_path):
    save_adapter_of_another_model(tmp_path / "other-adapter")
    bench = str(bench_file(tmp_path / "bench.jsonl"))
    cases = [
        (["--bench", "gsm9k"], 2, "unknown eval dataset 'gsm9k'"),
        (["--dataset", str(tmp_path / "missing.jsonl")], 2, "dataset not found"),
        (["--dataset", bench, "--samples", "2"], 2, "--samples > 1 needs sampling"),
        (["--dataset", bench, "--adapter", str(tmp_path)], 2, "student adapter not found"),
        (["--dataset", bench, "--adapter", str(tmp_path / "other-adapter")], 2, "does not fit model"),
        (["--dataset", bench, "--set", "max_new_tokens=0"], 2, "max_new_tokens: Input should be greater"),
        (["--dataset", "hf:no-such/dataset-anywhere"], 1, "cannot load no-such/dataset-anywhere"),
    ]
    for extra, code, message in cases:
        result = genssd("eval", STUDENT, *extra, "--out", str(tmp_path / "out"), env={"HF_HUB_OFFLINE": "1"})
        assert result.returncode == code, (extra, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (extra, result.stderr)


def test_a_torn_last_sample_is_cut_off_and_a_corrupt_one_refused(tmp_path):
    from genssd_cli.errors import RuntimeFailure
    from genssd_cli.eval import SAMPLES, _read_samples

    whole = json.dumps({"problem_id": "a", "sample": 0, "correct": True}) + "\n"
    (tmp_path / SAMPLES).write_text(whole + '{"problem_id": "b", "sa')
    assert list(_read_samples(tmp_path)) == [("a", 0)]
    assert (tmp_path / SAMPLES).read_text() == whole  # the next row starts on a line of its own
    (tmp_path / SAMPLES).write_text("{broken\n" + whole)
    with pytest.raises(RuntimeFailure, match="line 1 is corrupt"):
        _read_samples(tmp_path)
