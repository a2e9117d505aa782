"""Start a local llama.cpp OpenAI-compatible server for a run, and always stop it after: on any
exit genssd stops it itself; on Linux the kernel kills it if genssd dies without doing so
(kill -9, OOM), and a run stops a server an earlier session of its directory left behind.

The server gets a random API key of its own (in its environment, not on its command line, where
`ps` shows it) and counts as ready only when it lists our model alias to a request with that key:
whatever else holds the port (another server, a plain web server) is never taken for it."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from genssd_cli.config import LaunchConfig
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.models import resolve_gguf
from genssd_cli.procs import die_with_parent
from genssd_cli.teacher.servers.local import NotServing, free_port, local_base_url, wait_until

STOP_GRACE_S = 5.0
MODELS_MAX_BYTES = 1 << 20  # a model list is a few hundred bytes; whatever holds the port may send more
# Settings the server reads from its environment that would override ours (pydantic-settings: any case).
_OVERRIDING_ENV = {"api_key", "config_file"}


def serves_alias(base_url: str, api_key: str, alias: str) -> bool:
    """Whether GET /models lists `alias` to a request with `api_key` and refuses one with another
    key: the server genssd started (with that key and alias) does; whatever else holds the port (a
    plain web server, a server without our key) does not."""
    status, body = _models(base_url, api_key)
    try:
        data = json.loads(body).get("data") if status == 200 else None
    except (ValueError, AttributeError):
        return False
    if not (isinstance(data, list) and any(isinstance(m, dict) and m.get("id") == alias for m in data)):
        return False
    return _models(base_url, secrets.token_urlsafe(16))[0] in (401, 403)


def _models(base_url: str, api_key: str) -> tuple[int, bytes]:
    """GET /models with a key: the status and at most MODELS_MAX_BYTES of the body."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.stream("GET", f"{base_url}/models", headers=headers, timeout=2.0) as response:
        body = b""
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MODELS_MAX_BYTES:
                return response.status_code, b""
        return response.status_code, body


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
        self.api_key = secrets.token_urlsafe(32)  # the pool's client sends it (TeacherClient's api_key)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.gguf), "--model_alias", self.alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.cfg.n_ctx), *self.cfg.extra_args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k.lower() not in _OVERRIDING_ENV}
        env["API_KEY"] = self.api_key  # llama-cpp-python's server settings read it from here
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Own session: a Ctrl-C in the terminal reaches genssd, which stops the server itself.
            self.process = subprocess.Popen(
                die_with_parent(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env,
            )

    def wait_ready(self) -> None:
        """Until /v1/models lists our alias to our key; a server that died or stays silent (or
        something else that holds its port) points at its log."""
        try:
            wait_until(lambda: serves_alias(self.base_url, self.api_key, self.alias), self.process,
                       self.cfg.startup_timeout_s, "teacher server")  # fmt: skip
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
