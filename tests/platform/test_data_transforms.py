"""Transforms move every spatial map together; their randomness depends only on (seed, epoch, id)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from dubito import DubitoError
from dubito.platform.data import (
    CenterCrop,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    SyntheticCamVid,
    train_transform,
)
from dubito.platform.data.base import item_generator


def coordinate_item(h: int = 12, w: int = 16) -> dict:
    """Every map encodes its pixel's original (row, col), so alignment is checkable after any transform."""
    rows = torch.arange(h).view(-1, 1).expand(h, w)
    cols = torch.arange(w).view(1, -1).expand(h, w)
    code = rows * 100 + cols
    return {
        "image": torch.stack([rows.float(), cols.float(), code.float()]),
        "target": code.clone(),
        "mask": (code % 3 == 0),
        "noise": code.float() / 7,
        "id": 5,
        "has_static": True,
    }


def assert_aligned(item: dict) -> None:
    code = item["target"]
    assert torch.equal(item["image"][2], code.float())
    assert torch.equal(item["mask"], code % 3 == 0)
    assert torch.allclose(item["noise"], code.float() / 7)


def test_random_crop_and_flip_keep_maps_aligned():
    t = Compose([RandomCrop((7, 9)), RandomHorizontalFlip(1.0)])
    out = t(coordinate_item(), torch.Generator().manual_seed(3))
    assert out["target"].shape == (7, 9) and out["image"].shape == (3, 7, 9)
    assert_aligned(out)
    cols = out["target"] % 100
    assert (cols[:, :-1] - cols[:, 1:] == 1).all()  # mirrored: columns decrease left to right
    assert out["id"] == 5 and out["has_static"] is True  # non-spatial entries pass through


def test_center_crop_and_crop_larger_than_image():
    out = CenterCrop((4, 6))(coordinate_item())
    assert out["target"][0, 0] == 4 * 100 + 5
    with pytest.raises(DubitoError, match="larger than the 12x16 image"):
        RandomCrop((13, 4))(coordinate_item())


def test_resize_nearest_for_maps_bilinear_for_image():
    item = coordinate_item(8, 8)
    out = Resize((4, 4))(item)
    # nearest of pixel centres: rows/cols 1, 3, 5, 7 (independent computation)
    expected = torch.tensor([1, 3, 5, 7]).view(-1, 1) * 100 + torch.tensor([1, 3, 5, 7]).view(1, -1)
    assert torch.equal(out["target"], expected) and out["target"].dtype == torch.long
    assert out["mask"].dtype == torch.bool and torch.equal(out["mask"], expected % 3 == 0)
    # an antialiased bilinear shrink of a linear ramp: inside, the value at each block's centre
    ramp = out["image"][0][:, 0]
    assert torch.allclose(ramp[1:3], torch.tensor([2.5, 4.5]), atol=1e-4)
    assert (ramp[1:] > ramp[:-1]).all()


def test_flip_probability_is_respected():
    g = torch.Generator().manual_seed(0)
    flips = sum(
        bool((RandomHorizontalFlip(0.3)(coordinate_item(), g)["target"][0, 0] % 100) != 0)
        for _ in range(2000)
    )
    assert abs(flips / 2000 - 0.3) < 0.035  # 3.5 binomial standard deviations
    with pytest.raises(DubitoError, match="p must be in"):
        RandomHorizontalFlip(1.5)


def test_item_generator_depends_on_seed_epoch_and_index_only():
    a = torch.rand(4, generator=item_generator(0, 1, 7))
    assert torch.equal(a, torch.rand(4, generator=item_generator(0, 1, 7)))
    assert not torch.equal(a, torch.rand(4, generator=item_generator(0, 2, 7)))
    assert not torch.equal(a, torch.rand(4, generator=item_generator(1, 1, 7)))


def test_dataset_crops_are_reproducible_across_workers_and_change_with_epoch():
    ds = SyntheticCamVid(n=6, size=(24, 32), transform=train_transform((16, 16)), seed=3)
    single = [ds[i]["image"] for i in range(6)]
    loader = DataLoader(ds, batch_size=3, num_workers=2)
    batched = torch.cat([b["image"] for b in loader])
    assert torch.equal(torch.stack(single), batched)
    ds.set_epoch(1)
    assert not all(torch.equal(ds[i]["image"], single[i]) for i in range(6))
    for i in range(6):  # the crop moves image, labels and noise maps together
        item = ds[i]
        assert item["image"].shape == (3, 16, 16) and item["noise"].shape == (16, 16)
        clean = item["noise"] == 0  # where the generator added no label noise, labels are the clean ones
        assert torch.equal(item["target"][clean], item["clean_target"][clean])
