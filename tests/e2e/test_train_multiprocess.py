"""`genssd train --processes 2`: two data-parallel processes (gloo) on the real demo student with
real TRL + peft, on CPU; resume after a kill under a user-run torchrun; one line for a bad input.
The batch split and the checkpoint rule alone are in tests/train/test_data_parallel.py."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, genssd, trajectory_row

from genssd_cli.rundir.layout import CONFIG, TRAJECTORIES
from genssd_cli.train.command import ADAPTER, DONE
from genssd_cli.train.trainer import CHECKPOINTS, SAVED_BY_ALL

ROWS = [trajectory_row(p, f"Solve: {p}", f"{p[0]} + {p[2]} = {int(p[0]) + int(p[2])}. The answer is "
                       f"{int(p[0]) + int(p[2])}.", True) for p in ("2+3", "4+4", "6+1", "9+0")]  # fmt: skip
# Global batch 2 (as on one process): 1 row on each of the 2 processes; 4 rows, 2 epochs: 4 steps.
SETTINGS = ["--set", "training.batch_size=2", "--set", "training.learning_rate=0.002", "--set", "training.save_steps=1",
            "--set", "training.epochs=2"]  # fmt: skip
STEPS = 4

# Every write under OUT a process makes through Python (open for writing, mkdir, rename, remove),
# logged per rank by an audit hook; torch.save and safetensors write from C++/Rust and are not seen.
AUDIT = """
import os, sys
_out = os.environ["GENSSD_TEST_WATCH"] + os.sep
_log = os.path.join(os.environ["GENSSD_TEST_WRITES"], "rank-" + os.environ.get("RANK", "launcher") + ".txt")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _hook(event, args):
    if event == "open":
        mode, flags = args[1], args[2] or 0
        paths = [args[0]] if (any(c in mode for c in "wax+") if isinstance(mode, str) else flags & _WRITE) else []
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
        paths = [args[0]]
    elif event == "os.rename":
        paths = [args[1]]
    else:
        return
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(_out):
            with open(_log, "a") as log:
                log.write(event + " " + os.path.abspath(os.fsdecode(path)) + "\\n")

