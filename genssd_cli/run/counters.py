"""What the engine counts as a run goes (problems, trajectories by outcome, candidates, tokens,
retries): kept by the engine, shown by the progress display, never deciding anything."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class RunStats:
    problems_total: int
    problems_done: int = 0
    problems_active: int = 0
    finished: int = 0
    truncated: int = 0
    pruned: int = 0
    failed: int = 0
    correct: int = 0
    steps: int = 0
    candidates: int = 0
    teacher_tokens: int = 0
    ppl_sum: float = 0.0
    ppl_count: int = 0
    retries: Counter[str] = field(default_factory=Counter)  # the teacher client's, by class
    failures: Counter[str] = field(default_factory=Counter)  # failed trajectories, by class
    endpoints: Callable[[], str] | None = None  # a pool's state, when there is more than one
    started: float = field(default_factory=time.monotonic)

    def add_ppl(self, ppl: float) -> None:
        self.ppl_sum += ppl
        self.ppl_count += 1
