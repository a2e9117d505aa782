"""`genssd pipeline`: the whole study as one resumable command.

    cold start   genssd run (method standard-kd on its own problems) -> genssd train
    per method   genssd run (scored by the cold-started student) -> genssd train (continues the
                 cold-start adapter, so every method's student starts from the same point)
    with eval:   genssd eval of the base student, of the cold-start adapter (the reference every
                 method is compared to) and of each method's adapter; refused before any stage runs
                 when its max_new_tokens is below the runs' (it would favour the shorter method) or
                 when it asks for several samples per problem without sampling
    last         genssd report on the method runs and evals (OUT/report)

Each stage is the ordinary command on its own directory under OUT, so it resumes the way it does
alone: a finished run asks the teacher nothing, a finished training is skipped, an interrupted
one continues from its checkpoint. Re-running the pipeline walks the stages and does only what is
missing. Stage outcomes and wall times (summed over every session) go to OUT/pipeline.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from genssd_cli.config import (
    EvalConfig,
    EvalStageSettings,
    PipelineConfig,
    load_eval_config,
    load_pipeline_config,
    load_run_config,
)
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.eval.command import check_dataset, dataset_slug
from genssd_cli.files import write_atomic
from genssd_cli.paths import bundled_dir

RUN, TRAIN, EVAL, REPORT = "run", "train", "eval", "report"


def _beside(config_path: Path, name: str) -> Path:
    """A config the pipeline config names: next to it, else a bundled one."""
    for candidate in (config_path.parent / name, bundled_dir("configs") / name):
        if candidate.is_file():
            return candidate
    raise UsageError(f"config {config_path}: {name} is neither next to it nor a bundled config")


def stage_names(cfg: PipelineConfig) -> tuple[dict[str, str], list[str]]:
    """The eval stages' names with their eval datasets, and every stage's name in order. One
    dataset: METHOD/eval; several: METHOD/eval-DATASET each (base/ and cold-start/ alike)."""
    datasets = cfg.eval.datasets if cfg.eval else []
    evals = {EVAL: datasets[0]} if len(datasets) == 1 else {f"{EVAL}-{dataset_slug(d)}": d for d in datasets}
    names = (
        [f"base/{e}" for e in evals]
        + ([f"cold-start/{RUN}", f"cold-start/{TRAIN}", *(f"cold-start/{e}" for e in evals)] if cfg.cold_start else [])
        + [f"{method}/{kind}" for method in cfg.methods for kind in (RUN, TRAIN, *evals)]
        + [REPORT]
    )
    return evals, names


def check_eval(cfg: PipelineConfig, config_path: Path, run_config: Path) -> None:
    """Refuse an eval that would not be fair or cannot run, before any stage runs (hours in)."""
    if cfg.eval is None:
        return
    for dataset in cfg.eval.datasets:
        check_dataset(dataset)
    eval_config = _beside(config_path, cfg.eval.config)
    settings = load_eval_config(eval_config, cfg.eval.set)
    _check_token_cap(cfg, cfg.eval, settings, eval_config, run_config)
    _check_samples(cfg.eval, settings, eval_config)


def _longest_trajectories(cfg: PipelineConfig, run_config: Path) -> tuple[int, str]:
    """The largest search.max_new_tokens among the runs whose trajectories train a student that is
    evaluated (the methods' and the cold start's), with the overrides that set it."""
    sets = [("the pipeline's set", cfg.set)] + ([("cold_start.set", cfg.cold_start.set)] if cfg.cold_start else [])
    caps = [(load_run_config(run_config, s).search.max_new_tokens, f" with {name}" if s else "") for name, s in sets]
    return max(caps, key=lambda cap: cap[0])  # a tie names the methods' runs


def _check_token_cap(
    cfg: PipelineConfig, e: EvalStageSettings, settings: EvalConfig, eval_config: Path, run_config: Path
) -> None:
    """A student trained on trajectories of up to N tokens, evaluated with fewer, is cut off where
    it would still be reasoning: that favours the method with the shorter trajectories. Refused,
    not raised silently, so that the eval config says what is really used."""
    longest, where = _longest_trajectories(cfg, run_config)
    if settings.max_new_tokens < longest:
        with_set = " with eval.set" if e.set else ""
        raise UsageError(
            f"the eval's max_new_tokens {settings.max_new_tokens} ({eval_config.name}{with_set}) is below the runs' "
            f"search.max_new_tokens {longest} ({run_config.name}{where}): a student could be cut off before the end "
            f"of answers as long as those it was trained on; raise the eval's max_new_tokens to {longest} or more "
            f"(e.g. eval.set: [max_new_tokens={longest}])"
        )


def _check_samples(e: EvalStageSettings, settings: EvalConfig, eval_config: Path) -> None:
    """Several samples per problem need sampling: genssd eval refuses them greedy too, but only
    once its stage comes."""
    most, dataset = max(((e.samples_of(d), d) for d in e.datasets), key=lambda pair: pair[0])
    if most > 1 and settings.temperature == 0:
        raise UsageError(
            f"eval.samples {most} ({dataset}) needs sampling, but the eval's temperature is 0 ({eval_config.name}): "
            "set temperature > 0 (e.g. eval.set: [temperature=0.6]) or eval.samples: 1"
        )


def pipeline_command(
    config_path: Path, out: Path | None, overrides: list[str], console: Console, resume_hint: str
) -> dict[str, Any]:
    from genssd_cli.eval.command import eval_command
    from genssd_cli.report.command import report_command
    from genssd_cli.run.command import run_command
    from genssd_cli.shards.local import run_sharded
    from genssd_cli.train.command import ADAPTER, train_command

    cfg = load_pipeline_config(config_path, overrides)
    run_config = _beside(config_path, cfg.run_config)
    train_config = _beside(config_path, cfg.train_config)
    out = out or Path(cfg.out or Path("runs") / config_path.stem)
    check_eval(cfg, config_path, run_config)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write to {out}: {exc.strerror}") from None
    record: dict[str, Any] = {"config": str(config_path), "stages": {}}
    evals, names = stage_names(cfg)
    earlier = _earlier_stages(out / "pipeline.json")

    def stage(name: str, work: Callable[[Path], dict[str, Any]]) -> None:
        console.rule(f"stage {names.index(name) + 1}/{len(names)}: {name}", style="bold")
        started = time.monotonic()
        outcome = work(out / name)
        # Time spent on the stage in every session: a stage found done adds its few seconds to
        # the time the earlier sessions spent doing it, instead of replacing it.
        wall_s = earlier.get(name, {}).get("wall_s", 0.0) + time.monotonic() - started
        # The stage's time, not the part its command reports (a training's own wall_s).
        record["stages"][name] = {"dir": str(out / name), **outcome, "wall_s": round(wall_s, 1)}
        record["wall_s"] = round(sum(s["wall_s"] for s in record["stages"].values()), 1)
        write_atomic(out / "pipeline.json", json.dumps(record, indent=2) + "\n")

    def generate(sets: list[str], limit: int | None) -> Callable[[Path], dict[str, Any]]:
        def work(run_dir: Path) -> dict[str, Any]:
            if cfg.shards is None:
                summary = run_command(run_config, run_dir, limit, sets, False, console, resume_hint)
            else:  # the run's shards as `genssd run --shards N` runs them (processes or Ray actors)
                summary = run_sharded(run_config, run_dir, cfg.shards, limit, sets, False, cfg.executor,
                                      cfg.ray_address, None, 3, console, resume_hint)  # fmt: skip
            t = summary.trajectories
            if t.failed or t.pending:
                raise RuntimeFailure(
                    f"{run_dir}: {t.failed} failed and {t.pending} pending trajectories; "
                    f"the next stages need them: resume with: {resume_hint}"
                )
            return summary.model_dump(include={"trajectories", "correct", "kept"})

        return work

    def distill(run_dir: Path) -> Callable[[Path], dict[str, Any]]:
        def work(train_dir: Path) -> dict[str, Any]:
            return train_command([run_dir], train_dir, train_config, cfg.distill.set, cfg.distill.include_incorrect,
                                 False, console)  # fmt: skip

        return work

    def evaluate(adapter: Path | None, dataset: str) -> Callable[[Path], dict[str, Any]]:
        def work(eval_dir: Path) -> dict[str, Any]:
            model = load_run_config(run_config, cfg.set).student.model
            e = cfg.eval
            metrics = eval_command(model, str(adapter) if adapter else None, dataset, e.limit_of(dataset),
                                   e.samples_of(dataset), eval_dir, _beside(config_path, e.config), e.set,
                                   console)  # fmt: skip
            keys = ("accuracy", "ci95", "problems", "samples_per_problem", "pass_at_k", "mean_generated_tokens")
            return {k: metrics[k] for k in keys if k in metrics}

        return work

    for name, dataset in evals.items():
        stage(f"base/{name}", evaluate(None, dataset))
    student: list[str] = []
    if cfg.cold_start:
        stage(f"cold-start/{RUN}", generate(cfg.cold_start.set, cfg.cold_start.limit))
        stage(f"cold-start/{TRAIN}", distill(out / "cold-start" / RUN))
        # Where every method starts from: a method helps only as far as it beats this.
        for name, dataset in evals.items():
            stage(f"cold-start/{name}", evaluate(out / "cold-start" / TRAIN / ADAPTER, dataset))
        student = [f"student.adapter={(out / 'cold-start' / TRAIN / ADAPTER).resolve()}"]
    for method in cfg.methods:
        stage(f"{method}/{RUN}", generate([*cfg.set, *student, f"method={method}"], cfg.limit))
        stage(f"{method}/{TRAIN}", distill(out / method / RUN))
        for name, dataset in evals.items():
            stage(f"{method}/{name}", evaluate(out / method / TRAIN / ADAPTER, dataset))
    # Always redone: it only reads what the stages wrote (seconds).
    method_runs = [out / m / RUN for m in cfg.methods]
    eval_dirs = [out / s for s in names if s.rpartition("/")[2] in evals]
    stage(REPORT, lambda report_dir: report_command(method_runs, eval_dirs, report_dir, console))
    return record


def _earlier_stages(path: Path) -> dict[str, dict[str, Any]]:
    """The stages an earlier session recorded; none when there is no readable record."""
    try:
        stages = json.loads(path.read_text(encoding="utf-8")).get("stages", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {name: s for name, s in stages.items() if isinstance(s, dict) and isinstance(s.get("wall_s"), int | float)}
