"""The report's eval rows, with hand-made evals (samples.jsonl, and metrics.json as `genssd eval`
writes it) added to the recorded pipeline: avg@k with its normal interval over problems and pass@k
per dataset, recomputed here by formula from the samples alone; evals of one dataset with other
settings (samples, max_new_tokens, temperature, top_p) flagged as not comparable, with no accuracy
difference where the problems differ."""

import json
import math
from pathlib import Path

import pytest
from report_helpers import (
    COLD_ADAPTER,
    DATASET,
    EVAL_PROBLEMS,
    METHODS,
    Z,
    copy_recorded,
    md_row,
    report,
    write_eval,
)


@pytest.fixture
def recorded(tmp_path):
    return copy_recorded(tmp_path)


def comparability(warnings: list[str]) -> list[str]:
    """The warnings about the columns, not about their differences from genssd."""
    return [w for w in warnings if " - genssd, " not in w]


def add_stages(pipeline_dir: Path, *stages: str) -> None:
    record = json.loads((pipeline_dir / "pipeline.json").read_text())
    record["stages"].update({s: {"dir": str(pipeline_dir / s), "wall_s": 0.0} for s in stages})
    (pipeline_dir / "pipeline.json").write_text(json.dumps(record))


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


# Five problems, four samples each.
FOUR = {"p0": [True, True, True, True], "p1": [True, False, False, False], "p2": [False] * 4,
        "p3": [True, True, False, False], "p4": [False, False, True, False]}  # fmt: skip


def varied(column: int) -> dict[str, list[bool]]:
    """FOUR with the first `column` samples of p2 right: every column's numbers differ."""
    return {**FOUR, "p2": [k < column for k in range(4)]}


def test_avg_at_k_and_pass_at_k_per_dataset(recorded, tmp_path):
    # A second dataset, four samples per problem (sampled), in every column of a two-dataset pipeline.
    owners = {"base": None, "cold-start": COLD_ADAPTER, **{m: f"/tmp/fx/{m}/train/adapter" for m in METHODS}}
    for by, (owner, adapter) in enumerate(owners.items()):
        write_eval(recorded / owner / "eval-aime24", adapter, varied(by), dataset="aime24", temperature=0.6,
                   top_p=0.95, max_new_tokens=512)  # fmt: skip
    add_stages(recorded, *(f"{owner}/eval-aime24" for owner in owners))
    numbers, md = report([recorded], tmp_path / "report")
    assert [c["label"] for c in numbers["columns"]] == ["base student", "cold start", *METHODS]
    # other datasets may differ in settings: they are not compared
    assert comparability(numbers["warnings"]) == []
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
    assert md.count("pass@4 |") == 1 and f"eval accuracy, {DATASET} ({EVAL_PROBLEMS} problems, 95 % CI)" in md
    assert "| mean generated tokens | 11.5 |" in md  # tokens 10..13 per problem


def test_evals_of_one_dataset_with_other_settings_are_flagged(recorded, tmp_path):
    # genssd's eval replaced by one of as many other problems, four samples each, sampled; posthoc-ppl's
    # eval said to allow longer answers.
    sampled = {f"p{i}": FOUR[f"p{i % 5}"] for i in range(EVAL_PROBLEMS)}
    write_eval(recorded / "genssd/eval", "/tmp/fx/genssd/train/adapter", sampled, dataset=DATASET, temperature=0.6,
               top_p=0.95)  # fmt: skip
    settings = json.loads((recorded / "posthoc-ppl/eval/eval.json").read_text())
    (recorded / "posthoc-ppl/eval/eval.json").write_text(json.dumps({**settings, "max_new_tokens": 512}))
    numbers, md = report([recorded], tmp_path / "report")
    tokens = settings["max_new_tokens"]
    warning = (f"the {DATASET} evals differ in samples per problem (1, 4), max_new_tokens ({tokens}, 512), "
               "temperature (0.0, 0.6), top_p (1.0, 0.95): their accuracies are not comparable")  # fmt: skip
    assert comparability(numbers["warnings"]) == [warning]
    assert warning in md
    # genssd's eval is now of other problems: no accuracy difference, and the warnings say why.
    for column in ("base student", "cold start", "standard-kd", "posthoc-ppl"):
        assert numbers["differences"][column][f"accuracy:{DATASET}"] == {"delta": None, "low": None, "high": None,
                                                                          "pairs": 0}  # fmt: skip
        assert (f"{column} - genssd, eval accuracy, {DATASET} (points): 0 eval problems both evals answered (a paired "
                "difference needs 2): —") in numbers["warnings"]  # fmt: skip
    assert md_row(md, f"Δ eval accuracy, {DATASET} (points)") == ["—"] * 4
    # Mixed samples: the row says both, each cell says its k.
    cells = md_row(md, f"eval accuracy / avg@k, {DATASET} ({EVAL_PROBLEMS} problems, 95 % CI)")
    mean, (low, high) = avg_at_k(sampled)
    assert cells[2] == f"{100 * mean:.1f} % ({100 * low:.1f} to {100 * high:.1f}) avg@4"
    assert all(cell.endswith(")") and "avg@" not in cell for cell in cells[:2] + cells[3:])
    assert md_row(md, "pass@k") == ["—", "—", f"{100 * pass_at(sampled, 4):.1f} % (k=4)", "—", "—"]
