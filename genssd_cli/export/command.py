"""`genssd export`: the kept trajectories of one or more runs as a Hugging Face dataset folder, to
share with `HfApi().upload_folder` (genssd itself never pushes: that needs a network and a token).

The folder holds `data/train-00000-of-00001.parquet`, one row per trajectories.jsonl row: `prompt`
and `completion` (TRL's conversational prompt-completion form, what `genssd train` trains on),
`messages` (the two joined: TRL's conversational language-modeling form) and the row's metadata
with the run folder's name; and `README.md`, a dataset card whose YAML front matter points
`datasets` at the parquet file and holds the counts, and whose body says how the rows were made
(method, teacher, student, the settings that change results), how many there are, what the teacher
cost, and where they come from: genssd versions, config hashes, run folder names, the export date.
The card holds no path above a run folder, no URL and no API key.

The folder is built beside --out and renamed into place, so --out holds the previous export or
the new one, never a part of one. A non-empty --out that is not an export is refused.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import yaml
from pydantic import ValidationError

from genssd_cli.config import load_run_config
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.files import is_write_error, write_failed
from genssd_cli.rundir.records import RunStart, Summary, TrajectoryRow, read_rows, read_summary
from genssd_cli.rundir.results_hash import results_settings
from genssd_cli.rundir.store import CONFIG, EVENTS, SUMMARY, TRAJECTORIES
from genssd_cli.shards.plan import log_paths

DATA_FILE = "data/train-00000-of-00001.parquet"
CARD = "README.md"
METADATA = ("problem_id", "sample", "rank", "method", "reference", "answer", "correct", "finish", "steps",
            "student_ppl", "teacher_tokens", "completion_tokens", "run")  # fmt: skip
COLUMNS = ("prompt", "completion", "messages", *METADATA)
METHODS = {
    "genssd": "the teacher writes `search.n` chunks per step, continuing the kept prefix; the student keeps the "
    "one of lowest perplexity (pruned when even that is above `search.prune_ppl`)",
    "standard-kd": "one whole trajectory per sample, kept as written (the paper's Standard KD baseline)",
    "posthoc-ppl": "`search.n` whole trajectories per sample; the correct one of lowest student perplexity is kept",
    "morsd": "`search.n` whole trajectories per sample; correct ones, near-duplicates dropped, lowest Rationale "
    "Difficulty first (genssd's reading of the MoRSD baseline)",
}
# Settings never written to a card: where the teacher lives and how it is reached.
PRIVATE_KEYS = {"base_url", "endpoints", "api_key", "api_key_env"}
KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{16,}|[A-Za-z0-9_-]*(key|token|secret)=\S+)", re.I)


@dataclass
class Run:
    """What one run directory contributes: its rows and what the card says about it."""

    name: str  # its folder name (more of its path only when two runs share one): the `run` column
    rows: list[TrajectoryRow]
    summary: Summary | None = None
    starts: list[RunStart] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # flat dotted keys, made public
    notes: list[str] = field(default_factory=list)

    @property
    def config_hash(self) -> str | None:
        if self.summary and self.summary.config_hash:
            return self.summary.config_hash
        return self.starts[-1].config_hash if self.starts else None


def export_command(run_dirs: list[Path], out: Path, only_correct: bool) -> dict[str, Any]:
    """Writes the dataset folder; returns its counts for the command's one line."""
    folder = Path(os.path.abspath(out))  # "." and ".." resolved: the folder is renamed by parent and name
    replacing = check_out(folder)
    runs = read_runs(run_dirs)
    rows = dataset_rows(runs, only_correct)
    total = sum(len(r.rows) for r in runs)
    if not rows:
        what = f"no correct row among the {total} rows (drop --only-correct to export them all)" if total else "no row"
        raise UsageError(f"nothing to export: {what} in {', '.join(map(str, run_dirs))}")
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    card = dataset_card(runs, rows, only_correct, folder.name, today)
    _write_folder(folder, rows, card, replacing)
    return {"rows": len(rows), "correct": sum(r["correct"] for r in rows), "runs": len(runs), "out": str(out)}


# ---- reading the runs -----------------------------------------------------------------------


