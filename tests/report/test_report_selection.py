"""`genssd report`'s selection block (in process, on the recorded runs): report.json carries each
run's selection diagnostics, the same whether its summary.json has them (materialised now) or
predates them (the recorded summaries: worked out from events.jsonl), and report.md shows them as
rows, the shortest and stopping picks beside their random-pick base rates."""

from __future__ import annotations

import json

from report_helpers import METHODS, copy_recorded, md_row
from rich.console import Console

from genssd_cli.config import load_run_config
from genssd_cli.problems import load_problems
from genssd_cli.report.command import report_command
from genssd_cli.run.materialise import materialise
from genssd_cli.rundir.layout import SUMMARY
from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import RunStart
from genssd_cli.rundir.replay import summarize
from genssd_cli.rundir.store import RunStore


def expected_selection(run_dir) -> dict:
    cfg = load_run_config(run_dir / "config.yaml")
    events = read_events(run_dir)
    problems = load_problems(cfg.data, [e for e in events if isinstance(e, RunStart)][-1].limit)
    return summarize(events, problems, cfg.search.samples, cfg.teacher).selection.model_dump(mode="json")


def test_the_report_shows_each_runs_selection_diagnostics_old_summaries_included(tmp_path):
    """report.json's `selection` of each run equals the log's diagnostics, for a summary that has
    them and for old ones that do not; report.md's rows show them per column."""
    recorded = copy_recorded(tmp_path)
    runs = {m: recorded / m / "run" for m in METHODS}
    for run_dir in runs.values():  # the recorded summaries predate the diagnostics
        assert "selection" not in json.loads((run_dir / SUMMARY).read_text())
    genssd_run = runs["genssd"]
    cfg = load_run_config(genssd_run / "config.yaml")
    with RunStore(genssd_run) as store:  # this one's summary is written again, with them
        materialise(store, load_problems(cfg.data, 10), cfg)
    assert json.loads((genssd_run / SUMMARY).read_text())["selection"] is not None
    out = tmp_path / "report"
    report_command(list(runs.values()), [], out, Console(quiet=True))
    columns = {c["label"]: c["run"] for c in json.loads((out / "report.json").read_text())["columns"]}
    want = {m: expected_selection(runs[m]) for m in METHODS}
    assert {m: columns[m]["selection"] for m in METHODS} == want
    assert want["genssd"]["selections"] > 0 and want["standard-kd"]["selections"] == 0
    md = (out / "report.md").read_text()
    assert md_row(md, "selections (choices among ≥ 2 candidates)") == [str(want[m]["selections"]) for m in METHODS]
    assert md_row(md, "kept the shortest (random pick)") == [
        "—" if want[m]["kept_shortest"] is None
        else f"{100 * want[m]['kept_shortest']:.1f} % ({100 * want[m]['shortest_base_rate']:.1f} %)"
        for m in METHODS]  # fmt: skip
    assert md_row(md, "problems with a correct row") == [f"{100 * want[m]['coverage']:.1f} %" for m in METHODS]
