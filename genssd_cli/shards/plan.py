"""Sharded runs: which shard a problem belongs to, the plan fixed in the run directory, the one
teacher budget every shard draws on, and each shard's completion marker.

A sharded run directory (`genssd run --shards N`, or `--shard K/N` per process):

    RUN/shards.json          the plan: N, the assignment rule, the results-settings hash
    RUN/shard-K/             shard K: an ordinary run directory (its own log, lock, failures, resume)
    RUN/shard-K/completed    written when a session of shard K completed (a marker per rank, as
                             datatrove keeps one); removed when a session of it starts
    RUN/shard-K/spent        shard K's teacher cost so far (as its log says): max_cost is one
                             budget for the whole run, the sum of these
    RUN/trajectories.jsonl, failures.jsonl, summary.json, config.yaml
                             materialised from every shard's log once all have completed

Every shard process must see RUN (one machine, or a filesystem every node mounts).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from genssd_cli.config import RunConfig
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.files import write_atomic, write_failed
from genssd_cli.problems import Problem
from genssd_cli.rundir.records import ShardPlan

PLAN = "shards.json"
SPENT = "spent"
COMPLETED = "completed"
MERGE_LOCK = ".merge-lock"


class Shard(NamedTuple):
    index: int
    count: int


def parse_shard(text: str) -> Shard:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise UsageError(f"--shard {text!r}: give K/N with 0 <= K < N, e.g. --shard 0/4")
    return Shard(int(match[1]), int(match[2]))


def shard_of(problem_id: str, count: int) -> int:
    """Stable across runs, machines and Python versions (unlike hash())."""
    return int.from_bytes(hashlib.sha256(problem_id.encode()).digest()[:8], "big") % count


def select(problems: list[Problem], shard: Shard) -> list[Problem]:
    return [p for p in problems if shard_of(p.id, shard.count) == shard.index]


def shard_dir(run_dir: Path, index: int) -> Path:
    return run_dir / f"shard-{index}"


def read_plan(run_dir: Path) -> ShardPlan | None:
    path = run_dir / PLAN
    if not path.is_file():
        return None
    try:
        return ShardPlan.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"{path} is not a genssd shard plan ({exc}); restore it or use another --out") from None


def check_layout(run_dir: Path, count: int) -> ShardPlan | None:
    """Refuse a start of `count` shards that would assign the problems otherwise than the
    directory's plan fixed, or that would ignore an unsharded run there (read only)."""
    if (run_dir / "events.jsonl").exists():
        raise UsageError(f"{run_dir} holds an unsharded run; run it without --shards, or use another --out")
    plan = read_plan(run_dir)
    if plan is None:
        return None
    if plan.assignment != ShardPlan.model_fields["assignment"].default:
        raise UsageError(f"{run_dir} assigns problems by {plan.assignment!r}, which this genssd does not; "
                         "use another --out")
    if plan.shards != count:
        raise UsageError(f"{run_dir} is split into {plan.shards} shards; run it with --shards {plan.shards} "
                         "(the problems' assignment cannot change), or use another --out")  # fmt: skip
    return plan


def check_plan(run_dir: Path, count: int, config_hash: str, force: bool) -> None:
    """check_layout, and the settings the plan was made with (a shard's start)."""
    plan = check_layout(run_dir, count)
    if plan is not None and plan.config_hash != config_hash and not force:
        raise UsageError(f"{run_dir} was made with other settings; use another --out, or --force to continue anyway")


def write_plan(run_dir: Path, count: int, config_hash: str, force: bool) -> None:
    """Fixed by the first shard whose teacher answered; kept as it is after that, but for the
    settings hash a `--force` start moves on. Shards start together: the plan is linked into place
    only if no other shard's is there yet, and a shard that lost to another N (`--shard 0/4` and
    `--shard 1/2` started together) stops here, before its log is opened."""
    path = run_dir / PLAN
    if read_plan(run_dir) is None:
        mine = run_dir / f".{PLAN}.{os.getpid()}"
        try:
            mine.write_text(_plan_text(count, config_hash))
            os.link(mine, path)
            return
        except FileExistsError:
            pass  # another shard's: checked below
        except OSError as exc:
            raise write_failed(path, exc) from None
        finally:
            mine.unlink(missing_ok=True)
    check_plan(run_dir, count, config_hash, force)
    plan = read_plan(run_dir)
    if force and plan is not None and plan.config_hash != config_hash:  # forced once, not at every later resume
        write_atomic(path, _plan_text(count, config_hash))


