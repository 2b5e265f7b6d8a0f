"""Make3D (Saxena et al.) in its published layout::

    Train400Img/img-<name>.jpg      Train400Depth/depth_sph_corr-<name>.mat      (400 pairs)
    Test134/img-<name>.jpg          Test134Depth/Gridlaserdata/depth_sph_corr-<name>.mat  (134 pairs)

Photos are 2272x1704 (H x W); depth is the laser grid ``Position3DGrid`` (55 x 305 x 4), whose
channel 3 (0-based) is the depth in metres. The grid is resized to the item's resolution with
nearest neighbour; depth above ``max_depth`` (default 70 m, the common evaluation cap; the scanner
reports about 81.9 m where it has no return) or at 0 is masked out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from dubito import DubitoError
from dubito.platform.data.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FileDataset,
    InvalidDepthError,
    MissingDataError,
    SizeMismatchError,
    find_root,
    image_size,
    read_image,
    read_mat,
)
from dubito.platform.data.transforms import resize_map

__all__ = ["Make3D", "MAKE3D_SIZE"]

#: default item resolution (H, W): the 2272x1704 photos shrunk by 4.94, as commonly used (345x460)
MAKE3D_SIZE = (460, 345)
_IMAGE_DIRS = {"train": ("Train400Img",), "test": ("Test134", "Test134Img")}
_DEPTH_DIRS = {
    "train": ("Train400Depth", "Train400Depth/Gridlaserdata"),
    "test": ("Test134Depth/Gridlaserdata", "Test134Depth", "Gridlaserdata"),
}


class Make3D(FileDataset):
    """Make3D split ``split`` ("train" or "test") under ``root``.

    Items: ``image`` (3, H, W), ``target`` (H, W) float depth in metres (0 where invalid), ``mask``
    (H, W) = 0 < depth <= ``max_depth``, ``id``. ``size`` defaults to ``MAKE3D_SIZE``; None keeps
    the photos' native resolution.
    """

    task = "depth"
    name = "Make3D"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: tuple[int, int] | None = MAKE3D_SIZE,
        max_depth: float = 70.0,
        transform: Callable | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = (IMAGENET_MEAN, IMAGENET_STD),
        seed: int = 0,
        strict: bool = True,
    ):
        super().__init__(size, transform, normalize, seed, strict)
        if split not in _IMAGE_DIRS:
            raise MissingDataError(split, f"unknown Make3D split; choose one of {', '.join(_IMAGE_DIRS)}")
        if not max_depth > 0:
            raise DubitoError(f"max_depth must be > 0 metres, got {max_depth}")
        self.root = find_root(root, "Make3D", [d for dirs in _IMAGE_DIRS.values() for d in dirs])
        self.split = split
        self.max_depth = float(max_depth)
        image_dir = next((self.root / d for d in _IMAGE_DIRS[split] if (self.root / d).is_dir()), None)
        if image_dir is None:
            raise MissingDataError(self.root / _IMAGE_DIRS[split][0], f"Make3D {split} images not found")
        depth_dirs = [self.root / d for d in _DEPTH_DIRS[split] if (self.root / d).is_dir()]
        if not depth_dirs:
            raise MissingDataError(
                self.root / _DEPTH_DIRS[split][0], f"Make3D {split} depth folder not found"
            )
        self.files: list[tuple[Path, Path]] = []
        for position, image in enumerate(sorted(image_dir.glob("img-*.jpg"))):
            name = "depth_sph_corr-" + image.stem[len("img-") :] + ".mat"
            depth = next((d / name for d in depth_dirs if (d / name).is_file()), None)
            if depth is None:
                self._problem(
                    MissingDataError(image, f"image without its depth (expected {depth_dirs[0] / name})")
                )
            else:
                self.files.append((image, depth))
                self.ids.append(position)
        if not self.files and not self.problems:
            raise MissingDataError(image_dir, "no img-*.jpg images in this split")

    def __len__(self) -> int:
        return len(self.files)

    def path_of(self, index: int) -> str:
        return str(self.files[index][0])

    def _read(self, index: int, size: tuple[int, int] | None) -> tuple[dict, tuple[int, int]]:
        image_path, depth_path = self.files[index]
        image = read_image(image_path, draft_size=size)
        grid = read_mat(depth_path, "Position3DGrid")
        if grid.ndim != 3 or grid.shape[2] < 4 or grid.shape[0] == 0 or grid.shape[1] == 0:
            raise SizeMismatchError(
                depth_path, f"Position3DGrid has shape {grid.shape}, expected (rows, cols, 4)"
            )
        depth = grid[..., 3].astype(np.float32)
        if np.isnan(depth).any():
            raise InvalidDepthError(depth_path, f"{int(np.isnan(depth).sum())} NaN depth values")
        if (depth < 0).any():
            raise InvalidDepthError(depth_path, f"negative depth (min {float(depth.min()):.3g} m)")
        valid = (depth > 0) & (depth <= self.max_depth)
        out_size = size if size is not None else image.shape[:2]
        item = {
            "image": resize_map(
                torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, out_size, image=True
            ),
            "target": resize_map(torch.from_numpy(np.where(valid, depth, 0.0).astype(np.float32)), out_size),
            "mask": resize_map(torch.from_numpy(valid), out_size),
        }
        return item, image_size(image_path)
