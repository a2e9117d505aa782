"""`genssd bench gpu`: the GPU check runs end to end on a CPU with --tiny, so that it cannot rot
between GPU runs; a part past its deadline is killed and recorded, and the next part goes on."""

import json

import pytest
from conftest import genssd

from genssd_cli.bench.gpu import JSONL, PARTS, PARTS_LOG, SUMMARY_MD, PartResult, _lines, _run_part

SUMMARY_FIELDS = {"kind", "part", "figure", "label", "value", "unit", "target", "reference_h200", "met", "verdict",
                  "device"}  # fmt: skip


@pytest.mark.slow
def test_tiny_gpu_check_writes_every_part_and_figure(tmp_path):
    out = tmp_path / "gpu"
    # The shipped student's tokenizer, as in CI (a checkout with .whl/tokenizer would take that one).
    result = genssd("bench", "gpu", "--tiny", "--out", str(out), "--tokenizer", "smollm2-135m-instruct")
    assert result.returncode == 0, result.stdout + result.stderr + (out / PARTS_LOG).read_text()
    lines = [json.loads(line) for line in (out / JSONL).read_text().splitlines()]

    device = lines[0]
    assert device["kind"] == "device" and device["tiny"] is True and device["cuda"] is False
    assert device["device"].startswith("cpu") and device["driver"] is None
    for package in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "python"):
        assert device[package] and device[package] != "missing", package

    parts = {line["part"]: line for line in lines if line["kind"] == "part"}
    assert list(parts) == [p.name for p in PARTS]
    assert all(p["status"] == "ok" and p["error"] is None for p in parts.values()), parts
    figures = {(line["part"], line["figure"]): line for line in lines if line["kind"] == "figure"}
    assert set(figures) == {(p.name, f.key) for p in PARTS for f in p.figures}
    for (part, name), figure in figures.items():
        assert set(figure) == SUMMARY_FIELDS, (part, name)
        assert figure["value"] is not None, (part, name)
        if part == "smoke":  # a functional check: it holds on a CPU too
            assert (figure["value"], figure["verdict"], figure["met"]) == ("ok", "met", True), figure
        elif figure["target"]:  # speed and bf16 targets are a GPU's
            assert (figure["verdict"], figure["met"]) == ("not applicable (cpu)", None), figure
        else:
            assert figure["verdict"] == "no target", figure

    # The figures come from the benches' own lines, kept with their part.
    scoring = parts["scoring-1.5b"]["bench"]
    assert [b.get("method") for b in scoring[:2]] == ["naive", "prefix_cache"]
    assert figures[("scoring-1.5b", "cached_tokens_per_s")]["value"] == scoring[1]["candidate_tokens_per_s"]
    [agreement] = parts["scoring-bf16-fp32"]["bench"]
    assert agreement["candidates"] == 2 * 2 and 0 <= agreement["max_rel_ppl_cached"] < 0.5
    assert figures[("train", "tokens_per_row")]["value"] == 128  # rows cut at max_length, as at 4,096 on a GPU
    assert 0 < figures[("engine", "teacher_busy_fraction")]["value"] <= 1

    summary = (out / SUMMARY_MD).read_text()
    assert summary.count("not applicable (cpu)") == sum(1 for f in figures.values() if f["target"]) - 3
    for part in parts:
        assert f"| {part} |" in summary
    log = (out / PARTS_LOG).read_text()
    assert all(f"===== {part}: ok" in log for part in parts)


def test_a_part_past_its_deadline_is_killed_and_its_figures_say_so(tmp_path):
    smoke = next(p for p in PARTS if p.name == "smoke")
    spec = {"tiny": True, "tokenizer": "smollm2-135m-instruct", "work": str(tmp_path), "workload": smoke.tiny}
    result = _run_part(smoke, spec, 1.0, tmp_path / PARTS_LOG)
    assert result.status == "timed_out" and result.error == "timed out after 1 s" and result.seconds < 10
    assert "===== smoke: timed_out" in (tmp_path / PARTS_LOG).read_text()

    device = PartResult(PARTS[0], "ok", 1.0, 20.0, info={"device": "cpu (x86_64)", "cuda": False})
    figures = [line for line in _lines([device, result], True, 480, "t") if line["kind"] == "figure"]
    assert [f["figure"] for f in figures] == ["run", "train", "eval"]
    assert all(f["value"] is None and f["verdict"] == "timed out" for f in figures)


def test_unknown_part_is_one_error_line(tmp_path):
    result = genssd("bench", "gpu", "--tiny", "--out", str(tmp_path), "--part", "nope")
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("error: --part: unknown part 'nope' (known: device, scoring-1.5b, ")
