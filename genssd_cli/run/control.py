"""A run's stop state. The engine and the runner change it (a budget reached, a signal); the
progress display only shows it; the runner reads why the run stopped to pick its exit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import anyio

StopReason = Literal["signal", "budget"]


@dataclass
class RunControl:
    """Once `stop` is set no new teacher request is sent; requests in flight finish and are
    recorded. Created inside the event loop (anyio events belong to one)."""

    stop: anyio.Event
    spent: float | None = None  # teacher cost of this run directory, all sessions; None: no prices
    max_cost: float | None = None
    reason: StopReason | None = None  # why `stop` was set (the first reason wins)
    # A shard of a sharded run: adds this shard's cost to the run's shared budget, returns the run's total.
    share: Callable[[float], float] | None = None

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()

    def request_stop(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop.set()

    def pay(self, cost: float) -> None:
        """Count a response's cost; reaching max_cost stops the run as a first Ctrl-C does."""
        self.spent = self.share(cost) if self.share else (self.spent or 0.0) + cost
        if self.max_cost is not None and self.spent >= self.max_cost:
            self.request_stop("budget")
