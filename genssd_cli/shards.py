"""Sharded runs: which shard a problem belongs to, the plan fixed in the run directory, the one
teacher budget every shard draws on, and each shard's completion marker.

A sharded run directory (`genssd run --shards N`, or `--shard K/N` per process):

    RUN/shards.json          the plan: N, the assignment rule, the results-settings hash
    RUN/shard-K/             shard K: an ordinary run directory (its own log, lock, failures, resume)
    RUN/shard-K/completed    written when a session of shard K completed (a marker per rank, as
                             datatrove keeps one); removed when a session of it starts
    RUN/spend.sqlite         each shard's teacher cost: max_cost is one budget for the whole run
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
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from genssd_cli.config import RunConfig
from genssd_cli.data import Problem
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.files import write_atomic, write_failed
from genssd_cli.records import ShardPlan
from genssd_cli.shared_sqlite import open_shared

PLAN = "shards.json"
SPEND = "spend.sqlite"
SPEND_SCHEMA = "CREATE TABLE IF NOT EXISTS spend (shard INTEGER PRIMARY KEY, cost REAL NOT NULL)"
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


def write_plan(run_dir: Path, count: int, config_hash: str) -> None:
    """Fixed by the first shard whose teacher answered; kept as it is after that. Shards start
    together: the plan is linked into place only if no other shard's is there yet."""
    if read_plan(run_dir) is not None:
        return
    path = run_dir / PLAN
    mine = run_dir / f".{PLAN}.{os.getpid()}"
    try:
        mine.write_text(ShardPlan(shards=count, config_hash=config_hash).model_dump_json(indent=2) + "\n")
        os.link(mine, path)
    except FileExistsError:
        pass  # another shard's, with the same N (each checked it against the plan before starting)
    except OSError as exc:
        raise write_failed(path, exc) from None
    finally:
        mine.unlink(missing_ok=True)


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
    part unused. A concurrency smaller than the number of shards cannot be shared: refused."""

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
    shared = teacher.model_copy(update={
        "max_concurrency": concurrency(teacher.max_concurrency, "teacher.max_concurrency"),
        "requests_per_minute": rate(teacher.requests_per_minute), "tokens_per_minute": rate(teacher.tokens_per_minute),
        "endpoints": endpoints,
    })  # fmt: skip
    return cfg.model_copy(update={"teacher": shared})


class SharedSpend:
    """The teacher cost of every shard, in one sqlite file beside them: a shard adds what each
    response cost and reads the run's total, so max_cost is one budget for the whole run."""

    def __init__(self, run_dir: Path, shard: int):
        self.shard = shard
        self.path = run_dir / SPEND
        try:
            self._db = open_shared(self.path, SPEND_SCHEMA, timeout=30)
        except sqlite3.Error as exc:
            raise RuntimeFailure(f"cannot use the shared budget {self.path}: {exc}") from None

    def start(self, spent: float) -> float:
        """This shard's cost so far (from its own log, the truth); returns the run's total."""
        return self._write("INSERT INTO spend VALUES (?, ?) ON CONFLICT(shard) DO UPDATE SET cost = excluded.cost",
                           (self.shard, spent))  # fmt: skip

    def add(self, cost: float) -> float:
        return self._write("UPDATE spend SET cost = cost + ? WHERE shard = ?", (cost, self.shard))

    def _write(self, sql: str, args: tuple) -> float:
        try:
            with self._db:
                self._db.execute(sql, args)
            return self._db.execute("SELECT COALESCE(SUM(cost), 0) FROM spend").fetchone()[0]
        except sqlite3.Error as exc:
            raise RuntimeFailure(f"cannot use the shared budget {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()


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
