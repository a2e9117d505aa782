"""Progress for `genssd run`: a rich live panel on a terminal, plain periodic lines otherwise.
`RunStats` holds display counters only; the run's stop and budget state is the engine's
(`RunControl`), shown here, never decided here."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from genssd_cli.control import RunControl


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

    def line(self, control: RunControl) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.candidates / elapsed if elapsed > 0 else 0.0
        mean_ppl = f"{self.ppl_sum / self.ppl_count:.2f}" if self.ppl_count else "-"
        return (
            f"problems {self.problems_done}/{self.problems_total} (active {self.problems_active}) | "
            f"finished {self.finished} truncated {self.truncated} pruned {self.pruned} failed {self.failed} "
            f"correct {self.correct} | steps {self.steps} | cand/s {rate:.2f} | "
            f"teacher tokens {self.teacher_tokens} | mean chosen PPL {mean_ppl} | "
            f"retries {_by_class(self.retries)} | failures {_by_class(self.failures)} | ETA {self.eta()}"
            + (f" | cost {_spending(control)}" if control.spent is not None else "")
            + (f" | endpoints {self.endpoints()}" if self.endpoints else "")
            + (" | stopping" if control.stopping else "")
        )

    def eta(self) -> str:
        elapsed = time.monotonic() - self.started
        if not self.problems_done or self.problems_done >= self.problems_total:
            return "-"
        seconds = elapsed / self.problems_done * (self.problems_total - self.problems_done)
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

    def table(self, control: RunControl) -> Table:
        elapsed = time.monotonic() - self.started
        table = Table(title="genssd run", show_header=False, min_width=60)
        rows = [
            ("problems", f"{self.problems_done}/{self.problems_total} done, {self.problems_active} active"),
            ("trajectories", f"{self.finished} finished, {self.truncated} truncated, "
                             f"{self.pruned} pruned, {self.failed} failed"),
            ("correct", str(self.correct)),
            ("steps", str(self.steps)),
            ("candidates/s", f"{self.candidates / elapsed:.2f}" if elapsed > 0 else "-"),
            ("teacher tokens", str(self.teacher_tokens)),
            *([("teacher cost", _spending(control))] if control.spent is not None else []),
            *([("teacher endpoints", self.endpoints())] if self.endpoints else []),
            ("mean chosen PPL", f"{self.ppl_sum / self.ppl_count:.3f}" if self.ppl_count else "-"),
            ("teacher retries", _by_class(self.retries)),
            ("failures", _by_class(self.failures)),
            ("elapsed / ETA", f"{int(elapsed)}s / {self.eta()}"),
        ]  # fmt: skip
        if control.stopping:
            why = "max_cost reached: " if control.reason == "budget" else ""
            rows.append(("stopping", why + "finishing requests in flight (Ctrl-C again: stop at once)"))
        for key, value in rows:
            table.add_row(key, value)
        return table


def _spending(control: RunControl) -> str:
    return f"{control.spent:.4f}" + (f" of max {control.max_cost:g}" if control.max_cost is not None else "")


def _by_class(counts: Counter[str]) -> str:
    """`3 (http_503 2, timeout 1)` or `0`."""
    total = sum(counts.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")"


@asynccontextmanager
async def progress_display(stats: RunStats, control: RunControl, console: Console, interval_s: float):
    if console.is_terminal:
        with Live(get_renderable=lambda: stats.table(control), console=console, refresh_per_second=2):
            yield
        return
    async with anyio.create_task_group() as group:

        async def ticker() -> None:
            while True:
                await anyio.sleep(interval_s)
                console.print(stats.line(control), soft_wrap=True)

        group.start_soon(ticker)
        try:
            yield
        finally:
            group.cancel_scope.cancel()
    console.print(stats.line(control), soft_wrap=True)
