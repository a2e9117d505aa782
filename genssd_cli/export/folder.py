"""Writing an export's folder: the parquet file and the card, built beside --out and renamed into
place, so --out holds the previous export or the new one, never a part of one; a non-empty --out
that is not an export is refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from genssd_cli.errors import UsageError
from genssd_cli.export.rows import COLUMNS
from genssd_cli.files import is_write_error, make_out_dir, write_failed

DATA_FILE = "data/train-00000-of-00001.parquet"
CARD = "README.md"


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


def write_folder(out: Path, rows: list[dict[str, Any]], card: str, replacing: bool) -> None:
    """Built in a hidden sibling folder, then renamed over --out."""
    parent = out.parent
    make_out_dir(parent)
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
