"""Progress for `genssd run`: a rich live panel on a terminal, plain periodic lines otherwise.
It shows the engine's counters (`RunStats`, counters.py) and its stop and budget state
(`RunControl`), never decides them."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import asynccontextmanager

import anyio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from genssd_cli.run.control import RunControl
from genssd_cli.run.counters import RunStats


def status_line(stats: RunStats, control: RunControl) -> str:
    """One plain line of the run's progress (logs, CI, a pipe)."""
    elapsed = time.monotonic() - stats.started
    rate = stats.candidates / elapsed if elapsed > 0 else 0.0
    mean_ppl = f"{stats.ppl_sum / stats.ppl_count:.2f}" if stats.ppl_count else "-"
    return (
        f"problems {stats.problems_done}/{stats.problems_total} (active {stats.problems_active}) | "
        f"finished {stats.finished} truncated {stats.truncated} pruned {stats.pruned} failed {stats.failed} "
        f"correct {stats.correct} | steps {stats.steps} | cand/s {rate:.2f} | "
        f"teacher tokens {stats.teacher_tokens} | mean chosen PPL {mean_ppl} | "
        f"retries {_by_class(stats.retries)} | failures {_by_class(stats.failures)} | ETA {eta(stats)}"
        + (f" | cost {_spending(control)}" if control.spent is not None else "")
        + (f" | endpoints {stats.endpoints()}" if stats.endpoints else "")
        + (" | stopping" if control.stopping else "")
    )

def eta(stats: RunStats) -> str:
    """The time left, from the problems done so far."""
    elapsed = time.monotonic() - stats.started
    if not stats.problems_done or stats.problems_done >= stats.problems_total:
        return "-"
    seconds = elapsed / stats.problems_done * (stats.problems_total - stats.problems_done)
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

def status_table(stats: RunStats, control: RunControl) -> Table:
    """The live panel on a terminal."""
    elapsed = time.monotonic() - stats.started
    table = Table(title="genssd run", show_header=False, min_width=60)
    rows = [
        ("problems", f"{stats.problems_done}/{stats.problems_total} done, {stats.problems_active} active"),
        ("trajectories", f"{stats.finished} finished, {stats.truncated} truncated, "
                         f"{stats.pruned} pruned, {stats.failed} failed"),
        ("correct", str(stats.correct)),
        ("steps", str(stats.steps)),
        ("candidates/s", f"{stats.candidates / elapsed:.2f}" if elapsed > 0 else "-"),
        ("teacher tokens", str(stats.teacher_tokens)),
        *([("teacher cost", _spending(control))] if control.spent is not None else []),
        *([("teacher endpoints", stats.endpoints())] if stats.endpoints else []),
        ("mean chosen PPL", f"{stats.ppl_sum / stats.ppl_count:.3f}" if stats.ppl_count else "-"),
        ("teacher retries", _by_class(stats.retries)),
        ("failures", _by_class(stats.failures)),
        ("elapsed / ETA", f"{int(elapsed)}s / {eta(stats)}"),
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
        with Live(get_renderable=lambda: status_table(stats, control), console=console, refresh_per_second=2):
            yield
        return
    async with anyio.create_task_group() as group:

        async def ticker() -> None:
            while True:
                await anyio.sleep(interval_s)
                console.print(status_line(stats, control), soft_wrap=True)

        group.start_soon(ticker)
        try:
            yield
        finally:
            group.cancel_scope.cancel()
    console.print(status_line(stats, control), soft_wrap=True)
