"""`genssd export`: run folders to a Hugging Face dataset folder that `datasets` loads as written,
that TRL's SFTTrainer trains on unchanged (the real student, real TRL + peft), with a dataset card
whose front matter parses and which leaks no path, URL or key."""

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import STUDENT, genssd, trajectory_row, write_config

from genssd_cli.config import load_run_config
from genssd_cli.export.folder import CARD, DATA_FILE
from genssd_cli.export.rows import COLUMNS
from genssd_cli.rundir.layout import CONFIG, EVENTS, SUMMARY, TRAJECTORIES
from genssd_cli.rundir.records import Centre, KeptStats, Price, RunStart, Summary, TeacherTotals, TrajectoryCounts
from genssd_cli.rundir.results_hash import results_settings, settings_hash

SECRETS = ("/home/alice", "10.1.2.3", "://", "SECRET_ENV")  # what the runs' config holds and no card may


def row(problem: str, completion: str, correct: bool, **fields) -> dict:
    return {**trajectory_row(problem, f"Solve: {problem}", completion, correct), **fields}


GENSSD_ROWS = [
    row("2+3", "2 + 3 = 5. The answer is 5.", True, reference="5", student_ppl=1.75, teacher_tokens=30,
        completion_tokens=12, steps=2),
    row("1+1", "1 + 1 = 3. The answer is 3.", False, reference="2", student_ppl=2.5, teacher_tokens=28,
        completion_tokens=12, steps=2),
    row("9+9", "9 + 9 = 1", False, reference="18", answer=None, finish="truncated", student_ppl=None,
        teacher_tokens=40, completion_tokens=16, steps=4),
]  # fmt: skip
KD_ROWS = [
    row("4+4", "4 + 4 = 8. The answer is 8.", True, reference="8", method="standard-kd", teacher_tokens=9),
    row("6+1", "6 + 1 = 7. The answer is 7.", True, reference="7", method="standard-kd", teacher_tokens=9),
]


def run_yaml(method: str) -> dict:
    """A run config as `genssd run` resolves it, with what a card must never show: a private
    endpoint, an API key's variable name, absolute paths."""
    return {
        "method": method,
        "teacher": {"model": "teacher-x", "base_url": "http://10.1.2.3:8000/v1", "api_key_env": "SECRET_ENV",
                    "temperature": 0.7, "stop": ["\nQuestion:"]},
        "student": {"model": STUDENT, "adapter": "/home/alice/cold/adapter"},
        "search": {"n": 5, "chunk_tokens": 32},
        "data": {"source": "/home/alice/problems.jsonl"},
    }  # fmt: skip


