"""NYU Depth v2, labeled subset, in its published files::

    nyu_depth_v2_labeled.mat   MATLAB v7.3 (HDF5): images 480x640x3x1449 uint8, depths 480x640x1449 (m),
                               labels 480x640x1449 (0 = unlabelled, 1-894)
    splits.mat                 trainNdxs (795), testNdxs (654), 1-based
    classMapping40.mat         optional: mapClass (894 → 1-40), className; needed for segmentation

h5py returns MATLAB's axes reversed ((N, 3, W, H) for the images); the loader turns them back
into (H, W). Item ids are 0-based indices into the .mat file, the same for every split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dubito import DubitoError
from dubito.platform.data.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptFileError,
    FileDataset,
    InvalidDepthError,
    LabelValueError,
    MatKeyError,
    MissingDataError,
    SizeMismatchError,
    check_numeric,
    find_root,
    read_mat,
    to_tensors,
)

__all__ = ["NYUv2", "NYU_LABELED", "NYU_SPLITS", "NYU_MAPPING"]

NYU_LABELED = "nyu_depth_v2_labeled.mat"
NYU_SPLITS = "splits.mat"
NYU_MAPPING = "classMapping40.mat"
SPLITS = ("train", "test", "all")
TASKS = ("depth", "segmentation")


class NYUv2(FileDataset):
    """NYUv2 split ``split`` ("train", "test" or "all") for ``task`` "depth" or "segmentation".

    Depth items: ``target`` float metres, ``mask`` = 0 < depth <= ``max_depth``. Segmentation items
    (needs ``class_mapping``, default ``root/classMapping40.mat``): ``target`` long 0-39 with
    40 = unlabelled (``ignore_index``), ``mask`` = labelled. ``size`` None keeps 480x640.
    """

    name = "NYUv2"

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        task: str = "depth",
        size: tuple[int, int] | None = None,
        class_mapping: str | Path | None = None,
        max_depth: float = 10.0,
        transform: Callable | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = (IMAGENET_MEAN, IMAGENET_STD),
        seed: int = 0,
        strict: bool = True,
    ):
        super().__init__(size, transform, normalize, seed, strict)
        if split not in SPLITS:
            raise MissingDataError(split, f"unknown NYUv2 split; choose one of {', '.join(SPLITS)}")
        if task not in TASKS:
            raise DubitoError(f"NYUv2 task must be one of {', '.join(TASKS)}, got {task!r}")
        if not max_depth > 0:
            raise DubitoError(f"max_depth must be > 0 metres, got {max_depth}")
        self.root = find_root(root, "NYUv2", [NYU_LABELED])
        self.labeled = self.root / NYU_LABELED
        if not self.labeled.is_file():
            raise MissingDataError(self.labeled, "NYUv2 labeled .mat not found")
        self.split, self.task, self.max_depth = split, task, float(max_depth)
        self._file = None
        self._pid = None
        try:
            count = self._check_layout(("images", "depths" if task == "depth" else "labels"))
        finally:
            self.close()  # reopened lazily, once per process

        if split == "all":
            self.indices = np.arange(count)
        else:
            splits = self.root / NYU_SPLITS
            if not splits.is_file():
                raise MissingDataError(splits, f"NYUv2 splits file not found (needed for split {split!r})")
            ndx = read_mat(splits, f"{split}Ndxs", integer=True).astype(np.int64).ravel()
            if ndx.size and (ndx.min() < 1 or ndx.max() > count):
                raise SizeMismatchError(
                    splits, f"{split}Ndxs holds indices {ndx.min()}-{ndx.max()}, outside 1-{count} (1-based)"
                )
            self.indices = ndx - 1

        if task == "segmentation":
            mapping = Path(class_mapping) if class_mapping is not None else self.root / NYU_MAPPING
            if not mapping.is_file():
                raise MissingDataError(mapping, "40-class mapping file needed for NYUv2 segmentation")
            table = read_mat(mapping, "mapClass", integer=True).astype(np.int64).ravel()
            if table.size == 0 or table.min() < 1:
                raise LabelValueError(
                    mapping, f"mapClass values must be >= 1, found {table.min() if table.size else 'none'}"
                )
            self.num_classes = int(table.max())
            self.ignore_index = self.num_classes
            # lookup: raw label 0 (unlabelled) → ignore; raw k → mapClass[k-1] - 1
            self._lookup = np.concatenate([[self.ignore_index], table - 1])
            self.class_names = _class_names(mapping, self.num_classes)
        else:
            self.num_classes = None
            self.ignore_index = None

    def _check_layout(self, keys: Sequence[str]) -> int:
        f = self._h5()
        import h5py

        missing = [k for k in keys if not isinstance(f.get(k), h5py.Dataset)]
        if missing:
            raise MatKeyError(
                self.labeled, f"no variable {missing[0]!r} (an array) in the NYUv2 labeled .mat"
            )
        for k in keys:
            check_numeric(np.empty(0, dtype=f[k].dtype), self.labeled, k)
        shapes = {k: f[k].shape for k in keys}
        if len(shapes["images"]) != 4 or shapes["images"][1] != 3:
            raise SizeMismatchError(
                self.labeled, f"images has shape {shapes['images']}, expected (N, 3, W, H) in HDF5"
            )
        count, _, width, height = shapes["images"]
        for k in keys[1:]:
            if shapes[k] != (count, width, height):
                raise SizeMismatchError(
                    self.labeled,
                    f"{k} has shape {shapes[k]} but images is {shapes['images']} (HDF5 axis order)",
                )
        return int(count)

    def _h5(self):
        import h5py

        if self._file is None or self._pid != os.getpid():  # one handle per process (DataLoader workers)
            try:
                self._file = h5py.File(self.labeled, "r")
            except OSError as err:
                raise CorruptFileError(self.labeled, f"not a MATLAB v7.3 (HDF5) file ({err})") from None
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        """Close the HDF5 file (it reopens on the next access)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = state["_pid"] = None
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def item_id(self, index: int) -> int:
        return int(self.indices[index])

    def path_of(self, index: int) -> str:
        return f"{self.labeled}[{self.item_id(index)}]"

    def _read(self, index: int, size: tuple[int, int] | None) -> tuple[dict, tuple[int, int]]:
        f, i = self._h5(), self.item_id(index)
        where = self.path_of(index)
        image = np.asarray(f["images"][i]).transpose(2, 1, 0)  # (3, W, H) → (H, W, 3)
        if image.dtype != np.uint8:
            image = np.clip(image, 0, 255).astype(np.uint8)
        if self.task == "depth":
            depth = np.asarray(f["depths"][i], dtype=np.float32).T
            if np.isnan(depth).any():
                raise InvalidDepthError(where, f"{int(np.isnan(depth).sum())} NaN depth values")
            if (depth < 0).any():
                raise InvalidDepthError(where, f"negative depth (min {float(depth.min()):.3g} m)")
            valid = (depth > 0) & (depth <= self.max_depth)
            item = to_tensors(image, np.where(valid, depth, 0.0).astype(np.float32), valid, size)
        else:
            raw = np.asarray(f["labels"][i]).T.astype(np.int64)
            if raw.min() < 0 or raw.max() >= len(self._lookup):
                raise LabelValueError(
                    where, f"label values {int(raw.min())}-{int(raw.max())} outside 0-{len(self._lookup) - 1}"
                )
            target = self._lookup[raw]
            item = to_tensors(image, target, target != self.ignore_index, size)
        return item, image.shape[:2]


def _class_names(mapping: Path, count: int) -> tuple[str, ...]:
    try:
        names = read_mat(mapping, "className").ravel()
        out = tuple(str(np.asarray(n).ravel()[0]) for n in names)
        if len(out) == count:
            return out
    except (DubitoError, IndexError):
        pass
    return tuple(f"class {k}" for k in range(1, count + 1))
