"""`genssd bench …`: speed measurements, one sub-command per benchmark (genssd_cli/bench/)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

bench_app = typer.Typer(help="Speed measurements, side by side in one process; one JSON line per method.")


@bench_app.command("scoring")
def bench_scoring(
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="student: shipped name, HF id or folder"),
    random_init: str | None = typer.Option(None, "--random-init", help="a config-only shape, e.g. qwen2.5-1.5b"),
    prefix: int = typer.Option(512, "--prefix", min=1, help="prefix tokens per trajectory"),
    n: int = typer.Option(4, "--n", min=1, help="candidates per step"),
    chunk: int = typer.Option(64, "--chunk", min=1, help="tokens per candidate"),
    trajectories: int = typer.Option(8, "--trajectories", min=1),
    steps: int = typer.Option(3, "--steps", min=1, help="steps per trajectory"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16"),
    batch_tokens: int | None = typer.Option(None, "--batch-tokens", min=64, help="as student.batch_tokens"),
) -> None:
    """Prefix-cached scoring (what the engine runs) against a naive full recompute."""
    from genssd_cli.bench import print_lines
    from genssd_cli.bench.scoring import ScoringBench
    from genssd_cli.bench.scoring import bench_scoring as run_bench

    print_lines(run_bench(ScoringBench(model, random_init, prefix, n, chunk, trajectories, steps, device, dtype,
                                       batch_tokens)))  # fmt: skip


@bench_app.command("engine")
def bench_engine(
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="student: shipped name, HF id or folder"),
    problems: int = typer.Option(48, "--problems", min=1),
    n: int = typer.Option(4, "--n", min=1),
    chunk: int = typer.Option(16, "--chunk", min=1),
    steps: int = typer.Option(4, "--steps", min=1, help="max steps per trajectory"),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="teacher requests allowed in flight"),
    latency: float = typer.Option(0.1, "--latency-per-token", min=0.0, help="teacher seconds per token"),
) -> None:
    """The whole engine against a local teacher with a fixed latency: teacher busy share, loop CPU."""
    from genssd_cli.bench import print_lines
    from genssd_cli.bench.engine import EngineBench
    from genssd_cli.bench.engine import bench_engine as run_bench

    print_lines(run_bench(EngineBench(model, problems, n, chunk, steps, concurrency, latency)))


@bench_app.command("train")
def bench_train(
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="student: shipped name, HF id or folder"),
    random_init: str | None = typer.Option(None, "--random-init", help="a config-only shape, e.g. qwen2.5-1.5b"),
    rows: int = typer.Option(64, "--rows", min=1),
    steps: int = typer.Option(8, "--steps", min=1),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    max_length: int = typer.Option(512, "--max-length", min=16),
    lora_r: int = typer.Option(16, "--lora-r", min=1),
) -> None:
    """`genssd train`'s loop (TRL + peft) against a plain peft training loop, same batches."""
    from genssd_cli.bench import print_lines
    from genssd_cli.bench.train import TrainBench
    from genssd_cli.bench.train import bench_train as run_bench

    print_lines(run_bench(TrainBench(model, random_init, rows, steps, batch_size, max_length, lora_r)))


@bench_app.command("eval")
def bench_eval(
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="student: shipped name, HF id or folder"),
    random_init: str | None = typer.Option(None, "--random-init", help="a config-only shape, e.g. qwen2.5-1.5b"),
    rows: int = typer.Option(16, "--rows", min=1, help="bundled GSM8K prompts"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    backend: Literal["hf", "vllm"] = typer.Option("hf", "--backend", help="eval's loop to time: HF or vLLM"),
) -> None:
    """`genssd eval`'s generation loop against plain HF generate, same batches, greedy."""
    from genssd_cli.bench import print_lines
    from genssd_cli.bench.eval import bench_eval as run_bench

    print_lines(run_bench(model, random_init, rows, batch_size, max_new_tokens, backend))


