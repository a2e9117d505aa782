"""`genssd eval`: the student (optionally with an adapter) answers an eval dataset; answers are checked
by answers.py; per-sample rows go to samples.jsonl as each batch ends (a re-run skips them), and
metrics.json gets accuracy with a 95 % interval, pass@k and generated lengths.

Generation is batched HF `generate` (left padding, KV cache, the student's chat template), the
same prompts `genssd train` rendered its rows with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from genssd_cli.config import DataConfig, EvalConfig, load_eval_config
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.eval.outdir import METRICS, SAMPLES, SETTINGS, read_eval_settings
from genssd_cli.files import (
    LineFile,
    check_out_dir,
    cut_torn_tail,
    locked_out_dir,
    make_out_dir,
    parse_jsonl,
    write_atomic,
)
from genssd_cli.problems import (
    HELDOUT_COUNT,
    HELDOUT_SEED,
    Problem,
    final_answer,
    load_problems,
    load_prompt,
    render_prompt,
)
from genssd_cli.rundir.results_hash import changed_keys
from genssd_cli.stats import wilson


@dataclass(frozen=True)
class HubDataset:
    """An eval dataset on the Hugging Face hub, loaded through `datasets`."""

    dataset_id: str
    config: str | None
    split: str
    question: str  # the fields holding the question and the answer
    answer: str
    id_field: str | None  # None: rows are numbered


HUB_DATASETS = {
    "gsm8k-hf": HubDataset("openai/gsm8k", "main", "test", "question", "answer", None),
    "math-500": HubDataset("HuggingFaceH4/MATH-500", None, "test", "problem", "answer", "unique_id"),
    "aime24": HubDataset("HuggingFaceH4/aime_2024", None, "train", "problem", "answer", "id"),
}
# Eval datasets that ship: the bundled GSM8K test rows, and held-out problems of the demo's
# generator (never in a training set it generates), one set per difficulty.
BUNDLED = {
    "gsm8k": DataConfig(source="gsm8k-test"),
    **{f"arith{steps}-heldout": DataConfig(source="arith", steps=steps, seed=HELDOUT_SEED, count=HELDOUT_COUNT)
       for steps in (1, 2, 3)},
}  # fmt: skip


def load_eval_problems(dataset: str, cfg: EvalConfig, limit: int | None) -> list[Problem]:
    """A bundled name, a JSONL file, a known hub dataset, or `hf:DATASET_ID` (test split)."""
    if dataset in BUNDLED:
        return load_problems(BUNDLED[dataset], limit)
    if dataset in HUB_DATASETS or dataset.startswith("hf:"):
        return _hub_problems(dataset, cfg, limit)
    check_dataset(dataset)
    fields = {"question_field": cfg.question_field, "answer_field": cfg.answer_field, "id_field": cfg.id_field}
    return load_problems(DataConfig(source=dataset, **fields), limit)


def check_dataset(dataset: str) -> None:
    """A dataset eval knows or a file: refused in one line before anything runs (the pipeline
    checks its datasets before its first stage)."""
    if dataset in BUNDLED or dataset in HUB_DATASETS or dataset.startswith("hf:") or Path(dataset).exists():
        return
    if dataset.endswith(".jsonl"):
        raise UsageError(f"eval dataset not found: {dataset}")
    known = ", ".join([*BUNDLED, *HUB_DATASETS])
    raise UsageError(f"unknown eval dataset {dataset!r}: use one of {known}, hf:DATASET_ID, or a .jsonl file")


def _hub_problems(name: str, cfg: EvalConfig, limit: int | None) -> list[Problem]:
    hub = HUB_DATASETS.get(name) or HubDataset(name.removeprefix("hf:"), None, "test", cfg.question_field,
                                               cfg.answer_field, cfg.id_field)  # fmt: skip
    try:
        import datasets

        datasets.disable_progress_bars()
        rows = datasets.load_dataset(hub.dataset_id, hub.config, split=hub.split)
    except Exception as exc:  # offline, unknown id, gated: the library raises many kinds
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeFailure(
            f"eval dataset {name}: cannot load {hub.dataset_id} from the Hugging Face hub ({reason})"
        ) from None
    problems = []
    for i, row in enumerate(rows):
        if hub.question not in row or hub.answer not in row:
            raise UsageError(f"eval dataset {name}: rows have no {hub.question!r}/{hub.answer!r} fields "
                             "(set question_field/answer_field in the eval config)")  # fmt: skip
        problem_id = str(row.get(hub.id_field, i)) if hub.id_field else f"{name}-{i}"
        problems.append(Problem(problem_id, str(row[hub.question]).strip(), final_answer(str(row[hub.answer]))))
        if limit and len(problems) >= limit:
            break
    return problems


@dataclass(frozen=True)
class EvalOptions:
    """What `genssd eval` is asked to do, in the order of its flags."""

    model: str  # shipped name, HF model id or local folder
    dataset: str
    adapter: str | None = None  # a LoRA adapter folder from genssd train
    limit: int | None = None  # only the first N problems
    samples: int = 1  # generations per problem (pass@k)
    out: Path | None = None  # None: default_eval_dir
    config: Path | None = None  # None: configs/eval.yaml
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, in order


def eval_command(options: EvalOptions, console: Console) -> dict[str, Any]:
    model_ref, adapter, dataset, samples = options.model, options.adapter, options.dataset, options.samples
    cfg = load_eval_config(options.config, options.overrides)
    if samples > 1 and cfg.temperature == 0:
        raise UsageError("--samples > 1 needs sampling: set temperature > 0 (--set temperature=0.7)")
    template = load_prompt(cfg.prompt)
    problems = load_eval_problems(dataset, cfg, options.limit)
    out = options.out or default_eval_dir(model_ref, adapter, dataset)
    # What changes the results (not where they run, nor the batch size).
    settings = {"model": model_ref, "adapter": str(Path(adapter).resolve()) if adapter else None, "dataset": dataset,
                "samples": samples, "prompt_sha256": _sha(template),
                **cfg.model_dump(exclude={"device", "batch_size", "backend", "vllm_args"})}  # fmt: skip
    _check_settings(out, settings)
    with locked_out_dir(out):  # a second eval on this folder is refused: its samples would mix
        done = _read_samples(out)
        todo = [p for p in problems if any((p.id, k) not in done for k in range(samples))]
        if todo:
            _generate_missing(options, cfg, template, todo, _Samples(out, settings, done, samples), console)
        metrics = compute_metrics(problems, done, samples)
        metrics.update({"model": model_ref, "adapter": settings["adapter"], "dataset": dataset})
        write_atomic(out / METRICS, json.dumps(metrics, indent=2) + "\n")
    metrics["out"] = str(out)
    return metrics


@dataclass(frozen=True)
class _Samples:
    """The eval's folder: its settings, and the samples finished so far (added to as they come)."""

    out: Path
    settings: dict[str, Any]
    done: dict[tuple[str, int], dict]
    per_problem: int  # --samples


