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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    FakeTeacher,
    bench_file,
    genssd,
    run_config,
    save_adapter_of_another_model,
    trajectory_row,
    write_config,
)

from genssd_cli.rundir.layout import EVENTS

pytestmark = pytest.mark.slow


@dataclass
class Case:
    name: str
    args: list[str]
    code: int
    message: str
    run: str = "run"  # the prepared path it is pointed at: byte for byte the same afterwards
    env: dict | None = None
    out: bool = True  # `--out <run>` is added (the run command's cases)


def tree_digest(path: Path) -> dict[str, str]:
    """Every file's hash and every folder (an empty folder left behind counts too)."""
    return {
        str(p.relative_to(path)): "folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.name != ".lock" and not p.name.startswith("requests-")  # the teachers' own logs
    }


FOREIGN = ("html", "json", "error", "empty", "redirect")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small finished run, copies of it damaged in known ways, teachers that answer right,
    want a key, or answer as no OpenAI-compatible API does, and inputs for the other commands."""
    tmp = tmp_path_factory.mktemp("existing")
    server = FakeTeacher(tmp)
    keyed = FakeTeacher(tmp, "--api-key", "sk-right")
    foreign = {kind: FakeTeacher(tmp, "--foreign", kind) for kind in FOREIGN}
    foreign["no-usage"] = FakeTeacher(tmp, "--no-usage")  # answers, but never says what it cost
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

    # For train: a run with only a wrong trajectory, one whose rows are not genssd's, a plain folder.
    for name, rows in (("wrong-only", [trajectory_row("a", "1+1?", "1 + 1 = 3. The answer is 3.", False)]),
                       ("foreign-rows", [{"prompt": "2+3", "completion": "5"}]), ("no-rows", [])):  # fmt: skip
        (tmp / name).mkdir()
        shutil.copy(tmp / "run" / "config.yaml", tmp / name / "config.yaml")
        (tmp / name / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "plain").mkdir()
    (tmp / "a-file").write_text("not a directory\n")
    bench_file(tmp / "bench.jsonl")
    save_adapter_of_another_model(tmp / "other-adapter")
    yield tmp, server, keyed, foreign
    for teacher in (server, keyed, *foreign.values()):
        teacher.stop()


def catalogue(tmp: Path, url: str, keyed_url: str, foreign: dict[str, str]) -> list[Case]:
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
    # About 12,000 tokens: more than the demo student's 8,192 positions.
    huge = data("huge.jsonl", json.dumps({"id": "huge", "question": "1 + " * 6000 + "1?", "answer": "6001"}).encode())
    broken_yaml = data("broken.yaml", b"teacher: [unclosed\n")
    with_key = write_config(tmp / "with_key.yaml", run_config(url, teacher={"api_key": "sk-oops"}))
    keyed = write_config(tmp / "keyed.yaml", run_config(keyed_url, teacher={"api_key_env": "GENSSD_BAD_KEY"},
                                                        data={"count": 1}))  # fmt: skip
    dead = write_config(tmp / "dead.yaml", run_config("http://127.0.0.1:9/v1"))
    bench = str(tmp / "bench.jsonl")
    other_adapter = str(tmp / "other-adapter")
    offline = {"HF_HUB_OFFLINE": "1"}

    def setting(*items: str) -> list[str]:
        return ["run", good, *[a for item in items for a in ("--set", item)]]

    def answering(kind: str) -> list[str]:
        return [*setting(f"teacher.base_url={foreign[kind]}"), "--force"]

    def train(*args: str, out: str = "train-out") -> list[str]:
        return ["train", *args, "--out", str(tmp / out)]

    def evaluate(*args: str, out: str = "eval-out") -> list[str]:
        return ["eval", "smollm2-135m-instruct", *args, "--out", str(tmp / out)]

    def pipeline(*args: str, out: str = "pipeline-out") -> list[str]:
        return ["pipeline", "configs/pipeline-demo.yaml", *args, "--out", str(tmp / out)]

    def tune(*args: str) -> list[str]:
        return ["tune", good, *args, "--pilot", "1", "--out", str(tmp / "tune-out")]

    def export(*args: str, out: str = "export-out") -> list[str]:
        return ["export", *args, "--out", str(tmp / out)]

    def report(*args: str) -> list[str]:
        return ["report", *args, "--out", str(tmp / "report-out")]

    not_openai = "did not answer as an OpenAI-compatible API"
    return [
        # run: the config, the data, the teacher, the run directory
        Case("missing config", ["run", str(tmp / "missing.yaml")], 2, "config file not found"),
        Case("config not YAML", ["run", str(broken_yaml)], 2, "is not valid YAML (line 2)"),
        Case("n below 1", setting("search.n=0"), 2, "search.n: Input should be greater than or equal to 1"),
        Case("chunk of 0 tokens", setting("search.chunk_tokens=0"), 2, "search.chunk_tokens"),
        Case("unknown key", setting("search.colour=red"), 2, "search.colour: unknown key"),
        Case("not a number", setting("search.n=lots"), 2, "search.n: Input should be a valid integer"),
        Case("--set without =", setting("search.n"), 2, "--set expects KEY=VALUE"),
        Case("unknown method", setting("method=magic"), 2, "method: Input should be"),
        Case("negative max_cost", setting("max_cost=-1"), 2, "max_cost"),
        Case("unknown too_long choice", setting("data.too_long=maybe"), 2, "data.too_long: Input should be"),
        Case("API key in the file", ["run", str(with_key)], 2, "API keys are never read from config files"),
        Case("key variable unset", ["run", str(keyed)], 2, "environment variable GENSSD_BAD_KEY is not set"),
        Case("wrong API key", ["run", str(keyed)], 1, "rejected the API key (401)", env={"GENSSD_BAD_KEY": "sk-no"},
             run="unfinished"),
        Case("a key typed as api_key_env", setting("teacher.api_key_env=sk-live-0123456789abcdef"), 2,
             "api_key_env: not the name of an environment variable"),
        Case("launch: a key in extra_args", setting("teacher.base_url=null",
             "teacher.launch={gguf: gemma-3-270m, extra_args: [--api_key, sk-x]}"), 2,
             "extra_args: API keys are never read from config files"),
        Case("launch: --host in extra_args", setting("teacher.base_url=null",
             "teacher.launch={gguf: gemma-3-270m, extra_args: [--host=0.0.0.0]}"), 2,
             "extra_args: --host is genssd's to set"),
        Case("missing dataset", setting(f"data.source={tmp}/nope.jsonl"), 2, "dataset not found"),
        Case("row without answer", setting(f"data.source={no_answer}"), 2, "line 1: missing field 'answer'"),
        Case("row not an object", setting(f"data.source={not_object}"), 2, "line 1: expected a JSON object"),
        Case("non-UTF-8 data", setting(f"data.source={latin1}"), 2, "is not UTF-8"),
        Case("duplicate ids", setting(f"data.source={duplicate}"), 2, "duplicate problem id 'a'"),
        Case("empty dataset", setting(f"data.source={empty}"), 2, "has no problems"),
        Case("problem longer than the student holds", [*setting(f"data.source={huge}"), "--force"], 2,
             "problem 'huge' needs", run="unfinished"),
        Case("missing prompt", setting("prompts.teacher=nope"), 2, "prompt template not found: nope"),
        Case("unreachable endpoint", setting("teacher.base_url=http://127.0.0.1:9/v1"), 1, "unreachable",
             run="unfinished"),
        Case("endpoint answers HTML", answering("html"), 1, not_openai, run="unfinished"),
        Case("endpoint answers another JSON", answering("json"), 1, not_openai, run="unfinished"),
        Case("endpoint answers 200 with an error", answering("error"), 1, "an error object", run="unfinished"),
        Case("endpoint answers an empty body", answering("empty"), 1, "empty body", run="unfinished"),
        Case("endpoint redirects to a login page", answering("redirect"), 1, "redirected to", run="unfinished"),
        Case("max_cost, endpoint sends no usage", [*answering("no-usage"), "--set", "max_cost=1", "--set",
             "teacher.price={input: 1, output: 1}"], 2, "max_cost cannot be kept", run="unfinished"),
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
        # run: sharded
        Case("--shards and --shard", ["run", good, "--shards", "2", "--shard", "0/2"], 2, "not both"),
        Case("--shard not K/N", ["run", good, "--shard", "2/2"], 2, "give K/N with 0 <= K < N"),
        Case("an executor flag without --shards", ["run", good, "--restarts", "1"], 2,
             "--restarts: only with --shards"),
        Case("--ray-address, local executor", ["run", good, "--shards", "2", "--ray-address", "auto"], 2,
             "--ray-address: only with --executor ray"),
        Case("--shards on an unsharded run", ["run", good, "--shards", "2"], 2, "holds an unsharded run"),
        Case("more shards than requests in flight", ["run", good, "--shards", "8", "--out", str(tmp / "sharded-out")],
             2, "teacher.max_concurrency 4 cannot be shared by 8 shards", out=False),
        # tune
        Case("tune: a grid without values", tune("--grid", "search.n"), 2, "--grid expects KEY=V1,V2", out=False),
        Case("tune: a key given twice", tune("--grid", "search.n=2,3", "--grid", "search.n=4,5"), 2,
             "--grid search.n is given twice", out=False),
        Case("tune: a key in --set and --grid", tune("--grid", "search.n=2,3", "--set", "search.n=4"), 2,
             "--set search.n and --grid search.n", out=False),
        Case("tune: --grid data.limit", tune("--grid", "data.limit=1,2"), 2, "run on the first --pilot N problems",
             out=False),
        # export
        Case("export: not a run directory", export(str(tmp / "plain")), 2, "has no trajectories.jsonl", out=False),
        Case("export: --out a folder of something else", export(str(tmp / "run"), out="corrupt"), 2,
             "is not empty and not a genssd export", run="corrupt", out=False),
        # doctor
        Case("doctor: missing config", ["doctor", str(tmp / "missing.yaml")], 2, "config file not found", out=False),
        Case("doctor: unknown key", ["doctor", good, "--set", "search.colour=red"], 2, "search.colour: unknown key",
             out=False),
        Case("doctor: unreachable endpoint", ["doctor", str(dead)], 1, "cannot serve a run: reachable failed",
             out=False),
        Case("doctor: endpoint answers HTML", ["doctor", good, "--set", f"teacher.base_url={foreign['html']}"], 1,
             "cannot serve a run: reachable failed", out=False),
        # train
        Case("train: run directory not found", train(str(tmp / "missing")), 2, "run directory not found", out=False),
        Case("train: no trajectories.jsonl", train(str(tmp / "plain")), 2, "has no trajectories.jsonl", out=False),
        Case("train: rows of another tool", train(str(tmp / "foreign-rows")), 2,
             "trajectories.jsonl line 1: not a TrajectoryRow (problem_id: Field required)", out=False),
        Case("train: no trajectory at all", train(str(tmp / "no-rows"), "--include-incorrect"), 2,
             "nothing to train on: no trajectory", out=False),
        Case("train: no correct trajectory", train(str(tmp / "wrong-only")), 2,
             "no correct trajectory (--include-incorrect trains on all)", out=False),
        Case("train: zero epochs", train(str(tmp / "run"), "--set", "training.epochs=0", "--include-incorrect"), 2,
             "training.epochs: Input should be greater than 0", out=False),
        Case("train: unknown key", train(str(tmp / "run"), "--set", "training.colour=red"), 2,
             "training.colour: unknown key", out=False),
        Case("train: unknown tracker", train(str(tmp / "run"), "--include-incorrect", "--set",
             "training.report_to=[nope]"), 2, "training.report_to: unknown tracker 'nope'", out=False),
        Case("train: config not found", train(str(tmp / "run"), "--config", str(tmp / "missing.yaml")), 2,
             "config file not found", out=False),
        Case("train: --out is a file", train(str(tmp / "run"), "--include-incorrect", out="a-file"), 2,
             "exists and is not a directory", run="a-file", out=False),
        Case("train: adapter of another model", train(str(tmp / "run"), "--include-incorrect", "--set",
             f"student={{model: smollm2-135m-instruct, adapter: {other_adapter}}}"), 2,
             "does not fit model 'smollm2-135m-instruct'", out=False),
        # eval
        Case("eval: unknown dataset", evaluate("--dataset", "gsm9k"), 2, "unknown eval dataset 'gsm9k'", out=False),
        Case("eval: dataset file not found", evaluate("--dataset", str(tmp / "missing.jsonl")), 2,
             "dataset not found", out=False),
        Case("eval: samples without sampling", evaluate("--dataset", bench, "--samples", "2"), 2,
             "--samples > 1 needs sampling", out=False),
        Case("eval: adapter folder without an adapter", evaluate("--dataset", bench, "--adapter", str(tmp / "plain")),
             2, "student adapter not found", out=False),
        Case("eval: adapter of another model", evaluate("--dataset", bench, "--adapter", other_adapter), 2,
             "does not fit model", out=False),
        Case("eval: no new tokens", evaluate("--dataset", bench, "--set", "max_new_tokens=0"), 2,
             "max_new_tokens: Input should be greater", out=False),
        Case("eval: hub dataset offline", evaluate("--dataset", "hf:no-such/dataset-anywhere"), 1,
             "cannot load no-such/dataset-anywhere", env=offline, out=False),
        Case("eval: student not found", ["eval", "/no/such", "--dataset", bench, "--out", str(tmp / "eval-out")], 2,
             "model '/no/such' not found", out=False),
        Case("eval: --out is a file", evaluate("--dataset", bench, out="a-file"), 2, "not a directory",
             run="a-file", out=False),
        # pipeline
        Case("pipeline: config not found", ["pipeline", str(tmp / "missing.yaml")], 2, "config file not found",
             out=False),
        Case("pipeline: config not YAML", ["pipeline", str(broken_yaml)], 2, "is not valid YAML", out=False),
        Case("pipeline: unknown method", pipeline("--set", "methods=[magic]"), 2, "methods.0: Input should be",
             out=False),
        Case("pipeline: unknown eval dataset", pipeline("--set", "eval.dataset=gsm9k", "--set", "eval.limit={}"), 2,
             "unknown eval dataset 'gsm9k'", out=False),
        Case("pipeline: a limit for a dataset not evaluated", pipeline("--set", "eval.dataset=gsm8k"), 2,
             "eval: limit names arith1-heldout, not among the eval datasets", out=False),
        Case("pipeline: --out is a file", pipeline(out="a-file"), 2, "cannot write to", run="a-file", out=False),
        # report
        Case("report: path not found", report(str(tmp / "missing")), 2, "not a directory", out=False),
        Case("report: not a run directory", report(str(tmp / "plain")), 2, "has no trajectories.jsonl", out=False),
        Case("report: --eval not a directory", report(str(tmp / "run"), "--eval", str(tmp / "nope")), 2,
             "--eval: not a directory", out=False),
        Case("report: --eval of a run directory", report(str(tmp / "run"), "--eval", str(tmp / "run")), 2,
             "has no metrics.json", out=False),
        Case("report: unreadable run files", report(str(tmp / "corrupt")), 1, "corrupt", run="corrupt",
             out=False),
        # bench
        Case("bench scoring: model not found", ["bench", "scoring", "--model", "/no/such"], 2,
             "model '/no/such' not found", out=False),
        Case("bench train: unknown shape", ["bench", "train", "--random-init", "nope-7b"], 2, "nope-7b", out=False),
        Case("bench eval: unknown backend", ["bench", "eval", "--backend", "magic"], 2, "--backend", out=False),
        Case("bench gpu: unknown part", ["bench", "gpu", "--out", str(tmp / "gpu-out"), "--part", "nope"], 2,
             "nope", out=False),
    ]  # fmt: skip


def check_one_clean_line(result, case: Case) -> None:
    assert result.returncode == case.code, (case.name, result.stderr)
    assert case.message in result.stderr, (case.name, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, case.name
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (case.name, result.stderr)


CATALOGUE_SIZE = 91  # pinned: a case dropped by mistake fails the test


def test_bad_inputs_give_one_line_and_leave_everything_alone(prepared):
    tmp, server, keyed, foreign = prepared
    cases = catalogue(tmp, server.base_url, keyed.base_url, {k: t.base_url for k, t in foreign.items()})
    assert len(cases) == CATALOGUE_SIZE and len({c.name for c in cases}) == len(cases)
    before = tree_digest(tmp)
    failed = []
    for case in cases:
        out = ["--out", str(tmp / case.run)] if case.out else []
        result = genssd(*case.args, *out, env=case.env)
        try:
            check_one_clean_line(result, case)
        except AssertionError as exc:
            failed.append(f"{case.name}: {exc}")
        after = tree_digest(tmp)
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        if changed:
            failed.append(f"{case.name}: changed or left {sorted(changed)}")
            before = after
    assert not failed, "\n".join(failed)
    by_command = Counter(c.args[0] if c.args[0] in COMMANDS else "run" for c in cases)
    print(f"{len(cases)} bad inputs by command: {dict(by_command)} (+2: read-only directory, locked run)")


COMMANDS = ("run", "doctor", "train", "eval", "pipeline", "report", "bench", "tune", "export")


def test_read_only_run_directory(prepared, tmp_path):
    """Root ignores file modes, so under root the command runs without CAP_DAC_OVERRIDE."""
    tmp, server, *_ = prepared
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
    from genssd_cli.rundir.store import RunStore

    tmp, server, *_ = prepared
    config = write_config(tmp / "lock.yaml", run_config(server.base_url, data={"count": 1}))
    with RunStore(tmp / "run"):
        result = genssd("run", str(config), "--out", str(tmp / "run"))
    check_one_clean_line(result, Case("locked", [], 1, "in use by another genssd run"))
