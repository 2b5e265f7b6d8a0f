"""The benchmark runners stay runnable (no timing is asserted here)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.mc_chunking import bench_case
from dubito.platform.models import MLP


def test_chunking_benchmark_rows_show_identical_samples():
    rows = bench_case(
        "mlp", MLP(4, 2, hidden=(8,), variant="epistemic"), torch.randn(16, 4), samples=8, repeats=1
    )
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


@pytest.mark.slow
def test_ray_scoring_benchmark_rows_show_identical_scores(ray_session):
    from benchmarks.ray_scoring import bench

    rows = bench(8, (24, 32), "tiny", samples=2, batch_size=4, repeats=1)
    assert [r[:34].strip() for r in rows] == [
        "local (this process)",
        "1 Ray actor",
        "2 Ray actors",
        "2 Ray actors",
    ]
    assert all(
        float(r.split()[-1]) == 0.0 for r in rows[:3]
    )  # actors with this process's threads: bit-identical
    assert float(rows[3].split()[-1]) < 1e-4  # one thread per actor: equal to float rounding


def _mc_args(**overrides):
    import argparse

    args = dict(samples=4, batch=2, repeats=1, no_baal=True, no_memory=False, bf16=True, compile=False)
    args.update(overrides)
    return argparse.Namespace(**args)


def test_mc_speed_benchmark_compares_every_method_on_the_same_masks():
    from benchmarks.mc import speed_case

    rows = speed_case("tiny", (24, 32), _mc_args(), torch.device("cpu"), log=lambda line: None)
    methods = [r.method for r in rows]
    assert methods[0].startswith("naive loop") and "engine: default (auto chunk, measured)" in methods
    assert [m for m in methods if m.startswith("dropout_at=")] == [
        "dropout_at=decoder + prefix cache",
        "dropout_at=last_block + prefix cache",
        "dropout_at=head, no prefix cache",
        "dropout_at=head + prefix cache",
    ]
    by = {r.method: r for r in rows}
    # the naive loop with the engine's masks, and every exact mode, give the engine loop's uncertainties
    assert by["naive loop (train-mode dropout, no_grad)"].deviation == 0.0
    assert by["engine: + preallocated dense blocks"].deviation == 0.0
    assert all(r.deviation < 1e-5 for r in rows if "bf16" not in r.method)  # channels-last: float rounding
    assert 0 < by["engine: default + bf16 autocast"].deviation < 0.2  # bf16: visibly different, still close
    assert all(r.rate > 0 and r.peak >= 0 for r in rows)


@pytest.mark.slow
def test_mc_memory_and_quality_benchmarks_run_on_small_data(capsys):
    import argparse

    from benchmarks.mc import memory, quality

    results = memory(argparse.Namespace(pools="6,12", samples=2, height=24, width=32))
    assert [r["scored"] for r in results] == [6, 12] and all(r["peak"] > r["before"] > 0 for r in results)
    rows = quality(
        argparse.Namespace(
            epochs=1,
            seeds="0",
            samples=2,
            height=24,
            width=32,
            train_images=6,
            test_images=3,
            repeats=1,
            threads=0,
        )
    )
    assert [r["dropout_at"] for r in rows] == ["all", "decoder", "last_block", "head"]
    assert all(
        0.0 <= r["ood_auroc"] <= 1.0 and 0.0 <= r["mean_iou"] <= 1.0 and r["img_per_s"] > 0 for r in rows
    )
    out = capsys.readouterr().out
    assert "| head | 0 |" in out and "peak / smallest pool's" in out


def test_ensemble_benchmark_rows_show_the_loops_uncertainties(capsys):
    from benchmarks.ensemble import main

    rows = main(["--quick", "--members", "3"])
    assert [r["members"] for r in rows] == [3, 3, 3] and "speed-up" in capsys.readouterr().out
    for row in rows:  # the batched path computes what the loop does (its speed is the benchmark's to say)
        assert row["max_output_deviation"] < 1e-4 and row["max_epistemic_deviation"] < 1e-4
        assert row["loop_items_per_s"] > 0 and row["batched_items_per_s"] > 0
