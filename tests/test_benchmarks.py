"""The benchmark runners stay runnable (no timing is asserted here)."""

from __future__ import annotations

import torch

from benchmarks.mc_chunking import bench_case
from dubito.platform.models import MLP


def test_chunking_benchmark_rows_show_identical_samples():
    rows = bench_case("mlp", MLP(4, 2, hidden=(8,), variant="epistemic"), torch.randn(16, 4), samples=8, repeats=1)
    assert [r.split()[1] for r in rows] == ["1", "2", "8", "auto"]
    assert all(float(r.split()[-1]) == 0.0 for r in rows)  # every chunking gives the loop's samples


def test_data_loading_benchmark_runs_on_small_data():
    from benchmarks.data_loading import bench_camvid, bench_make3d_decode, bench_synthetic

    rows = bench_synthetic(2, {"camvid": (24, 32), "camvid_half": (12, 16), "make3d": (16, 12)})
    rows += bench_camvid(4, (24, 32), workers=0)
    rows += bench_make3d_decode(2, (128, 96), (16, 12))
    assert len(rows) == 10
    rates = [float(r[52:].split()[0]) for r in rows]
    assert all(rate > 0 for rate in rates)
    assert rows[-1].rstrip().endswith("x")  # draft decode reported as a ratio against the full decode


def test_ray_scoring_benchmark_rows_show_identical_scores(ray_session):
    from benchmarks.ray_scoring import bench

    rows = bench(8, (24, 32), "tiny", samples=2, batch_size=4, repeats=1)
    assert [r[:34].strip() for r in rows] == ["local (this process)", "1 Ray actor", "2 Ray actors", "2 Ray actors"]
    assert all(float(r.split()[-1]) == 0.0 for r in rows[:3])  # actors with this process's threads: bit-identical
    assert float(rows[3].split()[-1]) < 1e-4  # one thread per actor: equal to float rounding