def _generate_missing(options: EvalOptions, cfg: EvalConfig, template: str, todo: list[Problem], samples: _Samples,
                      console: Console) -> None:  # fmt: skip
    from genssd_cli.eval.generation import Generated, generate_batch
    from genssd_cli.eval.vllm_backend import VllmGenerator, use_vllm
    from genssd_cli.models import SHIPPED, chat_prompt, load_causal_lm, pick_device, student_model_dir

    model_ref, adapter = options.model, options.adapter
    console.print(f"loading {model_ref}" + (f" + adapter {adapter}" if adapter else "") + " …")
    close = None
    if use_vllm(cfg):
        source = str(student_model_dir(model_ref)) if model_ref in SHIPPED else model_ref
        generate = VllmGenerator(source, adapter, cfg)
        tokenizer, close = generate.tokenizer, generate.close
    else:
        model, tokenizer = load_causal_lm(model_ref, None, adapter, pick_device(cfg.device), cfg.dtype)

        def generate(prompts: list[str], cfg: EvalConfig, samples: int, seed: int) -> list[list[Generated]]:
            return generate_batch(model, tokenizer, prompts, cfg, samples, seed)

    try:
        _write_settings(samples.out, samples.settings)
        prompts = {p.id: chat_prompt(tokenizer, render_prompt(template, p.question)) for p in todo}
        # Similar lengths together: less padding per batch.
        todo.sort(key=lambda p: len(tokenizer(prompts[p.id], add_special_tokens=False)["input_ids"]))
        _generate_all(generate, todo, prompts, cfg, samples, console)
    finally:
        if close is not None:
            close()