sys.addaudithook(_hook)
"""


def make_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / TRAJECTORIES).write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (path / CONFIG).write_text("method: genssd\nteacher: {model: t, base_url: 'http://127.0.0.1:9/v1'}\n"
                               "student:\n  model: smollm2-135m-instruct\ndata: {source: arith}\n")  # fmt: skip
    return path


def tagged(tag: str) -> list[int]:
    """The live processes started with GENSSD_TEST_TAG=tag in their environment (launcher and ranks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if f"GENSSD_TEST_TAG={tag}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def none_left(tag: str, within_s: float = 15) -> bool:
    deadline = time.monotonic() + within_s
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not tagged(tag)


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def printed_steps(stdout: str) -> list[int]:
    return [int(line.split()[1].split("/")[0]) for line in stdout.splitlines() if line.startswith("step ")]


def whole(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / SAVED_BY_ALL).read_text())
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train2")
    run, out, writes, hook = make_run(tmp / "run"), tmp / "out", tmp / "writes", tmp / "hook"
    writes.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT)
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "GENSSD_TEST_WATCH": str(out), "GENSSD_TEST_WRITES": str(writes)}  # fmt: skip
    started = time.monotonic()
    result = genssd("train", str(run), "--out", str(out), "--processes", "2", *SETTINGS, env=env)
    print(f"2-process training of {STEPS} steps: {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stderr
    return out, writes, result


@pytest.mark.slow
def test_two_processes_train_once_and_rank_0_alone_writes(trained):
    out, writes, result = trained
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines.count("data parallel: 2 processes (gloo), 1 row x 1 accumulation step each: 2 rows per optimizer "
                       "step, as on one process") == 1, result.stdout  # fmt: skip
    assert printed_steps(result.stdout) == list(range(1, STEPS + 1))  # rank 0 alone prints
    assert len([line for line in lines if line.startswith("done: ")]) == 1
    assert f"{STEPS} steps on 2 processes" in result.stdout

    assert {p.name for p in out.iterdir()} == {ADAPTER, CHECKPOINTS, CONFIG, "manifest.json", "train_log.jsonl", DONE}
    assert json.loads((out / "manifest.json").read_text())["rows"] == 4
    done = json.loads((out / DONE).read_text())["result"]
    assert (done["processes"], done["global_batch"], done["steps"]) == (2, 2, STEPS)
    assert [h["step"] for h in history(out) if "loss" in h] == list(range(1, STEPS + 1))
    # Both processes trained: each saved its RNG state into the last checkpoint, then it was marked whole.
    last = out / CHECKPOINTS / f"checkpoint-{STEPS}"
    assert {"rng_state_0.pth", "rng_state_1.pth", SAVED_BY_ALL, "trainer_state.json"} <= set(os.listdir(last))

    def written(who: str) -> set[str]:
        path = writes / f"rank-{who}.txt"
        return {line.split(" ", 1)[1] for line in path.read_text().splitlines()} if path.exists() else set()

    ours = {str(out / name) for name in (CONFIG, "manifest.json", "train_log.jsonl", DONE)}
    assert ours <= written("0")
    assert not written("launcher")
    # The other rank touches nothing but its share of each checkpoint (transformers' RNG state).
    assert written("1") and all(p.startswith(str(out / CHECKPOINTS) + os.sep) for p in written("1")), written("1")


@pytest.mark.slow
def test_the_adapter_of_two_processes_loads(trained):
    import torch

    from genssd_cli.models import load_causal_lm

    out, _, _ = trained
    tuned, tokenizer = load_causal_lm("smollm2-135m-instruct", None, str(out / ADAPTER), "cpu", "float32")
    base = tuned.get_base_model()
    ids = tokenizer("6 + 1 = 7. The answer is 7.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with_adapter = tuned(ids).logits
        with tuned.disable_adapter():
            without = base(ids).logits
    assert (with_adapter - without).abs().max() > 1e-3  # the trained LoRA weights are in the loaded adapter


@pytest.mark.slow
def test_killed_launcher_leaves_no_process_and_torchrun_resumes(trained, tmp_path):
    from safetensors.torch import load_file

    uninterrupted = trained[0]
    run, out, tag = make_run(tmp_path / "run"), tmp_path / "out", uuid.uuid4().hex
    args = ["train", str(run), "--out", str(out), *SETTINGS]
    # TMPDIR: the launcher's temporary folder (its processes' error files) outlives a SIGKILL.
    env = {**os.environ, "COLUMNS": "200", "GENSSD_TEST_TAG": tag, "TMPDIR": str(tmp_path)}
    launcher = subprocess.Popen([sys.executable, "-m", "genssd_cli", *args, "--processes", "2"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        # Killed outright once checkpoint-2 is whole: step 3 is under way in both processes.
        deadline = time.monotonic() + 300
        while launcher.poll() is None and not whole(out / CHECKPOINTS / "checkpoint-2") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(tagged(tag)) == 3, "the launcher and its 2 processes"
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    assert launcher.returncode == -signal.SIGKILL, "training ended before the kill"
    assert none_left(tag), "a training process outlived its launcher"
    assert not (out / ADAPTER).exists() and not (out / DONE).exists()
    saved = [int(p.name.removeprefix("checkpoint-")) for p in (out / CHECKPOINTS).glob("checkpoint-*") if whole(p)]
    assert 2 <= max(saved) < STEPS

    # Resumed by torchrun run by the user: every process picks the same checkpoint, rank 0 alone prints.
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "--log-dir", str(tmp_path / "torchrun"), "-m", "genssd_cli", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("resuming from") == 1, resumed.stdout
    assert f"resuming from {out / CHECKPOINTS / f'checkpoint-{max(saved)}'}" in resumed.stdout
    assert printed_steps(resumed.stdout) == list(range(max(saved) + 1, STEPS + 1))  # once each: rank 0 alone prints
    logged = [h for h in history(out) if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, STEPS + 1))  # each step once, none lost, none repeated
    assert json.loads((out / DONE).read_text())["result"]["steps"] == STEPS
    # The same as the uninterrupted training: the RNG states, optimizer and data order came back.
    reference = [h for h in history(uninterrupted) if "loss" in h]
    for got, want in zip(logged, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (got, want)
    ours, theirs = (load_file(d / ADAPTER / "adapter_model.safetensors") for d in (out, uninterrupted))
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-5
    assert none_left(tag)


@pytest.mark.slow
def test_a_crashed_rank_stops_the_others_with_one_line(tmp_path):
    run, out, tag = make_run(tmp_path / "run"), tmp_path / "out", uuid.uuid4().hex
    env = {**os.environ, "COLUMNS": "200", "GENSSD_TEST_TAG": tag}
    launcher = subprocess.Popen([sys.executable, "-m", "genssd_cli", "train", str(run), "--out", str(out),
                                 "--processes", "2", *SETTINGS], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while launcher.poll() is None and not whole(out / CHECKPOINTS / "checkpoint-1") and time.monotonic() < deadline:
            time.sleep(0.02)
        [rank_1] = [p for p in tagged(tag) if b"RANK=1" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0")]
        os.kill(rank_1, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=60)  # the launcher does not wait on the survivor
    finally:
        launcher.kill()
    assert launcher.returncode == 1
    assert stderr.strip().splitlines()[-1].startswith("error: training process 1 was killed by SIGKILL"), stderr
    assert none_left(tag)


@pytest.mark.slow
def test_a_bad_input_is_one_line_and_leaves_no_process(tmp_path):
    """A student that does not load: each process finds it, the launcher reports it once."""
    run, out, tag = make_run(tmp_path / "run"), tmp_path / "out", uuid.uuid4().hex
    config = tmp_path / "train.yaml"
    config.write_text("student: {model: /nonexistent}\n")
    bad = genssd("train", str(run), "--out", str(out), "--config", str(config), "--processes", "2",
                 env={"GENSSD_TEST_TAG": tag})  # fmt: skip
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: student model '/nonexistent' not found"), bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
    assert none_left(tag, within_s=0) and not out.exists()
