"""Start a local llama.cpp OpenAI-compatible server for a run, and always stop it after."""

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
from genssd_cli.serving import NotServing, free_port, local_base_url, wait_until_serving

STOP_GRACE_S = 5.0


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
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
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
