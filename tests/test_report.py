"""`genssd report` on fixed recorded runs: a small `genssd pipeline configs/compare-demo.yaml`
(3 problems per method, 4 GSM8K rows per eval; adapters and checkpoints left out). The expected
numbers are recomputed here from the raw records (events.jsonl, samples.jsonl), not from the
summary.json the report reads."""

import io
import json
import math
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


# Hand-made evals: samples.jsonl written here, metrics.json as `genssd eval` writes it from them,
# and the expected numbers recomputed below by formula from the samples alone.
COLD_ADAPTER = "/tmp/fx/cold-start/train/adapter"  # what the recorded runs were scored by
Z = 1.96


def write_eval(eval_dir: Path, adapter: str | None, correct: dict[str, list[bool]], dataset: str = "gsm8k",
               **settings) -> None:  # fmt: skip
    from genssd_cli.data import Problem
    from genssd_cli.eval import compute_metrics

    samples = len(next(iter(correct.values())))
    rows = [{"problem_id": pid, "sample": k, "prompt": "Q", "generation": "A", "reference": "1",
             "answer": "1" if ok else "2", "correct": ok, "tokens": 10 + k, "hit_limit": False}
            for pid, oks in correct.items() for k, ok in enumerate(oks)]  # fmt: skip
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recorded = json.loads((RECORDED / "base/eval/eval.json").read_text())
    recorded.pop("bench")
    eval_json = {**recorded, "adapter": adapter, "dataset": dataset, "samples": samples, **settings}
    (eval_dir / "eval.json").write_text(json.dumps(eval_json))
    problems = [Problem(pid, "Q", "1") for pid in correct]
    metrics = compute_metrics(problems, {(r["problem_id"], r["sample"]): r for r in rows}, samples)
    (eval_dir / "metrics.json").write_text(json.dumps({**metrics, "adapter": adapter, "dataset": dataset}))


def add_stages(pipeline_dir: Path, *stages: str) -> None:
    record = json.loads((pipeline_dir / "pipeline.json").read_text())
    record["stages"].update({s: {"dir": str(pipeline_dir / s), "wall_s": 0.0} for s in stages})
    (pipeline_dir / "pipeline.json").write_text(json.dumps(record))


def wilson(correct: int, n: int) -> list[float]:
    p = correct / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return [centre - half, centre + half]


def avg_at_k(correct: dict[str, list[bool]]) -> tuple[float, list[float]]:
    """Mean over problems of the share of correct samples, with a normal 95 % interval over problems."""
    means = [sum(oks) / len(oks) for oks in correct.values()]
    mean = sum(means) / len(means)
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (len(means) - 1))
    half = Z * sd / math.sqrt(len(means))
    return mean, [max(0.0, mean - half), min(1.0, mean + half)]


def pass_at(correct: dict[str, list[bool]], k: int) -> float:
    """1 - C(n - c, k) / C(n, k) per problem, averaged."""
    per_problem = [1 - math.comb(len(oks) - sum(oks), k) / math.comb(len(oks), k) for oks in correct.values()]
    return sum(per_problem) / len(per_problem)


def report(paths: list[Path], out: Path, evals: list[Path] = ()) -> tuple[dict, str]:
    from rich.console import Console

    from genssd_cli.report import report_command

    report_command(paths, list(evals), out, Console(file=io.StringIO(), width=200))
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def md_row(md: str, name: str) -> list[str]:
    """A report.md row's cells, found by its name."""
    [line] = [line for line in md.splitlines() if line.startswith(f"| {name} |")]
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


# Five problems, four samples each.
FOUR = {"p0": [True, True, True, True], "p1": [True, False, False, False], "p2": [False] * 4,
        "p3": [True, True, False, False], "p4": [False, False, True, False]}  # fmt: skip


def varied(column: int) -> dict[str, list[bool]]:
    """FOUR with the first `column` samples of p2 right: every column's numbers differ."""
    return {**FOUR, "p2": [k < column for k in range(4)]}


