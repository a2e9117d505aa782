"""The engine starts a problem's task when a place frees up, not one task per problem up front:
with 200 problems and max_active_problems 3, never more than 3 problem tasks exist at once, and
the problems still start in order and all end."""

from __future__ import annotations

from engine_helpers import ladder, make_config, make_problems, rows, run_engine
from engine_stubs import StubTeacher

from genssd_cli.run.engine import Engine


def test_problem_tasks_are_created_as_places_free_up(tmp_path, monkeypatch):
    """Peak live problem tasks is the limit (before: every problem's task at once, waiting)."""
    live, peak, started = [0], [0], []
    original = Engine._problem

    async def counted(self, problem, *args):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        started.append(problem.id)
        try:
            await original(self, problem, *args)
        finally:
            live[0] -= 1

    monkeypatch.setattr(Engine, "_problem", counted)
    cfg = make_config(engine={"max_active_problems": 3, "fsync": "never"}, search={"max_steps": 1})
    problems = make_problems(200)
    run_engine(cfg, tmp_path, problems, StubTeacher(ladder))
    assert peak[0] == 3
    assert started == [p.id for p in problems]
    assert len(rows(tmp_path, problems)) == 200
