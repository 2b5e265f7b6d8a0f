"""Synthetic scenes: deterministic, CamVid-like class statistics, and exactly the documented noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from dubito import DubitoError
from dubito.platform.data import SyntheticCamVid, SyntheticMake3D
from dubito.platform.data.synthetic import (
    CAMVID_FREQUENCIES,
    CLEAN_INPUT_NOISE,
    DUSK_INPUT_NOISE,
    SYNTHETIC_CAMVID_FREQUENCIES,
    binary_entropy,
)

TENSOR_KEYS = ("image", "target", "clean_target", "mask", "noise", "input_noise", "static")


def items(ds, n=None):
    return [ds[i] for i in range(len(ds) if n is None else n)]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("cls", [SyntheticCamVid, SyntheticMake3D])
def test_same_seed_same_items_whatever_the_size_or_order(cls):
    a = cls(n=5, size=(40, 56), seed=4)
    b = cls(n=50, size=(40, 56), seed=4)
    for i in (3, 0, 4):  # any order, any dataset length
        assert_same(a[i], b[i])
    assert a[4]["id"] == 4
    other = cls(n=5, size=(40, 56), seed=5)
    assert not torch.equal(a[0]["image"], other[0]["image"])
    val = cls("val", n=5, size=(40, 56), seed=4)
    assert not torch.equal(a[0]["image"], val[0]["image"])  # splits are different scenes


@pytest.mark.parametrize("cls", [SyntheticCamVid, SyntheticMake3D])
def test_an_item_is_the_same_scene_at_every_resolution(cls):
    small = items(cls(n=30, size=(24, 32), seed=1))
    large = items(cls(n=30, size=(96, 128), seed=1))
    for a, b in zip(small, large):
        assert (a["dusk"], a["has_static"]) == (b["dusk"], b["has_static"])
        # the static covers the same fraction of the image, at the same relative place
        assert float(a["static"].float().mean()) == pytest.approx(float(b["static"].float().mean()), abs=0.03)
    # the scene itself: the large rendering, shrunk by nearest neighbour, mostly agrees with the small one
    a, b = small[0]["clean_target"], large[0]["clean_target"][2::4, 2::4]
    close = (a == b) if cls is SyntheticCamVid else torch.isclose(a, b, rtol=0.05)
    assert float(close.float().mean()) > 0.85


def test_raising_the_static_fraction_only_adds_static_images():
    low = [it["has_static"] for it in items(SyntheticCamVid(n=60, size=(16, 16), static_fraction=0.2))]
    high = [it["has_static"] for it in items(SyntheticCamVid(n=60, size=(16, 16), static_fraction=0.5))]
    assert all(h for lo, h in zip(low, high) if lo) and sum(high) > sum(low)


def test_item_contents_and_types():
    item = SyntheticCamVid(n=2, size=(30, 40))[1]
    for k in TENSOR_KEYS:
        assert item[k].shape[-2:] == (30, 40), k
    assert item["image"].shape == (3, 30, 40) and item["image"].dtype == torch.float32
    assert item["target"].dtype == torch.long and int(item["target"].max()) <= 10
    assert bool(item["mask"].all())  # no void in synthetic scenes
    assert isinstance(item["has_static"], bool) and isinstance(item["dusk"], bool) and item["ood"] is False
    depth = SyntheticMake3D(n=2, size=(30, 40))[0]
    assert depth["target"].dtype == torch.float32 and not bool(depth["mask"].all())  # sky has no depth
    assert float(depth["target"][~depth["mask"]].abs().max()) == 0.0


def class_frequencies(ds) -> np.ndarray:
    counts = np.zeros(11)
    for item in items(ds):
        counts += np.bincount(item["clean_target"].ravel().numpy(), minlength=11)
    return counts / counts.sum()


def test_class_frequencies_resemble_camvid_and_match_the_documented_table():
    freq = class_frequencies(SyntheticCamVid(n=120, size=(90, 120), seed=1))
    camvid = np.array(CAMVID_FREQUENCIES)
    assert (freq > 0).all()  # every class occurs
    ratio = freq / camvid
    assert (ratio > 0.5).all() and (ratio < 2.0).all(), ratio  # within a factor 2 of CamVid's, each class
    assert stats.spearmanr(freq, camvid).statistic > 0.9  # the same order of common and rare classes
    documented = np.array(SYNTHETIC_CAMVID_FREQUENCIES)
    np.testing.assert_allclose(freq, documented, rtol=0.3, atol=0.004)  # another seed: the table holds


def test_static_fraction_and_static_labels_are_uniform_noise():
    ds = SyntheticCamVid(n=300, size=(24, 32), seed=2, static_fraction=0.3)
    all_items = items(ds)
    flags = np.array([it["has_static"] for it in all_items])
    assert abs(flags.mean() - 0.3) < 3 * math.sqrt(0.3 * 0.7 / 300)
    for it in all_items:
        assert bool(it["static"].any()) == it["has_static"]
    labels = torch.cat([it["target"][it["static"]] for it in all_items]).numpy()
    counts = np.bincount(labels, minlength=11)
    assert stats.chisquare(counts).pvalue > 1e-3  # uniform over the 11 classes
    noise = torch.cat([it["noise"][it["static"]] for it in all_items])
    assert torch.allclose(noise, torch.full_like(noise, math.log(11)))
    # the signature is in the input: grey (R = G = B) pixels with the spread of U(0, 1)
    first = next(i for i, it in enumerate(all_items) if it["has_static"])
    raw = SyntheticCamVid(n=300, size=(24, 32), seed=2, static_fraction=0.3, normalize=None)[first]
    pixels = raw["image"][:, raw["static"]]
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
    assert abs(float(pixels[0].std()) - 1 / math.sqrt(12)) < 0.05


def test_boundary_bands_flip_labels_at_the_documented_rate():
    p = 0.3
    ds = SyntheticCamVid(n=60, size=(60, 80), seed=3, boundary_flip=p, static_fraction=0.0)
    flipped, band_pixels = 0, 0
    for it in items(ds):
        band = it["noise"] > 0
        assert torch.allclose(it["noise"][band], torch.tensor(binary_entropy(p)))
        assert torch.equal(it["target"][~band], it["clean_target"][~band])  # no noise outside the bands
        flipped += int((it["target"][band] != it["clean_target"][band]).sum())
        band_pixels += int(band.sum())
    rate = flipped / band_pixels
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / band_pixels) + 0.005


def test_boundary_bands_lie_on_class_edges():
    it = SyntheticCamVid(n=1, size=(60, 80), seed=0, static_fraction=0.0, boundary_width=1)[0]
    clean = it["clean_target"]
    edge = torch.zeros_like(clean, dtype=torch.bool)
    edge[:-1] |= clean[:-1] != clean[1:]
    edge[1:] |= clean[1:] != clean[:-1]
    edge[:, :-1] |= clean[:, :-1] != clean[:, 1:]
    edge[:, 1:] |= clean[:, 1:] != clean[:, :-1]
    assert torch.equal(it["noise"] > 0, edge)


def test_dusk_images_are_darker_lower_contrast_and_noisier():
    ds = SyntheticCamVid(n=80, size=(30, 40), seed=5, dusk_fraction=0.5, static_fraction=0.0, normalize=None)
    dusk, day = [], []
    for it in items(ds):
        (dusk if it["dusk"] else day).append(it)
        expected = DUSK_INPUT_NOISE if it["dusk"] else CLEAN_INPUT_NOISE
        assert torch.allclose(it["input_noise"], torch.tensor(expected))
    assert 20 < len(dusk) < 60
    brightness = lambda its: np.mean([float(i["image"].mean()) for i in its])  # noqa: E731
    # contrast of the scene: spread of the per-class mean colours
    contrast = lambda its: np.mean(  # noqa: E731
        [
            float(
                torch.stack([i["image"][:, i["target"] == c].mean(1) for c in i["target"].unique()])
                .std(0)
                .mean()
            )
            for i in its
        ]
    )
    assert brightness(dusk) < 0.6 * brightness(day)
    assert contrast(dusk) < 0.5 * contrast(day)


def test_depth_noise_is_gaussian_with_the_documented_std_growing_with_depth():
    ds = SyntheticMake3D(n=30, size=(48, 36), seed=6, static_fraction=0.0, sensor_noise=(0.05, 0.0004))
    z, depth, noise = [], [], []
    for it in items(ds):
        clean = it["clean_target"]
        quiet = it["mask"] & torch.isclose(
            it["noise"], 0.05 + 0.0004 * clean**2
        )  # outside the boundary bands
        z.append(((it["target"] - clean) / it["noise"])[quiet])
        depth.append(clean[quiet])
        noise.append(it["noise"][quiet])
    z, depth, noise = torch.cat(z), torch.cat(depth), torch.cat(noise)
    assert len(z) > 10_000
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    assert stats.kstest(z.numpy()[:5000], "norm").pvalue > 1e-3
    assert stats.spearmanr(depth.numpy(), noise.numpy()).statistic > 0.99  # noise grows with depth


def test_depth_boundary_bands_take_the_neighbours_depth_at_the_documented_rate():
    p = 0.3
    ds = SyntheticMake3D(
        n=30, size=(48, 36), seed=7, static_fraction=0.0, boundary_flip=p, sensor_noise=(0.01, 5e-5)
    )
    taken, total = 0, 0
    for it in items(ds):
        clean, target, noise = it["clean_target"], it["target"], it["noise"]
        band = it["mask"] & ~torch.isclose(noise, ds.depth_std(clean))
        # a depth edge is a jump of more than 10 % of the nearer side, i.e. more than depth / 11
        assert (noise[band] >= math.sqrt(p * (1 - p)) * clean[band] / 11 * 0.999).all()
        # "flying pixels" sit far off their own surface (the sensor noise is < 0.5 % of the depth here)
        flying = band & ((target - clean).abs() > 0.05 * clean)
        # there the neighbour's depth ≈ the target, so the mixture std is known: sqrt(p(1-p)) |Δ| dominates
        np.testing.assert_allclose(
            noise[flying], math.sqrt(p * (1 - p)) * (target - clean)[flying].abs(), rtol=0.1
        )
        taken += int(flying.sum())
        total += int(band.sum())
    assert total > 1000
    assert abs(taken / total - p) < 4 * math.sqrt(p * (1 - p) / total)


def test_depth_mask_caps_far_and_sky_pixels():
    ds = SyntheticMake3D(n=5, size=(48, 36), seed=8, max_depth=30.0, static_fraction=0.0)
    for it in items(ds):
        assert float(it["clean_target"][it["mask"]].max()) <= 30.0
        assert float(it["target"][~it["mask"]].abs().max()) == 0.0
    with pytest.raises(DubitoError, match="max_depth"):
        SyntheticMake3D(max_depth=0.5)


def test_depth_static_is_uniform_random_depth():
    ds = SyntheticMake3D(n=40, size=(32, 24), seed=9, static_fraction=1.0, max_depth=70.0)
    values = torch.cat([it["target"][it["static"]] for it in items(ds)]).numpy()
    assert stats.kstest(values[:4000], "uniform", args=(1.0, 69.0)).pvalue > 1e-3
    noise = ds[0]["noise"][ds[0]["static"]]
    assert torch.allclose(noise, torch.tensor(69.0 / math.sqrt(12)))
    assert bool(ds[0]["mask"][ds[0]["static"]].all())


@pytest.mark.parametrize("cls", [SyntheticCamVid, SyntheticMake3D])
def test_ood_variant_differs_in_input_statistics(cls):
    def colour_balance(ood: bool) -> np.ndarray:  # per image: mean red minus mean blue
        ds = cls(
            n=40, size=(30, 40), seed=10, ood=ood, normalize=None, static_fraction=0.0, dusk_fraction=0.0
        )
        return np.array([float(it["image"][0].mean() - it["image"][2].mean()) for it in items(ds)])

    inside, outside = colour_balance(False), colour_balance(True)
    auroc = roc_auc_score(np.r_[np.zeros(40), np.ones(40)], np.r_[inside, outside])
    assert auroc > 0.95  # one colour statistic separates indoor rooms from streets
    assert cls(n=1, size=(30, 40), ood=True)[0]["ood"] is True


def test_ood_depth_is_indoor_range():
    streets = [
        it["clean_target"][it["mask"]].median()
        for it in items(SyntheticMake3D(n=10, size=(32, 24), static_fraction=0))
    ]
    rooms = [
        it["clean_target"][it["mask"]].median()
        for it in items(SyntheticMake3D(n=10, size=(32, 24), static_fraction=0, ood=True))
    ]
    assert max(rooms) < 10 < np.median(streets)


def test_bad_arguments_name_the_argument():
    with pytest.raises(DubitoError, match="static_fraction"):
        SyntheticCamVid(static_fraction=1.5)
    with pytest.raises(DubitoError, match="split"):
        SyntheticCamVid("dev")
    with pytest.raises(DubitoError, match="size"):
        SyntheticCamVid(size=(4, 100))
    with pytest.raises(IndexError):
        SyntheticCamVid(n=2, size=(16, 16))[2]


def test_class_weights_follow_the_documented_frequencies():
    w = SyntheticCamVid(n=1).class_weights()
    f = torch.tensor(SYNTHETIC_CAMVID_FREQUENCIES)
    assert torch.allclose(w * f, torch.full_like(f, float(f.median())), rtol=1e-4)  # median / f_c


def test_negative_seed_is_refused():
    with pytest.raises(DubitoError, match="seed must be >= 0"):
        SyntheticCamVid(seed=-1)
