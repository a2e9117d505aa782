"""The launched llama.cpp server counts as ready only when it lists our model alias to a request
with its own key: a plain web server, or a server without that key, holding the port is never
taken for it. The key goes in the server's environment, not on its command line (`ps`). In
process, against standard-library servers: no model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from genssd_cli.config import LaunchConfig
from genssd_cli.teacher.servers import llama_cpp
from genssd_cli.teacher.servers.llama_cpp import LocalServer, serves_alias
from genssd_cli.teacher.servers.local import NotServing, local_base_url, wait_until

KEY = "the-right-key"


class ModelsHandler(BaseHTTPRequestHandler):
    """/v1/models as llama-cpp-python answers it, to the right key only (401 otherwise)."""

    alias = "teacher"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps({"object": "list", "data": [{"id": self.alias, "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def serve():
    servers = []

    def start(handler) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return local_base_url(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("listing", [False, True], ids=["empty folder", "a file listing the alias"])
def test_a_plain_web_server_on_the_port_is_not_ready(serve, tmp_path, listing):
    """Before, any answer below 500 counted: `python -m http.server` on the port passed. Even one
    whose folder holds a v1/models listing our alias is not ready: it does not check the key."""
    if listing:
        (tmp_path / "v1").mkdir()
        (tmp_path / "v1" / "models").write_text('{"data": [{"id": "teacher"}]}')

    class Files(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args) -> None:
            pass

    url = serve(Files)
    assert not serves_alias(url, KEY, "teacher")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(NotServing, match="did not answer within"):
            wait_until(lambda: serves_alias(url, KEY, "teacher"), process, 1.0, "teacher server")
    finally:
        process.kill()
        process.wait()


def test_ready_only_with_our_key_and_our_alias(serve):
    url = serve(ModelsHandler)
    assert serves_alias(url, KEY, "teacher")
    assert not serves_alias(url, "another-key", "teacher")  # 401: not the server we started
    assert not serves_alias(url, KEY, "another-alias")  # another model behind the port


def test_a_server_without_our_model_list_is_not_ready(serve):
    """Any status below 500 used to pass: a 404 page, a redirect, a JSON of another shape do not."""

    class Other(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = b'{"status": "ok"}' if self.path.endswith("/models") else b"no"
            self.send_response(200 if self.path.endswith("/models") else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

    assert not serves_alias(serve(Other), KEY, "teacher")


def test_the_key_is_random_and_goes_in_the_environment_not_the_command_line(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    started = {}

    class Popen:
        def __init__(self, cmd, **kwargs):
            started.update(cmd=cmd, env=kwargs["env"])

    monkeypatch.setattr(llama_cpp.subprocess, "Popen", Popen)
    monkeypatch.setenv("CONFIG_FILE", "/tmp/theirs.yaml")  # would override our host, port and key
    first = LocalServer(LaunchConfig(gguf=str(gguf)), "teacher", tmp_path / "log")
    second = LocalServer(LaunchConfig(gguf=str(gguf)), "teacher", tmp_path / "log")
    assert first.api_key != second.api_key and len(first.api_key) >= 32
    first.start()
    assert first.api_key not in " ".join(started["cmd"])
    assert started["env"]["API_KEY"] == first.api_key
    assert "CONFIG_FILE" not in started["env"]
