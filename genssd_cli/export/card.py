"""The dataset card (README.md) of an export: YAML front matter with the counts, and a body, the
text of card.md, that says how the rows were made, how many there are, what the teacher cost and
where they come from. The card holds no path above a run folder, no URL and no API key (the
runs' settings come in through rows.public)."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from string import Template
from typing import Any

import yaml

from genssd_cli.export.rows import Run

METHODS = {
    "genssd": "the teacher writes `search.n` chunks per step, continuing the kept prefix; the student keeps the "
    "one of lowest perplexity (pruned when even that is above `search.prune_ppl`)",
    "standard-kd": "one whole trajectory per sample, kept as written (the paper's Standard KD baseline)",
    "posthoc-ppl": "`search.n` whole trajectories per sample; the correct one of lowest student perplexity is kept",
    "morsd": "`search.n` whole trajectories per sample; correct ones, near-duplicates dropped, lowest Rationale "
    "Difficulty first (genssd's reading of the MoRSD baseline)",
    "random-pick": "as genssd, but a seeded random chunk is kept per step (a control of genssd's)",
    "posthoc-random": "`search.n` whole trajectories per sample; a seeded random correct one is kept (a control)",
    "standard-kd-budget": "`search.n` whole trajectories per sample; every correct one is kept (a control)",
}


def size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):  # fmt: skip
        if n < limit:
            return label
    return "10M<n<100M"


def dataset_card(runs: list[Run], rows: list[dict[str, Any]], only_correct: bool, folder: str, date: str) -> str:
    from genssd_cli import __version__

    methods = Counter(r["method"] for r in rows)
    finish = Counter(r["finish"] for r in rows)
    n_correct = sum(r["correct"] for r in rows)
    per_run = Counter(r["run"] for r in rows)
    per_run_correct = Counter(r["run"] for r in rows if r["correct"])
    teacher_tokens = sum(r["teacher_tokens"] for r in rows)
    front = yaml.safe_dump(_front_matter(runs, rows, only_correct, date), sort_keys=False, allow_unicode=True)
    notes = []
    if any(s.forced for r in runs for s in r.starts):
        notes.append("A session of a run continued with changed settings (`--force`): the settings shown are its "
                     "latest session's.")  # fmt: skip
    notes += [f"Note: {note}." for run in runs for note in run.notes]
    template = Template(resources.files(__package__).joinpath("card.md").read_text(encoding="utf-8"))
    return template.substitute(
        front=front,
        folder=folder,
        teachers=_list(_values(runs, "teacher.model")),
        methods=_list(sorted(methods)),
        students=_list(_values(runs, "student.model")),
        rows=len(rows),
        of_all=f", the correct ones of {sum(len(r.rows) for r in runs)}" if only_correct else "",
        correct=n_correct,
        correct_share=_share(n_correct, len(rows)),
        finished=finish["stop"],
        truncated=finish["truncated"],
        method_rows="\n".join(_method_row(method, rows) for method in sorted(methods)),
        correct_column="." if only_correct else "; the `correct` column says which rows are.",
        method_lines="\n".join(_method_line(method) for method in sorted(methods)),
        settings="\n".join(_settings_table(runs)),
        teacher_tokens=teacher_tokens,
        cost_lines="".join("\n" + line for line in _cost_lines(runs)),  # none: the paragraph ends there
        provenance_rows="\n".join(_provenance_row(run, per_run, per_run_correct) for run in runs),
        date=date,
        version=__version__,
        notes="".join("\n" + note for note in notes),
    )


def _front_matter(runs: list[Run], rows: list[dict[str, Any]], only_correct: bool, date: str) -> dict[str, Any]:
    """The card's YAML: the Hub's dataset fields and genssd's counts."""
    from genssd_cli import __version__

    finish = Counter(r["finish"] for r in rows)
    per_run = Counter(r["run"] for r in rows)
    per_run_correct = Counter(r["run"] for r in rows if r["correct"])
    costs = [r.summary.teacher.cost for r in runs if r.summary and r.summary.teacher.cost is not None]
    counts: dict[str, Any] = {
        "exported": date,
        "genssd_version": __version__,
        "only_correct": only_correct,
        "rows": len(rows),
        "correct": sum(r["correct"] for r in rows),
        "finished": finish["stop"],
        "truncated": finish["truncated"],
        "methods": dict(sorted(Counter(r["method"] for r in rows).items())),
        "teacher_tokens": sum(r["teacher_tokens"] for r in rows),
        "runs": [
            {"name": r.name, "rows": per_run[r.name], "correct": per_run_correct[r.name], "config_hash": r.config_hash}
            for r in runs
        ],
    }
    if costs:
        counts["teacher_cost"] = round(sum(costs), 6)
        if len(costs) < len(runs):  # a sum over some runs must not pass for the whole
            counts["teacher_cost_covers"] = f"{len(costs)} of {len(runs)} runs (the others recorded no cost)"
    return {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
        "license": "other",
        "task_categories": ["text-generation"],
        "tags": ["genssd", "distillation", "synthetic"],
        "size_categories": [size_category(len(rows))],
        "genssd": counts,
    }


