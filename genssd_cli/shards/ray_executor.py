"""The Ray executor of a sharded run: one Ray Core actor per shard, placed by Ray (a GPU each
where the cluster has GPUs), running the shard's own `genssd run --shard K/N` process. An actor
whose process or node dies is restarted by Ray and the shard resumes from its log; a shard
process that dies under a live actor is started again from here. Nothing here writes a file:
the shard processes do, so RUN must be on a filesystem every node mounts.

On an existing cluster: `genssd run CONFIG --shards N --executor ray --ray-address auto` on a
node of it (or `ray://HEAD:10001`); without an address a local cluster of the run's own, on loopback only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

from rich.console import Console

from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.procs import die_with_parent, relay_stop
from genssd_cli.shards.process import POLL_S, ShardCommand, relaunch

STOPPED = 130
NO_SHARED_DIRECTORY = 3  # an exit status no shard process gives


class ShardWorker:
    """Runs one shard's process at a time; `stop` may arrive while `run` waits (two threads), or
    before it starts one (then it starts none). A process gets one SIGTERM, however many stops come
    (a second signal would make the shard stop at once, without draining)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.stopped = False
        self.lock = threading.Lock()

    def pid(self) -> int:
        return os.getpid()

    def run(self, argv: list[str], log: str, threads: str | None, cwd: str) -> int:
        # Ray set CUDA_VISIBLE_DEVICES for this actor's GPUs; the shard process inherits it. Ray also
        # sets OMP_NUM_THREADS=1 in its workers: the shard gets the caller's instead, so the student's
        # CPU arithmetic (and its PPLs, to the last digit) is what the same run gives outside Ray.
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = threads
        if not os.path.isdir(cwd):  # the caller's paths are relative to its directory: RUN's filesystem
            return NO_SHARED_DIRECTORY
        with self.lock, open(os.path.join(cwd, log), "ab") as out:
            if self.stopped:
                return STOPPED
            # This node's Python (Ray runs every node on the same environment), in the caller's directory.
            self.process = subprocess.Popen(die_with_parent([sys.executable, *argv[1:]]), stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                            start_new_session=True, env=env)  # fmt: skip
        return self.process.wait()

    def stop(self) -> None:
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            if self.process is not None and self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)


def run_on_ray(commands: list[ShardCommand], address: str | None, gpus_per_shard: float | None, max_restarts: int,
               console: Console) -> None:  # fmt: skip
    ray = _init_ray(address)
    try:
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        gpus = gpus_per_shard if gpus_per_shard is not None else (1 if cluster_gpus else 0)
        if gpus > cluster_gpus:  # no actor could ever be placed: the run would wait for ever
            raise UsageError(f"--gpus-per-shard {gpus:g}: the Ray cluster has {cluster_gpus:g} GPUs")
        version = ray.__version__
        console.print(f"Ray {version}: {ray.cluster_resources().get('CPU', 0):g} CPUs, "
                      f"{ray.cluster_resources().get('GPU', 0):g} GPUs; {gpus:g} GPU per shard")  # fmt: skip
        worker = ray.remote(ShardWorker).options(
            num_gpus=gpus, num_cpus=0 if gpus else 1, max_concurrency=2,
            max_restarts=max_restarts, max_task_retries=max_restarts,  # a dead actor: restarted, its shard rerun
        )  # fmt: skip
        _watch({c.index: worker.remote() for c in commands}, commands, max_restarts, console)
    finally:
        ray.shutdown()


def _init_ray(address: str | None):
    """Ray, attached to the cluster the user named (`auto` reads RAY_ADDRESS) or, without an
    address, a new local cluster of this run's own whose services listen on loopback only:
    `address="local"` never attaches to a cluster found in RAY_ADDRESS or under /tmp/ray."""
    if address is not None:
        import ray

        return _connect(ray, address=address)
    # Ray swaps a loopback node address for the machine's own (and so binds its gRPC servers to
    # every interface) unless "clusters" are off, as they are on macOS and Windows: read when Ray
    # is imported and by the services it starts, so set in the environment first.
    saved = os.environ.get(_LOCAL_ONLY)
    os.environ[_LOCAL_ONLY] = "0"
    try:
        import ray
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # Ray was imported before: its constant read already
        return _connect(ray, address="local", _node_ip_address="127.0.0.1")
    finally:
        if saved is None:
            os.environ.pop(_LOCAL_ONLY, None)
        else:
            os.environ[_LOCAL_ONLY] = saved


_LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _connect(ray, address: str, **local: str):
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False, **local)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "(local)" if address == "local" else address
        raise RuntimeFailure(f"cannot reach the Ray cluster {where}: {exc}") from None
    return ray


def _watch(actors: dict, commands: list[ShardCommand], max_restarts: int, console: Console) -> None:
    """Every shard on its actor until all have ended; a stop here is passed on to every actor."""
    import ray

    threads = os.environ.get("OMP_NUM_THREADS")
    cwd = os.getcwd()
    stopping = False

    def start(command: ShardCommand):
        return actors[command.index].run.remote(command.argv, str(command.log), threads, cwd)

    pending = {start(c): c for c in commands}

    def stop_all(signum: int) -> None:
        nonlocal stopping
        stopping = True
        for actor in actors.values():
            actor.stop.remote()

    with relay_stop(stop_all):
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            if stopping:  # again: an actor Ray restarted since is a new one, with a shard it may start
                stop_all(signal.SIGTERM)
            for ref in done:
                command = pending.pop(ref)
                code = _exit_code(ref, command, cwd, console)
                if code is None:
                    continue
                if relaunch(command, code, max_restarts, console, stopping):
                    pending[start(command)] = command
                elif command.code == 2:
                    stop_all(signal.SIGTERM)


def _exit_code(ref, command: ShardCommand, cwd: str, console: Console) -> int | None:
    """How the shard's process ended; None (and the shard marked failed) where its actor or its
    node could not run it."""
    import ray
    from ray.exceptions import RayActorError, RayError

    try:
        code = ray.get(ref)
    except RayActorError as exc:  # restarts used up, or its node is gone for good
        command.code = -1
        console.print(f"shard {command.index}: its Ray actor died ({exc.__class__.__name__})", markup=False)
        return None
    except RayError as exc:  # e.g. its node cannot open the log: one line, not Ray's traceback
        command.code = -1
        console.print(f"shard {command.index}: {str(exc).strip().splitlines()[-1]}", markup=False)
        return None
    if code == NO_SHARED_DIRECTORY:
        command.code = -1
        console.print(f"shard {command.index}: its node has no {cwd}: RUN and the config must be on "
                      "a filesystem every node mounts, at the same path", markup=False)  # fmt: skip
        return None
    return code