def read_runs(run_dirs: list[Path]) -> list[Run]:
    resolved = [d.resolve() for d in run_dirs]
    if len(set(resolved)) < len(resolved):
        raise UsageError("a run directory is given twice")
    names = run_names(resolved)
    return [read_run(d, name) for d, name in zip(run_dirs, names, strict=True)]


def run_names(dirs: list[Path]) -> list[str]:
    """Each run's folder name; where two share one (a pipeline's METHOD/run), as many of the
    parent folders as tell them apart."""
    depth = 1
    while True:
        names = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names) or depth >= max(len(d.parts) for d in dirs):
            return names
        depth += 1


def read_run(run_dir: Path, name: str) -> Run:
    if not run_dir.is_dir():
        raise UsageError(f"run directory not found: {run_dir}")
    if not (run_dir / TRAJECTORIES).is_file():
        raise UsageError(f"{run_dir} has no {TRAJECTORIES}: not a genssd run directory, or no session ended")
    hint = "run `genssd run` on it again to rewrite it"
    try:
        rows = read_rows(run_dir / TRAJECTORIES, TrajectoryRow, hint)
        summary = read_summary(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else None
    except RuntimeFailure as exc:  # the user's files to fix, as for `genssd train`
        raise UsageError(str(exc)) from None
    run = Run(name, rows, summary, [s for log in log_paths(run_dir) for s in run_starts(log)])  # sharded: all
    if run.starts:
        run.settings = run.starts[-1].settings  # the latest session's: what the config hash covers
    elif (run_dir / CONFIG).is_file():
        try:
            run.settings = results_settings(load_run_config(run_dir / CONFIG), {})
        except UsageError:  # written by another genssd version: the rows still stand
            run.notes.append(f"{name}: its {CONFIG} is not readable by this genssd; settings not shown")
    else:
        run.notes.append(f"{name}: no {CONFIG} or {EVENTS}; settings not shown")
    run.settings = {k: public(v) for k, v in run.settings.items() if not PRIVATE_KEYS & set(k.split("."))}
    return run


def run_starts(path: Path) -> list[RunStart]:
    """The `run_start` events of events.jsonl (one per session). Only those lines are parsed: a
    long run's log holds millions of other records. One not readable (torn, another format) is
    left out: provenance, not rows, depends on it."""
    starts = []
    try:
        with open(path, "rb") as log:
            for line in log:
                if b'"run_start"' not in line:
                    continue
                try:
                    starts.append(RunStart.model_validate_json(line))
                except ValidationError:
                    continue
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    return starts


def public(value: Any) -> Any:
    """A setting as the card may show it: a path only by its last part, no URL, nothing key-like."""
    if isinstance(value, list):
        return [public(v) for v in value]
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items() if k not in PRIVATE_KEYS}
    if not isinstance(value, str):
        return value
    if "://" in value:
        return "(a URL, not recorded)"
    if KEY_LIKE.search(value):
        return "(redacted)"
    if value.startswith(("/", "~", "\\")) or re.match(r"[A-Za-z]:[\\/]", value):
        return PureWindowsPath(value).name or value  # Windows parsing splits on both kinds of slash
    return value


def correct(row: TrajectoryRow) -> bool:
    """As `genssd train` reads it: rows an older genssd marked correct must also have ended and
    stated their answer."""
    return row.correct and row.finish == "stop" and row.answer is not None


def dataset_rows(runs: list[Run], only_correct: bool) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        for row in run.rows:
            if only_correct and not correct(row):
                continue
            prompt = [m.model_dump() for m in row.prompt]
            completion = [m.model_dump() for m in row.completion]
            rows.append({"prompt": prompt, "completion": completion, "messages": prompt + completion,
                         **{k: getattr(row, k) for k in METADATA if k != "run"},
                         "correct": correct(row), "run": run.name})  # fmt: skip
    return rows


# ---- writing --------------------------------------------------------------------------------


