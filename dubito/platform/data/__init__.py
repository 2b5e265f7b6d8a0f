"""Datasets: CamVid, Make3D and NYUv2 read from their published layouts, scikit-learn's bundled
digits (vectors, for the MLP), and synthetic scenes with known noise. Items are dicts (``image``,
``target``, ``mask``, ``id``; see ``base``).

    from dubito.platform.data import CamVid, SyntheticCamVid, get_dataset
    train = CamVid("/data/CamVid", "train", size=(180, 240), transform=train_transform((160, 160)))
    pool = get_dataset("synthetic-camvid", "train", size=(90, 120), n=200)
"""

from __future__ import annotations

from pathlib import Path

from dubito import DubitoError
from dubito.platform.data.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptFileError,
    DatasetError,
    FileDataset,
    InvalidDepthError,
    LabelValueError,
    MatKeyError,
    MissingDataError,
    Problem,
    SizeMismatchError,
)
from dubito.platform.data.camvid import CAMVID_CLASS_WEIGHTS, CAMVID_CLASSES, CAMVID_VOID, CamVid
from dubito.platform.data.digits import DIGITS_SIZE, Digits
from dubito.platform.data.make3d import MAKE3D_SIZE, Make3D
from dubito.platform.data.nyuv2 import NYUv2
from dubito.platform.data.stats import median_frequency_weights
from dubito.platform.data.synthetic import SyntheticCamVid, SyntheticMake3D
from dubito.platform.data.transforms import (
    CenterCrop,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    train_transform,
)

__all__ = [
    "DATASETS",
    "get_dataset",
    "CamVid",
    "Make3D",
    "NYUv2",
    "Digits",
    "DIGITS_SIZE",
    "SyntheticCamVid",
    "SyntheticMake3D",
    "CAMVID_CLASSES",
    "CAMVID_CLASS_WEIGHTS",
    "CAMVID_VOID",
    "MAKE3D_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "median_frequency_weights",
    "Compose",
    "Resize",
    "RandomCrop",
    "CenterCrop",
    "RandomHorizontalFlip",
    "train_transform",
    "DatasetError",
    "MissingDataError",
    "CorruptFileError",
    "SizeMismatchError",
    "LabelValueError",
    "InvalidDepthError",
    "MatKeyError",
    "Problem",
    "FileDataset",
]

#: dataset names accepted by ``get_dataset`` (and the commands' ``--dataset``)
DATASETS = {
    "camvid": CamVid,
    "make3d": Make3D,
    "nyuv2": NYUv2,
    "synthetic-camvid": SyntheticCamVid,
    "synthetic-make3d": SyntheticMake3D,
    "digits": Digits,
}


def get_dataset(name: str, split: str = "train", root: str | Path | None = None, **options):
    """Dataset ``name`` (see ``DATASETS``), split ``split``. Datasets read from disk need ``root``;
    synthetic ones and ``digits`` (bundled with scikit-learn) ignore it. ``options`` go to the
    dataset's constructor (``size``, ``transform``, ...; for digits ``seed``, ``test_fraction``,
    ``normalize``)."""
    if name not in DATASETS:
        raise DubitoError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    cls = DATASETS[name]
    if name.startswith("synthetic-") or name == "digits":
        return cls(split=split, **options)
    if root is None:
        raise DubitoError(f"dataset {name!r} is read from disk: give its root folder (--root DIR)")
    return cls(root, split, **options)
