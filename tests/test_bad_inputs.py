"""The bad-input catalogue: every user mistake gets one `error:` line, exit 2 (usage) or 1 (runtime),
no traceback, and the files of the run directory it was pointed at stay byte for byte the same."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FakeTeacher, genssd, run_config, write_config

from genssd_cli.store import EVENTS

pytestmark = pytest.mark.slow


@dataclass
class Case:
    name: str
    args: list[str]
    code: int
    message: str
    run: str = "run"  # which prepared run directory it is pointed at
    env: dict | None = None


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small finished run, copies of it damaged in known ways, and two teachers."""
    tmp = tmp_path_factory.mktemp("existing")
    server = FakeTeacher(tmp)
    keyed = FakeTeacher(tmp, "--api-key", "sk-right")
    config = write_config(tmp / "good.yaml", run_config(server.base_url, data={"count": 1}))
    result = genssd("run", str(config), "--out", str(tmp / "run"))
    assert result.returncode == 0, result.stderr

    corrupt = tmp / "corrupt"
    shutil.copytree(tmp / "run", corrupt)
    lines = (corrupt / EVENTS).read_text().splitlines(keepends=True)
    lines[1] = "{this is not json\n"
    (corrupt / EVENTS).write_text("".join(lines))

    old = tmp / "old-format"
    shutil.copytree(tmp / "run", old)
    events = [json.loads(line) for line in (old / EVENTS).read_text().splitlines()]
    (old / EVENTS).write_text("".join(json.dumps({**e, "v": 1}) + "\n" for e in events))

    # A finished run asks nothing of the teacher or the student: point those cases at one that is not.
    unfinished = tmp / "unfinished"
    shutil.copytree(tmp / "run", unfinished)
    kept = [line for line in (unfinished / EVENTS).read_text().splitlines(keepends=True) if '"finish"' not in line]
    (unfinished / EVENTS).write_text("".join(kept))

    (tmp / "a-file").write_text("not a directory\n")
    yield tmp, server, keyed
    server.stop()
    keyed.stop()


