"""Child processes that never outlive genssd, and stops passed on to them: the one place that asks
the kernel for a parent-death signal and that relays Ctrl-C / SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# What stops genssd with a drain: Ctrl-C, SIGTERM, and SIGHUP (the terminal it ran in closed).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Run before the child's own code, in the fresh child (single-threaded, unlike genssd, where a
# preexec_fn could deadlock): ask the kernel for SIGKILL when the parent dies, make sure the parent
# did not die already, then become the child.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    f"ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, signal.SIGKILL); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def die_with_parent(cmd: list[str]) -> list[str]:
    """`cmd`, started so that it is killed when the process starting it dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


def die_with(parent_pid: int) -> None:
    """Called in a child already running Python: the kernel kills it when `parent_pid` goes
    (Linux); if that happened before the call, it ends now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


@contextlib.contextmanager
def relay_stop(stop_all: Callable[[int], None]) -> Iterator[None]:
    """A Ctrl-C, SIGTERM or SIGHUP here is passed on to every child (they run in sessions of their
    own, so the terminal's Ctrl-C reaches them once, from here): they drain and record what is in
    flight while this process waits; a second one stops them at once."""
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def relay(signum, frame) -> None:
        stop_all(signal.SIGTERM)

    for s in previous:
        signal.signal(s, relay)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """Outside an event loop, SIGTERM and SIGHUP unwind like Ctrl-C, so what `finally` stops is stopped."""
    previous = {s: signal.signal(s, _raise_keyboard_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def reinstall_sigterm_as_keyboard_interrupt() -> None:
    """After an event loop that replaced the handlers."""
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _raise_keyboard_interrupt)