def _plan_text(count: int, config_hash: str) -> str:
    return ShardPlan(shards=count, config_hash=config_hash).model_dump_json(indent=2) + "\n"


def refuse_sharded(run_dir: Path) -> None:
    """An unsharded start on a sharded directory would ignore every shard's work."""
    plan = read_plan(run_dir)
    if plan is not None:
        raise UsageError(f"{run_dir} is a sharded run ({plan.shards} shards); add --shards {plan.shards}")


def log_paths(run_dir: Path) -> list[Path]:
    """The run's logs: its own events.jsonl, or every shard's, in shard order."""
    plan = read_plan(run_dir)
    if plan is None:
        return [run_dir / "events.jsonl"]
    return [shard_dir(run_dir, k) / "events.jsonl" for k in range(plan.shards)]


def share_limits(cfg: RunConfig, count: int) -> RunConfig:
    """Each shard's part of every endpoint limit, so that together the shards keep the run's limits.
    Ours: a static share (no coordination between machines), so a shard that ends early leaves its
    part unused. A concurrency smaller than the number of shards cannot be shared: refused. A
    server genssd launches is each shard's own: its limits are not shared."""
    if cfg.teacher.launch is not None:
        return cfg

    def concurrency(value: int, where: str) -> int:
        if value < count:
            raise UsageError(f"{where} {value} cannot be shared by {count} shards (each needs at least one request "
                             f"in flight): raise it to {count} or more, or use fewer shards")  # fmt: skip
        return value // count

    def rate(value: float | None) -> float | None:
        return value / count if value is not None else None

    teacher = cfg.teacher
    endpoints = [
        e.model_copy(update={
            "max_concurrency": concurrency(e.max_concurrency, f"teacher.endpoints {e.label} max_concurrency")
            if e.max_concurrency is not None else None,
            "requests_per_minute": rate(e.requests_per_minute), "tokens_per_minute": rate(e.tokens_per_minute),
        })
        for e in teacher.endpoints
    ]  # fmt: skip
    # The teacher-wide concurrency is used by endpoints without their own (all, without a pool).
    used = not teacher.endpoints or any(e.max_concurrency is None for e in teacher.endpoints)
    shared = teacher.model_copy(update={
        "max_concurrency": concurrency(teacher.max_concurrency, "teacher.max_concurrency")
        if used else teacher.max_concurrency,
        "requests_per_minute": rate(teacher.requests_per_minute), "tokens_per_minute": rate(teacher.tokens_per_minute),
        "endpoints": endpoints,
    })  # fmt: skip
    return cfg.model_copy(update={"teacher": shared})


def record_spent(shard_path: Path, spent: float) -> None:
    """Shard K's cost so far, replaced whole (a reader sees the old value or the new one)."""
    write_atomic(shard_path / SPENT, f"{spent!r}\n")


def _spent(shard_path: Path) -> float:
    try:
        return float((shard_path / SPENT).read_text())
    except (OSError, ValueError):  # not started yet, or of a genssd without these files
        return 0.0


class SharedSpend:
    """The teacher cost of the whole run, for one shard: its own, exact, plus every other shard's
    `spent` file, read at every response (N-1 small reads: the cap holds as tightly as with one
    shared counter). Files rather than one shared database: sqlite's WAL needs every process on
    one host, and a multi-node run's directory is on NFS."""

    def __init__(self, run_dir: Path, shard: Shard, spent: float):
        self.run_dir, self.shard, self.mine = run_dir, shard, spent

    def total(self) -> float:
        others = (k for k in range(self.shard.count) if k != self.shard.index)
        return self.mine + sum(_spent(shard_dir(self.run_dir, k)) for k in others)

    def add(self, cost: float) -> float:
        self.mine += cost
        record_spent(shard_dir(self.run_dir, self.shard.index), self.mine)
        return self.total()


def clear_completed(shard_path: Path) -> None:
    (shard_path / COMPLETED).unlink(missing_ok=True)


def mark_completed(shard_path: Path) -> None:
    write_atomic(shard_path / COMPLETED, "completed\n")


def all_completed(run_dir: Path, count: int) -> bool:
    return all((shard_dir(run_dir, k) / COMPLETED).is_file() for k in range(count))


@contextlib.contextmanager
def merge_lock(run_dir: Path) -> Iterator[None]:
    """Shards that complete at the same moment materialise the run's files one after another."""
    with open(run_dir / MERGE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
