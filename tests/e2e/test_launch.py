"""A launched teacher server never outlives genssd: the kernel kills it with its parent (Linux),
and a run stops one an earlier session left. Stand-in processes, no model."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genssd_cli.procs import die_with_parent
from genssd_cli.teacher.servers.llama_cpp import stop_leftover_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def gone(pid: int, within_s: float = 10.0) -> bool:
    """The process ended (a zombie waiting for its reaper counts as ended)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def test_a_server_dies_with_the_process_that_started_it_even_on_kill_9():
    # A stand-in for genssd: starts the "server" as launch.py does, prints its pid, waits.
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time; from genssd_cli.procs import die_with_parent; "
         f"child = subprocess.Popen(die_with_parent({SLEEPER!r}), start_new_session=True); "
         "print(child.pid, flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    child = int(parent.stdout.readline())
    time.sleep(0.5)  # the child has become the sleeper
    assert not gone(child, within_s=0.2)
    assert Path(f"/proc/{child}/cmdline").read_text().split("\0")[:2] == SLEEPER[:2]  # exec'd, same pid
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert gone(child)


def test_the_wrapper_refuses_to_start_when_its_parent_is_already_gone():
    started = subprocess.run([*die_with_parent(SLEEPER)[:3], "1", *SLEEPER], timeout=30)
    assert started.returncode == 1  # its parent is not pid 1: it never became the sleeper


def test_a_server_left_by_an_earlier_session_is_stopped_and_nothing_else_is():
    leftover = subprocess.Popen([*SLEEPER, "llama_cpp.server", "--port", "43210"], start_new_session=True)
    other = subprocess.Popen([*SLEEPER, "something-else", "--port", "43210"], start_new_session=True)
    try:
        assert not stop_leftover_server(leftover.pid, 43211)  # another port: not that server
        assert not stop_leftover_server(other.pid, 43210)  # the pid now runs another program
        assert stop_leftover_server(leftover.pid, 43210)
        leftover.wait(timeout=10)
        assert other.poll() is None
        assert not stop_leftover_server(leftover.pid, 43210)  # already gone
    finally:
        for process in (leftover, other):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
