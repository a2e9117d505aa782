"""The engine knows its teacher only as the `Teacher` protocol (teacher/protocol.py), and both
teachers implement it with its very signature: the pool (`TeacherClient`) that a run uses, and the
tests' `StubTeacher`, which therefore cannot drift from what the engine calls. The seed the engine
asks a step with is stable and spread."""

from __future__ import annotations

import inspect

import pytest
from engine_stubs import StubTeacher, chunk

from genssd_cli.run.engine import request_seed
from genssd_cli.teacher.pool import TeacherClient
from genssd_cli.teacher.protocol import Teacher

MEMBERS = [name for name, _ in inspect.getmembers(Teacher, inspect.isfunction) if not name.startswith("_")]


def test_the_protocol_is_what_the_engine_calls():
    assert MEMBERS == ["sample"]


@pytest.mark.parametrize("teacher", [TeacherClient, StubTeacher])
@pytest.mark.parametrize("member", MEMBERS)
def test_each_teacher_implements_the_protocol_with_its_signature(teacher, member):
    mine, theirs = getattr(teacher, member), getattr(Teacher, member)
    assert inspect.signature(mine, eval_str=True) == inspect.signature(theirs, eval_str=True)
    assert inspect.iscoroutinefunction(mine) == inspect.iscoroutinefunction(theirs)


def test_the_stub_is_a_teacher():
    teacher: Teacher = StubTeacher(lambda call, index: chunk("The answer is 7.", "stop"))
    assert inspect.iscoroutinefunction(teacher.sample)


def test_request_seed_is_stable_and_spread():
    assert request_seed(0, "p1", 0, 2, 0) == request_seed(0, "p1", 0, 2, 0)
    seeds = {request_seed(0, f"p{i}", 0, s, a) for i in range(20) for s in range(5) for a in range(2)}
    assert len(seeds) == 200
