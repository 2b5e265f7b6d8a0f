"""The digits dataset: scikit-learn's bundled load_digits as dubito items with stable ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from dubito import DubitoError
from dubito.platform.data import DATASETS, Digits, get_dataset


@pytest.fixture(scope="module")
def raw():
    bunch = load_digits()
    return bunch.data, bunch.target


def test_counts_disjoint_and_ids_are_load_digits_indices(raw):
    data, target = raw
    train, test, full = Digits("train"), Digits("test"), Digits("all")
    assert len(train) + len(test) == 1797 == len(data) == len(full)
    assert len(test) == round(0.25 * 1797)
    assert set(train.ids).isdisjoint(test.ids)
    assert sorted(train.ids + test.ids) == list(range(1797)) == full.ids
    assert train.task == "classification" and train.num_classes == 10
    plain = Digits("test", normalize=False)
    assert plain.ids == test.ids
    for position in (0, 7, len(plain) - 1):
        item = plain[position]
        i = item["id"]
        assert i == plain.ids[position]
        np.testing.assert_allclose(item["image"].numpy(), data[i] / 16.0, rtol=0, atol=1e-7)
        assert int(item["target"]) == target[i]
    # the same image has the same id in every split
    position_in_all = full.ids.index(plain.ids[3])
    assert full[position_in_all]["id"] == plain[3]["id"]


def test_item_values(raw):
    data, target = raw
    item = Digits("train", normalize=False)[5]
    assert set(item) == {"image", "target", "mask", "id"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (64,)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["target"].dtype == torch.long and item["target"].shape == ()
    assert item["mask"].dtype == torch.bool and item["mask"].shape == () and bool(item["mask"])
    assert isinstance(item["id"], int)
    # normalised: train features have mean 0, std 1 (where not constant); test uses train statistics
    train = Digits("train")
    images = torch.stack([train[i]["image"] for i in range(len(train))]).double()
    varying = torch.from_numpy(data[train.ids].std(0) > 1e-6)
    torch.testing.assert_close(images.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-5, rtol=0)
    std = images.std(0, unbiased=False)[varying]
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)
    test, plain_test = Digits("test"), Digits("test", normalize=False)
    pixels = data[train.ids] / 16.0
    mean, std = pixels.mean(0), pixels.std(0)
    expected = (plain_test[4]["image"].double().numpy() - mean) / np.where(std > 1e-6, std, 1.0)
    np.testing.assert_allclose(test[4]["image"].numpy(), expected, atol=1e-5)
    assert test[-1]["id"] == test.ids[-1]
    with pytest.raises(IndexError):
        test[len(test)]
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert (
        batch["image"].shape == (4, 64)
        and batch["target"].shape == (4,)
        and batch["id"].tolist() == train.ids[:4]
    )
    train.set_epoch(3)  # no-op, but part of the dataset contract
    assert train[0]["id"] == train.ids[0]


def test_same_seed_same_split_other_seed_other_split():
    assert Digits("train", seed=3).ids == Digits("train", seed=3).ids
    assert Digits("test", seed=3).ids != Digits("test", seed=4).ids
    a, b = Digits("test", seed=3), Digits("test", seed=3)
    assert torch.equal(a.images, b.images)
    small = Digits("test", test_fraction=0.1, seed=3)
    assert len(small) == round(0.1 * 1797)


def test_registry_and_errors():
    assert DATASETS["digits"].cls is Digits and DATASETS["digits"].default_model == "mlp"
    ds = get_dataset("digits", "test", seed=2)
    assert isinstance(ds, Digits) and ds.ids == Digits("test", seed=2).ids
    assert len(get_dataset("digits", "train", root=None, test_fraction=0.5)) == 1797 - round(0.5 * 1797)
    with pytest.raises(DubitoError, match="split"):
        Digits("val")
    with pytest.raises(DubitoError, match="test_fraction"):
        Digits("train", test_fraction=1.0)
    with pytest.raises(DubitoError, match="seed"):
        Digits("train", seed=-1)