def _method_row(method: str, rows: list[dict[str, Any]]) -> str:
    of = [r for r in rows if r["method"] == method]
    ended = Counter(r["finish"] for r in of)
    right = sum(r["correct"] for r in of)
    return f"| `{method}` | {len(of)} | {right} | {ended['stop']} | {ended['truncated']} |"


def _method_line(method: str) -> str:
    return f"- `{method}`: {METHODS.get(method, 'a method of another genssd version')}."


def _provenance_row(run: Run, per_run: Counter[str], per_run_correct: Counter[str]) -> str:
    versions = ", ".join(dict.fromkeys(s.genssd for s in run.starts)) or "not recorded"
    sessions = run.summary.sessions if run.summary else len(run.starts) or "not recorded"
    digest = f"`{run.config_hash}`" if run.config_hash else "not recorded"
    return f"| `{run.name}` | {per_run[run.name]} | {per_run_correct[run.name]} | {sessions} | {versions} | {digest} |"


def _values(runs: list[Run], key: str) -> list[str]:
    return list(dict.fromkeys(str(r.settings[key]) for r in runs if key in r.settings)) or ["(not recorded)"]


def _list(values: list[str]) -> str:
    return ", ".join(f"`{v}`" for v in values)


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "—"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) and value.isprintable() else json.dumps(value, ensure_ascii=False)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _settings_table(runs: list[Run]) -> list[str]:
    """The settings that change results (what each run's config hash covers), one column per run.
    Prompt texts appear by their sha256."""
    keys = list(dict.fromkeys(k for r in runs for k in r.settings))
    if not keys:
        return ["The runs' settings were not recorded."]
    first = [k for k in ("method", "teacher.model", "student.model") if k in keys]
    keys = first + sorted(k for k in keys if k not in first)
    lines = ["Settings that change the results (as each run recorded them):", "",
             "| setting | " + " | ".join(f"`{r.name}`" for r in runs) + " |",
             "|---|" + "---|" * len(runs)]  # fmt: skip
    for key in keys:
        cells = [_cell(r.settings[key]) if key in r.settings else "—" for r in runs]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    return lines


def _cost_lines(runs: list[Run]) -> list[str]:
    lines = []
    for run in runs:
        if run.summary is None:
            continue
        t = run.summary.teacher
        line = (f"- `{run.name}` (all its trajectories, pruned ones included): {t.requests} requests, "
                f"{t.prompt_tokens} prompt and {t.completion_tokens} completion tokens")  # fmt: skip
        if t.cache is not None and t.cache.hits:
            line += f" ({t.cache.hits} of the requests answered from the response cache, not billed)"
        if t.cost is not None:
            price = t.price_per_million
            at = f" at {price.input:g} / {price.output:g} per million prompt / completion tokens" if price else ""
            line += f"; cost {t.cost:.4f}{at} (in the currency of `teacher.price`)"
        lines.append(line + ".")
    return ["", "From each run's summary:", "", *lines] if lines else []
