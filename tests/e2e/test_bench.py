"""`genssd bench`: the commands run and report what they claim to measure (never timings)."""

import json

import pytest
from conftest import genssd


def test_bench_scoring_prints_one_json_line_per_method():
    result = genssd("bench", "scoring", "--prefix", "48", "--n", "2", "--chunk", "8", "--trajectories", "2",
                    "--steps", "2", "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    naive, cached, ratio = lines
    assert (naive["method"], cached["method"]) == ("naive", "prefix_cache")
    assert naive["candidate_tokens"] == cached["candidate_tokens"] == 2 * 2 * 2 * 8
    # The naive scorer recomputes every prefix; the cached one computes each prefix token once.
    assert naive["forward_tokens"] == 2 * 2 * (2 * (48 + 8) + 8)  # rows padded to the longest
    # Prefixes are cached (built before the timing): per step only n rows of chunk+1 tokens.
    assert cached["forward_tokens"] == 2 * 2 * 2 * (8 + 1)
    assert ratio["speedup"] > 0


@pytest.mark.parametrize("bench", ["scoring", "train", "eval"])
def test_bench_unknown_random_init_shape_is_one_error_line(bench):
    result = genssd("bench", bench, "--random-init", "nope")
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("error: --random-init: unknown shape 'nope' (known: qwen2.5-1.5b, ")


def test_bench_engine_reports_teacher_use_and_loop_cost():
    result = genssd("bench", "engine", "--problems", "3", "--n", "2", "--chunk", "8", "--steps", "2",
                    "--concurrency", "2", "--latency-per-token", "0.01")  # fmt: skip
    assert result.returncode == 0, result.stderr
    [line] = [json.loads(line) for line in result.stdout.splitlines()]
    assert line["bench"] == "engine" and line["requests"] == line["candidates"] > 0
    assert 0 < line["teacher_busy_fraction"] <= 1
    assert line["loop_cpu_ms_per_candidate"] > 0 and line["student_cache_peak_mb"] > 0


def test_bench_train_compares_the_same_batches():
    result = genssd("bench", "train", "--rows", "4", "--steps", "2", "--batch-size", "2", "--max-length", "256")
    assert result.returncode == 0, result.stderr
    ours, plain, ratio = (json.loads(line) for line in result.stdout.splitlines())
    assert (ours["method"], plain["method"]) == ("genssd_train", "plain_peft_loop")
    assert ours["steps"] == plain["steps"] == 2 and ours["tokens"] == plain["tokens"] > 0
    assert ratio["speedup"] > 0


def test_bench_eval_compares_the_same_prompts():
    result = genssd("bench", "eval", "--rows", "2", "--batch-size", "2", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    ours, plain, ratio = (json.loads(line) for line in result.stdout.splitlines())
    assert (ours["method"], plain["method"]) == ("genssd_eval", "plain_hf_generate")
    assert ours["prompts"] == plain["prompts"] == 2 and 0 < ours["new_tokens"] == plain["new_tokens"] <= 8
    assert ratio["speedup"] > 0