@bench_app.command("affinity")
def bench_affinity(
    endpoints: list[str] = typer.Option(
        [],
        "--endpoint",
        help="a running vLLM server's base URL, with prefix caching and VLLM_SERVER_DEV_MODE=1 (repeat; default: "
        "start --servers)",
    ),
    servers: int = typer.Option(2, "--servers", min=2, help="vLLM servers to start when no --endpoint is given"),
    teacher: str = typer.Option(
        "smollm2-135m-instruct", "--teacher", help="the model they serve: shipped name, HF id or folder"
    ),
    student: str = typer.Option("smollm2-135m-instruct", "--student", help="shipped name, HF id or folder"),
    problems: int = typer.Option(4, "--problems", min=1),
    samples: int = typer.Option(2, "--samples", min=1, help="trajectories per problem"),
    n: int = typer.Option(4, "--n", min=1),
    chunk: int = typer.Option(32, "--chunk", min=1),
    steps: int = typer.Option(6, "--steps", min=1, help="steps per trajectory"),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="requests in flight per server"),
    vllm_python: str | None = typer.Option(
        None, "--vllm-python", help="a Python with vLLM (default: $GENSSD_VLLM_PYTHON, else .venv-vllm/bin/python)"
    ),
    vllm_args: list[str] = typer.Option([], "--vllm-arg", help="an extra server argument: --vllm-arg=--block-size=16"),
    startup_timeout_s: float = typer.Option(900.0, "--startup-timeout-s", min=1.0),
) -> None:
    """teacher.routing affinity against least-loaded: the same run on a pool of vLLM servers, each
    server's prefix-cache hit rate from its /metrics."""
    from genssd_cli.bench import print_lines
    from genssd_cli.bench.affinity import AffinityBench
    from genssd_cli.bench.affinity import bench_affinity as run_bench

    print_lines(run_bench(AffinityBench(endpoints, servers, teacher, student, problems, samples, n, chunk, steps,
                                        concurrency, vllm_python, vllm_args, startup_timeout_s)))  # fmt: skip


@bench_app.command("resume")
def bench_resume(
    problems: int = typer.Option(100_000, "--problems", min=1, help="problems in the synthetic run"),
    out: Path | None = typer.Option(None, "--out", help="keep the synthetic run here (default: a temporary folder)"),
    samples: int = typer.Option(1, "--samples", min=1, help="trajectories per problem"),
    steps: int = typer.Option(4, "--steps", min=1, help="steps per trajectory"),
    n: int = typer.Option(4, "--n", min=1, help="candidates per step"),
    chunk_tokens: int = typer.Option(256, "--chunk-tokens", min=1, help="tokens of text per candidate"),
    baseline: Path | None = typer.Option(
        None,
        "--baseline",
        help="another genssd checkout, measured on the same log (e.g. `git worktree add /tmp/genssd-before c083b59`)",
    ),
    memory_limit_gb: float = typer.Option(
        16.0, "--memory-limit-gb", min=0.0, help="address-space cap of each measured process (0: none)"
    ),
) -> None:
    """What `genssd run` does with a paper-scale log on resume and at the end (read, replay,
    materialise), in a child process: time and peak RSS; with --baseline, another checkout's too."""
    from genssd_cli.bench import print_lines
    from genssd_cli.bench.resume import Shape
    from genssd_cli.bench.resume import bench_resume as run_bench

    shape = Shape(problems=problems, samples=samples, steps=steps, n=n, chunk_tokens=chunk_tokens)
    run_bench(shape, out, baseline, memory_limit_gb or None, lambda line: print_lines([line]))


@bench_app.command("gpu")
def bench_gpu(
    out: Path = typer.Option(..., "--out", help="where gpu-check.jsonl, summary.md and parts.log go"),
    tiny: bool = typer.Option(False, "--tiny", help="tiny shapes and workloads: checks the check itself on a CPU"),
    budget_s: float = typer.Option(480.0, "--budget-s", min=10.0, help="the whole check's time; parts share it"),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="tokenizer folder or shipped name for the random-"
                                         "init shapes (default: .whl/tokenizer if there, else the demo student's)"),
    parts: list[str] = typer.Option([], "--part", help="run only this part (repeatable; the device part always runs)"),
) -> None:
    """Every GPU figure in one call (scoring, bf16 vs fp32, engine, train, eval, an end-to-end smoke),
    each part in its own process under its own deadline; targets met or not in OUT/summary.md."""
    from genssd_cli.bench.gpu import SUMMARY_MD, gpu_check

    results = gpu_check(out, tiny, budget_s, tokenizer, parts, lambda line: print(line, flush=True))
    print(f"-> {out / SUMMARY_MD}")
    if any(r.status != "ok" for r in results):
        raise typer.Exit(1)
