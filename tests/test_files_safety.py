"""Issue 30's promises about the files genssd writes: one command per output folder (a second one
refused in one line naming the folder), whole files that survive a power cut (unique temporary
names, the file and its folder synced), symlinked run files refused, new run folders and logs the
owner's only, and a checkpoint resumed only with a torch that loads it safely."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
from pathlib import Path

import pytest
from rich.console import Console

from genssd_cli import files
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.eval.command import EvalOptions, eval_command
from genssd_cli.files import LineFile, hold_lock, locked_out_dir, write_atomic
from genssd_cli.rundir.layout import EVENTS
from genssd_cli.rundir.store import RunStore
from genssd_cli.train.command import TrainOptions, refuse_unsafe_resume, train_command

QUIET = Console(quiet=True)


@contextlib.contextmanager
def held_by_another(folder: Path):
    """The folder's lock, held as another genssd command would hold it."""
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(hold_lock(folder / files.LOCK, "held")):
        yield


def test_a_second_eval_on_a_held_folder_is_refused_in_one_line(tmp_path):
    """Two evals on one --out would duplicate and cut each other's samples: the second is refused
    before it reads or cuts samples.jsonl, naming the folder."""
    out = tmp_path / "eval"
    with held_by_another(out):
        (out / "samples.jsonl").write_bytes(b'{"torn')  # the first eval's line, mid-write
        with pytest.raises(RuntimeFailure) as refused:
            eval_command(EvalOptions("smollm2-135m-instruct", "arith1-heldout", limit=1, out=out), QUIET)
    assert str(refused.value) == f"{out} is in use by another genssd command (pid {os.getpid()})"
    assert (out / "samples.jsonl").read_bytes() == b'{"torn'  # not cut under the other eval


def test_a_second_train_on_a_held_folder_is_refused_in_one_line(tmp_path):
    """A second train on one --out would remove the first one's checkpoint in progress."""
    out = tmp_path / "train"
    with held_by_another(out), pytest.raises(RuntimeFailure, match=f"^{out} is in use by another genssd command"):
        train_command(TrainOptions([tmp_path / "run"], out), QUIET)


def test_a_folder_made_for_a_refused_command_is_taken_back(tmp_path):
    """The lock makes the folder; a command refused before writing anything leaves none behind,
    and the lock is free again once the command ends, its file removed (nothing of ours stays in
    the user's folder)."""
    out = tmp_path / "new"
    with pytest.raises(UsageError), locked_out_dir(out):
        raise UsageError("refused")
    assert not out.exists()
    with locked_out_dir(out):
        (out / "kept").write_text("x")
    with locked_out_dir(out):  # released: the next command takes it
        pass
    assert sorted(p.name for p in out.iterdir()) == ["kept"]


def test_write_atomic_temporary_names_are_unique_under_two_threads(tmp_path):
    """Two writers of one file at the same time each write a temporary file of their own: the
    file ends whole (one writer's bytes, never a mix) and no temporary file is left."""
    path = tmp_path / "shards.json"
    both_open = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def write(mark: bytes) -> None:
        def pieces():
            yield mark * 1000
            both_open.wait()  # both temporary files open at once
            yield mark * 1000

        try:
            write_atomic(path, pieces())
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(m,)) for m in (b"a", b"b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert path.read_bytes() in (b"a" * 2000, b"b" * 2000)
    assert [p.name for p in tmp_path.iterdir()] == ["shards.json"]


def test_write_atomic_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    """A power cut after write_atomic returns leaves the new file, not a zero-length one: the file
    is synced before the rename and the folder (its new name) after it."""
    synced: list[str] = []

    def fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")

    monkeypatch.setattr(files.os, "fsync", fsync)
    write_atomic(tmp_path / "eval.json", "{}\n")
    assert synced == ["file", "folder"]


@pytest.mark.parametrize("name", [EVENTS, "samples.jsonl"])
def test_a_symlinked_log_is_refused_and_its_target_left_alone(tmp_path, name):
    """A log that links elsewhere is refused in one line; the file it names is neither cut nor
    appended to."""
    target = tmp_path / "elsewhere.txt"
    target.write_bytes(b"precious\nno newline")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(target)
    with pytest.raises(UsageError, match=f"^{run / name} is a symbolic link"):
        if name == EVENTS:
            with RunStore(run) as store:
                store.open_log()
        else:
            files.cut_torn_tail(run / name)
    with pytest.raises(UsageError, match="is a symbolic link"):
        LineFile(run / name)
    with pytest.raises(UsageError, match="is a symbolic link"):
        write_atomic(run / name, "x\n")
    assert target.read_bytes() == b"precious\nno newline"


def test_a_new_run_folder_and_its_log_are_the_owners_only(tmp_path):
    """Prompts and teacher replies are not for other users of the machine: 0o700 and 0o600 (less
    what the umask takes too)."""
    previous = os.umask(0o022)
    try:
        with RunStore(tmp_path / "run") as store:
            store.open_log()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "run" / EVENTS).stat().st_mode) == 0o600


@pytest.mark.parametrize(("version", "refused"), [("2.5.1+cu121", True), ("2.4.0", True), ("2.6.0", False),
                                                   ("2.13.0+cpu", False), ("3.0.0", False)])  # fmt: skip
def test_a_checkpoint_is_resumed_only_with_a_torch_that_loads_it_safely(version, refused):
    """Below torch 2.6, resuming unpickles the checkpoint's RNG state with full pickle: refused."""
    if refused:
        expected = rf"^ckpt: resuming needs torch >= 2\.6 .*torch {re.escape(version)} is installed"
        with pytest.raises(UsageError, match=expected):
            refuse_unsafe_resume("ckpt", version)
    else:
        refuse_unsafe_resume("ckpt", version)
