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
from dataclasses import dataclass
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
from genssd_cli.files import locked_out_dir, write_atomic
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
    cfg = load_pipeline_config(config_path, overrides)
    run_config = _beside(config_path, cfg.run_config)
    out = out or Path(cfg.out or Path("runs") / config_path.stem)
    check_eval(cfg, config_path, run_config)
    with locked_out_dir(out):  # a second pipeline here would run every stage twice, side by side
        return _run_stages(cfg, config_path, run_config, out, console, resume_hint)


def _run_stages(cfg: PipelineConfig, config_path: Path, run_config: Path, out: Path, console: Console,
                resume_hint: str) -> dict[str, Any]:  # fmt: skip
    from genssd_cli.train.command import ADAPTER

    evals, names = stage_names(cfg)
    study = _Study(cfg, config_path, run_config, _beside(config_path, cfg.train_config), console, resume_hint)
    stages = _Stages(out, names, _earlier_stages(out / "pipeline.json"), console,
                     {"config": str(config_path), "stages": {}})  # fmt: skip
    stage = stages.run
    for name, dataset in evals.items():
        stage(f"base/{name}", study.evaluate(None, dataset))
    student: list[str] = []
    if cfg.cold_start:
        stage(f"cold-start/{RUN}", study.generate(cfg.cold_start.set, cfg.cold_start.limit))
        stage(f"cold-start/{TRAIN}", study.distill(out / "cold-start" / RUN))
        # Where every method starts from: a method helps only as far as it beats this.
        for name, dataset in evals.items():
            stage(f"cold-start/{name}", study.evaluate(out / "cold-start" / TRAIN / ADAPTER, dataset))
        student = [f"student.adapter={(out / 'cold-start' / TRAIN / ADAPTER).resolve()}"]
    for method in cfg.methods:
        stage(f"{method}/{RUN}", study.generate([*cfg.set, *student, f"method={method}"], cfg.limit))
        stage(f"{method}/{TRAIN}", study.distill(out / method / RUN))
        for name, dataset in evals.items():
            stage(f"{method}/{name}", study.evaluate(out / method / TRAIN / ADAPTER, dataset))
    # Always redone: it only reads what the stages wrote (seconds).
    eval_dirs = [out / s for s in names if s.rpartition("/")[2] in evals]
    stage(REPORT, study.report([out / m / RUN for m in cfg.methods], eval_dirs))
    return stages.record


Work = Callable[[Path], dict[str, Any]]  # a stage's command, given the stage's directory; what pipeline.json keeps


@dataclass(frozen=True)
class _Stages:
    """The stages as they run: each one's rule on the console, and pipeline.json rewritten after it."""

    out: Path
    names: list[str]  # every stage, in order
    earlier: dict[str, dict[str, Any]]  # the stages an earlier session recorded
    console: Console
    record: dict[str, Any]

    def run(self, name: str, work: Work) -> None:
        out, record = self.out, self.record
        self.console.rule(f"stage {self.names.index(name) + 1}/{len(self.names)}: {name}", style="bold")
        started = time.monotonic()
        outcome = work(out / name)
        # Time spent on the stage in every session: a stage found done adds its few seconds to
        # the time the earlier sessions spent doing it, instead of replacing it.
        wall_s = self.earlier.get(name, {}).get("wall_s", 0.0) + time.monotonic() - started
        # The stage's time, not the part its command reports (a training's own wall_s).
        record["stages"][name] = {"dir": str(out / name), **outcome, "wall_s": round(wall_s, 1)}
        record["wall_s"] = round(sum(s["wall_s"] for s in record["stages"].values()), 1)
        write_atomic(out / "pipeline.json", json.dumps(record, indent=2) + "\n")


@dataclass(frozen=True)
class _Study:
    """The pipeline's configs resolved: each stage is one of the ordinary commands, on its own directory."""

    cfg: PipelineConfig
    config_path: Path
    run_config: Path
    train_config: Path
    console: Console
    resume_hint: str

    def generate(self, sets: list[str], limit: int | None) -> Work:
        from genssd_cli.run.command import run_command
        from genssd_cli.run.options import RunOptions
        from genssd_cli.shards.local import ShardedOptions, run_sharded

        cfg, console, resume_hint = self.cfg, self.console, self.resume_hint

        def work(run_dir: Path) -> dict[str, Any]:
            options = RunOptions(self.run_config, run_dir, limit, sets)
            if cfg.shards is None:
                summary = run_command(options, console, resume_hint)
            else:  # the run's shards as `genssd run --shards N` runs them (processes or Ray actors)
                summary = run_sharded(options, ShardedOptions(cfg.shards, cfg.executor, cfg.ray_address), console,
                                      resume_hint)  # fmt: skip
            t = summary.trajectories
            if t.failed or t.pending:
                raise RuntimeFailure(
                    f"{run_dir}: {t.failed} failed and {t.pending} pending trajectories; "
                    f"the next stages need them: resume with: {resume_hint}"
                )
            return summary.model_dump(include={"trajectories", "correct", "kept"})

        return work

    def distill(self, run_dir: Path) -> Work:
        from genssd_cli.train.command import TrainOptions, train_command

        def work(train_dir: Path) -> dict[str, Any]:
            options = TrainOptions([run_dir], train_dir, self.train_config, self.cfg.distill.set,
                                   self.cfg.distill.include_incorrect)  # fmt: skip
            return train_command(options, self.console)

        return work

    def evaluate(self, adapter: Path | None, dataset: str) -> Work:
        from genssd_cli.eval.command import EvalOptions, eval_command

        def work(eval_dir: Path) -> dict[str, Any]:
            model = load_run_config(self.run_config, self.cfg.set).student.model
            e = self.cfg.eval
            options = EvalOptions(model, dataset, str(adapter) if adapter else None, e.limit_of(dataset),
                                  e.samples_of(dataset), eval_dir, _beside(self.config_path, e.config),
                                  e.set)  # fmt: skip
            metrics = eval_command(options, self.console)
            keys = ("accuracy", "ci95", "problems", "samples_per_problem", "pass_at_k", "mean_generated_tokens")
            return {k: metrics[k] for k in keys if k in metrics}

        return work

    def report(self, method_runs: list[Path], eval_dirs: list[Path]) -> Work:
        from genssd_cli.report.command import report_command

        return lambda report_dir: report_command(method_runs, eval_dirs, report_dir, self.console)


def _earlier_stages(path: Path) -> dict[str, dict[str, Any]]:
    """The stages an earlier session recorded; none when there is no readable record."""
    try:
        stages = json.loads(path.read_text(encoding="utf-8")).get("stages", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {name: s for name, s in stages.items() if isinstance(s, dict) and isinstance(s.get("wall_s"), int | float)}
