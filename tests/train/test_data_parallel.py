"""Data-parallel training's rules in process (genssd_cli/train/), no model, no process: the global
batch of one process kept when it is split over several (batch size and accumulation), and a
checkpoint of several processes counted whole only once every rank has saved (an incomplete one
removed at resume). tests/e2e/test_train_multiprocess.py runs the two processes for real."""

from genssd_cli.train.trainer import SAVED_BY_ALL, batch_layout


def test_batch_layout_keeps_one_process_global_batch():
    assert batch_layout(4, 1, 2) == (2, 1)  # the batch split
    assert batch_layout(2, 4, 2) == (2, 2)  # the accumulation divided first: memory per process as configured
    assert batch_layout(4, 3, 2) == (3, 2)  # 12 rows a step either way
    assert batch_layout(8, 1, 1) == (8, 1)
    assert batch_layout(3, 1, 2) == (3, 1)  # no multiple of 2: as configured, 6 rows a step (the command warns)


def test_a_checkpoint_of_several_processes_is_whole_once_all_saved(tmp_path):
    from rich.console import Console

    from genssd_cli.train.command import last_complete_checkpoint

    for step, files in ((1, ["rng_state.pth"]), (2, ["rng_state_0.pth", "rng_state_1.pth", SAVED_BY_ALL]),
                        (3, ["rng_state_0.pth"])):  # fmt: skip
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in [*files, "trainer_state.json"]:
            (folder / name).write_text("{}")
    # checkpoint-3: rank 0 saved its part, rank 1 had not when it stopped.
    assert last_complete_checkpoint(tmp_path, Console(quiet=True)) == str(tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    (tmp_path / "checkpoint-2" / SAVED_BY_ALL).unlink()
    assert last_complete_checkpoint(tmp_path, Console(quiet=True)) == str(tmp_path / "checkpoint-1")  # one process's
