"""Datasets are declared once (task, source, splits, inputs) and every command reads the kind of a
dataset from its descriptor, never from its name: a dataset a user registers is treated like the
built-in one it resembles."""

from __future__ import annotations

import pytest

from dubito import DubitoError
from dubito.platform.config import check_model, default_model, needs_root
from dubito.platform.data import (
    DATASETS,
    HEADLINE,
    DatasetInfo,
    Digits,
    SyntheticMake3D,
    dataset_info,
    get_dataset,
)


@pytest.fixture
def extra():
    """Two datasets under names no built-in check could know."""
    added = [
        DATASETS.register(DatasetInfo("my-vectors", Digits, "classification", "bundled", inputs="vectors")),
        DATASETS.register(
            DatasetInfo("my-depth", SyntheticMake3D, "depth", "synthetic", ("train", "val", "test"))
        ),
        DATASETS.register(DatasetInfo("my-disk", Digits, "segmentation", "disk")),
    ]
    yield
    for info in added:
        DATASETS.unregister(info.name)


def test_builtin_descriptors():
    table = {name: (i.task, i.needs_root, i.headline, i.default_model) for name, i in DATASETS.items()}
    assert table == {
        "camvid": ("segmentation", True, "mean_iou", "tiny"),
        "make3d": ("depth", True, "rms", "tiny"),
        "nyuv2": ("depth", True, "rms", "tiny"),
        "synthetic-camvid": ("segmentation", False, "mean_iou", "tiny"),
        "synthetic-make3d": ("depth", False, "rms", "tiny"),
        "digits": ("classification", False, "accuracy", "mlp"),
    }
    assert {t: h for t, h in HEADLINE.items()} == {
        "segmentation": ("mean_iou", True),
        "depth": ("rms", False),
        "classification": ("accuracy", True),
    }
    with pytest.raises(DubitoError, match="--ood-dataset must be one of"):
        dataset_info("cityscapes", "--ood-dataset")
    with pytest.raises(DubitoError, match="task, source or inputs"):
        DatasetInfo("odd", Digits, "detection", "disk")


def test_a_registered_dataset_is_read_by_its_descriptor(extra, tmp_path):
    from dubito.acquisition.config import LoopConfig
    from dubito.experiments.sweep import SweepConfig
    from dubito.platform.training import TrainConfig

    assert default_model("my-vectors") == "mlp" and not needs_root("my-vectors")
    check_model("my-vectors", "mlp")
    with pytest.raises(DubitoError, match="holds vectors"):
        check_model("my-vectors", "tiny")
    assert TrainConfig(dataset="my-vectors").model == "mlp"
    LoopConfig.flat(dataset="my-vectors", output=str(tmp_path / "a")).validate()
    assert len(get_dataset("my-vectors", "train", seed=0)) == len(Digits("train", seed=0))

    assert needs_root("my-disk")
    with pytest.raises(DubitoError, match="--dataset my-disk is read from disk: give --root"):
        TrainConfig(dataset="my-disk", output=str(tmp_path / "b")).validate()
    with pytest.raises(DubitoError, match="read from disk"):
        get_dataset("my-disk", "train")

    # the sweep's metric follows the task, not the name
    sweep = SweepConfig(
        kind="label", output=str(tmp_path / "s"), grid=("seed=0",), base={"dataset": "my-depth"}
    )
    assert sweep.metric_and_mode() == ("test_rms", "min")
    sweep = SweepConfig(
        kind="train", output=str(tmp_path / "s"), grid=("seed=0",), base={"dataset": "my-vectors"}
    )
    assert sweep.metric_and_mode() == ("val_accuracy", "max")