def check_out(out: Path) -> bool:
    """Whether --out holds a previous export (replaced); refused when it holds anything else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return True
    if not is_export(out):
        raise UsageError(f"--out {out} is not empty and not a genssd export; give a new or empty folder")
    return True


def is_export(folder: Path) -> bool:
    """A folder this command wrote: a card of ours and parquet data, nothing else (so replacing it
    deletes nothing the user put there)."""
    entries = {p.name for p in folder.iterdir()}
    if entries != {CARD, "data"} or not (folder / "data").is_dir():
        return False
    if [p.name for p in (folder / "data").iterdir()] != [Path(DATA_FILE).name]:  # e.g. a split the user added
        return False
    meta = front_matter((folder / CARD).read_text(encoding="utf-8", errors="replace"))
    return isinstance(meta, dict) and isinstance(meta.get("genssd"), dict)


def front_matter(card: str) -> Any:
    """The YAML between the card's opening `---` lines (None when there is none or it is not YAML)."""
    if not card.startswith("---\n"):
        return None
    end = card.find("\n---\n", 4)
    if end < 0:
        return None
    try:
        return yaml.safe_load(card[4:end])
    except yaml.YAMLError:
        return None


def _write_folder(out: Path, rows: list[dict[str, Any]], card: str, replacing: bool) -> None:
    """Built in a hidden sibling folder, then renamed over --out."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write to {parent}: {exc.strerror}") from None
    tmp = parent / f".{out.name}.export-{os.getpid()}"
    old = parent / f".{out.name}.previous-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / DATA_FILE).parent.mkdir(parents=True)
        write_parquet(rows, tmp / DATA_FILE)
        (tmp / CARD).write_text(card, encoding="utf-8")
        if replacing:
            # Two renames: a crash between them leaves the previous export in `old`, never a mix.
            os.rename(out, old)
        os.rename(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if replacing and old.exists() and not out.exists():
            os.rename(old, out)
        if not is_write_error(exc):
            raise
        raise write_failed(exc.filename or out, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """With explicit features, so every export has one schema (an all-null column stays a float)."""
    import datasets
    from datasets import Dataset, Features, Value

    datasets.disable_progress_bars()  # the command prints its own one line
    messages = [{"role": Value("string"), "content": Value("string")}]
    types = {"prompt": messages, "completion": messages, "messages": messages, "problem_id": Value("string"),
             "sample": Value("int64"), "rank": Value("int64"), "method": Value("string"),
             "reference": Value("string"), "answer": Value("string"), "correct": Value("bool"),
             "finish": Value("string"), "steps": Value("int64"), "student_ppl": Value("float64"),
             "teacher_tokens": Value("int64"), "completion_tokens": Value("int64"), "run": Value("string")}  # fmt: skip
    Dataset.from_list(rows, features=Features({c: types[c] for c in COLUMNS})).to_parquet(str(path))


# ---- the dataset card -----------------------------------------------------------------------


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
    costs = [r.summary.teacher.cost for r in runs if r.summary and r.summary.teacher.cost is not None]
    counts: dict[str, Any] = {
        "exported": date,
        "genssd_version": __version__,
        "only_correct": only_correct,
        "rows": len(rows),
        "correct": n_correct,
        "finished": finish["stop"],
        "truncated": finish["truncated"],
        "methods": dict(sorted(methods.items())),
        "teacher_tokens": teacher_tokens,
        "runs": [
            {"name": r.name, "rows": per_run[r.name], "correct": per_run_correct[r.name], "config_hash": r.config_hash}
            for r in runs
        ],
    }
    if costs:
        counts["teacher_cost"] = round(sum(costs), 6)
        if len(costs) < len(runs):  # a sum over some runs must not pass for the whole
            counts["teacher_cost_covers"] = f"{len(costs)} of {len(runs)} runs (the others recorded no cost)"
    meta = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
        "license": "other",
        "task_categories": ["text-generation"],
        "tags": ["genssd", "distillation", "synthetic"],
        "size_categories": [size_category(len(rows))],
        "genssd": counts,
    }
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    teachers = _values(runs, "teacher.model")
    students = _values(runs, "student.model")
    body = [
        f"# {folder}",
        "",
        f"Reasoning traces written by the teacher {_list(teachers)} and kept by genssd's "
        f"{_list(sorted(methods))} selection for the student {_list(students)}: one row per kept trajectory, "
        "in TRL's conversational forms. Exported by genssd from its run folders.",
        "",
        "## Rows",
        "",
        f"{len(rows)} rows"
        + (f", the correct ones of {sum(len(r.rows) for r in runs)}" if only_correct else "")
        + f"; {n_correct} correct ({_share(n_correct, len(rows))}), {finish['stop']} finished, "
        f"{finish['truncated']} truncated.",
        "",
        "| method | rows | correct | finished | truncated |",
        "|---|---|---|---|---|",
    ]
    for method in sorted(methods):
        of = [r for r in rows if r["method"] == method]
        ended = Counter(r["finish"] for r in of)
        right = sum(r["correct"] for r in of)
        body.append(f"| `{method}` | {len(of)} | {right} | {ended['stop']} | {ended['truncated']} |")
    body += [
        "",
        "**Correct** means the trace ended (`finish: stop`, not cut at a token limit), stated its answer "
        '("The answer is N", `\\boxed{}` or `####`) and that answer matches `reference`'
        + ("." if only_correct else "; the `correct` column says which rows are."),
        "",
        "| column | what |",
        "|---|---|",
        "| `prompt` | the user turn, `[{role, content}]` (TRL's conversational prompt-completion form) |",
        "| `completion` | the assistant turn: the kept trace, cut at the first stop string |",
        "| `messages` | `prompt + completion` (TRL's conversational language-modeling form) |",
        "| `problem_id`, `sample`, `rank` | the problem, which of its trajectories, which of the rows kept from one "
        "request (0 unless `morsd.keep` > 1) |",
        "| `method` | the selection method that kept it |",
        "| `reference`, `answer`, `correct` | the dataset's answer, the one the trace states (null: none), whether "
        "they match |",
        "| `finish`, `steps` | `stop` or `truncated`; chunks kept (1 for whole-trajectory methods) |",
        "| `student_ppl` | the student's perplexity of the whole completion |",
        "| `teacher_tokens`, `completion_tokens` | teacher tokens the trajectory cost (response-cache hits included; 0 "
        "on rank > 0), and kept |",
        "| `run` | the run folder it comes from |",
        "",
        "## How the rows were made",
        "",
    ]
    body += [f"- `{m}`: {METHODS.get(m, 'a method of another genssd version')}." for m in sorted(methods)]
    body += ["", *_settings_table(runs), ""]
    body += ["## Teacher tokens and cost", "",
             f"Teacher completion tokens the exported rows cost: {teacher_tokens} (answers from a response "
             "cache included: what the rows took, not what was billed)."]  # fmt: skip
    body += _cost_lines(runs)
    body += [
        "",
        "## Provenance",
        "",
        "| run | rows | correct | sessions | genssd | config hash |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        versions = ", ".join(dict.fromkeys(s.genssd for s in run.starts)) or "not recorded"
        sessions = run.summary.sessions if run.summary else len(run.starts) or "not recorded"
        digest = f"`{run.config_hash}`" if run.config_hash else "not recorded"
        body.append(f"| `{run.name}` | {per_run[run.name]} | {per_run_correct[run.name]} | {sessions} | "
                    f"{versions} | {digest} |")  # fmt: skip
    body += ["", f"Exported on {date} (UTC) by genssd {__version__}."]
    if any(s.forced for r in runs for s in r.starts):
        body.append("A session of a run continued with changed settings (`--force`): the settings shown are its "
                    "latest session's.")  # fmt: skip
    body += [f"Note: {note}." for run in runs for note in run.notes]
    body += [
        "",
        "## Use",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'train = load_dataset("{folder}", split="train")  # this folder, or its id on the Hub once pushed',
        "```",
        "",
        "TRL's `SFTTrainer` takes it as it is: it trains on `prompt` + `completion` with the loss on the "
        "completion only (drop `prompt` and `completion` to train on `messages` whole). `genssd train` trains "
        "on the correct rows of the run folders themselves.",
        "",
        "## How to push it",
        "",
        "genssd does not push. With a network and a Hugging Face token (`hf auth login`, or `HF_TOKEN`):",
        "",
        "```python",
        "from huggingface_hub import HfApi",
        "",
        "api = HfApi()",
        'api.create_repo("YOUR_NAME/DATASET_NAME", repo_type="dataset", exist_ok=True)  # private=True: only you',
        f'api.upload_folder(folder_path="{folder}", repo_id="YOUR_NAME/DATASET_NAME", repo_type="dataset")',
        "```",
        "",
        "`license: other` until you set it: the rows are the teacher's outputs on the runs' problems, so their "
        "terms are the teacher's and the problem set's.",
        "",
    ]
    return f"---\n{front}---\n\n" + "\n".join(body)


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
