"""Start a local llama.cpp OpenAI-compatible server for a run, and always stop it after: on any
exit genssd stops it itself; on Linux the kernel kills it if genssd dies without doing so
(kill -9, OOM), and a run stops a server an earlier session of its directory left behind."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from genssd_cli.config import LaunchConfig
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.models import resolve_gguf
from genssd_cli.procs import die_with_parent
from genssd_cli.teacher.servers.local import NotServing, free_port, local_base_url, wait_until_serving

STOP_GRACE_S = 5.0
def stop_leftover_server(pid: int, port: int) -> bool:
    """Kill the llama.cpp server an earlier session started (recorded in its run_start), if it is
    still running: the same pid, serving on the same port. True when one was stopped."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # gone (or not Linux: the earlier session's server died with it there too)
    if b"llama_cpp.server" not in cmdline or str(port).encode() not in cmdline:
        return False  # the pid was reused by another program
    try:
        os.killpg(pid, signal.SIGKILL)  # it leads its own process group
    except ProcessLookupError:
        return False
    return True


class LocalServer:
    def __init__(self, cfg: LaunchConfig, model_alias: str, log_path: Path):
        if importlib.util.find_spec("llama_cpp") is None:
            raise UsageError(
                "teacher.launch needs llama.cpp's server: pip install 'llama-cpp-python[server]' "
                "(or install genssd with the demo extra)"
            )
        self.cfg = cfg
        self.gguf = resolve_gguf(cfg.gguf)
        self.port = cfg.port or free_port()
        self.base_url = local_base_url(self.port)
        self.alias = model_alias
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.gguf), "--model_alias", self.alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.cfg.n_ctx), *self.cfg.extra_args,
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Own session: a Ctrl-C in the terminal reaches genssd, which stops the server itself.
            self.process = subprocess.Popen(
                die_with_parent(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        """Until /v1/models answers; a server that died or stays silent points at its log."""
        try:
            wait_until_serving(f"{self.base_url}/models", self.process, self.cfg.startup_timeout_s, "teacher server")
        except NotServing as exc:
            raise RuntimeFailure(f"{exc}; see {self.log_path}") from None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: llama.cpp finishes its running request before exiting on TERM."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=STOP_GRACE_S)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # slow, or the user insists
            self.kill()
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """At once, no grace: for a second Ctrl-C."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.process.wait()


@contextmanager
def launched(server: LocalServer):
    server.start()
    try:
        yield server
    finally:
        server.stop()
