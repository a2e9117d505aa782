"""`genssd train` on the real demo student with real TRL + peft, on CPU."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, genssd, trajectory_row

from genssd_cli.rundir.layout import CONFIG, TRAJECTORIES
from genssd_cli.train.command import ADAPTER

pytestmark = pytest.mark.slow

STUDENT_CONFIG = "student:\n  model: smollm2-135m-instruct\n"


def row(problem: str, completion: str, correct: bool) -> dict:
    return trajectory_row(problem, f"Solve: {problem}", completion, correct)


def make_run(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / TRAJECTORIES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / CONFIG).write_text(
        "method: genssd\nteacher: {model: t, base_url: 'http://127.0.0.1:9/v1'}\n"
        + STUDENT_CONFIG + "data: {source: arith}\n"
    )  # fmt: skip
    return path


ROWS = [
    row("2+3", "2 + 3 = 5. The answer is 5.", True),
    row("4+4", "4 + 4 = 8. The answer is 8.", True),
    row("6+1", "6 + 1 = 7. The answer is 7.", True),
    row("9+0", "9 + 0 = 9. The answer is 9.", True),
    row("1+1", "1 + 1 = 3. The answer is 3.", False),
    row("2+3", "2 + 3 = 5. The answer is 5.", True),  # a duplicate
]


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    run = make_run(tmp / "run", ROWS)
    out = tmp / "out"
    args = ["train", str(run), "--out", str(out), "--set", "training.batch_size=2",
            "--set", "training.learning_rate=0.002", "--set", "training.save_steps=1"]  # fmt: skip
    first = genssd(*args, "--set", "training.epochs=3")
    assert first.returncode == 0, first.stderr
    # Kept for test_a_killed_run_resumes: the next test trains this adapter further.
    shutil.copytree(out / "adapter", tmp / "uninterrupted-adapter")
    return tmp, run, out, args, first


def test_loss_decreases_and_records_are_written(trained):
    _, _, out, _, first = trained
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 4 and manifest["excluded"] == {"duplicate": 1, "wrong_answer": 1}
    assert manifest["runs"][0] == {"dir": manifest["runs"][0]["dir"], "trajectories": 6, "correct": 5, "used": 4,
                                   "excluded": {"duplicate": 1, "wrong_answer": 1}}  # fmt: skip
    assert manifest["cut_at_max_length"] == 0
    losses = [h["loss"] for h in history(out) if "loss" in h]
    assert len(losses) == 6  # 4 rows, batch 2, 3 epochs
    assert losses[-1] < losses[0] * 0.8
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert "step 6/6 | loss" in first.stdout and "tokens/s" in first.stdout


def test_rerun_resumes_from_the_last_checkpoint(trained):
    _, _, out, args, _ = trained
    again = genssd(*args, "--set", "training.epochs=4")
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout and "checkpoint-6" in again.stdout
    steps = [h["step"] for h in history(out) if "loss" in h]
    assert steps == list(range(1, 9))  # continued at step 7, not from 1


def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(trained, tmp_path):
    from safetensors.torch import load_file

    tmp, _, uninterrupted, args, _ = trained
    run = make_run(tmp_path / "run", ROWS)
    out = tmp_path / "out"
    same = ["train", str(run), "--out", str(out), *args[4:], "--set", "training.epochs=3"]  # the fixture's run
    killed = subprocess.Popen([sys.executable, "-m", "genssd_cli", *same], cwd=ROOT,
                              env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        # Killed mid-epoch, as soon as checkpoint-3 is whole (trainer_state.json is written last):
        # step 4 is under way, not yet saved.
        state, deadline = out / "checkpoints" / "checkpoint-3" / "trainer_state.json", time.monotonic() + 300
        while killed.poll() is None and not _whole_json(state) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert killed.returncode == -signal.SIGKILL, "training ended before the kill"
    assert not (out / "adapter").exists() and not (out / "done.json").exists()
    # The newest whole checkpoint: were the kill to land mid-save, the part-saved one would be removed.
    saved = (out / "checkpoints").glob("checkpoint-*")
    last = max(int(p.name.removeprefix("checkpoint-")) for p in saved if _whole_json(p / "trainer_state.json"))
    assert 3 <= last < 6

    resumed = genssd(*same)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{last}'}" in resumed.stdout
    printed = [int(line.split()[1].split("/")[0]) for line in resumed.stdout.splitlines() if line.startswith("step ")]
    assert printed == list(range(last + 1, 7))  # only the steps after the checkpoint were trained again
    logged = [h for h in history(out) if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, 7))  # each step once, none lost, none repeated
    assert json.loads((out / "done.json").read_text())["result"]["steps"] == 6
    assert json.loads((out / "manifest.json").read_text())["rows"] == 4

    # The same run uninterrupted (the fixture's): same losses and gradient norms step by step, same adapter.
    # The RNG, optimizer and data order are restored from the checkpoint: on CPU it was bit-exact.
    reference = [h for h in history(uninterrupted) if "loss" in h and h["step"] <= 6]
    for got, want in zip(logged, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), (got, want)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6), (got, want)
    ours, theirs = (load_file(d / "adapter_model.safetensors") for d in (out / ADAPTER, tmp / "uninterrupted-adapter"))
    assert ours.keys() == theirs.keys()
    drift = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert drift <= 1e-6, drift


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def test_adapter_changes_the_students_ppl(trained):
    from genssd_cli.config import StudentConfig
    from genssd_cli.student.scorer import ScoreRequest, StudentScorer

    _, _, out, _, _ = trained
    request = ScoreRequest("", ["6 + 1 = 7. The answer is 7."])
    scores = {}
    for adapter in (None, str(out / "adapter")):
        scorer = StudentScorer.load(StudentConfig(model="smollm2-135m-instruct", adapter=adapter), "{question}")
        text = scorer.prompt_text("Solve: 6+1")
        scores[adapter] = scorer.score_naive([ScoreRequest(text, request.candidates)])[0][0].ppl
    base, tuned = scores.values()
    assert tuned < base * 0.9  # trained on exactly this completion


def test_loss_covers_the_completion_only(tmp_path):
    from rich.console import Console

    from genssd_cli.config import StudentConfig, TrainConfig
    from genssd_cli.train.trainer import make_trainer

    cfg = TrainConfig(student=StudentConfig(model="smollm2-135m-instruct"))
    trainer = make_trainer(cfg, ROWS[:2], tmp_path, Console(quiet=True))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels, ids = batch["labels"][0].tolist(), batch["input_ids"][0].tolist()
    tokenizer = trainer.processing_class
    first = next(i for i, label in enumerate(labels) if label != -100)
    assert all(label == -100 for label in labels[:first])
    assert "Solve: 2+3" in tokenizer.decode(ids[:first])  # the prompt is masked
    assert "The answer is 5." in tokenizer.decode([t for t in labels if t != -100])


def test_training_curves_go_to_tensorboard(tmp_path):
    """`training.report_to: [tensorboard]`: transformers' own TensorBoard callback writes the curves
    to OUT/tensorboard, the same losses as train_log.jsonl. (Bad inputs: tests/test_bad_inputs.py.)"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = make_run(tmp_path / "run", ROWS[:2])
    out = tmp_path / "out"
    result = genssd("train", str(run), "--out", str(out), "--set", "training.epochs=2",
                    "--set", "training.batch_size=1", "--set", "training.report_to=[tensorboard]",
                    "--set", "training.run_name=curves")  # fmt: skip
    assert result.returncode == 0, result.stderr
    [folder] = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(folder))
    events.Reload()
    logged = [h["loss"] for h in history(out) if "loss" in h]
    assert len(logged) == 4
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(logged, rel=1e-6)

