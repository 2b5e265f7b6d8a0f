"""The benchmark runners stay runnable (no timing is asserted here)."""

from __future__ import annotations

import torch

from benchmarks.mc_chunking import bench_case
from dubito.platform.models import MLP


def test_chunking_benchmark_rows_show_identical_samples():
    rows = bench_case("mlp", MLP(4, 2, hidden=(8,), variant="epistemic"), torch.randn(16, 4), samples=8, repeats=1)
    assert [r.split()[1] for r in rows] == ["1", "2", "8", "auto"]
    assert all(float(r.split()[-1]) == 0.0 for r in rows)  # every chunking gives the loop's samples
