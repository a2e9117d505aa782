"""A full disk, for real: the run directory (eval, train, report output) lives on a tmpfs of a few
KiB that fills up. Each command ends in one line naming the file and the error, exit 1, leaves no
temporary file and loses nothing already written; once the disk has room, the same command resumes
and ends as if nothing had happened.

Mounting needs root (CI runs as root); elsewhere each file is capped with RLIMIT_FSIZE instead, so
a write past the cap fails with EFBIG, another real OS write error."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_config, write_config

from genssd_cli.rundir.layout import EVENTS
from genssd_cli.rundir.log import read_events

pytestmark = pytest.mark.slow


class SmallDisk:
    """A folder where writes run out of room at `size` bytes; `fill` leaves none, `release` and
    `grow` give it back."""

    def __init__(self, path: Path, size: int, overhead: int = 0):
        self.path = path
        path.mkdir(parents=True)
        # `overhead`: what a tmpfs's page-sized blocks add for the small files beside the one that fills.
        self.mounted = os.geteuid() == 0 and _mount(path, size + overhead)
        self.cap: int | None = None if self.mounted else size  # RLIMIT_FSIZE, when not mounted

    def grow(self) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,size=256m", str(self.path)], check=True)
        self.cap = None

    def fill(self) -> None:
        if not self.mounted:
            self.cap = 0
            return
        with contextlib.suppress(OSError), open(self.path / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()

    def release(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)
        if not self.mounted:
            self.cap = None

    def genssd(self, *args: str) -> subprocess.CompletedProcess:
        cap = self.cap

        def limit() -> None:
            if cap is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not death
                resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))

        env = {**os.environ, "COLUMNS": "200"}
        return subprocess.run([sys.executable, "-m", "genssd_cli", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=600, preexec_fn=limit, env=env)  # fmt: skip

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


def _mount(path: Path, size: int) -> bool:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disks: list[SmallDisk] = []

    def make(size: int, overhead: int = 0) -> SmallDisk:
        disk = SmallDisk(tmp_path / f"disk{len(disks)}", size, overhead)
        disks.append(disk)
        return disk

    yield make
    for disk in disks:
        disk.unmount()


def check_refused_in_one_line(result: subprocess.CompletedProcess, path: Path) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: cannot write {path}"), line
    assert "No space left on device" in line or "File too large" in line, line


def temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_run_whose_disk_fills_up_resumes_once_there_is_room(tmp_path, fake_teacher, small_disk):
    server = fake_teacher("--ignore-n")
    config = write_config(tmp_path / "c.yaml", run_config(server.base_url, data={"count": 3}))
    reference = tmp_path / "reference"
    done = small_disk(64 * 2**20).genssd("run", str(config), "--out", str(reference))
    assert done.returncode == 0, done.stderr
    log_size = (reference / EVENTS).stat().st_size
    asked = len(server.requests())

    # Room for the lock and config.yaml (a 4 KiB page each) and half of the log: the run stops
    # part-way, at a record it cannot write.
    disk = small_disk(log_size // 2, overhead=2 * 4096)
    run = disk.path / "run"
    full = disk.genssd("run", str(config), "--out", str(run))
    check_refused_in_one_line(full, run / EVENTS)
    assert temporary_files(disk.path) == []
    assert (run / EVENTS).read_bytes().endswith(b"\n")  # whole records only
    recorded = {e.seed for e in read_events(run) if e.type == "response"}
    assert recorded, "the disk filled before the first response; give it more room"
    first_session = len(server.requests())

    disk.grow()
    resumed = disk.genssd("run", str(config), "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "trajectories.jsonl").read_bytes() == (reference / "trajectories.jsonl").read_bytes()
    assert not recorded & {r["seed"] for r in server.requests()[first_session:]}  # nothing recorded is paid twice
    assert first_session - asked > 0


def test_materialised_files_on_a_full_disk(tmp_path, fake_teacher, small_disk):
    server = fake_teacher("--ignore-n")
    config = write_config(tmp_path / "c.yaml", run_config(server.base_url, data={"count": 2}))
    disk = small_disk(8 * 2**20)
    run = disk.path / "run"
    assert disk.genssd("run", str(config), "--out", str(run)).returncode == 0
    expected = (run / "trajectories.jsonl").read_bytes()
    (run / "trajectories.jsonl").unlink()
    log = (run / EVENTS).read_bytes()

    disk.fill()
    full = disk.genssd("run", str(config), "--out", str(run))
    check_refused_in_one_line(full, run / "trajectories.jsonl")
    assert temporary_files(disk.path) == [] and (run / EVENTS).read_bytes() == log

    disk.release()
    again = disk.genssd("run", str(config), "--out", str(run))
    assert again.returncode == 0, again.stderr
    assert (run / "trajectories.jsonl").read_bytes() == expected


def test_eval_samples_on_a_full_disk_resume(tmp_path, small_disk):
    bench = tmp_path / "bench.jsonl"
    rows = [{"id": f"q{i}", "question": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(12)]
    bench.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["eval", "smollm2-135m-instruct", "--dataset", str(bench), "--set", "max_new_tokens=16",
            "--set", "batch_size=1"]  # fmt: skip
    reference = small_disk(64 * 2**20)
    assert reference.genssd(*args, "--out", str(reference.path / "eval")).returncode == 0
    expected = (reference.path / "eval/samples.jsonl").read_text().splitlines()
    assert len(expected) == 12 and len("".join(expected)) > 4096  # more than a page

    # Room for the settings and the folder's lock (a 4 KiB page each) and about half of the samples:
    # the disk fills while samples are appended.
    disk = small_disk(len("".join(expected)) // 2, overhead=2 * 4096)
    out = disk.path / "eval"
    full = disk.genssd(*args, "--out", str(out))
    check_refused_in_one_line(full, out / "samples.jsonl")
    assert temporary_files(disk.path) == []
    written = (out / "samples.jsonl").read_text()
    assert written.endswith("\n") and 0 < len(written.splitlines()) < 12  # whole samples only
    assert not (out / "metrics.json").exists()

    disk.grow()
    resumed = disk.genssd(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert sorted((out / "samples.jsonl").read_text().splitlines()) == sorted(expected)


def test_report_on_a_full_disk(tmp_path, fake_teacher, small_disk):
    server = fake_teacher("--ignore-n")
    config = write_config(tmp_path / "c.yaml", run_config(server.base_url, data={"count": 1}))
    run = tmp_path / "run"
    assert small_disk(8 * 2**20).genssd("run", str(config), "--out", str(run)).returncode == 0
    disk = small_disk(8 * 2**20)
    out = disk.path / "report"
    out.mkdir()
    disk.fill()
    full = disk.genssd("report", str(run), "--out", str(out))
    check_refused_in_one_line(full, out / "report.md")
    assert temporary_files(disk.path) == [] and list(out.iterdir()) == []
    disk.release()
    assert disk.genssd("report", str(run), "--out", str(out)).returncode == 0
    assert (out / "report.md").is_file()


def test_train_on_a_full_disk_resumes(tmp_path, small_disk):
    from conftest import QUESTIONS, STUDENT, trajectory_row

    from genssd_cli.rundir.layout import CONFIG, TRAJECTORIES

    source = tmp_path / "rows"
    source.mkdir()
    rows = [trajectory_row(i, q, f"The answer is {a}.", True) for i, q, a in QUESTIONS]
    (source / TRAJECTORIES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (source / CONFIG).write_text("teacher: {model: t, base_url: 'http://127.0.0.1:9/v1'}\n"
                                 f"student: {{model: {STUDENT}}}\ndata: {{source: arith}}\n")  # fmt: skip
    args = ["train", str(source), "--set", "training.epochs=1", "--set", "training.batch_size=2",
            "--set", "training.save_steps=1"]  # fmt: skip
    # Room for the config, the manifest and a LoRA adapter (~19 MiB), not for a checkpoint's
    # optimizer state beside it: the first checkpoint is cut short.
    disk = small_disk(30 * 2**20)
    out = disk.path / "train"
    full = disk.genssd(*args, "--out", str(out))
    assert full.returncode == 1 and "Traceback" not in full.stderr + full.stdout, full.stderr
    [line] = full.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot write {out}"), line
    assert temporary_files(disk.path) == []
    assert (out / "config.yaml").is_file() and (out / "manifest.json").is_file()

    disk.grow()
    resumed = disk.genssd(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "saved only in part" in resumed.stdout  # the cut checkpoint was removed, not resumed from
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "done.json").read_text())["result"]["steps"] == 2
