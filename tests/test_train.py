"""`genssd train` on the real demo student with real TRL + peft, on CPU."""

import json
from pathlib import Path

import pytest
from conftest import genssd, save_adapter_of_another_model, trajectory_row

from genssd_cli.store import CONFIG, TRAJECTORIES

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


def test_adapter_changes_the_students_ppl(trained):
    from genssd_cli.config import StudentConfig
    from genssd_cli.student import ScoreRequest, StudentScorer

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
    from genssd_cli.trainer import make_trainer

    cfg = TrainConfig(student=StudentConfig(model="smollm2-135m-instruct"))
    trainer = make_trainer(cfg, ROWS[:2], tmp_path, Console(quiet=True))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels, ids = batch["labels"][0].tolist(), batch["input_ids"][0].tolist()
    tokenizer = trainer.processing_class
    first = next(i for i, label in enumerate(labels) if label != -100)
    assert all(label == -100 for label in labels[:first])
    assert "Solve: 2+3" in tokenizer.decode(ids[:first])  # the prompt is masked
    assert "The answer is 5." in tokenizer.decode([t for t in labels if t != -100])


def test_bad_inputs(tmp_path):
    wrong_only = make_run(tmp_path / "wrong", [row("1+1", "3", False)])
    empty = make_run(tmp_path / "empty", [])
    (tmp_path / "plain").mkdir()
    save_adapter_of_another_model(tmp_path / "other-adapter")
    good = make_run(tmp_path / "good", ROWS[:2])
    foreign = make_run(tmp_path / "foreign", [{"prompt": "2+3", "completion": "5"}])
    cases = [
        ([str(foreign)], "trajectories.jsonl line 1: not a TrajectoryRow (problem_id: Field required)"),
        ([str(tmp_path / "missing")], "run directory not found"),
        ([str(tmp_path / "plain")], "has no trajectories.jsonl"),
        ([str(wrong_only)], "no correct trajectory (--include-incorrect trains on all)"),
        ([str(empty), "--include-incorrect"], "nothing to train on: no trajectory"),
        ([str(good), "--set", "training.epochs=0"], "training.epochs: Input should be greater than 0"),
        ([str(good), "--set", f"student={{model: smollm2-135m-instruct, adapter: {tmp_path}/other-adapter}}"],
         "does not fit model 'smollm2-135m-instruct'"),
    ]  # fmt: skip
    for args, message in cases:
        result = genssd("train", *args, "--out", str(tmp_path / "out"))
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
