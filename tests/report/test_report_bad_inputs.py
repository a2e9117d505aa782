"""`genssd report` (the real CLI) on wrong inputs: a missing or non-run directory, an eval directory
passed as a run, a run passed with --eval, an unreadable summary.json: one `error:` line, exit 2
(usage) or 1 (runtime)."""

import pytest
from conftest import genssd
from report_helpers import copy_recorded


@pytest.fixture
def recorded(tmp_path):
    return copy_recorded(tmp_path)


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
