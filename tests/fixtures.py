"""Tiny datasets in the real published layouts, written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dubito.platform.data.layouts import write_camvid_split, write_make3d_split, write_nyuv2

CAMVID_HW = (36, 48)

#: a training run small enough for tests of how it runs (Ray Train, ensembles)
TINY_TRAIN = dict(
    model="tiny",
    height=24,
    width=32,
    train_images=8,
    val_images=4,
    epochs=2,
    batch_size=4,
    device="cpu",
    seed=3,
)

#: a labeling loop small enough for a test of what runs where (Ray actors, sweep trials)
TINY_LOOP = dict(
    dataset="synthetic-camvid",
    height=24,
    width=32,
    pool_images=16,
    test_images=4,
    initial=4,
    query=2,
    rounds=2,
    epochs=1,
    samples=2,
    batch_size=4,
    device="cpu",
)


def make_camvid(root: Path, counts=(3, 2, 2), seed: int = 0, hw=CAMVID_HW) -> dict:
    """CamVid/{train,val,test}[annot] + list files; returns the arrays written, per split."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in zip(("train", "val", "test"), counts):
        images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(n)]
        labels = [rng.integers(0, 12, hw, dtype=np.uint8) for _ in range(n)]
        names = [f"0001TP_{split}_{i:04d}" for i in range(n)]
        paths = write_camvid_split(root / "CamVid", split, images, labels, names)
        written[split] = {"images": images, "labels": labels, "paths": paths}
    return written


def make_make3d(root: Path, counts=(2, 2), seed: int = 0, image_hw=(64, 48), grid=(55, 305)) -> dict:
    """Train400Img/Train400Depth and Test134/Test134Depth/Gridlaserdata; depths in 1-80 m."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in zip(("train", "test"), counts):
        images = [rng.integers(0, 256, (*image_hw, 3), dtype=np.uint8) for _ in range(n)]
        depths = [rng.uniform(1.0, 80.0, grid) for _ in range(n)]
        paths = write_make3d_split(
            root, split, images, depths, names=[f"10.21op2-p-{split}{i:03d}t000" for i in range(n)]
        )
        written[split] = {"images": images, "depths": depths, "paths": paths}
    return written


def make_nyuv2(root: Path, n: int = 6, hw=(12, 16), seed: int = 0) -> dict:
    """nyu_depth_v2_labeled.mat (HDF5, MATLAB axis order), splits.mat, classMapping40.mat."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.0, (n, *hw)).astype(np.float32)
    labels = rng.integers(0, 9, (n, *hw))  # raw labels 0 (unlabelled) .. 8
    class_map = [1, 2, 2, 3, 40, 1, 5, 5]  # raw 1..8 → 40-class ids 1..40
    train, test = [0, 2, 4], [1, 3, 5][: max(0, n - 3)]
    write_nyuv2(root, images, depths, labels, train=train, test=test, class_map=class_map)
    return {
        "images": images,
        "depths": depths,
        "labels": labels,
        "class_map": class_map,
        "train": train,
        "test": test,
    }