def test_cold_start_eval_is_a_column_of_its_own(recorded, tmp_path):
    # 4 problems, one sample each, greedy: the recorded evals' settings; 3 of 4 right.
    cold = {"a": [True], "b": [True], "c": [False], "d": [True]}
    write_eval(recorded / "cold-start/eval", COLD_ADAPTER, cold)
    add_stages(recorded, "cold-start/eval")
    numbers, md = report([recorded], tmp_path / "report")
    columns = {c["label"]: c for c in numbers["columns"]}
    assert list(columns) == ["base student", "cold start", *METHODS]
    assert numbers["warnings"] == []
    [evaluation] = columns["cold start"]["evals"].values()
    assert columns["cold start"]["run"] is None
    assert evaluation["accuracy"] == pytest.approx(0.75) and evaluation["samples"] == 1
    assert evaluation["ci95"] == pytest.approx(wilson(3, 4), abs=1e-4)
    low, high = wilson(3, 4)
    assert md.splitlines()[2] == "| | base student | cold start | genssd | standard-kd | posthoc-ppl |"
    cells = md_row(md, "eval accuracy, gsm8k (4 problems, 95 % CI)")
    assert cells[1] == f"75.0 % ({100 * low:.1f} to {100 * high:.1f})"
    assert "pass@" not in md  # one sample per problem everywhere: no pass@k row

    # Outside a pipeline: the eval of the adapter that scored the runs is the cold start too.
    numbers, _ = report([recorded / "genssd/run"], tmp_path / "alone", [recorded / "cold-start/eval"])
    assert [c["label"] for c in numbers["columns"]] == ["cold start", "genssd"]


def test_avg_at_k_and_pass_at_k_per_dataset(recorded, tmp_path):
    # A second dataset, four samples per problem (sampled), in every column of a two-dataset pipeline.
    owners = {"base": None, "cold-start": COLD_ADAPTER, **{m: f"/tmp/fx/{m}/train/adapter" for m in METHODS}}
    for by, (owner, adapter) in enumerate(owners.items()):
        write_eval(recorded / owner / "eval-aime24", adapter, varied(by), dataset="aime24", temperature=0.6,
                   top_p=0.95, max_new_tokens=512)  # fmt: skip
    add_stages(recorded, *(f"{owner}/eval-aime24" for owner in owners))
    numbers, md = report([recorded], tmp_path / "report")
    assert [c["label"] for c in numbers["columns"]] == ["base student", "cold start", *METHODS]
    assert numbers["warnings"] == []  # other datasets may differ in settings: they are not compared
    for column, by in zip(numbers["columns"], range(len(owners)), strict=True):
        evaluation, want = column["evals"]["aime24"], varied(by)
        mean, interval = avg_at_k(want)
        assert evaluation["samples"] == 4
        assert evaluation["accuracy"] == pytest.approx(mean, abs=1e-4)
        assert evaluation["ci95"] == pytest.approx(interval, abs=1e-4)
        assert evaluation["pass_at_k"]["4"] == pytest.approx(pass_at(want, 4), abs=1e-4)
        assert evaluation["pass_at_k"]["4"] == sum(any(oks) for oks in want.values()) / len(want)
        assert evaluation["pass_at_k"]["1"] == pytest.approx(mean, abs=1e-4)
    # The markdown: accuracy labelled avg@4 with its interval, a pass@4 row, for aime24 only.
    cells = md_row(md, "eval avg@4, aime24 (5 problems, 95 % CI)")
    for cell, by in zip(cells, range(len(owners)), strict=True):
        mean, (low, high) = avg_at_k(varied(by))
        assert cell == f"{100 * mean:.1f} % ({100 * low:.1f} to {100 * high:.1f})"
    assert md_row(md, "pass@4") == [f"{100 * pass_at(varied(by), 4):.1f} %" for by in range(len(owners))]
    assert md.count("pass@4 |") == 1 and "eval accuracy, gsm8k (4 problems, 95 % CI)" in md
    assert "| mean generated tokens | 11.5 |" in md  # tokens 10..13 per problem


def test_evals_of_one_dataset_with_other_settings_are_flagged(recorded, tmp_path):
    write_eval(recorded / "genssd/eval", "/tmp/fx/genssd/train/adapter", {p: FOUR[p] for p in ("p0", "p1", "p2", "p3")},
               temperature=0.6, top_p=0.95)  # fmt: skip
    settings = json.loads((recorded / "posthoc-ppl/eval/eval.json").read_text())
    (recorded / "posthoc-ppl/eval/eval.json").write_text(json.dumps({**settings, "max_new_tokens": 512}))
    numbers, md = report([recorded], tmp_path / "report")
    warning = ("the gsm8k evals differ in samples per problem (1, 4), max_new_tokens (256, 512), temperature "
               "(0.0, 0.6), top_p (1.0, 0.95): their accuracies are not comparable")  # fmt: skip
    assert numbers["warnings"] == [warning]
    assert warning in md
    # Mixed samples: the row says both, each cell says its k.
    cells = md_row(md, "eval accuracy / avg@k, gsm8k (4 problems, 95 % CI)")
    mean, (low, high) = avg_at_k({p: FOUR[p] for p in ("p0", "p1", "p2", "p3")})
    assert cells[1] == f"{100 * mean:.1f} % ({100 * low:.1f} to {100 * high:.1f}) avg@4"
    assert cells[0].endswith(")") and "avg@" not in cells[0]
    assert md_row(md, "pass@k") == ["—", "75.0 % (k=4)", "—", "—"]
