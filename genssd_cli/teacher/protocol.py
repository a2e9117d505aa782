"""What the engine needs of a teacher: the candidates of a step it does not have yet, each reply
reported the moment it arrives. `TeacherClient` (pool.py) is the real one; the tests' stub is
another."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from genssd_cli.rundir.records import Candidate, TeacherReply
from genssd_cli.teacher.endpoint import Request

OnReply = Callable[[TeacherReply], None]


class Teacher(Protocol):
    async def sample(self, step: Request, have: Mapping[int, Candidate], on_reply: OnReply) -> None:
        """Ask for the candidates of `step` (n choices, start 0, the step's seed) not in `have`
        (index → candidate); each reply goes to `on_reply` as it arrives. Raises StopRequested
        once a stop is requested (nothing is sent then), TeacherUnavailable after the retries,
        ContextTooLong when the trace outgrew the teacher's context."""
        ...
