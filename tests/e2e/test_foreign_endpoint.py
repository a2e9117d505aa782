"""A base_url that is not an OpenAI-compatible API (a login page, another JSON API, an error under
status 200, an empty body, a redirect): one clear line naming the endpoint and what came back, in
the client, `genssd run` (no run directory left behind) and `genssd doctor`."""

import shutil

import anyio
import pytest
from conftest import genssd, run_config, write_config

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import RequestRefused, TeacherFatalError
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


HOSTILE = "\x1b]0;title\x07\x1b[2J"  # sets the terminal's title, clears the screen


def test_server_text_never_reaches_the_terminal_raw(tmp_path, fake_teacher):
    """A model id carrying escape sequences and rich markup: `genssd run`'s error line and `genssd
    doctor`'s table show it without them (before, the terminal's title was set and the screen cleared);
    a 400's message carrying them is cleaned in the error it raises."""
    server = fake_teacher("--model", f"evil{HOSTILE}[bold]model")
    config = write_config(tmp_path / "c.yaml", run_config(server.base_url))
    run = genssd("run", str(config), "--out", str(tmp_path / "run"))
    assert run.returncode == 1 and "is not served" in run.stderr and "evil]0;title[2J" not in run.stderr
    doctor = genssd("doctor", str(config))
    assert doctor.returncode == 1 and "evil" in doctor.stdout and "[bold]model" in doctor.stdout
    for text in (run.stdout, run.stderr, doctor.stdout, doctor.stderr):
        assert "\x1b" not in text and "\x07" not in text and "Traceback" not in text
    # A 400 whose message carries them, from a URL with a password: the error names neither.
    refusing = fake_teacher("--status", "400", "--error-message", f"bad{HOSTILE} request")
    url = refusing.base_url.replace("http://", "http://user:secret@")
    teacher = TeacherClient(TeacherConfig(model="fake-teacher", base_url=url, retries=0), url)

    async def ask():
        try:
            await teacher.endpoints[0].models()  # the client sends the real URL (with its user info)
            with pytest.raises(RequestRefused) as refused:
                await teacher.sample(Request(Prompt("Q: 1+1?\nA:"), 1, 4, 0), {}, lambda reply: None)
        finally:
            await teacher.aclose()
        return str(refused.value)

    message = anyio.run(ask)
    assert message.endswith("refused the request (400): bad request") and "secret" not in message, message


@pytest.mark.slow
def test_credentials_in_the_base_url_reach_no_file_and_no_screen(tmp_path, fake_teacher):
    """`http://user:secret@host/v1`: the run works (the client sends the real URL), and no file of
    the run directory, the response cache, the report or the output holds `secret`; `genssd report`
    on run folders whose names are rich markup works (before: a MarkupError traceback)."""
    server = fake_teacher()
    url = server.base_url.replace("http://", "http://user:secret@")
    run_dir = tmp_path / "[bold]x[/"
    cache = tmp_path / "cache.sqlite"
    config = write_config(tmp_path / "c.yaml", run_config(url, teacher={"cache": str(cache)}, data={"count": 1}))
    run = genssd("run", str(config), "--out", str(run_dir))
    assert run.returncode == 0, run.stderr
    twin = tmp_path / "y[/bold]"  # a closing tag that closes nothing: rich's MarkupError
    shutil.copytree(run_dir, twin)  # the same method twice: the columns are told apart by folder
    report = genssd("report", str(run_dir), str(twin), "--out", str(tmp_path / "report"))
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr
    assert "y[/bold]" in (tmp_path / "report" / "report.md").read_text()
    for text in (run.stdout, run.stderr, report.stdout, report.stderr):
        assert "secret" not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "c.yaml"]
    assert any(p.name == "events.jsonl" for p in files) and cache in files
    leaked = [str(p) for p in files if b"secret" in p.read_bytes()]
    assert not leaked, leaked