def _generate_all(generate: Callable[..., list], todo: list[Problem], prompts: dict[str, str], cfg: EvalConfig,
                  samples: _Samples, console: Console) -> None:  # fmt: skip
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from genssd_cli.answers import answers_match, extract_answer

    columns = [TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn()]  # fmt: skip
    done = samples.done
    sink = LineFile(samples.out / SAMPLES)
    with contextlib.closing(sink), Progress(*columns, console=console) as progress:
        task = progress.add_task("eval", total=len(todo), rate="")
        tokens = 0
        started = time.monotonic()
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            # The seed depends on the batch's first problem, not on what was done before a resume.
            seed = cfg.seed + int(_sha(batch[0].id)[:8], 16)
            generated = generate([prompts[p.id] for p in batch], cfg, samples.per_problem, seed)
            for problem, gens in zip(batch, generated, strict=True):
                for k, gen in enumerate(gens):
                    if (problem.id, k) in done:
                        continue
                    answer = extract_answer(gen.text)
                    row = {"problem_id": problem.id, "sample": k, "prompt": prompts[problem.id],
                           "generation": gen.text, "reference": problem.reference, "answer": answer,
                           "correct": answers_match(problem.reference, answer), "tokens": gen.tokens,
                           "hit_limit": gen.hit_limit}  # fmt: skip
                    sink.append(json.dumps(row, ensure_ascii=False) + "\n")
                    done[(problem.id, k)] = row
                    tokens += gen.tokens
            sink.sync()
            rate = tokens / max(time.monotonic() - started, 1e-9)
            progress.update(task, advance=len(batch), rate=f"{rate:.0f} tokens/s")


def compute_metrics(problems: list[Problem], done: dict[tuple[str, int], dict], samples: int) -> dict[str, Any]:
    per_problem = [[done[(p.id, k)]["correct"] for k in range(samples) if (p.id, k) in done] for p in problems]
    per_problem = [c for c in per_problem if c]
    rows = [done[(p.id, k)] for p in problems for k in range(samples) if (p.id, k) in done]
    n = len(per_problem)
    means = [sum(c) / len(c) for c in per_problem]
    accuracy = statistics.fmean(means) if means else None
    metrics: dict[str, Any] = {
        "problems": n,
        "samples_per_problem": samples,
        "accuracy": round(accuracy, 4) if accuracy is not None else None,
        "ci95": _interval(means, samples) if means else None,
        "mean_generated_tokens": round(statistics.fmean(r["tokens"] for r in rows), 1) if rows else None,
        "hit_token_limit": round(sum(r["hit_limit"] for r in rows) / len(rows), 4) if rows else None,
    }
    if samples > 1:
        metrics["pass_at_k"] = {
            str(k): round(statistics.fmean(pass_at_k(len(c), sum(c), k) for c in per_problem), 4)
            for k in sorted({1, samples})
        }
    return metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _interval(means: list[float], samples: int) -> list[float]:
    """95 %: Wilson's interval for one sample per problem; otherwise a normal interval over
    problems (samples of one problem are not independent, problems are)."""
    n, z = len(means), 1.96
    p = statistics.fmean(means)
    if samples == 1:
        low, high = wilson(p, n, z)
    else:
        half = z * (statistics.stdev(means) / math.sqrt(n) if n > 1 else 0.5)
        low, high = max(0.0, p - half), min(1.0, p + half)
    return [round(low, 4), round(high, 4)]


def default_eval_dir(model_ref: str, adapter: str | None, dataset: str) -> Path:
    name = f"{_slug(model_ref)}-{dataset_slug(dataset)}"
    if adapter:
        name += f"-adapter-{_sha(str(Path(adapter).resolve()))[:8]}"
    return Path("runs") / "eval" / name


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    check_out_dir(out)
    previous = read_eval_settings(out)
    if previous is None:
        return
    changed = changed_keys(previous, settings)
    if changed:
        raise UsageError(f"{out} holds an eval with other settings (changed: {', '.join(changed)}); use another --out")


def _write_settings(out: Path, settings: dict[str, Any]) -> None:
    make_out_dir(out)
    write_atomic(out / SETTINGS, json.dumps(settings, indent=2) + "\n")


def _read_samples(out: Path) -> dict[tuple[str, int], dict]:
    """Finished samples; a torn last line (killed mid-write) is cut off, to be generated again."""
    path = out / SAMPLES
    rows = parse_jsonl(path, "move the file away to start over")
    cut_torn_tail(path)  # new rows are appended after the last whole line
    try:
        return {(row["problem_id"], row["sample"]): row for row in rows}
    except (KeyError, TypeError):
        raise RuntimeFailure(f"{path}: not a genssd eval samples file; move it away to start over") from None


def dataset_slug(dataset: str) -> str:
    """An eval dataset's name for a directory: gsm8k, math-500, my-set (for data/my-set.jsonl)."""
    return _slug(Path(dataset).stem if dataset.endswith(".jsonl") else dataset)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text.strip("/").split("/")[-1]).strip("-")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


