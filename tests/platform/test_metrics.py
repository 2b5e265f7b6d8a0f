"""Metrics against independent numpy / scipy / scikit-learn computations and hand-made
cases with exactly known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats
from sklearn.metrics import roc_auc_score

from dubito import DubitoError
from dubito.platform.metrics import (
    DEPTH_EPS,
    CalibrationHistogram,
    ConfusionMatrix,
    DepthMetrics,
    RegressionCalibration,
    UncertaintySample,
    auroc,
    ause,
    depth_metrics,
    expected_calibration_error,
    mean_iou,
    pixel_accuracy,
    regression_calibration,
    reliability_curve,
    sparsification,
    uncertainty_curve,
)


def t(a, dtype=torch.float64):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


# ----------------------------------------------------------------------- segmentation


def np_confusion(pred, target, C, ignore_index=None, mask=None):
    valid = (target >= 0) & (target < C)
    if ignore_index is not None:
        valid &= target != ignore_index
    if mask is not None:
        valid &= np.broadcast_to(mask, target.shape)
    m = np.zeros((C, C), dtype=np.int64)
    np.add.at(m, (target[valid], pred[valid]), 1)
    return m


def np_iou(m):
    tp = np.diag(m).astype(float)
    denom = m.sum(0) + m.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    return iou


def random_segmentation(rng, shape, C, void=255):
    target = rng.integers(0, C, size=shape)
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, C, size=shape))
    target = np.where(rng.random(shape) < 0.1, void, target)
    target = np.where(rng.random(shape) < 0.03, -1, target)  # also skipped: outside [0, C)
    return pred, target


def test_confusion_matrix_against_numpy():
    rng = np.random.default_rng(0)
    C = 6
    pred, target = random_segmentation(rng, (3, 17, 23), C)
    mask = rng.random((3, 1, 23)) < 0.8  # broadcastable
    cm = ConfusionMatrix(C, ignore_index=255).update(
        t(pred, torch.long), t(target, torch.long), t(mask, torch.bool)
    )
    expected = np_confusion(pred, target, C, 255, mask)
    assert cm.matrix.dtype == torch.int64 and cm.matrix.shape == (C, C)
    np.testing.assert_array_equal(cm.matrix.numpy(), expected)
    per_class, mean = cm.iou()
    assert per_class.dtype == torch.float64
    np.testing.assert_allclose(per_class.numpy(), np_iou(expected), rtol=1e-12)
    assert mean == pytest.approx(np.nanmean(np_iou(expected)), rel=1e-12)
    assert cm.pixel_accuracy() == pytest.approx(np.trace(expected) / expected.sum(), rel=1e-12)

    per_class2, mean2 = mean_iou(
        t(pred, torch.long), t(target, torch.long), C, ignore_index=255, mask=t(mask, torch.bool)
    )
    assert torch.equal(per_class, per_class2) and mean == mean2
    # numpy inputs are accepted
    per_class3, _ = mean_iou(pred, target, C, ignore_index=255, mask=mask)
    assert torch.equal(per_class, per_class3)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda C: st.tuples(
            st.just(C),
            arrays(np.int64, st.integers(1, 40), elements=st.integers(0, C - 1)),
            st.integers(0, 2**32 - 1),
        )
    )
)
def test_confusion_matrix_hypothesis(args):
    C, pred, seed = args
    rng = np.random.default_rng(seed)
    target = rng.integers(-1, C + 1, size=pred.shape)  # -1 and C are skipped
    cm = ConfusionMatrix(C).update(torch.from_numpy(pred), torch.from_numpy(target))
    expected = np_confusion(pred, target, C)
    np.testing.assert_array_equal(cm.matrix.numpy(), expected)
    np.testing.assert_allclose(cm.iou()[0].numpy(), np_iou(expected), rtol=1e-12)


def test_two_class_hand_made():
    target = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    cm = ConfusionMatrix(2).update(pred, target)
    assert cm.matrix.tolist() == [[3, 1], [0, 4]]
    per_class, mean = cm.iou()
    # class 0: TP 3, FN 1, FP 0 -> 3/4; class 1: TP 4, FP 1 -> 4/5
    assert per_class.tolist() == pytest.approx([0.75, 0.8])
    assert mean == pytest.approx(0.775)
    assert cm.pixel_accuracy() == pytest.approx(7 / 8)
    assert pixel_accuracy(pred, target) == pytest.approx(7 / 8)


def test_streaming_merge_and_reset():
    rng = np.random.default_rng(1)
    C = 4
    batches = [random_segmentation(rng, (2, 9, 11), C) for _ in range(4)]
    one = ConfusionMatrix(C, ignore_index=255)
    one.update(
        torch.from_numpy(np.concatenate([p for p, _ in batches])),
        torch.from_numpy(np.concatenate([g for _, g in batches])),
    )
    streamed = ConfusionMatrix(C, ignore_index=255)
    for p, g in batches:
        streamed.update(torch.from_numpy(p), torch.from_numpy(g))
    assert torch.equal(one.matrix, streamed.matrix)

    a, b = ConfusionMatrix(C, ignore_index=255), ConfusionMatrix(C, ignore_index=255)
    for p, g in batches[:2]:
        a.update(torch.from_numpy(p), torch.from_numpy(g))
    for p, g in batches[2:]:
        b.update(torch.from_numpy(p), torch.from_numpy(g))
    assert torch.equal(a.merge(b).matrix, one.matrix)
    with pytest.raises(DubitoError, match="num_classes"):
        a.merge(ConfusionMatrix(C + 1))
    a.reset()
    assert int(a.matrix.sum()) == 0 and math.isnan(a.pixel_accuracy())


def test_absent_classes_are_nan_and_excluded():
    target = torch.tensor([0, 0, 1, 1, 1])
    pred = torch.tensor([0, 1, 1, 1, 3])  # class 3 only predicted -> IoU 0, class 2 absent -> NaN
    per_class, mean = mean_iou(pred, target, 4)
    assert per_class[0] == pytest.approx(0.5) and per_class[1] == pytest.approx(2 / 4)
    assert math.isnan(per_class[2]) and per_class[3] == 0
    assert mean == pytest.approx((0.5 + 0.5 + 0) / 3)
    per_class, mean = ConfusionMatrix(3).iou()
    assert torch.isnan(per_class).all() and math.isnan(mean)


def test_segmentation_bad_input():
    with pytest.raises(DubitoError, match="num_classes"):
        ConfusionMatrix(0)
    cm = ConfusionMatrix(3, ignore_index=255)
    with pytest.raises(DubitoError, match="pred"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(DubitoError, match="pred"):
        cm.update(torch.tensor([0, -1]), torch.tensor([0, 1]))
    with pytest.raises(DubitoError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(DubitoError, match="integer"):
        cm.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(DubitoError, match="mask"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]), mask=torch.ones(3, dtype=torch.bool))
    # a bad prediction at a skipped pixel is not counted, hence no error
    cm.update(torch.tensor([0, 7]), torch.tensor([0, 255]))
    assert cm.matrix.sum() == 1


def test_pixel_accuracy_against_numpy():
    rng = np.random.default_rng(2)
    pred, target = random_segmentation(rng, (4, 13), 5)
    mask = rng.random((4, 13)) < 0.7
    valid = mask & (target != 255) & (target >= 0)
    assert pixel_accuracy(pred, target, ignore_index=255, mask=mask) == pytest.approx(
        (pred == target)[valid].mean(), rel=1e-12
    )


# ------------------------------------------------------------------------------ depth


def np_depth(pred, target):
    ratio = np.maximum(pred / target, target / pred)
    return {
        "rel": np.mean(np.abs(pred - target) / target),
        "rms": np.sqrt(np.mean((pred - target) ** 2)),
        "log10": np.mean(np.abs(np.log10(pred) - np.log10(target))),
        "delta1": np.mean(ratio < 1.25),
        "delta2": np.mean(ratio < 1.25**2),
        "delta3": np.mean(ratio < 1.25**3),
    }


def test_depth_known_answers():
    d = torch.tensor([[1.0, 2.0], [4.0, 8.0]], dtype=torch.float64)
    m = depth_metrics(2 * d, d)
    assert set(m) == {"rel", "rms", "log10", "delta1", "delta2", "delta3"}
    assert m["rel"] == pytest.approx(1.0)
    assert m["rms"] == pytest.approx(math.sqrt((1 + 4 + 16 + 64) / 4))
    assert m["log10"] == pytest.approx(math.log10(2))
    assert (m["delta1"], m["delta2"], m["delta3"]) == (0, 0, 0)  # 2 > 1.25³ = 1.953
    m = depth_metrics(1.2 * d, d)
    assert m["rel"] == pytest.approx(0.2) and (m["delta1"], m["delta2"], m["delta3"]) == (1, 1, 1)
    m = depth_metrics(10 * d, d)
    assert m["log10"] == pytest.approx(1.0) and m["rel"] == pytest.approx(9.0)
    m = depth_metrics(d / 1.5, d)  # ratio 1.5: not < 1.25, but < 1.5625
    assert (m["delta1"], m["delta2"], m["delta3"]) == (0, 1, 1)
    m = depth_metrics(1.25 * d, d)  # exactly 1.25 (representable): strict inequality
    assert (m["delta1"], m["delta2"], m["delta3"]) == (0, 1, 1)
    m = depth_metrics(d, d)
    assert m == {"rel": 0, "rms": 0, "log10": 0, "delta1": 1, "delta2": 1, "delta3": 1}


def test_depth_mask_invalid_targets_and_clamp():
    target = torch.tensor([1.0, 2.0, 0.0, -1.0, math.nan, math.inf, 5.0])
    pred = torch.tensor([1.2, 2.4, 3.0, 3.0, 3.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, True, True, True, False])
    m = depth_metrics(pred, target, mask)
    assert m["rel"] == pytest.approx(0.2) and m["delta1"] == 1
    assert m["rms"] == pytest.approx(math.sqrt((0.2**2 + 0.4**2) / 2), rel=1e-6)
    # a non-positive prediction is clamped to DEPTH_EPS in the log and ratio terms only
    m = depth_metrics(torch.tensor([0.0, -3.0]), torch.tensor([1.0, 1.0]))
    assert m["log10"] == pytest.approx(-math.log10(DEPTH_EPS))
    assert m["rel"] == pytest.approx((1 + 4) / 2) and m["delta3"] == 0
    assert all(math.isfinite(v) for v in m.values())
    assert all(math.isnan(v) for v in depth_metrics(torch.zeros(3), torch.zeros(3)).values())


def test_depth_against_numpy_streaming_and_merge():
    rng = np.random.default_rng(3)
    target = rng.uniform(0.5, 80, size=(6, 1, 8, 10))
    pred = target * np.exp(rng.normal(0, 0.3, size=target.shape))
    mask = rng.random((6, 1, 8, 10)) < 0.8
    ref = np_depth(pred[mask], target[mask])
    got = depth_metrics(t(pred), t(target), t(mask, torch.bool))
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-10), k
    assert 0 < got["delta1"] < got["delta2"] < got["delta3"] <= 1

    streamed, a, b = DepthMetrics(), DepthMetrics(), DepthMetrics()
    for i in range(6):
        args = (t(pred[i]).float(), t(target[i]).float(), t(mask[i], torch.bool))
        streamed.update(*args)
        (a if i < 3 else b).update(*args)
    assert streamed.count == mask.sum()
    assert a.merge(b).count == streamed.count
    for k in ref:
        assert streamed.compute()[k] == pytest.approx(ref[k], rel=1e-5), k
        assert a.compute()[k] == pytest.approx(streamed.compute()[k], rel=1e-12), k
    with pytest.raises(DubitoError, match="shape"):
        depth_metrics(torch.ones(3), torch.ones(4))


# ------------------------------------------------------------ classification calibration


def np_ece(probs, target, bins):
    conf, pred = probs.max(1), probs.argmax(1)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs((pred[sel] == target[sel]).mean() - conf[sel].mean())
    return ece


def sample_labels(probs: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(probs, 1, generator=g).squeeze(1)


def test_ece_against_numpy_and_reliability():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.full(4, 0.7), size=3000)
    target = rng.integers(0, 4, size=3000)
    assert expected_calibration_error(probs, target, bins=10) == pytest.approx(
        np_ece(probs, target, 10), rel=1e-10
    )
    r = reliability_curve(probs, target, bins=10)
    assert r["bin_edges"].tolist() == pytest.approx(np.linspace(0, 1, 11).tolist())
    assert r["count"].sum() == 3000 and r["count"].dtype == torch.int64
    assert torch.isnan(r["confidence"][:2]).all() and torch.isnan(r["accuracy"][:2]).all()  # conf >= 1/4
    filled = r["count"] > 0
    lo, hi = r["bin_edges"][:-1][filled], r["bin_edges"][1:][filled]
    assert ((r["confidence"][filled] >= lo) & (r["confidence"][filled] <= hi)).all()
    ece_from_curve = float(
        (r["count"][filled].double() / 3000 * (r["accuracy"][filled] - r["confidence"][filled]).abs()).sum()
    )
    assert ece_from_curve == pytest.approx(np_ece(probs, target, 10), rel=1e-10)


def test_ece_calibrated_is_near_zero():
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(2 * torch.randn(200_000, 5, generator=g, dtype=torch.float64), 1)
    target = sample_labels(probs, 6)
    assert expected_calibration_error(probs, target) < 0.01


def test_ece_overconfident_matches_expected_gap():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(200_000, 5, generator=g, dtype=torch.float64)
    true = torch.softmax(logits, 1)
    sharp = torch.softmax(3 * logits, 1)  # over-confident predictor
    target = sample_labels(true, 8)
    ece = expected_calibration_error(sharp, target)
    # the gap with labels replaced by their expectations (the true probability of the argmax)
    conf, pred = sharp.max(1)
    p_correct = true.gather(1, pred[:, None]).squeeze(1)
    idx = (conf * 15).floor().long().clamp(max=14)
    expected = sum(abs(float(p_correct[idx == b].sum() - conf[idx == b].sum())) for b in range(15)) / len(
        conf
    )
    assert expected > 0.1
    assert ece == pytest.approx(expected, abs=0.01)


def test_ece_two_confidence_levels_exact_gap():
    # half the samples claim 0.9 but are right 70% of the time, half claim 0.6 and are right 55%
    n = 20_000
    probs = torch.tensor([[0.9, 0.1]] * n + [[0.6, 0.4]] * n, dtype=torch.float64)
    target = torch.cat([(torch.arange(n) >= 0.7 * n).long(), (torch.arange(n) >= 0.55 * n).long()])
    assert expected_calibration_error(probs, target) == pytest.approx(0.5 * 0.2 + 0.5 * 0.05, abs=1e-9)


def test_calibration_ignore_index_mask_streaming_and_errors():
    rng = np.random.default_rng(9)
    probs = rng.dirichlet(np.ones(3), size=(4, 5, 6)).transpose(0, 3, 1, 2)  # (N, C, H, W)
    target = rng.integers(0, 3, size=(4, 5, 6))
    void = rng.random((4, 5, 6)) < 0.2
    mask = rng.random((4, 5, 6)) < 0.8
    with_void = np.where(void, 11, target)
    flat_p, flat_t = probs.transpose(0, 2, 3, 1).reshape(-1, 3), target.reshape(-1)
    keep = (~void & mask).reshape(-1)
    ref = np_ece(flat_p[keep], flat_t[keep], 15)
    assert expected_calibration_error(probs, with_void, ignore_index=11, mask=mask) == pytest.approx(
        ref, rel=1e-10
    )
    assert reliability_curve(probs, with_void, ignore_index=11, mask=mask)["count"].sum() == keep.sum()

    hist, a, b = CalibrationHistogram(), CalibrationHistogram(), CalibrationHistogram()
    for i in range(4):
        args = (torch.from_numpy(probs[i : i + 1]).float(), torch.from_numpy(with_void[i : i + 1]), 11)
        hist.update(*args, mask=torch.from_numpy(mask[i : i + 1]))
        (a if i < 2 else b).update(*args, mask=torch.from_numpy(mask[i : i + 1]))
    assert hist.ece() == pytest.approx(ref, abs=1e-6)
    assert a.merge(b).ece() == pytest.approx(hist.ece(), rel=1e-12)
    assert torch.equal(a.count, hist.count)

    with pytest.raises(DubitoError, match="bins"):
        CalibrationHistogram(0)
    with pytest.raises(DubitoError, match="target"):
        CalibrationHistogram().update(torch.rand(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(DubitoError, match="logits"):
        CalibrationHistogram().update(5 * torch.randn(4, 3).abs() + 2, torch.zeros(4, dtype=torch.long))
    with pytest.raises(DubitoError, match="bins"):
        a.merge(CalibrationHistogram(10))
    assert math.isnan(CalibrationHistogram().ece())


# ---------------------------------------------------------------- regression calibration


def binomial_tol(levels, n):
    return 4 * np.sqrt(levels * (1 - levels) / n) + 1e-9


def test_gaussian_targets_are_calibrated_and_match_scipy():
    rng = np.random.default_rng(10)
    n = 100_000
    mean = rng.normal(0, 3, size=n)
    var = np.exp(rng.normal(0, 1, size=n))
    target = rng.normal(mean, np.sqrt(var))
    out = regression_calibration(mean, var, target)
    levels = out["levels"].numpy()
    assert levels == pytest.approx(np.linspace(0.05, 0.95, 19))
    observed = out["observed"].numpy()
    assert (np.abs(observed - levels) < binomial_tol(levels, n)).all()
    # independent count with scipy's quantile function
    z = stats.norm.ppf((1 + levels) / 2)
    ref = (np.abs(target - mean)[None] <= z[:, None] * np.sqrt(var)[None]).mean(1)
    np.testing.assert_allclose(observed, ref, atol=1e-12)
    cal = RegressionCalibration().update(t(mean), t(var), t(target))
    assert cal.error() < 0.005


def test_laplace_targets():
    rng = np.random.default_rng(11)
    n = 100_000
    mean = rng.normal(0, 3, size=n)
    var = np.exp(rng.normal(0, 1, size=n))
    b = np.sqrt(var / 2)
    target = rng.laplace(mean, b)
    levels = RegressionCalibration().levels.numpy()
    lap = regression_calibration(mean, var, target, likelihood="laplace")["observed"].numpy()
    assert (np.abs(lap - levels) < binomial_tol(levels, n)).all()
    ref = (np.abs(target - mean)[None] <= stats.laplace.ppf((1 + levels) / 2)[:, None] * b[None]).mean(1)
    np.testing.assert_allclose(lap, ref, atol=1e-12)
    # a Gaussian interval on Laplace data: P(|X| ≤ zσ) = 1 − exp(−z√2) for variance σ²
    gauss = regression_calibration(mean, var, target, likelihood="gaussian")["observed"].numpy()
    analytic = 1 - np.exp(-stats.norm.ppf((1 + levels) / 2) * np.sqrt(2))
    assert (np.abs(gauss - analytic) < binomial_tol(analytic, n)).all()
    assert gauss[0] > levels[0] + 0.02 and gauss[-1] < levels[-1] - 0.005  # misfit at the extremes


def test_overconfident_variance_under_covers():
    rng = np.random.default_rng(12)
    n = 50_000
    mean, var = rng.normal(size=n), np.exp(rng.normal(size=n))
    target = rng.normal(mean, np.sqrt(var))
    cal = RegressionCalibration().update(t(mean), t(var / 4), t(target))
    levels = cal.levels.numpy()
    observed = cal.observed().numpy()
    assert (observed < levels).all()
    analytic = 2 * stats.norm.cdf(stats.norm.ppf((1 + levels) / 2) / 2) - 1
    assert (np.abs(observed - analytic) < binomial_tol(analytic, n)).all()


def test_regression_calibration_streaming_mask_and_errors():
    rng = np.random.default_rng(13)
    mean, target = rng.normal(size=(4, 50)), rng.normal(size=(4, 50))
    var = np.array(0.8)  # homoscedastic, broadcast
    mask = rng.random((4, 50)) < 0.7
    levels = torch.tensor([0.1, 0.5, 0.9])
    one = regression_calibration(mean, var, target, mask=mask, levels=levels)["observed"]
    z = stats.norm.ppf((1 + levels.numpy()) / 2)
    ref = (np.abs(target - mean)[mask][None] <= z[:, None] * np.sqrt(0.8)).mean(1)
    np.testing.assert_allclose(one.numpy(), ref, atol=1e-12)
    a, b = RegressionCalibration(levels), RegressionCalibration(levels)
    for i in range(4):
        (a if i < 2 else b).update(t(mean[i]), t(var), t(target[i]), t(mask[i], torch.bool))
    np.testing.assert_allclose(a.merge(b).observed().numpy(), ref, atol=1e-12)
    assert a.count == mask.sum()
    # zero variance: only exact hits are inside
    hits = RegressionCalibration(levels).update(torch.zeros(4), torch.zeros(4), torch.tensor([0.0, 0, 1, -1]))
    assert hits.observed().tolist() == [0.5, 0.5, 0.5]

    with pytest.raises(DubitoError, match="likelihood"):
        RegressionCalibration(likelihood="cauchy")
    with pytest.raises(DubitoError, match="levels"):
        RegressionCalibration(levels=torch.tensor([0.5, 1.0]))
    with pytest.raises(DubitoError, match="var"):
        RegressionCalibration().update(torch.zeros(3), -torch.ones(3), torch.zeros(3))
    with pytest.raises(DubitoError, match="shape"):
        RegressionCalibration().update(torch.zeros(3), torch.ones(3), torch.zeros(4))
    with pytest.raises(DubitoError, match="levels"):
        a.merge(RegressionCalibration())


# ------------------------------------------------------------------ uncertainty quality


def np_curve(u, e, q):
    order = np.argsort(u, kind="stable")
    keep = max(1, int(math.floor((1 - q) * len(u) + 1e-9)))
    return e[order[:keep]].mean()


def test_uncertainty_curve_against_numpy_with_ties():
    rng = np.random.default_rng(14)
    u = rng.integers(0, 10, size=403).astype(float)  # many ties
    e = rng.random(403)
    q = torch.tensor([0.0, 0.25, 0.5, 0.7, 0.9, 0.99, 1.0], dtype=torch.float64)
    out = uncertainty_curve(u, e, q)
    assert torch.equal(out["quantiles"], q)
    np.testing.assert_allclose(out["value"].numpy(), [np_curve(u, e, float(x)) for x in q], rtol=1e-12)
    assert out["value"][-1] == e[np.argsort(u, kind="stable")[0]]  # q = 1 keeps one point
    default = uncertainty_curve(torch.from_numpy(u), torch.from_numpy(e))
    assert default["quantiles"].tolist() == pytest.approx(np.linspace(0, 0.95, 20).tolist())
    assert default["value"][0] == pytest.approx(e.mean())
    # accuracy and error rate are complementary
    # removing half of 7 points keeps floor(3.5) = 3; removing 30% of 10 keeps 7 (not 6)
    assert uncertainty_curve(torch.arange(7.0), torch.arange(7.0), torch.tensor([0.5]))["value"].item() == 1.0
    for dtype in (torch.float32, torch.float64):
        q3 = torch.tensor([0.3], dtype=dtype)
        assert uncertainty_curve(torch.arange(10.0), torch.arange(10.0), q3)["value"].item() == 3.0
    correct = (rng.random(403) < 0.8).astype(float)
    acc = uncertainty_curve(u, correct)["value"]
    err = uncertainty_curve(u, 1 - correct)["value"]
    np.testing.assert_allclose(acc.numpy(), 1 - err.numpy(), atol=1e-12)


def test_informative_uncertainty_gives_decreasing_error():
    g = torch.Generator().manual_seed(15)
    u = torch.rand(50_000, generator=g, dtype=torch.float64)
    wrong = (torch.rand(50_000, generator=g, dtype=torch.float64) < u**2).double()
    value = uncertainty_curve(u, wrong)["value"]
    assert (value[1:] <= value[:-1]).all()
    assert value[0] == pytest.approx(1 / 3, abs=0.01) and value[-1] < 0.01


def test_sparsification_oracle_random_and_numpy():
    g = torch.Generator().manual_seed(16)
    e = torch.empty(20_000, dtype=torch.float64).exponential_(generator=g)
    perfect = sparsification(e, e)
    assert perfect["fractions"].tolist() == pytest.approx(np.linspace(0, 1, 21).tolist())
    assert torch.equal(perfect["model"], perfect["oracle"]) and perfect["ause"] == 0
    assert perfect["model"][0] == pytest.approx(1.0)

    rand = sparsification(torch.rand(20_000, generator=g), e)
    assert rand["ause"] > 0.3
    assert (rand["oracle"] <= rand["model"] + 1e-12).all()
    assert (rand["model"][:-2] - 1).abs().max() < 0.1  # flat-ish up to 90% removed
    assert ause(torch.rand(20_000, generator=g), e) == pytest.approx(rand["ause"], abs=0.1)

    informative = e + 0.5 * torch.randn(20_000, generator=g, dtype=torch.float64)
    mid = sparsification(informative, e)
    assert 0 < mid["ause"] < rand["ause"]

    # a few points against numpy, and the trapezoid rule
    un, en = informative.numpy(), e.numpy()
    f = mid["fractions"].numpy()
    model = np.array([np_curve(un, en, x) for x in f]) / en.mean()
    oracle = np.array([np_curve(en, en, x) for x in f]) / en.mean()
    np.testing.assert_allclose(mid["model"].numpy(), model, rtol=1e-10)
    np.testing.assert_allclose(mid["oracle"].numpy(), oracle, rtol=1e-10)
    diff = model - oracle
    assert mid["ause"] == pytest.approx(float(((diff[1:] + diff[:-1]) / 2 * np.diff(f)).sum()), rel=1e-10)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 60).flatmap(
        lambda n: st.tuples(
            arrays(np.float64, n, elements=st.integers(0, 5).map(float)),
            arrays(np.float64, n, elements=st.floats(0, 10, allow_nan=False)),
        )
    ),
    st.integers(1, 12),
)
def test_sparsification_invariants(pair, steps):
    u, e = pair
    out = sparsification(u, e, steps=steps)
    assert out["model"].shape == out["oracle"].shape == (steps + 1,)
    assert (out["oracle"] <= out["model"] + 1e-9).all()
    assert out["ause"] >= -1e-12
    if e.mean() > 0:
        assert out["model"][0] == pytest.approx(1.0) and out["oracle"][0] == pytest.approx(1.0)
    # the oracle curve is non-increasing
    assert (out["oracle"][1:] <= out["oracle"][:-1] + 1e-9).all()


def test_curve_errors():
    with pytest.raises(DubitoError, match="shape"):
        uncertainty_curve(torch.ones(3), torch.ones(4))
    with pytest.raises(DubitoError, match="empty"):
        sparsification(torch.ones(0), torch.ones(0))
    with pytest.raises(DubitoError, match="quantiles"):
        uncertainty_curve(torch.ones(3), torch.ones(3), torch.tensor([1.5]))
    with pytest.raises(DubitoError, match="non-negative"):
        sparsification(torch.ones(3), -torch.ones(3))
    with pytest.raises(DubitoError, match="steps"):
        sparsification(torch.ones(3), torch.ones(3), steps=0)
    with pytest.raises(DubitoError, match="finite"):
        uncertainty_curve(torch.tensor([1.0, math.nan]), torch.ones(2))


def test_uncertainty_sample_exact_below_max_points():
    rng = np.random.default_rng(17)
    s = UncertaintySample(max_points=1000)
    us, es = [], []
    for _ in range(3):
        u, e = rng.random((2, 7, 9)), rng.random((2, 7, 9))
        mask = rng.random((2, 7, 9)) < 0.7
        s.update(torch.from_numpy(u).float(), torch.from_numpy(e), torch.from_numpy(mask))
        us.append(u[mask].astype(np.float32)), es.append(e[mask])
    pu, pe = s.points()
    assert pu.dtype == pe.dtype == torch.float64
    np.testing.assert_array_equal(pu.numpy(), np.concatenate(us))
    np.testing.assert_array_equal(pe.numpy(), np.concatenate(es))
    assert s.seen == len(pu)


def test_uncertainty_sample_subsamples_uniformly_and_deterministically():
    g = torch.Generator().manual_seed(18)
    batches = [torch.rand(10_000, generator=g, dtype=torch.float64) for _ in range(20)]
    population = torch.cat(batches)

    def run(seed):
        s = UncertaintySample(max_points=5_000, seed=seed)
        for b in batches:
            s.update(b, 2 * b + 1)
        return s

    s = run(0)
    u, e = s.points()
    assert len(u) == len(e) == 5_000 and s.seen == 200_000
    assert torch.equal(e, 2 * u + 1)  # pairs stay together
    assert torch.isin(u, population).all()
    assert len(torch.unique(u)) == 5_000  # without replacement
    assert torch.equal(run(0).points()[0], u)
    assert not torch.equal(run(1).points()[0], u)
    # mean close to the population mean; both halves of the stream equally represented
    std = float(population.std()) / math.sqrt(5_000)
    assert abs(float(u.mean()) - float(population.mean())) < 4 * std
    first_half = torch.isin(u, population[:100_000]).sum()
    assert abs(int(first_half) - 2_500) < 4 * math.sqrt(5_000 * 0.25)

    a, b = UncertaintySample(max_points=5_000, seed=0), UncertaintySample(max_points=5_000, seed=1)
    for i, batch in enumerate(batches):
        (a if i % 2 else b).update(batch, batch)
    merged = a.merge(b)
    assert merged.seen == 200_000 and len(merged.points()[0]) == 5_000
    with pytest.raises(DubitoError, match="max_points"):
        UncertaintySample(max_points=0)


# ------------------------------------------------------------------------ OOD detection


@settings(max_examples=80, deadline=None)
@given(
    arrays(np.int64, st.integers(1, 40), elements=st.integers(0, 6)),
    arrays(np.int64, st.integers(1, 40), elements=st.integers(0, 6)),
)
def test_auroc_matches_sklearn_with_ties(scores_in, scores_out):
    y = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
    expected = roc_auc_score(y, np.r_[scores_in, scores_out])
    assert auroc(torch.from_numpy(scores_in), torch.from_numpy(scores_out)) == pytest.approx(
        expected, abs=1e-12
    )


def test_auroc_known_values_and_errors():
    rng = np.random.default_rng(19)
    a, b = rng.normal(size=3000), rng.normal(3, 1, size=2000)
    assert auroc(a, b) == pytest.approx(
        roc_auc_score(np.r_[np.zeros(3000), np.ones(2000)], np.r_[a, b]), abs=1e-12
    )
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9, 0.3])) == 1.0
    assert auroc(torch.tensor([0.5, 0.9, 0.3]), torch.tensor([0.1, 0.2])) == 0.0
    assert auroc(torch.ones(5), torch.ones(7)) == 0.5
    assert auroc(rng.normal(size=20_000), rng.normal(size=20_000)) == pytest.approx(0.5, abs=0.015)
    with pytest.raises(DubitoError, match="scores_out"):
        auroc(torch.ones(3), torch.ones(0))
    with pytest.raises(DubitoError, match="scores_in"):
        auroc(torch.tensor([math.nan]), torch.ones(2))
