"""The `genssd` command. Commands stay thin and import their machinery when called, so
`genssd --help` never pays for torch."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Literal

import typer
from rich.console import Console

from genssd_cli.errors import GenssdError
from genssd_cli.files import is_write_error, write_failed

app = typer.Typer(
    help="Gen-SSD: grow a teacher's chain of thought chunk by chunk, keep the chunks a small "
    "student can follow, and distill them into the student.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from genssd_cli import __version__

        print(f"genssd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    """Gen-SSD: grow a teacher's chain of thought chunk by chunk, keep the chunks a small student
    can follow, and distill them into the student."""
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())


@app.command()
def run(
    config: Path | None = typer.Argument(None, help="run config YAML (default: the bundled demo)"),
    out: Path | None = typer.Option(None, "--out", help="run directory (default: runs/CONFIG_NAME)"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="only the first N problems"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting: --set search.n=8"),
    force: bool = typer.Option(False, "--force", help="resume even though result settings changed"),
    shards: int | None = typer.Option(None, "--shards", min=1, help="split the problems into N shards, run them all"),
    shard: str | None = typer.Option(None, "--shard", help="run one shard, K/N (K from 0), e.g. in a Slurm array"),
    executor: Literal["local", "ray"] | None = typer.Option(None, "--executor", help="where --shards run (local)"),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster: auto, ray://HOST:PORT"),
    gpus_per_shard: float | None = typer.Option(None, "--gpus-per-shard", min=0, help="Ray: default 1 if it has GPUs"),
    restarts: int | None = typer.Option(None, "--restarts", min=0, help="times a dead shard is started again (3)"),
) -> None:
    """Generate Gen-SSD trajectories; running it again on the same --out resumes."""
    from genssd_cli.errors import Interrupted, UsageError
    from genssd_cli.runner import default_run_dir

    console = Console()
    run_dir = out or default_run_dir(config)
    try:
        if shards is not None and shard is not None:
            raise UsageError("give --shards N (run every shard) or --shard K/N (run one), not both")
        _check_executor_flags(shards, executor, ray_address, gpus_per_shard, restarts)
        if shards is not None:
            from genssd_cli.executors import run_sharded

            summary = run_sharded(config, run_dir, shards, limit, overrides, force, executor or "local", ray_address,
                                  gpus_per_shard, 3 if restarts is None else restarts, console,
                                  _resume_command())  # fmt: skip
        else:
            from genssd_cli.runner import run_command
            from genssd_cli.shards import parse_shard

            one = parse_shard(shard) if shard is not None else None
            summary = run_command(config, out, limit, overrides, force, console, _resume_command(), one)
    except (KeyboardInterrupt, Interrupted):
        err_console.print(f"interrupted; resume with: {_resume_command()}", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    t = summary.trajectories
    console.print(
        f"done: {t.finished} finished, {t.truncated} truncated, {t.pruned} pruned, "
        f"{t.failed} failed, {summary.correct} correct -> {run_dir}/trajectories.jsonl",
        markup=False,
        soft_wrap=True,
    )
    if t.failed or t.pending:
        console.print(f"some trajectories did not end; resume with: {_resume_command()}", markup=False, soft_wrap=True)


def _check_executor_flags(shards: int | None, executor: str | None, ray_address: str | None,
                          gpus_per_shard: float | None, restarts: int | None) -> None:
    """A flag that would change nothing is a mistake worth a line, not a run that ignores it."""
    from genssd_cli.errors import UsageError

    given = {"--executor": executor, "--ray-address": ray_address, "--gpus-per-shard": gpus_per_shard,
             "--restarts": restarts}  # fmt: skip
    if shards is None and (named := [flag for flag, value in given.items() if value is not None]):
        raise UsageError(f"{', '.join(named)}: only with --shards N (where the shards run)")
    if executor != "ray" and (named := [f for f in ("--ray-address", "--gpus-per-shard") if given[f] is not None]):
        raise UsageError(f"{', '.join(named)}: only with --executor ray")


@app.command()
def train(
    run_dirs: list[Path] = typer.Argument(..., help="run directories whose trajectories.jsonl to train on"),
    out: Path = typer.Option(..., "--out", help="where the adapter, checkpoints and logs go"),
    config: Path | None = typer.Option(None, "--config", help="train config YAML (default: configs/train.yaml)"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting: --set training.epochs=1"),
    include_incorrect: bool = typer.Option(False, "--include-incorrect", help="also train on wrong answers"),
    merge: bool = typer.Option(False, "--merge", help="also write the merged model to OUT/merged"),
    processes: int = typer.Option(1, "--processes", min=1, help="data-parallel processes, one GPU each (CPU: gloo)"),
) -> None:
    """LoRA-fine-tune the student on kept trajectories (TRL SFT); running it again resumes."""
    from genssd_cli.train import train_main

    result = train_main(run_dirs, out, config, overrides, include_incorrect, merge, processes, sys.argv[1:], Console())
    if result is None:  # printed by the main training process
        return
    on = f" on {result['processes']} processes" if result.get("processes", 1) > 1 else ""
    print(
        f"done: {result['rows']} rows, {result['steps']} steps{on}, loss {result['first_loss']} -> "
        f"{result['last_loss']} in {result['wall_s']} s -> {result['adapter']}"
    )


@app.command()
def pipeline(
    config: Path | None = typer.Argument(None, help="pipeline config YAML (default: configs/pipeline-demo.yaml)"),
    out: Path | None = typer.Option(None, "--out", help="where every stage's directory goes"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting: --set limit=4"),
) -> None:
    """Cold start, then each method's run and training, each stage resumable; again: resumes."""
    from genssd_cli.errors import Interrupted
    from genssd_cli.paths import bundled_dir
    from genssd_cli.pipeline import pipeline_command

    config = config or bundled_dir("configs") / "pipeline-demo.yaml"
    try:
        record = pipeline_command(config, out, overrides, Console(), _resume_command())
    except (KeyboardInterrupt, Interrupted):
        err_console.print(f"interrupted; resume with: {_resume_command()}", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    for name, stage in record["stages"].items():
        print(f"{name}: {stage['wall_s']} s -> {stage['dir']}")
    print(f"done: {len(record['stages'])} stages in {record['wall_s']} s")


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="the student: shipped name, HF model id or local folder"),
    dataset: str = typer.Option(..., "--dataset", "--bench",  # --bench: its earlier name, still accepted
                                help="gsm8k or arith1-heldout (bundled), math-500, aime24, hf:ID, or FILE.jsonl"),
    adapter: str | None = typer.Option(None, "--adapter", help="a LoRA adapter folder from genssd train"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="only the first N problems"),
    samples: int = typer.Option(1, "--samples", min=1, help="generations per problem (pass@k)"),
    out: Path | None = typer.Option(None, "--out", help="default: runs/eval/MODEL-DATASET[-adapter-HASH]"),
    config: Path | None = typer.Option(None, "--config", help="eval config YAML (default: configs/eval.yaml)"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting: --set max_new_tokens=512"),
) -> None:
    """Accuracy of the student (with --adapter: after distillation) on an eval dataset; resumes."""
    from genssd_cli.eval import eval_command

    m = eval_command(model, adapter, dataset, limit, samples, out, config, overrides, Console())
    passes = "".join(f", pass@{k} {v:.3f}" for k, v in m.get("pass_at_k", {}).items())
    ci = m["ci95"] or [None, None]
    print(f"accuracy {m['accuracy']:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}) on {m['problems']} problems{passes}, "
          f"mean {m['mean_generated_tokens']} tokens -> {m['out']}/metrics.json")  # fmt: skip


