"""Datasets: CamVid, Make3D and NYUv2 read from their published layouts, scikit-learn's bundled
digits (vectors, for the MLP), and synthetic scenes with known noise. Items are dicts (``image``,
``target``, ``mask``, ``id``; see ``base``).

    from dubito.platform.data import CamVid, SyntheticCamVid, get_dataset
    train = CamVid("/data/CamVid", "train", size=(180, 240), transform=train_transform((160, 160)))
    pool = get_dataset("synthetic-camvid", "train", size=(90, 120), n=200)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
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
from dubito.platform.registry import Registry

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "HEADLINE",
    "dataset_info",
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

#: the headline metric of each task and whether higher is better (loops, sweeps, studies)
HEADLINE = {"segmentation": ("mean_iou", True), "depth": ("rms", False), "classification": ("accuracy", True)}


@dataclass(frozen=True)
class DatasetInfo:
    """What dubito knows of a dataset before opening it: the one place a dataset's kind is read.

    Attributes:
        name: ``--dataset`` name.
        cls: the dataset class (``cls(root, split, **options)`` for data read from disk, else
            ``cls(split=split, **options)``).
        task: ``segmentation``, ``depth`` or ``classification``.
        source: ``disk`` (read from ``--root``), ``synthetic`` (scenes generated from a seed, with an
            indoor out-of-distribution variant) or ``bundled`` (shipped with a library: digits).
        splits: the splits it has (``val`` where it has its own validation split).
        inputs: ``images`` (FC-DenseNet) or ``vectors`` (the MLP).
    """

    name: str
    cls: type
    task: str
    source: str
    splits: tuple[str, ...] = ("train", "test")
    inputs: str = "images"

    def __post_init__(self) -> None:
        if (
            self.task not in HEADLINE
            or self.source not in ("disk", "synthetic", "bundled")
            or self.inputs not in ("images", "vectors")
        ):
            raise DubitoError(
                f"dataset {self.name!r}: task, source or inputs not one dubito knows ({self.task}, {self.source}, {self.inputs})"
            )

    @property
    def needs_root(self) -> bool:
        """Read from disk: commands need ``--root``."""
        return self.source == "disk"

    @property
    def synthetic(self) -> bool:
        return self.source == "synthetic"

    @property
    def headline(self) -> str:
        """The task's headline metric (``mean_iou``, ``rms``, ``accuracy``)."""
        return HEADLINE[self.task][0]

    @property
    def higher_is_better(self) -> bool:
        return HEADLINE[self.task][1]

    @property
    def default_model(self) -> str:
        """``--model auto``: the MLP for vectors, the tiny FC-DenseNet for images."""
        return "mlp" if self.inputs == "vectors" else "tiny"

    def takes(self, option: str) -> bool:
        """Whether its constructor accepts ``option`` (e.g. ``max_depth``: the built-in depth datasets)."""
        try:
            parameters = inspect.signature(self.cls).parameters
        except (TypeError, ValueError):  # no signature to read: give it nothing it may not take
            return False
        return option in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())

    def open(self, split: str = "train", root: str | Path | None = None, **options):
        if not self.needs_root:
            return self.cls(split=split, **options)
        if root is None:
            raise DubitoError(f"dataset {self.name!r} is read from disk: give its root folder (--root DIR)")
        return self.cls(root, split, **options)


#: dataset names accepted by ``get_dataset`` (and the commands' ``--dataset``), each with its descriptor
DATASETS: Registry[DatasetInfo] = Registry("dataset", "dubito.datasets", DatasetInfo, __name__)
for _info in (
    DatasetInfo("camvid", CamVid, "segmentation", "disk", ("train", "val", "test")),
    DatasetInfo("make3d", Make3D, "depth", "disk"),
    DatasetInfo("nyuv2", NYUv2, "depth", "disk"),
    DatasetInfo("synthetic-camvid", SyntheticCamVid, "segmentation", "synthetic", ("train", "val", "test")),
    DatasetInfo("synthetic-make3d", SyntheticMake3D, "depth", "synthetic", ("train", "val", "test")),
    DatasetInfo("digits", Digits, "classification", "bundled", inputs="vectors"),
):
    DATASETS.register(_info, builtin=True)


def dataset_info(name: str, flag: str = "--dataset") -> DatasetInfo:
    """The descriptor of dataset ``name``; a :class:`DubitoError` naming ``flag`` and the known ones otherwise."""
    if name not in DATASETS:
        raise DubitoError(f"{flag} must be one of {', '.join(DATASETS)}, got {name!r}")
    return DATASETS[name]


def get_dataset(name: str, split: str = "train", root: str | Path | None = None, **options):
    """Dataset ``name`` (see ``DATASETS``), split ``split``. Datasets read from disk need ``root``;
    synthetic ones and ``digits`` (bundled with scikit-learn) ignore it. ``options`` go to the
    dataset's constructor (``size``, ``transform``, ...; for digits ``seed``, ``test_fraction``,
    ``normalize``)."""
    if name not in DATASETS:
        raise DubitoError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name].open(split, root, **options)
