"""`genssd eval`: metrics computed independently, and end to end on the real demo student (base and
with an adapter from `genssd train`), resume, and bad inputs."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, STUDENT, bench_file, genssd, train_adapter_on_questions

from genssd_cli.eval.command import compute_metrics, pass_at_k


def test_pass_at_k_and_the_interval():
    assert pass_at_k(4, 0, 1) == 0 and pass_at_k(4, 4, 2) == 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    from genssd_cli.problems import Problem

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
def test_samples_survive_a_kill_and_are_those_of_an_uninterrupted_run(tmp_path):
    bench = bench_file(tmp_path / "bench.jsonl")
    args = ["eval", STUDENT, "--dataset", str(bench), "--limit", "3", "--samples", "3", "--set", "temperature=0.7",
            "--set", "max_new_tokens=24", "--set", "batch_size=1"]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    uninterrupted = genssd(*args, "--out", str(whole))
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    reference = [json.loads(line) for line in (whole / "samples.jsonl").read_text().splitlines()]

    killed = subprocess.Popen([sys.executable, "-m", "genssd_cli", *args, "--out", str(cut)], cwd=ROOT,
                              env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    samples = cut / "samples.jsonl"
    try:  # killed once the first problem's samples are on disk, with 2 problems to go
        deadline = time.monotonic() + 300
        while killed.poll() is None and _lines(samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert killed.returncode == -signal.SIGKILL, "eval ended before the kill"
    kept = samples.read_text()
    assert 3 <= len(kept.splitlines()) < 9 and kept.endswith("\n")
    # As if killed while writing the next row too: half of it on disk.
    torn = json.dumps(reference[len(kept.splitlines())])
    samples.write_text(kept + torn[: len(torn) // 2])

    resumed = genssd(*args, "--out", str(cut))
    assert resumed.returncode == 0, resumed.stderr
    text = samples.read_text()
    assert text.startswith(kept)  # samples done before the kill are kept, not generated again
    rows = [json.loads(line) for line in text.splitlines()]
    keys = [(r["problem_id"], r["sample"]) for r in rows]
    ids = sorted(json.loads(line)["id"] for line in bench.read_text().splitlines()[:3])
    assert sorted(keys) == [(q, k) for q in ids for k in range(3)]  # each once, samples 0..2
    # A batch is seeded from its first problem, not from what ran before: the same samples as uninterrupted.
    assert {(r["problem_id"], r["sample"]): r for r in reference} == dict(zip(keys, rows, strict=True))

    metrics = json.loads((cut / "metrics.json").read_text())
    correct = [[r["correct"] for r in rows if r["problem_id"] == q] for q in ids]
    mean_at_1 = sum(sum(c) / 3 for c in correct) / 3  # pass@1 and accuracy: mean over samples
    pass_at_3 = sum(any(c) for c in correct) / 3  # with k = n, pass@k: any sample right
    assert metrics["problems"] == 3 and metrics["samples_per_problem"] == 3
    assert metrics["accuracy"] == round(mean_at_1, 4)
    assert metrics["pass_at_k"] == {"1": round(mean_at_1, 4), "3": round(pass_at_3, 4)}
    assert metrics == json.loads((whole / "metrics.json").read_text())
    assert json.loads((cut / "eval.json").read_text())["samples"] == 3


def _lines(path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


@pytest.mark.slow
def test_a_torn_last_sample_is_cut_off_and_a_corrupt_one_refused(tmp_path):
    from genssd_cli.errors import RuntimeFailure
    from genssd_cli.eval.command import SAMPLES, _read_samples

    whole = json.dumps({"problem_id": "a", "sample": 0, "correct": True}) + "\n"
    (tmp_path / SAMPLES).write_text(whole + '{"problem_id": "b", "sa')
    assert list(_read_samples(tmp_path)) == [("a", 0)]
    assert (tmp_path / SAMPLES).read_text() == whole  # the next row starts on a line of its own
    (tmp_path / SAMPLES).write_text("{broken\n" + whole)
    with pytest.raises(RuntimeFailure, match="line 1 is corrupt"):
        _read_samples(tmp_path)