@app.command()
def doctor(
    config: Path | None = typer.Argument(None, help="run config YAML (default: the embedded demo)"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting: --set teacher.base_url=…"),
) -> None:
    """Probe each teacher endpoint: reachable, model, n, seed, continuation, stop strings, context."""
    from genssd_cli.doctor import doctor_command

    findings = doctor_command(config, overrides, Console())
    doubts = list(dict.fromkeys(f.check for f in findings if f.ok is False))
    print("the endpoint can serve a run" + (f"; see the rows marked no: {', '.join(doubts)}" if doubts else ""))


@app.command()
def report(
    paths: list[Path] = typer.Argument(..., help="run directories, or a pipeline directory (its runs and evals)"),
    evals: list[Path] = typer.Option([], "--eval", help="an eval directory from genssd eval (repeatable)"),
    out: Path | None = typer.Option(None, "--out", help="default: PIPELINE_DIR/report, else runs/report"),
) -> None:
    """Runs side by side: kept / pruned, student PPL, length, teacher tokens, cost, eval accuracy."""
    from genssd_cli.report import report_command

    result = report_command(paths, evals, out, Console())
    print(f"report of {result['columns']} columns -> {result['out']}/report.md, {len(result['plots'])} plots")


@app.command()
def tune(
    config: Path = typer.Argument(..., help="run config YAML"),
    grid: list[str] = typer.Option([], "--grid", help="a setting and its values: --grid search.n=2,4,8 (repeatable)"),
    pilot: int = typer.Option(50, "--pilot", min=1, help="run each point on the first N problems"),
    out: Path | None = typer.Option(None, "--out", help="default: runs/tune-CONFIG_NAME"),
    max_cost: float | None = typer.Option(None, "--max-cost", help="teacher budget of the whole sweep (needs a price)"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting of every point: --set search.retries=2"),
) -> None:
    """Pilot runs over a grid of settings, cheapest first, sharing one teacher cache; a table and a pick."""
    from genssd_cli.errors import Interrupted
    from genssd_cli.tune import tune_command

    try:
        record = tune_command(config, grid, pilot, out, max_cost, overrides, Console(), _resume_command())
    except (KeyboardInterrupt, Interrupted):
        err_console.print(f"interrupted; resume with: {_resume_command()}", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    ran = sum(1 for p in record["points"] if p["status"] != "not run")
    pick = record["recommendation"]["slug"]
    print(f"done: {ran} of {len(record['points'])} points -> {record['out']}/tune.md"
          + (f"; recommended: {pick}" if pick else ""))  # fmt: skip


@app.command()
def export(
    run_dirs: list[Path] = typer.Argument(..., help="run directories whose trajectories.jsonl to export"),
    out: Path = typer.Option(..., "--out", help="the dataset folder (a previous export there is replaced)"),
    only_correct: bool = typer.Option(False, "--only-correct", help="only the rows marked correct"),
) -> None:
    """The kept trajectories as a Hugging Face dataset folder (parquet + dataset card), ready to push."""
    from genssd_cli.export import CARD, DATA_FILE, export_command

    result = export_command(run_dirs, out, only_correct)
    print(f"exported {result['rows']} rows ({result['correct']} correct) of {result['runs']} runs -> "
          f"{result['out']}/{DATA_FILE}, {result['out']}/{CARD}")  # fmt: skip


bench_app = typer.Typer(help="Speed measurements, side by side in one process; one JSON line per method.")
app.add_typer(bench_app, name="bench")


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
    from genssd_cli.bench.scoring import bench_scoring as run_bench

    print_lines(run_bench(model, random_init, prefix, n, chunk, trajectories, steps, device, dtype, batch_tokens))


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
    from genssd_cli.bench.engine import bench_engine as run_bench

    print_lines(run_bench(model, problems, n, chunk, steps, concurrency, latency))


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
    from genssd_cli.bench.train import bench_train as run_bench

    print_lines(run_bench(model, random_init, rows, steps, batch_size, max_length, lora_r))


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
    from genssd_cli.bench.affinity import bench_affinity as run_bench

    print_lines(run_bench(endpoints, servers, teacher, student, problems, samples, n, chunk, steps, concurrency,
                          vllm_python, vllm_args, startup_timeout_s))  # fmt: skip


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


def _resume_command() -> str:
    return "genssd " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C outside a command's own handling
        _fail("interrupted", 130)
    except typer.TyperException as exc:  # a bad flag or argument (click's usage errors): one line
        _fail(f"{exc.format_message()} (see --help)", getattr(exc, "exit_code", 2))
    except GenssdError as exc:
        _fail(str(exc), exc.exit_code)
    except OSError as exc:  # a write refused where no writer of ours names its file (a library's)
        if not is_write_error(exc):
            raise
        _fail(str(write_failed(exc.filename or "a file", exc)), 1)
    sys.exit(code or 0)


def _fail(message: str, code: int) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)
