"""A base_url that is not an OpenAI-compatible API (a login page, another JSON API, an error under
status 200, an empty body, a redirect): one clear line naming the endpoint and what came back, in
the client, `genssd run` (no run directory left behind) and `genssd doctor`."""

import anyio
import pytest
from conftest import genssd, run_config, write_config

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import TeacherFatalError
from genssd_cli.teacher.endpoint import ForeignAnswer, Prompt, Request
from genssd_cli.teacher.pool import TeacherClient, error_class

KINDS = {
    "html": "text/html, body '<!doctype html>",
    "json": "application/json, body '{\"status\": \"ok\"",
    "error": "an error object (quota exceeded)",
    "empty": "application/json, empty body",
    "redirect": "text/html, body '<!doctype html>",  # followed to the login page
}


@pytest.mark.parametrize("kind", KINDS)
def test_the_client_names_what_came_back(fake_teacher, kind):
    server = fake_teacher("--foreign", kind)
    teacher = TeacherClient(TeacherConfig(model="fake-teacher", base_url=server.base_url, retries=0), server.base_url)

    async def go():
        try:
            with pytest.raises(TeacherFatalError) as refused:
                await teacher.check()
            with pytest.raises(ForeignAnswer) as foreign:
                await teacher.endpoints[0].create(Request(Prompt("Q: 1+1?\nA:"), 2, 4, 0))
        finally:
            await teacher.aclose()
        return str(refused.value), foreign.value

    message, foreign = anyio.run(go)
    moved = f", redirected to http://127.0.0.1:{server.port}/login" if kind == "redirect" else ""
    head = f"teacher {server.base_url} did not answer as an OpenAI-compatible API (HTTP 200{moved}: "
    assert message.startswith(head)
    assert KINDS[kind] in message
    assert error_class(foreign) == "malformed"  # during a run: retried like any malformed body


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["html", "error"])
def test_run_and_doctor_refuse_in_one_line_and_leave_no_run_directory(tmp_path, fake_teacher, kind):
    server = fake_teacher("--foreign", kind)
    config = write_config(tmp_path / "c.yaml", run_config(server.base_url))
    run = genssd("run", str(config), "--out", str(tmp_path / "run"))
    assert run.returncode == 1, run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("error: teacher ") and KINDS[kind] in line
    assert not (tmp_path / "run").exists()
    doctor = genssd("doctor", str(config))
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr + doctor.stdout
    assert doctor.stderr.strip() == "error: the teacher endpoint cannot serve a run: reachable failed"
    assert "OpenAI-compatible" in doctor.stdout
