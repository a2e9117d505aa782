"""Local HTTP servers run as their own process (llama.cpp's for `teacher.launch`, the bundled fake
teacher for `genssd bench engine` and the tests): a free port for one, and the wait until it
answers (any answer, or one that only the server started can give)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable

import httpx

from genssd_cli.errors import RuntimeFailure
from genssd_cli.procs import die_with_parent

FAKE_TEACHER_STARTUP_S = 30.0


class NotServing(RuntimeFailure):
    """The server process exited while starting, or did not answer in time."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1"


def wait_until_serving(url: str, process: subprocess.Popen, timeout_s: float, name: str = "server") -> None:
    """Poll `url` with a short backoff until it answers, the process dies, or time is up. Any
    answer below 500 counts: a server that wants an API key is serving, one still loading its
    model (503) is not."""
    wait_until(lambda: httpx.get(url, timeout=2.0).status_code < 500, process, timeout_s, name)


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, timeout_s: float, name: str = "server") -> None:
    """Call `ready` with a short backoff until it says yes, the process dies, or time is up (an
    HTTP error counts as not yet)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NotServing(f"{name} exited with code {process.returncode} while starting")
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    raise NotServing(f"{name} did not answer within {timeout_s:.0f} s")


def start_fake_teacher(port: int, *args: str) -> subprocess.Popen:
    """genssd_cli/teacher/servers/test_teacher.py on `port` with its command-line `args`, once it answers; the
    caller stops it."""
    module = "genssd_cli.teacher.servers.test_teacher"
    process = subprocess.Popen(die_with_parent([sys.executable, "-m", module, "--port", str(port), *args]))
    try:
        wait_until_serving(f"{local_base_url(port)}/models", process, FAKE_TEACHER_STARTUP_S, "fake teacher server")
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process