def make_run(path: Path, rows: list[dict], method: str, records: bool) -> Path:
    """A run folder: trajectories.jsonl and config.yaml; with `records`, also the summary.json and
    events.jsonl `genssd run` writes (a run_start per session, other events between)."""
    path.mkdir(parents=True)
    (path / TRAJECTORIES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_config(path / CONFIG, run_yaml(method))
    if records:
        settings = results_settings(load_run_config(path / CONFIG), {})
        config_hash = settings_hash(settings)
        start = RunStart(config_hash=config_hash, settings=settings, forced=False, limit=None, problems=4,
                         genssd="0.0.9", time=0.0)  # fmt: skip
        other = json.dumps({"v": 2, "type": "prune", "problem_id": "x", "sample": 0, "step": 1, "best_ppl": 9.0})
        (path / EVENTS).write_text(start.line() + other + "\n" + start.model_copy(update={"genssd": "0.1.0"}).line())
        summary = Summary(
            problems=4, trajectories=TrajectoryCounts(finished=2, truncated=1, pruned=1, failed=0, pending=0),
            correct=1, steps=9,
            teacher=TeacherTotals(requests=11, prompt_tokens=1200, completion_tokens=150, candidates=20,
                                  cost=0.18, price_per_million=Price(input=100.0, output=400.0)),
            kept=KeptStats(student_ppl=Centre(), completion_tokens=Centre()), sessions=2, wall_s=3.5,
            config_hash=config_hash,
        )  # fmt: skip
        (path / SUMMARY).write_text(json.dumps(summary.model_dump(mode="json")))
    return path


@pytest.fixture
def runs(tmp_path):
    return (make_run(tmp_path / "gen-run", GENSSD_ROWS, "genssd", records=True),
            make_run(tmp_path / "kd-run", KD_ROWS, "standard-kd", records=False))  # fmt: skip


def load(folder: Path, cache: Path):
    from datasets import load_dataset

    return load_dataset(str(folder), split="train", cache_dir=str(cache))


def card_of(folder: Path) -> tuple[dict, str]:
    text = (folder / CARD).read_text(encoding="utf-8")
    assert text.startswith("---\n"), text[:200]
    meta = yaml.safe_load(text[4 : text.index("\n---\n")])
    assert isinstance(meta, dict), text[:500]
    return meta, text


def test_export_loads_as_written_with_a_card_of_counts_and_no_secrets(tmp_path, runs):
    gen, kd = runs
    out = tmp_path / "shared" / "dataset"
    result = genssd("export", str(gen), str(kd), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("exported 5 rows (3 correct) of 2 runs ->") and result.stderr == ""
    assert (out / DATA_FILE).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["dataset"]  # no temporary folder left

    dataset = load(out, tmp_path / "cache")
    assert dataset.column_names == list(COLUMNS)
    written = [(r, "gen-run") for r in GENSSD_ROWS] + [(r, "kd-run") for r in KD_ROWS]
    assert len(dataset) == len(written)
    for got, (want, run) in zip(dataset, written, strict=True):
        assert got["prompt"] == want["prompt"] and got["completion"] == want["completion"]
        assert got["messages"] == want["prompt"] + want["completion"]
        assert {k: got[k] for k in COLUMNS[3:-1]} == {k: want[k] for k in COLUMNS[3:-1]}
        assert got["run"] == run

    meta, text = card_of(out)
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
    assert {"genssd", "distillation"} <= set(meta["tags"]) and meta["task_categories"] == ["text-generation"]
    assert meta["license"] == "other" and meta["size_categories"] == ["n<1K"]
    counts = meta["genssd"]
    gen_hash = json.loads((gen / SUMMARY).read_text())["config_hash"]
    assert {k: counts[k] for k in ("rows", "correct", "finished", "truncated", "methods", "teacher_tokens")} == {
        "rows": 5, "correct": 3, "finished": 4, "truncated": 1, "methods": {"genssd": 3, "standard-kd": 2},
        "teacher_tokens": 30 + 28 + 40 + 9 + 9}  # fmt: skip
    assert counts["runs"] == [{"name": "gen-run", "rows": 3, "correct": 1, "config_hash": gen_hash},
                              {"name": "kd-run", "rows": 2, "correct": 2, "config_hash": None}]  # fmt: skip
    assert counts["teacher_cost"] == 0.18 and counts["only_correct"] is False
    assert counts["teacher_cost_covers"] == "1 of 2 runs (the others recorded no cost)"

    # The body: method, teacher, student, the results settings of each run, cost, provenance.
    for expected in (
        "`teacher-x`",
        f"`{STUDENT}`",
        "| `search.n` | `5` | `5` |",
        "| `search.chunk_tokens` | `32`",
        "| `teacher.temperature` | `0.7`",
        '`["\\nQuestion:"]`',
        "| `student.adapter` | `adapter`",
        "| `data.source` | `problems.jsonl`",
        "cost 0.1800 at 100 / 400 per million",
        f"| `gen-run` | 3 | 1 | 2 | 0.0.9, 0.1.0 | `{gen_hash}` |",
        "| `kd-run` | 2 | 2 | not recorded | not recorded | not recorded |",
        f"Exported on {counts['exported']} (UTC)",
        'upload_folder(folder_path="dataset"',
        'repo_type="dataset"',
        "| `genssd` | 3 | 1 | 2 | 1 |",
        "| `standard-kd` | 2 | 2 | 2 | 0 |",
    ):
        assert expected in text, expected
    for secret in (*SECRETS, str(tmp_path)):
        assert secret not in text, secret


def test_only_correct_and_re_export_replaces_the_previous_one(tmp_path, runs):
    gen, kd = runs
    out = tmp_path / "dataset"
    assert genssd("export", str(gen), str(kd), "--out", str(out)).returncode == 0
    (out / CARD).write_text((out / CARD).read_text() + "\nedited by hand\n")  # a card the user touched is still ours

    again = genssd("export", str(gen), str(kd), "--out", str(out), "--only-correct")
    assert again.returncode == 0, again.stderr
    dataset = load(out, tmp_path / "cache")
    assert dataset["problem_id"] == ["2+3", "4+4", "6+1"] and all(dataset["correct"])
    meta, text = card_of(out)
    assert meta["genssd"]["rows"] == 3 and meta["genssd"]["only_correct"] is True
    assert "edited by hand" not in text and "the correct ones of 5" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "dataset", "gen-run", "kd-run"]


def test_runs_of_one_folder_name_are_told_apart(tmp_path):
    """A pipeline's runs are all called `run` (METHOD/run): the `run` column names the method too."""
    gen = make_run(tmp_path / "genssd" / "run", GENSSD_ROWS[:1], "genssd", records=False)
    kd = make_run(tmp_path / "standard-kd" / "run", KD_ROWS[:1], "standard-kd", records=False)
    assert genssd("export", str(gen), str(kd), "--out", str(tmp_path / "out")).returncode == 0
    assert load(tmp_path / "out", tmp_path / "cache")["run"] == ["genssd/run", "standard-kd/run"]


@pytest.mark.parametrize("case", ["missing run", "no trajectories", "no correct row", "no row", "run twice",
                                  "out not an export", "out with the user's split", "out a file"])  # fmt: skip
def test_bad_inputs_are_one_line(tmp_path, case):
    run = make_run(tmp_path / "run", [GENSSD_ROWS[1]], "genssd", records=False)
    out, args = tmp_path / "out", []
    if case == "missing run":
        args, message = [str(tmp_path / "nowhere")], "run directory not found"
    elif case == "no trajectories":
        (tmp_path / "empty").mkdir()
        args, message = [str(tmp_path / "empty")], "has no trajectories.jsonl"
    elif case == "no correct row":
        args, message = [str(run), "--only-correct"], "no correct row among the 1 rows"
    elif case == "no row":
        (run / TRAJECTORIES).write_text("")
        args, message = [str(run)], "nothing to export: no row"
    elif case == "run twice":
        args, message = [str(run), str(tmp_path / "." / "run")], "given twice"
    elif case == "out not an export":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        args, message = [str(run)], "is not empty and not a genssd export"
    elif case == "out with the user's split":
        assert genssd("export", str(run), "--out", str(out)).returncode == 0
        (out / "data" / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
        args, message = [str(run)], "is not empty and not a genssd export"
    else:
        out.write_text("a file")
        args, message = [str(run)], "exists and is not a folder"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = genssd("export", *args, "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*deprecated:FutureWarning")  # transformers vs TRL
def test_trl_trains_on_the_export_unchanged(tmp_path, runs):
    """One SFTTrainer step (LoRA, CPU, the real student) on the loaded dataset as it is, every
    column kept: TRL takes the `prompt`/`completion` form and trains on the completion only."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from genssd_cli.models import load_causal_lm

    out = tmp_path / "dataset"
    assert genssd("export", *map(str, runs), "--out", str(out)).returncode == 0
    dataset = load(out, tmp_path / "cache")
    model, tokenizer = load_causal_lm(STUDENT, None, None, "cpu", "float32")
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                     report_to="none", bf16=False, gradient_checkpointing=False, save_strategy="no",
                     logging_steps=1, max_length=256, disable_tqdm=True)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))  # fmt: skip
    first = trainer.train_dataset[0]
    trained_on = [t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != -100]
    assert 0 < len(trained_on) < len(first["input_ids"])  # the prompt is masked, the completion is not
    decoded = tokenizer.decode(trained_on)
    assert GENSSD_ROWS[0]["completion"][0]["content"] in decoded and "Solve:" not in decoded
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 1 and len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0