def catalogue(tmp: Path, url: str, keyed_url: str) -> list[Case]:
    def data(name: str, content: bytes) -> Path:
        path = tmp / name
        path.write_bytes(content)
        return path

    good = str(tmp / "good.yaml")
    row = b'{"id": "a", "question": "1+1?", "answer": "2"}\n'
    no_answer = data("no_answer.jsonl", b'{"question": "1+1?"}\n')
    latin1 = data("latin1.jsonl", '{"id": "a", "question": "caf\u00e9?", "answer": "1"}\n'.encode("latin-1"))
    duplicate = data("duplicate.jsonl", row + row)
    empty = data("empty.jsonl", b"\n")
    not_object = data("list.jsonl", b"[1, 2]\n")
    broken_yaml = data("broken.yaml", b"teacher: [unclosed\n")
    with_key = write_config(tmp / "with_key.yaml", run_config(url, teacher={"api_key": "sk-oops"}))
    keyed = write_config(tmp / "keyed.yaml", run_config(keyed_url, teacher={"api_key_env": "GENSSD_BAD_KEY"},
                                                        data={"count": 1}))  # fmt: skip
    def setting(*items: str) -> list[str]:
        return ["run", good, *[a for item in items for a in ("--set", item)]]

    return [
        Case("missing config", ["run", str(tmp / "missing.yaml")], 2, "config file not found"),
        Case("config not YAML", ["run", str(broken_yaml)], 2, "is not valid YAML (line 2)"),
        Case("n below 1", setting("search.n=0"), 2, "search.n: Input should be greater than or equal to 1"),
        Case("chunk of 0 tokens", setting("search.chunk_tokens=0"), 2, "search.chunk_tokens"),
        Case("unknown key", setting("search.colour=red"), 2, "search.colour: unknown key"),
        Case("not a number", setting("search.n=lots"), 2, "search.n: Input should be a valid integer"),
        Case("--set without =", setting("search.n"), 2, "--set expects KEY=VALUE"),
        Case("unknown method", setting("method=magic"), 2, "method: Input should be"),
        Case("API key in the file", ["run", str(with_key)], 2, "API keys are never read from config files"),
        Case("key variable unset", ["run", str(keyed)], 2, "environment variable GENSSD_BAD_KEY is not set"),
        Case("wrong API key", ["run", str(keyed)], 1, "rejected the API key (401)", env={"GENSSD_BAD_KEY": "sk-no"},
             run="unfinished"),
        Case("missing dataset", setting(f"data.source={tmp}/nope.jsonl"), 2, "dataset not found"),
        Case("row without answer", setting(f"data.source={no_answer}"), 2, "line 1: missing field 'answer'"),
        Case("row not an object", setting(f"data.source={not_object}"), 2, "line 1: expected a JSON object"),
        Case("non-UTF-8 data", setting(f"data.source={latin1}"), 2, "is not UTF-8"),
        Case("duplicate ids", setting(f"data.source={duplicate}"), 2, "duplicate problem id 'a'"),
        Case("empty dataset", setting(f"data.source={empty}"), 2, "has no problems"),
        Case("missing prompt", setting("prompts.teacher=nope"), 2, "prompt template not found: nope"),
        Case("unreachable endpoint", setting("teacher.base_url=http://127.0.0.1:9/v1"), 1, "unreachable",
             run="unfinished"),
        Case("model not served", [*setting("teacher.model=nobody"), "--force"], 1, "'nobody' is not served",
             run="unfinished"),
        Case("student not found", [*setting("student.model=/no/such"), "--force"], 2, "model '/no/such' not found",
             run="unfinished"),
        Case("another config's run", setting("search.n=5"), 2, "changed: search.n"),
        Case("--limit 0", ["run", good, "--limit", "0"], 2, "--limit"),
        Case("unknown flag", ["run", good, "--no-such-flag"], 2, "No such option: --no-such-flag"),
        Case("unknown command", ["walk"], 2, "No such command 'walk'"),
        Case("--out is a file", ["run", good], 2, "exists and is not a directory", run="a-file"),
        Case("corrupt log line", ["run", good], 1, "events.jsonl line 2 is corrupt", run="corrupt"),
        Case("older log format", ["run", good], 2, "written by another genssd version", run="old-format"),
    ]  # fmt: skip


def check_one_clean_line(result, case: Case) -> None:
    assert result.returncode == case.code, (case.name, result.stderr)
    assert case.message in result.stderr, (case.name, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, case.name
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (case.name, result.stderr)


def test_bad_inputs_give_one_line_and_leave_the_run_alone(prepared):
    tmp, server, keyed = prepared
    cases = catalogue(tmp, server.base_url, keyed.base_url)
    assert len(cases) >= 20
    for case in cases:
        target = tmp / case.run
        before = tree_digest(target) if target.is_dir() else target.read_bytes()
        result = genssd(*case.args, "--out", str(target), env=case.env)
        check_one_clean_line(result, case)
        after = tree_digest(target) if target.is_dir() else target.read_bytes()
        assert after == before, f"{case.name}: changed the existing run"
    print(f"{len(cases) + 1} bad inputs covered (with the read-only directory)")


def test_read_only_run_directory(prepared, tmp_path):
    """Root ignores file modes, so under root the command runs without CAP_DAC_OVERRIDE."""
    tmp, server, _ = prepared
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    config = write_config(tmp_path / "c.yaml", run_config(server.base_url, data={"count": 1}))
    before = tree_digest(run)
    for path in [run, *run.iterdir()]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    command = [sys.executable, "-m", "genssd_cli", "run", str(config), "--out", str(run)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: file modes cannot be enforced")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        check_one_clean_line(result, Case("read-only", [], 2, f"cannot write to run directory {run}"))
        assert tree_digest(run) == before
    finally:
        for path in [run, *run.iterdir()]:
            path.chmod(0o755)


def test_second_run_on_the_same_directory_is_refused(prepared):
    from genssd_cli.store import RunStore

    tmp, server, _ = prepared
    config = write_config(tmp / "lock.yaml", run_config(server.base_url, data={"count": 1}))
    with RunStore(tmp / "run"):
        result = genssd("run", str(config), "--out", str(tmp / "run"))
    check_one_clean_line(result, Case("locked", [], 1, "in use by another genssd run"))
