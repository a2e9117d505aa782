"""Which rows `genssd train` trains on, and the manifest's count of the rest by reason (no model)."""

import json

from conftest import trajectory_row

from genssd_cli.rundir.layout import TRAJECTORIES
from genssd_cli.train.command import build_dataset


def test_only_ended_traces_that_state_the_right_answer_are_trained_on(tmp_path):
    truncated = {**trajectory_row("a", "Q a", "The answer is 5.", True), "finish": "truncated"}  # an older genssd's
    rows = [
        trajectory_row("b", "Q b", "The answer is 5.", True),
        trajectory_row("b", "Q b", "The answer is 5.", True),  # the same trace again
        trajectory_row("c", "Q c", "So 2 + 3 = 5", False),  # no stated answer
        trajectory_row("d", "Q d", "The answer is 6.", False),
        truncated,
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / TRAJECTORIES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, manifest = build_dataset([run], include_incorrect=False)
    assert [r["problem_id"] for r in kept] == ["b"]
    reasons = {"duplicate": 1, "no_stated_answer": 1, "truncated": 1, "wrong_answer": 1}
    assert manifest["excluded"] == reasons and manifest["rows"] == 1
    assert manifest["runs"][0] == {"dir": str(run), "trajectories": 5, "correct": 2, "used": 1, "excluded": reasons}
    everything, manifest = build_dataset([run], include_incorrect=True)
    assert [r["problem_id"] for r in everything] == ["b", "c", "d", "a"] and manifest["excluded"] == {"duplicate": 1}
