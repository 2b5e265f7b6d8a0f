"""Benchmark: how many items per second the data layer delivers (a number to watch, no target yet).

Run: ``python -m benchmarks.data_loading [--quick]``. Times, in one process:

- each synthetic generator (``SyntheticCamVid``, ``SyntheticMake3D``, their indoor OOD variants)
  at full and at CPU-friendly resolution;
- the CamVid loader at 360x480 on a SegNet-layout folder of PNGs written from synthetic scenes
  (real-looking compression), alone and through a 2-worker DataLoader (ratio against one process);
- decoding Make3D's 2272x1704 JPEGs for a 460x345 item with JPEG draft mode versus a full decode
  (ratio; both then resize to the same size).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.timing import best_time
from dubito.platform.data import CamVid, SyntheticCamVid, SyntheticMake3D
from dubito.platform.data.base import read_image
from dubito.platform.data.layouts import write_camvid_split
from dubito.platform.data.transforms import resize_map


def items_per_second(fn, count: int, repeats: int = 1) -> float:
    """Best of ``repeats`` runs of ``fn()``, which produces ``count`` items."""
    best, _ = best_time(fn, repeats)
    return count / best


def row(name: str, rate: float, ratio: str = "") -> str:
    return f"{name:52s} {rate:10.1f} {ratio:>10s}"


def bench_synthetic(n: int, sizes: dict) -> list[str]:
    rows = []
    for cls, size in (
        (SyntheticCamVid, sizes["camvid"]),
        (SyntheticCamVid, sizes["camvid_half"]),
        (SyntheticMake3D, sizes["make3d"]),
    ):
        for ood in (False, True):
            ds = cls(n=n, size=size, ood=ood)
            rate = items_per_second(lambda: [ds[i] for i in range(n)], n)
            rows.append(row(f"{cls.__name__}{' (ood)' if ood else ''} {size[0]}x{size[1]}", rate))
    return rows


def bench_camvid(n: int, size: tuple[int, int], workers: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        scenes = SyntheticCamVid(n=n, size=size, normalize=None)
        images, labels = [], []
        for i in range(n):
            item = scenes[i]
            images.append((item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            labels.append(item["target"].numpy().astype(np.uint8))
        write_camvid_split(Path(tmp) / "CamVid", "train", images, labels)
        ds = CamVid(Path(tmp) / "CamVid", "train")
        single = items_per_second(lambda: [ds[i] for i in range(n)], n)
        loader = DataLoader(ds, batch_size=4, num_workers=workers)
        pooled = items_per_second(lambda: [b for b in loader], n)
        return [
            row(f"CamVid loader {size[0]}x{size[1]} PNG, 1 process", single),
            row(
                f"CamVid loader {size[0]}x{size[1]} PNG, DataLoader {workers} workers",
                pooled,
                f"{pooled / single:.2f}x",
            ),
        ]


def bench_make3d_decode(n: int, native: tuple[int, int], size: tuple[int, int]) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        rng = np.random.default_rng(0)
        paths = []
        for i in range(n):
            base = SyntheticMake3D(n=n, size=(native[0] // 8, native[1] // 8), normalize=None)[i]["image"]
            big = resize_map(base, native, image=True)  # smooth photo-like content at full size
            pixels = (
                (big.permute(1, 2, 0).numpy() * 255 + rng.normal(0, 2, (*native, 3)))
                .clip(0, 255)
                .astype(np.uint8)
            )
            path = Path(tmp) / f"img-{i}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            paths.append(path)

        def load(draft: bool):
            for p in paths:
                img = read_image(p, draft_size=size if draft else None)
                resize_map(torch.from_numpy(img).permute(2, 0, 1).float(), size, image=True)

        full = items_per_second(lambda: load(False), n)
        drafted = items_per_second(lambda: load(True), n)
        return [
            row(f"Make3D JPEG {native[0]}x{native[1]} -> {size[0]}x{size[1]}, full decode", full),
            row(
                f"Make3D JPEG {native[0]}x{native[1]} -> {size[0]}x{size[1]}, draft decode",
                drafted,
                f"{drafted / full:.2f}x",
            ),
        ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and counts (CI smoke run)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        n, sizes = 4, {"camvid": (72, 96), "camvid_half": (36, 48), "make3d": (48, 36)}
        camvid_size, native, make3d_size = (72, 96), (456, 342), (92, 69)
    else:
        n, sizes = 24, {"camvid": (360, 480), "camvid_half": (180, 240), "make3d": (460, 345)}
        camvid_size, native, make3d_size = (360, 480), (2272, 1704), (460, 345)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {n} items per case")
    print(f"{'case':52s} {'items/s':>10s} {'ratio':>10s}")
    for line in bench_synthetic(n, sizes):
        print(line)
    for line in bench_camvid(n, camvid_size, args.workers):
        print(line)
    for line in bench_make3d_decode(max(2, n // 3), native, make3d_size):
        print(line)


if __name__ == "__main__":
    main()
