"""The benchmarks' shared timer: the best of a few runs after a warm-up, synchronising a GPU."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

__all__ = ["best_time"]


def best_time(fn: Callable[[], Any], repeats: int, device: torch.device | None = None) -> tuple[float, Any]:
    """(best seconds of ``repeats`` calls of ``fn()``, the last call's output), after one untimed
    warm-up call (imports, first-call allocations, kernel selection). On a CUDA ``device`` the
    queue is drained before and after each timed call, so the time covers the GPU's work."""
    cuda = device is not None and torch.device(device).type == "cuda"
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, out
