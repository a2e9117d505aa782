"""`genssd train --processes N`: the data-parallel launch, and what each process it starts does
to behave as one command: die with its launcher, and report a user's error once.

`--processes N` starts N copies of `genssd train` under torch's elastic launcher (what torchrun
runs); torchrun or `accelerate launch` run by the user do the same without this module's launch.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from genssd_cli.errors import GenssdError, Interrupted, RuntimeFailure, UsageError
from genssd_cli.procs import die_with
from genssd_cli.train.trainer import CHECKPOINTS, rank

LAUNCHER_PID = "GENSSD_TRAIN_LAUNCHER"  # in the processes `--processes N` starts: the launcher's pid


def print_layout(console: Console, one_process: int, batch: int, accum: int, processes: int) -> None:
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_initialized() else "?"
    each = f"{batch} row{'s' * (batch > 1)} x {accum} accumulation step{'s' * (accum > 1)} each"
    total = batch * accum * processes
    console.print(f"data parallel: {processes} processes ({backend}), {each}: {total} rows per optimizer step"
                  + (", as on one process" if total == one_process else ""), markup=False, highlight=False,
                  soft_wrap=True)  # fmt: skip
    if total != one_process:
        console.print(f"warning: training.batch_size x training.grad_accum = {one_process} is no multiple of "
                      f"{processes} processes, so each optimizer step takes {total} rows instead of {one_process} "
                      f"(fewer, larger steps); make it a multiple of {processes} to compare with one process "
                      "like for like", markup=False, highlight=False, soft_wrap=True)  # fmt: skip


def launch(argv: list[str], processes: int, device: str, out: Path, console: Console) -> None:
    """`--processes N`: `genssd ARGV` N times under torch's elastic launcher (what torchrun runs) on
    this machine, with a rendezvous port of its own. When a process fails the launcher stops the
    others; the error line of the first to fail is reported here, with its exit code."""
    _check_devices(device, processes)
    import logging
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ[LAUNCHER_PID] = str(os.getpid())
    # torchrun sets 1 thread per process; on a CPU the cores shared out train faster. A user's setting wins.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // processes)))
    # The launcher's own log lines are not the user's: a failure is reported below, in one line.
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        quiet = logging.getLogger(name)
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
    with tempfile.TemporaryDirectory(prefix="genssd-train-") as logs:  # the processes' error files
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.1, logs_specs=DefaultLogsSpecs(log_dir=logs))  # fmt: skip
        try:
            elastic_launch(config, sys.executable)("-m", "genssd_cli", *argv)
        except ChildFailedError as exc:
            raise _first_failure(exc, out) from None
        except SignalException as exc:
            raise Interrupted(f"stopped by {exc.sigval.name}: the {processes} training processes were stopped; "
                              "run the same command again to resume from the last checkpoint") from None  # fmt: skip


def _check_devices(setting: str, processes: int) -> None:
    from genssd_cli.models import pick_device

    device = pick_device(setting)
    if device == "mps":
        raise UsageError("--processes: an Apple GPU (mps) trains in one process; leave --processes out")
    if device == "cuda":
        import torch

        if processes > torch.cuda.device_count():
            raise UsageError(f"--processes {processes}: {torch.cuda.device_count()} GPUs visible, one per process "
                             "(CUDA_VISIBLE_DEVICES picks them)")  # fmt: skip


class ProcessFailed(GenssdError):
    """A training process's own error line, reported by the launcher with that process's exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _first_failure(exc, out: Path) -> GenssdError:
    """The first error line a process left (every process raises the same user error), or what
    befell the first process to fail when none left one (killed, or a bug: its traceback is above).
    The launcher lists the failed processes before those it stopped, so on a tie the first listed."""
    failures = list(exc.failures.items())  # (global rank, ProcessFailure)
    reported = [(r, f) for r, f in failures if f.error_file_data.get("genssd")]
    if reported:
        _, failure = min(reported, key=lambda item: item[1].timestamp)
        return ProcessFailed(failure.message, failure.exitcode if failure.exitcode > 0 else 1)
    first, failure = min(failures, key=lambda item: item[1].timestamp)
    what = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
            else f"failed with exit code {failure.exitcode} (its output is above)")  # fmt: skip
    return RuntimeFailure(f"training process {first} {what}; the others were stopped. Run the same command "
                          f"again to resume from the last checkpoint in {out / CHECKPOINTS}")  # fmt: skip


@contextmanager
def reported_once() -> Iterator[None]:
    """Under a launcher every process runs the same checks, so a user error is every process's. Each
    leaves its line in the launcher's error file; one line reaches the terminal: the launcher's
    (`--processes`), else rank 0's, and another rank's own failure with its rank."""
    try:
        yield
    except GenssdError as exc:
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:
            with contextlib.suppress(OSError):
                Path(error_file).write_text(json.dumps({"message": str(exc), "timestamp": int(time.time()),
                                                        "genssd": True}))  # fmt: skip
        if os.environ.get(LAUNCHER_PID) or (rank() != 0 and isinstance(exc, UsageError)):
            raise SystemExit(exc.exit_code) from None
        if rank() != 0:
            raise ProcessFailed(f"training process {rank()}: {exc}", exc.exit_code) from None
        raise


def die_with_launcher() -> None:
    """A launcher killed outright (SIGKILL) cannot stop the processes it started: each asks the
    kernel to kill it when its launcher goes (Linux), so none is left training alone."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher:
        return
    die_with(int(launcher))
