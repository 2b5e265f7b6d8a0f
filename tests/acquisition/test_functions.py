"""Acquisition scores against direct numpy computations; reductions against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dubito import DubitoError
from dubito.acquisition.functions import ACQUISITIONS, Acquisition, get_acquisition
from dubito.acquisition.reductions import REDUCTIONS, parse_reduction, reduce_scores
from dubito.platform.uncertainty import classification_uncertainty, regression_uncertainty

T, N, C, H, W = 7, 3, 4, 5, 6


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_entropy(p, axis):
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=axis)


@pytest.fixture(scope="module")
def seg():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (T, N, C, H, W))
    probs = np_softmax(logits, axis=2)
    u = classification_uncertainty(torch.from_numpy(probs), torch.from_numpy(logits))
    return probs, logits, u


@pytest.fixture(scope="module")
def reg():
    rng = np.random.default_rng(1)
    means = rng.normal(0, 1, (T, N, 2, H, W))
    log_var = rng.normal(-1, 0.5, (T, N, 2, H, W))
    u = regression_uncertainty(torch.from_numpy(means), torch.from_numpy(log_var))
    epistemic = means.var(axis=0)
    aleatoric = np.exp(log_var).mean(axis=0)
    return u, epistemic, aleatoric


def score(name, u, **options):
    return get_acquisition(name, **options).score(u).numpy()


def test_classification_scores_match_numpy(seg):
    probs, logits, u = seg
    mean = probs.mean(0)
    predictive = np_entropy(mean, axis=1)
    aleatoric = np_entropy(probs, axis=2).mean(0)
    bald = predictive - aleatoric
    assert (bald >= -1e-12).all() and bald.max() > 0.05
    ordered = np.sort(mean, axis=1)
    votes = probs.argmax(axis=2)
    modal = np.stack([(votes == c).sum(0) for c in range(C)], axis=1).max(axis=1)
    expected = {
        "entropy": predictive,
        "bald": bald,
        "aleatoric": aleatoric,
        "epistemic": bald,
        "margin": 1 - (ordered[:, -1] - ordered[:, -2]),
        "least_confidence": 1 - ordered[:, -1],
        "variation_ratio": 1 - modal / T,
    }
    for name, want in expected.items():
        got = score(name, u)
        assert got.shape == (N, H, W), name
        np.testing.assert_allclose(got, want, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(score("bald", u), np.clip(bald, 0, None), atol=1e-10)
    got = score("epistemic", u, logit_variance=True)
    np.testing.assert_allclose(got, logits.var(axis=0).mean(axis=1), rtol=1e-10)


def test_image_classification_scores_are_per_image():
    rng = np.random.default_rng(2)
    probs = np_softmax(rng.normal(0, 1, (T, 9, C)), axis=2)
    u = classification_uncertainty(torch.from_numpy(probs))
    ordered = np.sort(probs.mean(0), axis=1)
    np.testing.assert_allclose(score("margin", u), 1 - (ordered[:, -1] - ordered[:, -2]), atol=1e-12)
    for name, acq in ACQUISITIONS.items():
        if "classification" in acq.kinds:
            out = acq.score(u, generator=torch.Generator().manual_seed(0))
            assert out.shape == (9,), name


def test_regression_scores_match_numpy(reg):
    u, epistemic, aleatoric = reg
    total = epistemic + aleatoric
    expected = {
        "entropy": (0.5 * np.log(2 * math.pi * math.e * total)).mean(1),
        "bald": (0.5 * np.log(total / aleatoric)).mean(1),
        "aleatoric": aleatoric.mean(1),
        "epistemic": epistemic.mean(1),
        "total_variance": total.mean(1),
    }
    for name, want in expected.items():
        got = score(name, u)
        assert got.shape == (N, H, W), name
        np.testing.assert_allclose(got, want, rtol=1e-10, err_msg=name)
    assert (score("bald", u) >= 0).all()


def test_regression_vectors_and_no_aleatoric_head():
    rng = np.random.default_rng(3)
    means = rng.normal(0, 1, (T, 8, 3))
    u = regression_uncertainty(torch.from_numpy(means))  # no aleatoric head: aleatoric_var == 0
    np.testing.assert_allclose(score("bald", u), means.var(axis=0).mean(1), rtol=1e-12)
    assert "epistemic_var" in ACQUISITIONS["bald"].doc
    np.testing.assert_allclose(score("total_variance", u), means.var(axis=0).mean(1), rtol=1e-12)
    u1 = regression_uncertainty(torch.from_numpy(means[..., 0]))
    assert score("entropy", u1).shape == (8,)
    assert np.isfinite(score("entropy", regression_uncertainty(torch.zeros(3, 4)))).all()


def test_random_is_seeded_uniform_and_needs_a_generator(seg, reg):
    _, _, u = seg
    acq = get_acquisition("random")
    a = acq.score(u, generator=torch.Generator().manual_seed(5))
    b = acq.score(u, generator=torch.Generator().manual_seed(5))
    c = acq.score(u, generator=torch.Generator().manual_seed(6))
    assert a.shape == (N, H, W)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a >= 0).all() and (a < 1).all() and a.std() > 0.1
    assert acq.score(reg[0], generator=torch.Generator().manual_seed(0)).shape == (N, H, W)
    with pytest.raises(DubitoError, match="random.*Generator"):
        acq.score(u)


@pytest.mark.parametrize("name", sorted(ACQUISITIONS))
def test_kinds_are_honoured(name, seg, reg):
    acq = ACQUISITIONS[name]
    assert isinstance(acq, Acquisition) and acq.name == name and acq.doc
    gen = torch.Generator().manual_seed(0)
    for kind, u in (("classification", seg[2]), ("regression", reg[0])):
        if kind in acq.kinds:
            assert acq.score(u, generator=gen).shape == (N, H, W)
        else:
            with pytest.raises(DubitoError, match=rf"{name}.*{kind}"):
                acq.score(u, generator=gen)


def test_registry_errors_and_options(seg, reg):
    with pytest.raises(DubitoError, match="unknown acquisition 'bold'.*bald.*margin"):
        get_acquisition("bold")
    with pytest.raises(DubitoError, match="logit_variance"):
        get_acquisition("epistemic", logit_varience=True)
    with pytest.raises(DubitoError, match="no options"):
        get_acquisition("margin", logit_variance=True)
    with pytest.raises(DubitoError, match="Uncertainty"):
        get_acquisition("entropy").score(torch.zeros(3))
    variant = get_acquisition("epistemic", logit_variance=True)
    assert variant.name == "epistemic(logit_variance)" and variant != get_acquisition("epistemic")
    assert get_acquisition("epistemic", logit_variance=False) is ACQUISITIONS["epistemic"]
    assert get_acquisition(variant.name) is variant
    no_logits = classification_uncertainty(torch.from_numpy(seg[0]))
    with pytest.raises(DubitoError, match="logit"):
        variant.score(no_logits)
    with pytest.raises(DubitoError, match="regression"):
        variant.score(reg[0])


# --- reductions ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def maps():
    rng = np.random.default_rng(4)
    scores = rng.random((4, 9, 11))
    mask = rng.random((4, 9, 11)) > 0.3
    mask[2] = False  # an image without valid pixels
    mask[3, :5] = False
    classes = rng.integers(0, 3, (4, 9, 11))
    return scores, mask, classes


def run(scores, mask, how, classes=None, **kw):
    return reduce_scores(
        torch.from_numpy(scores),
        None if mask is None else torch.from_numpy(mask),
        how,
        classes=None if classes is None else torch.from_numpy(classes),
        **kw,
    ).numpy()


@pytest.mark.parametrize("how", REDUCTIONS)
def test_masked_pixels_never_count(how, maps):
    scores, mask, classes = maps
    base = run(scores, mask, how, classes)
    assert base.shape == (4,)
    changed = np.where(mask, scores, 1e6)
    other_classes = np.where(mask, classes, 7)
    np.testing.assert_array_equal(run(changed, mask, how, other_classes, num_classes=8), base)
    assert base[2] == 0.0
    assert (base[[0, 1, 3]] > 0).all()


def test_mean_max_topq_against_numpy(maps):
    scores, mask, _ = maps
    for i in range(4):
        vals = scores[i][mask[i]]
        got = {how: run(scores, mask, how, q=0.07)[i] for how in ("mean", "max", "topq")}
        if vals.size == 0:
            assert got == {"mean": 0.0, "max": 0.0, "topq": 0.0}
            continue
        assert got["mean"] == pytest.approx(vals.mean())
        assert got["max"] == pytest.approx(vals.max())
        take = max(1, math.ceil(round(0.07 * vals.size, 9)))
        assert got["topq"] == pytest.approx(np.sort(vals)[::-1][:take].mean())
    # q·n exactly an integer: 0.07·100 = 7.000000000000001 takes 7 pixels, not 8
    flat = np.arange(100, dtype=np.float64).reshape(1, 10, 10)
    assert run(flat, None, "topq", q=0.07)[0] == pytest.approx(np.arange(93, 100).mean())
    assert run(flat, None, "topq", q=1e-6)[0] == 99.0  # at least one pixel
    assert run(flat, None, "topq", q=1.0)[0] == pytest.approx(flat.mean())


def test_vectors_pass_through():
    s = torch.tensor([0.3, 0.1])
    assert reduce_scores(s, how="grid") is s


def test_class_balanced_by_hand():
    scores = np.array([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
    classes = np.array([[[0, 0, 0], [0, 2, 5]]])
    mask = np.array([[[True, True, True], [True, True, False]]])
    # class 0: mean(1,2,3,4) = 2.5; class 2: 5; class 5 only at a void pixel → absent
    assert run(scores, mask, "class_balanced", classes)[0] == pytest.approx((2.5 + 5.0) / 2)
    assert run(scores, None, "class_balanced", classes)[0] == pytest.approx((2.5 + 5.0 + 6.0) / 3)
    assert run(scores, None, "mean")[0] == pytest.approx(3.5)


def test_grid_by_hand():
    rng = np.random.default_rng(5)
    scores = rng.random((2, 5, 6))
    mask = np.ones((2, 5, 6), dtype=bool)
    scores[1, 3:, 3:] = 50.0  # the best cell of image 1 ...
    mask[1, 3:, 3:] = False  # ... is void, so it must not win
    rows, cols = [slice(0, 3), slice(3, 5)], [slice(0, 3), slice(3, 6)]  # ⌊h·2/5⌋, ⌊w·2/6⌋
    for i in range(2):
        cells = [scores[i, r, c][mask[i, r, c]] for r in rows for c in cols]
        want = max(cell.mean() for cell in cells if cell.size)
        assert run(scores, mask, "grid", grid=2)[i] == pytest.approx(want)
    # more cells than pixels: empty cells are skipped; each pixel is its own cell → the max
    assert run(scores, mask, "grid", grid=7)[0] == pytest.approx(scores[0].max())
    assert run(scores, None, "grid", grid=1)[0] == pytest.approx(scores[0].mean())


def test_reduction_errors(maps):
    scores, mask, classes = maps
    with pytest.raises(DubitoError, match="how"):
        run(scores, mask, "median")
    with pytest.raises(DubitoError, match="classes"):
        run(scores, mask, "class_balanced")
    with pytest.raises(DubitoError, match="num_classes"):
        run(scores, mask, "class_balanced", classes, num_classes=2)
    with pytest.raises(DubitoError, match="grid"):
        run(scores[:, None], None, "grid")
    with pytest.raises(DubitoError, match="q must"):
        run(scores, mask, "topq", q=0.0)
    with pytest.raises(DubitoError, match="mask"):
        run(scores, mask[:, :3], "topq")


def test_parse_reduction():
    assert parse_reduction("mean") == ("mean", {})
    assert parse_reduction("topq:0.05") == ("topq", {"q": 0.05})
    assert parse_reduction("grid:8") == ("grid", {"grid": 8})
    assert parse_reduction("class_balanced") == ("class_balanced", {})
    for bad in [
        "",
        "median",
        "mean:3",
        "topq:abc",
        "topq:0",
        "topq:1.5",
        "topq:nan",
        "grid:0",
        "grid:2.5",
        "grid:",
    ]:
        with pytest.raises(DubitoError):
            parse_reduction(bad)
