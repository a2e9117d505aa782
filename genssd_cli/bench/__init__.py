"""`genssd bench`: speed measurements, each comparing what genssd runs with a plain baseline on
the same work in one process. One module per benchmark (scoring, engine, train, eval); here is
what their JSON lines share. torch is imported inside the functions."""

from __future__ import annotations

import json
import resource


def print_lines(results: list[dict]) -> None:
    for line in results:
        print(json.dumps(line), flush=True)


def synchronize(device: str) -> None:
    """A GPU runs ahead of Python: wait for its work before reading the clock."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{device} ({platform.processor() or platform.machine()})"


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process peak RSS


def ratio_line(bench: str, ours: dict, theirs: dict, rate: str, digits: int = 3) -> dict:
    """How many times `ours` did the work per second that `theirs` did."""
    return {"bench": bench, "ratio": f"{ours['method']} / {theirs['method']}",
            "speedup": round(ours[rate] / theirs[rate], digits)}  # fmt: skip
