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
import os
from pathlib import Path
from typing import Any

from genssd_cli.errors import UsageError
from genssd_cli.export.card import dataset_card
from genssd_cli.export.folder import check_out, write_folder
from genssd_cli.export.rows import dataset_rows, read_runs
from genssd_cli.files import hold_lock, make_out_dir, remove_lock


def export_command(run_dirs: list[Path], out: Path, only_correct: bool) -> dict[str, Any]:
    """Writes the dataset folder; returns its counts for the command's one line."""
    folder = Path(os.path.abspath(out))  # "." and ".." resolved: the folder is renamed by parent and name
    check_out(folder)  # refused before the runs are read
    runs = read_runs(run_dirs)
    rows = dataset_rows(runs, only_correct)
    total = sum(len(r.rows) for r in runs)
    if not rows:
        what = f"no correct row among the {total} rows (drop --only-correct to export them all)" if total else "no row"
        raise UsageError(f"nothing to export: {what} in {', '.join(map(str, run_dirs))}")
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    card = dataset_card(runs, rows, only_correct, folder.name, today)
    # The folder is replaced whole, so its lock lies beside it; checked again once held.
    make_out_dir(folder.parent)
    lock = folder.parent / f".{folder.name}.lock"
    held = hold_lock(lock, f"{out} is in use by another genssd command")
    try:
        write_folder(folder, rows, card, check_out(folder))
    finally:
        remove_lock(held, lock)
    return {"rows": len(rows), "correct": sum(r["correct"] for r in rows), "runs": len(runs), "out": str(out)}
