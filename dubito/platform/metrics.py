"""Evaluation metrics (docs/formulas.md, "Evaluation conventions"), as pure tensor functions
and small streaming accumulators.

Every accumulator keeps only sufficient statistics on the CPU (float64 / int64), so a
test set can be streamed batch by batch, and has ``merge`` to combine the partial
results of several (Ray) workers. The one-shot functions are thin wrappers around the
accumulators, so streaming and one-shot results agree exactly (up to float summation
order). Inputs may be torch tensors or numpy arrays; the arithmetic is done in float64.
Natural logarithms unless stated (depth's log10 term).

- segmentation: :class:`ConfusionMatrix`, :func:`mean_iou`, :func:`pixel_accuracy`
- depth: :class:`DepthMetrics`, :func:`depth_metrics`
- classification calibration: :class:`CalibrationHistogram`,
  :func:`expected_calibration_error`, :func:`reliability_curve`
- regression calibration: :class:`RegressionCalibration`, :func:`regression_calibration`
- uncertainty quality: :class:`UncertaintySample`, :func:`uncertainty_curve`,
  :func:`sparsification`, :func:`ause`
- OOD detection: :func:`auroc`
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from dubito import DubitoError
from dubito.platform.uncertainty import LIKELIHOODS

__all__ = [
    "ConfusionMatrix",
    "mean_iou",
    "pixel_accuracy",
    "DEPTH_EPS",
    "DepthMetrics",
    "depth_metrics",
    "CalibrationHistogram",
    "expected_calibration_error",
    "reliability_curve",
    "RegressionCalibration",
    "regression_calibration",
    "UncertaintySample",
    "uncertainty_curve",
    "sparsification",
    "ause",
    "auroc",
]

DEPTH_EPS = 1e-6
"""Predicted depths ≤ this are clamped to it in the log10 and ratio (δ) terms."""


# ---------------------------------------------------------------------------- helpers


def _tensor(x: Tensor | np.ndarray, name: str, where: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as err:
        raise DubitoError(f"{where}: {name} must be a tensor or array, got {type(x).__name__}") from err


def _same_shape(a: Tensor, b: Tensor, names: tuple[str, str], where: str) -> None:
    if a.shape != b.shape:
        raise DubitoError(
            f"{where}: {names[0]} has shape {tuple(a.shape)} but {names[1]} has shape "
            f"{tuple(b.shape)}; they must match"
        )


def _mask(mask: Tensor | np.ndarray | None, like: Tensor, where: str) -> Tensor:
    """``mask`` as a bool tensor of ``like``'s shape and device (all true when None)."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    mask = _tensor(mask, "mask", where).to(device=like.device, dtype=torch.bool)
    try:
        return torch.broadcast_to(mask, like.shape)
    except RuntimeError as err:
        raise DubitoError(
            f"{where}: mask of shape {tuple(mask.shape)} does not broadcast to shape {tuple(like.shape)}"
        ) from err


def _integer(x: Tensor, name: str, where: str) -> Tensor:
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise DubitoError(f"{where}: {name} must hold integer class indices, got dtype {x.dtype}")
    return x.long()


def _positive_int(value: int, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DubitoError(f"{where}: {name} must be an integer >= 1, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------- segmentation


class ConfusionMatrix:
    """Streaming confusion matrix for semantic segmentation.

    ``matrix[i, j]`` counts pixels of true class ``i`` predicted as ``j`` (C, C), int64.
    A pixel is skipped when its target equals ``ignore_index``, lies outside
    ``[0, num_classes)`` or ``mask`` is false there. A counted pixel whose prediction lies
    outside ``[0, num_classes)`` is an error.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        self.num_classes = _positive_int(num_classes, "num_classes", "ConfusionMatrix")
        self.ignore_index = ignore_index
        self._matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @property
    def matrix(self) -> Tensor:
        """(C, C) int64 counts, rows = true class, columns = predicted class (a copy)."""
        return self._matrix.clone()

    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> ConfusionMatrix:
        """Add a batch. ``pred``, ``target``: integer tensors of equal (any) shape;
        ``mask``: bool, broadcastable to it (true = counts)."""
        where = "ConfusionMatrix.update"
        pred = _integer(_tensor(pred, "pred", where), "pred", where)
        target = _integer(_tensor(target, "target", where), "target", where).to(pred.device)
        _same_shape(pred, target, ("pred", "target"), where)
        c = self.num_classes
        valid = _mask(mask, target, where) & (target >= 0) & (target < c)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        p, t = pred[valid], target[valid]
        bad = (p < 0) | (p >= c)
        if bool(bad.any()):
            raise DubitoError(
                f"{where}: pred holds class {int(p[bad][0])} outside [0, {c}) at a counted pixel"
            )
        counts = torch.bincount(t * c + p, minlength=c * c).reshape(c, c)
        self._matrix += counts.cpu()
        return self

    def iou(self) -> tuple[Tensor, float]:
        """Per-class IoU = TP / (TP + FP + FN), (C,) float64, NaN for classes absent from
        both target and prediction; and their mean over the other classes (NaN if none)."""
        m = self._matrix.to(torch.float64)
        tp = m.diagonal()
        denom = m.sum(0) + m.sum(1) - tp
        per_class = torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, math.nan))
        return per_class, float(torch.nanmean(per_class))

    def pixel_accuracy(self) -> float:
        """Fraction of counted pixels predicted correctly (NaN if none were counted)."""
        total = int(self._matrix.sum())
        return float(self._matrix.diagonal().sum()) / total if total else math.nan

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix with the same number of classes (e.g. from a Ray worker)."""
        if not isinstance(other, ConfusionMatrix) or other.num_classes != self.num_classes:
            raise DubitoError(
                f"ConfusionMatrix.merge: other must be a ConfusionMatrix with num_classes={self.num_classes}"
            )
        self._matrix += other._matrix
        return self

    def reset(self) -> ConfusionMatrix:
        self._matrix.zero_()
        return self


def mean_iou(
    pred: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, float]:
    """Per-class IoU (C,) (NaN for absent classes) and its nan-mean; see :class:`ConfusionMatrix`."""
    return ConfusionMatrix(num_classes, ignore_index).update(pred, target, mask).iou()


def pixel_accuracy(
    pred: Tensor, target: Tensor, ignore_index: int | None = None, mask: Tensor | None = None
) -> float:
    """Fraction of valid pixels with ``pred == target`` (NaN if none are valid).

    Valid: ``mask`` true, ``target != ignore_index`` and ``target >= 0`` (negative labels
    are void, as in :class:`ConfusionMatrix`). ``pred``, ``target``: integer, equal shapes.
    """
    where = "pixel_accuracy"
    pred = _integer(_tensor(pred, "pred", where), "pred", where)
    target = _integer(_tensor(target, "target", where), "target", where).to(pred.device)
    _same_shape(pred, target, ("pred", "target"), where)
    valid = _mask(mask, target, where) & (target >= 0)
    if ignore_index is not None:
        valid &= target != ignore_index
    total = int(valid.sum())
    return int((valid & (pred == target)).sum()) / total if total else math.nan


# ------------------------------------------------------------------------------ depth

_DEPTH_KEYS = ("rel", "rms", "log10", "delta1", "delta2", "delta3")


class DepthMetrics:
    """Streaming depth metrics, pixel-pooled (docs/formulas.md):

    ``rel = mean |d̂−d|/d``, ``rms = sqrt(mean (d̂−d)²)``, ``log10 = mean |log10 d̂ − log10 d|``,
    ``delta_k`` = fraction with ``max(d̂/d, d/d̂) < 1.25^k`` (k = 1, 2, 3).

    Valid pixels: ``mask`` true, ``target > 0``, and both target and prediction finite.
    Predicted depths ≤ :data:`DEPTH_EPS` (1e-6) are clamped to it in the log10 and δ
    terms only (rel and rms use the raw prediction).
    """

    def __init__(self) -> None:
        self._sums = torch.zeros(6, dtype=torch.float64)  # |e|/d, e², |Δlog10|, δ1, δ2, δ3
        self.count = 0

    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> DepthMetrics:
        """Add a batch: ``pred``, ``target`` of equal (any) shape, ``mask`` broadcastable."""
        where = "DepthMetrics.update"
        pred = _tensor(pred, "pred", where)
        target = _tensor(target, "target", where).to(pred.device)
        _same_shape(pred, target, ("pred", "target"), where)
        valid = _mask(mask, target, where) & torch.isfinite(target) & (target > 0) & torch.isfinite(pred)
        d_hat = pred[valid].to(torch.float64)
        d = target[valid].to(torch.float64)
        clamped = d_hat.clamp_min(DEPTH_EPS)
        ratio = torch.maximum(clamped / d, d / clamped)
        sums = torch.stack(
            [
                ((d_hat - d).abs() / d).sum(),
                (d_hat - d).square().sum(),
                (torch.log10(clamped) - torch.log10(d)).abs().sum(),
                (ratio < 1.25).sum().to(torch.float64),
                (ratio < 1.25**2).sum().to(torch.float64),
                (ratio < 1.25**3).sum().to(torch.float64),
            ]
        )
        self._sums += sums.cpu()
        self.count += int(d.numel())
        return self

    def compute(self) -> dict[str, float]:
        """``{rel, rms, log10, delta1, delta2, delta3}`` over all valid pixels seen (NaN if none)."""
        if self.count == 0:
            return {k: math.nan for k in _DEPTH_KEYS}
        m = (self._sums / self.count).tolist()
        return {
            "rel": m[0],
            "rms": math.sqrt(m[1]),
            "log10": m[2],
            "delta1": m[3],
            "delta2": m[4],
            "delta3": m[5],
        }

    def merge(self, other: DepthMetrics) -> DepthMetrics:
        if not isinstance(other, DepthMetrics):
            raise DubitoError(f"DepthMetrics.merge: other must be a DepthMetrics, got {type(other).__name__}")
        self._sums += other._sums
        self.count += other.count
        return self

    def reset(self) -> DepthMetrics:
        self._sums.zero_()
        self.count = 0
        return self


def depth_metrics(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Depth metrics of one set of maps; see :class:`DepthMetrics` for definitions."""
    return DepthMetrics().update(pred, target, mask).compute()


# ------------------------------------------------------------ classification calibration


class CalibrationHistogram:
    """Streaming reliability histogram: ``bins`` equal-width confidence bins on [0, 1].

    Bin ``b`` holds confidences in ``[b/B, (b+1)/B)``; the last bin also holds 1.
    Per bin it keeps the count, the sum of confidences and the number correct.
    """

    def __init__(self, bins: int = 15) -> None:
        self.bins = _positive_int(bins, "bins", "CalibrationHistogram")
        self.count = torch.zeros(self.bins, dtype=torch.int64)
        self.confidence_sum = torch.zeros(self.bins, dtype=torch.float64)
        self.correct_sum = torch.zeros(self.bins, dtype=torch.float64)

    def update(
        self,
        probs: Tensor,
        target: Tensor,
        ignore_index: int | None = None,
        mask: Tensor | None = None,
    ) -> CalibrationHistogram:
        """Add a batch.

        Args:
            probs: class probabilities (N, C, ...), class axis 1.
            target: class indices (N, ...).
            ignore_index: target value that does not count (void).
            mask: valid pixels (N, ...) or broadcastable; targets outside [0, C) are skipped.
        Confidence = max probability; correct = argmax == target.
        """
        where = "CalibrationHistogram.update"
        probs = _tensor(probs, "probs", where)
        if probs.dim() < 2:
            raise DubitoError(f"{where}: probs must be (N, C, ...), got shape {tuple(probs.shape)}")
        target = _integer(_tensor(target, "target", where), "target", where).to(probs.device)
        expected = probs.shape[:1] + probs.shape[2:]
        if target.shape != expected:
            raise DubitoError(
                f"{where}: target has shape {tuple(target.shape)} but probs {tuple(probs.shape)} "
                f"needs {tuple(expected)}"
            )
        c = probs.shape[1]
        valid = _mask(mask, target, where) & (target >= 0) & (target < c)
        if ignore_index is not None:
            valid &= target != ignore_index
        conf, pred = probs.max(1)
        conf, correct = conf[valid].to(torch.float64), (pred == target)[valid]
        if conf.numel() and (
            bool(torch.isnan(conf).any()) or float(conf.max()) > 1 + 1e-6 or float(conf.min()) < 0
        ):
            raise DubitoError(f"{where}: probs must be probabilities in [0, 1] (were logits passed?)")
        idx = (conf * self.bins).floor().long().clamp(0, self.bins - 1)
        self.count += torch.bincount(idx, minlength=self.bins).cpu()
        self.confidence_sum += torch.bincount(idx, weights=conf, minlength=self.bins).cpu()
        self.correct_sum += torch.bincount(idx, weights=correct.to(torch.float64), minlength=self.bins).cpu()
        return self

    def ece(self) -> float:
        """``Σ_b (n_b/N) |acc_b − conf_b|`` (NaN if nothing was counted)."""
        total = int(self.count.sum())
        if total == 0:
            return math.nan
        return float((self.correct_sum - self.confidence_sum).abs().sum()) / total

    def reliability(self) -> dict[str, Tensor]:
        """``bin_edges`` (B+1,), mean ``confidence`` (B,), ``accuracy`` (B,) (both NaN for
        empty bins) and ``count`` (B,) int64."""
        n = self.count.to(torch.float64)
        nan = torch.full_like(n, math.nan)
        return {
            "bin_edges": torch.linspace(0, 1, self.bins + 1, dtype=torch.float64),
            "confidence": torch.where(n > 0, self.confidence_sum / n.clamp_min(1), nan),
            "accuracy": torch.where(n > 0, self.correct_sum / n.clamp_min(1), nan),
            "count": self.count.clone(),
        }

    def merge(self, other: CalibrationHistogram) -> CalibrationHistogram:
        if not isinstance(other, CalibrationHistogram) or other.bins != self.bins:
            raise DubitoError(
                f"CalibrationHistogram.merge: other must be a CalibrationHistogram with bins={self.bins}"
            )
        self.count += other.count
        self.confidence_sum += other.confidence_sum
        self.correct_sum += other.correct_sum
        return self

    def reset(self) -> CalibrationHistogram:
        self.count.zero_()
        self.confidence_sum.zero_()
        self.correct_sum.zero_()
        return self


def expected_calibration_error(
    probs: Tensor,
    target: Tensor,
    bins: int = 15,
    ignore_index: int | None = None,
    mask: Tensor | None = None,
) -> float:
    """ECE with ``bins`` equal-width bins; ``probs`` (N, C, ...), ``target`` (N, ...)."""
    return CalibrationHistogram(bins).update(probs, target, ignore_index, mask).ece()


def reliability_curve(
    probs: Tensor,
    target: Tensor,
    bins: int = 15,
    ignore_index: int | None = None,
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Reliability diagram data; see :meth:`CalibrationHistogram.reliability`."""
    return CalibrationHistogram(bins).update(probs, target, ignore_index, mask).reliability()


# ---------------------------------------------------------------- regression calibration


class RegressionCalibration:
    """Streaming coverage of predicted central intervals at nominal ``levels`` (L,).

    ``var`` is the predictive variance. Gaussian: interval ``mean ± z·sqrt(var)`` with
    ``z = Φ⁻¹((1+level)/2)``. Laplace (variance ``2b²``, so ``b = sqrt(var/2)``):
    ``mean ± b·(−ln(1−level))``. Intervals are closed. Levels default to
    ``linspace(0.05, 0.95, 19)`` and must lie in (0, 1).
    """

    def __init__(self, levels: Tensor | None = None, likelihood: str = "gaussian") -> None:
        where = "RegressionCalibration"
        if likelihood not in LIKELIHOODS:
            raise DubitoError(f"{where}: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if levels is None:
            levels = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
        levels = _tensor(levels, "levels", where).to(device="cpu", dtype=torch.float64).reshape(-1)
        if levels.numel() == 0 or bool(((levels <= 0) | (levels >= 1) | torch.isnan(levels)).any()):
            raise DubitoError(f"{where}: levels must be a non-empty 1-D tensor with values in (0, 1)")
        self.levels = levels
        self.likelihood = likelihood
        if likelihood == "gaussian":
            self._half_width = torch.special.ndtri((1 + levels) / 2)  # in standard deviations
        else:
            self._half_width = -torch.log1p(-levels)  # in Laplace scales b
        self.inside = torch.zeros(levels.numel(), dtype=torch.int64)
        self.count = 0

    def update(
        self, mean: Tensor, var: Tensor, target: Tensor, mask: Tensor | None = None
    ) -> RegressionCalibration:
        """Add a batch: ``mean``, ``target`` of equal shape, ``var`` (≥ 0) broadcastable to
        it, ``mask`` broadcastable (true = counts; non-finite targets never count)."""
        where = "RegressionCalibration.update"
        mean = _tensor(mean, "mean", where).to(torch.float64)
        target = _tensor(target, "target", where).to(device=mean.device, dtype=torch.float64)
        var = _tensor(var, "var", where).to(device=mean.device, dtype=torch.float64)
        _same_shape(mean, target, ("mean", "target"), where)
        try:
            var = torch.broadcast_to(var, mean.shape)
        except RuntimeError as err:
            raise DubitoError(
                f"{where}: var of shape {tuple(var.shape)} does not broadcast to mean's shape {tuple(mean.shape)}"
            ) from err
        valid = _mask(mask, target, where) & torch.isfinite(target)
        dev, v = (target - mean)[valid].abs(), var[valid]
        if bool((v < 0).any()):
            raise DubitoError(f"{where}: var must be non-negative")
        scale = v.sqrt() if self.likelihood == "gaussian" else (v / 2).sqrt()
        # standardised distance; a zero-width interval holds only an exact hit; NaN never counts
        r = torch.where(scale > 0, dev / scale, torch.where(dev == 0, 0.0, math.inf))
        r = torch.where(torch.isnan(r), math.inf, r)
        r_sorted = r.sort().values
        half_width = self._half_width.to(r.device)
        self.inside += torch.searchsorted(r_sorted, half_width, right=True).cpu()
        self.count += int(r.numel())
        return self

    def observed(self) -> Tensor:
        """Observed coverage at each level, (L,) float64 (NaN if nothing was counted)."""
        if self.count == 0:
            return torch.full_like(self.levels, math.nan)
        return self.inside.to(torch.float64) / self.count

    def error(self) -> float:
        """Mean absolute miscalibration ``mean_l |observed_l − level_l|``."""
        return float((self.observed() - self.levels).abs().mean())

    def merge(self, other: RegressionCalibration) -> RegressionCalibration:
        if (
            not isinstance(other, RegressionCalibration)
            or other.likelihood != self.likelihood
            or not torch.equal(other.levels, self.levels)
        ):
            raise DubitoError("RegressionCalibration.merge: other must have the same levels and likelihood")
        self.inside += other.inside
        self.count += other.count
        return self


def regression_calibration(
    mean: Tensor,
    var: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    likelihood: str = "gaussian",
    levels: Tensor | None = None,
) -> dict[str, Tensor]:
    """``{levels (L,), observed (L,)}``; see :class:`RegressionCalibration`."""
    cal = RegressionCalibration(levels, likelihood).update(mean, var, target, mask)
    return {"levels": cal.levels.clone(), "observed": cal.observed()}


# ------------------------------------------------------------------ uncertainty quality


class UncertaintySample:
    """Streaming uniform random subsample of (uncertainty, error) pairs of valid pixels.

    Each valid point gets an i.i.d. uniform key from a ``torch.Generator`` seeded with
    ``seed``; the ``max_points`` points with the smallest keys are kept (a bottom-k
    reservoir: a uniform sample without replacement of everything seen). Exact — every
    point, in input order — while at most ``max_points`` have been seen; deterministic
    for the same seed and input order. ``merge`` is uniform only when the workers used
    different seeds.
    """

    def __init__(self, max_points: int = 2_000_000, seed: int = 0) -> None:
        self.max_points = _positive_int(max_points, "max_points", "UncertaintySample")
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._chunks: list[Tensor] = []  # (3, n) float64: uncertainty, error, key
        self._buffered = 0
        self.seen = 0

    def update(self, uncertainty: Tensor, error: Tensor, mask: Tensor | None = None) -> UncertaintySample:
        """Add equal-shape maps; points where ``mask`` is false or either value is
        non-finite are dropped."""
        where = "UncertaintySample.update"
        u = _tensor(uncertainty, "uncertainty", where)
        e = _tensor(error, "error", where).to(u.device)
        _same_shape(u, e, ("uncertainty", "error"), where)
        valid = _mask(mask, u, where) & torch.isfinite(u) & torch.isfinite(e)
        u = u[valid].to(device="cpu", dtype=torch.float64)
        e = e[valid].to(device="cpu", dtype=torch.float64)
        n = u.numel()
        if n == 0:
            return self
        keys = torch.rand(n, generator=self._generator, dtype=torch.float64)
        self._chunks.append(torch.stack([u, e, keys]))
        self._buffered += n
        self.seen += n
        if self._buffered > 2 * self.max_points:
            self._compact()
        return self

    def _compact(self) -> Tensor:
        data = torch.cat(self._chunks, dim=1) if len(self._chunks) != 1 else self._chunks[0]
        if data.shape[1] > self.max_points:
            keep = torch.topk(data[2], self.max_points, largest=False, sorted=False).indices.sort().values
            data = data[:, keep]
        self._chunks = [data]
        self._buffered = data.shape[1]
        return data

    def points(self) -> tuple[Tensor, Tensor]:
        """The kept ``(uncertainty, error)``, each 1-D float64 (in the order seen)."""
        if not self._chunks:
            empty = torch.zeros(0, dtype=torch.float64)
            return empty, empty.clone()
        data = self._compact()
        return data[0].clone(), data[1].clone()

    def merge(self, other: UncertaintySample) -> UncertaintySample:
        """Pool another sample's points (keys included) and keep the ``max_points`` smallest keys."""
        if not isinstance(other, UncertaintySample):
            raise DubitoError(
                f"UncertaintySample.merge: other must be an UncertaintySample, got {type(other).__name__}"
            )
        self._chunks.extend(c.clone() for c in other._chunks)
        self._buffered += other._buffered
        self.seen += other.seen
        self._compact()
        return self


def _flat_pair(uncertainty: Tensor, error: Tensor, where: str) -> tuple[Tensor, Tensor]:
    u = _tensor(uncertainty, "uncertainty", where)
    e = _tensor(error, "error", where).to(u.device)
    _same_shape(u, e, ("uncertainty", "error"), where)
    u, e = u.reshape(-1).to(torch.float64), e.reshape(-1).to(torch.float64)
    if u.numel() == 0:
        raise DubitoError(f"{where}: uncertainty and error are empty")
    if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(e).all())):
        raise DubitoError(f"{where}: uncertainty and error must be finite")
    return u, e


def _kept(fractions: Tensor, n: int, eps: float = 0.0) -> Tensor:
    """Points kept after removing ``fractions``: floor((1−f)·n), at least 1, with a slack
    of ``1e-9 + 4·eps·n`` against rounding (``eps``: the precision ``fractions`` came in),
    so that e.g. removing 0.3 (even as float32) of 10 points keeps 7."""
    return torch.floor((1 - fractions) * n + (1e-9 + 4 * eps * n)).long().clamp(1, n)


def _remaining_mean(order_key: Tensor, error: Tensor, kept: Tensor) -> Tensor:
    """Mean error of the ``kept`` points with the smallest ``order_key`` (stable ties)."""
    order = torch.sort(order_key, stable=True).indices
    csum = torch.cumsum(error[order], 0)
    kept = kept.to(csum.device)
    return (csum[kept - 1] / kept.to(torch.float64)).cpu()


def uncertainty_curve(
    uncertainty: Tensor, error: Tensor, quantiles: Tensor | None = None
) -> dict[str, Tensor]:
    """Precision–uncertainty curve: remove the most uncertain fraction ``q`` of the
    points and average ``error`` over the rest.

    Pass ``error = 1 − correct`` to get the error rate (1 − accuracy) of the retained
    pixels, or ``correct`` itself to get their accuracy; any per-point value works.

    Args:
        uncertainty, error: equal shapes (flattened), finite.
        quantiles: fractions removed, in [0, 1] (default ``linspace(0, 0.95, 20)``).
    Returns:
        ``{quantiles (Q,), value (Q,)}`` float64. Removing ``q`` keeps the
        ``floor((1−q)·n)`` least uncertain points (at least 1; rounding slack of a few
        ulps of the quantiles' dtype); ties in uncertainty are broken by position
        (stable sort: earlier points count as less uncertain).
    """
    where = "uncertainty_curve"
    u, e = _flat_pair(uncertainty, error, where)
    if quantiles is None:
        quantiles = torch.linspace(0, 0.95, 20, dtype=torch.float64)
    q = _tensor(quantiles, "quantiles", where)
    eps = torch.finfo(q.dtype).eps if q.is_floating_point() else 0.0
    q = q.to(device="cpu", dtype=torch.float64).reshape(-1)
    if bool(((q < 0) | (q > 1) | torch.isnan(q)).any()):
        raise DubitoError(f"{where}: quantiles must lie in [0, 1]")
    return {"quantiles": q, "value": _remaining_mean(u, e, _kept(q, u.numel(), eps))}


def sparsification(uncertainty: Tensor, error: Tensor, steps: int = 20) -> dict[str, Tensor | float]:
    """Sparsification curves and AUSE (Ilg et al. 2018).

    ``fractions = linspace(0, 1, steps+1)`` (steps+1,) of points removed. ``model``:
    mean error of the points left after removing the most uncertain fraction;
    ``oracle``: the same removing the largest errors first. Both keep
    ``floor((1−f)·n)`` points, at least 1, so the last point (f = 1) is the single least
    uncertain point vs. the single smallest error. Both curves are divided by the mean
    error of all points, so they start at 1 (unless every error is 0; then no scaling).
    ``ause`` = trapezoid integral of ``model − oracle`` over the fractions, i.e. over
    [0, 1]; ``oracle ≤ model`` pointwise, so ``ause ≥ 0``.

    Args:
        uncertainty, error: equal shapes (flattened), finite; error ≥ 0.
    """
    where = "sparsification"
    steps = _positive_int(steps, "steps", where)
    u, e = _flat_pair(uncertainty, error, where)
    if bool((e < 0).any()):
        raise DubitoError(f"{where}: error must be non-negative")
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    kept = _kept(fractions, u.numel())
    model = _remaining_mean(u, e, kept)
    oracle = _remaining_mean(e, e, kept)
    scale = float(e.mean())
    if scale > 0:
        model, oracle = model / scale, oracle / scale
    area = float(torch.trapezoid(model - oracle, fractions))
    return {"fractions": fractions, "model": model, "oracle": oracle, "ause": area}


def ause(uncertainty: Tensor, error: Tensor, steps: int = 20) -> float:
    """Area under the sparsification error; see :func:`sparsification`."""
    return float(sparsification(uncertainty, error, steps)["ause"])


# ------------------------------------------------------------------------ OOD detection


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """AUROC with OOD samples as positives, higher score = more OOD.

    Exact: the Mann–Whitney U statistic with average ranks for ties, ``U / (n_in n_out)``
    (a tie between an in- and an out-sample counts ½). Any shapes (flattened); both
    sides non-empty and finite.
    """
    where = "auroc"
    s_in = _tensor(scores_in, "scores_in", where).reshape(-1).to(torch.float64)
    s_out = _tensor(scores_out, "scores_out", where).reshape(-1).to(device=s_in.device, dtype=torch.float64)
    for name, s in (("scores_in", s_in), ("scores_out", s_out)):
        if s.numel() == 0:
            raise DubitoError(f"{where}: {name} is empty")
        if not bool(torch.isfinite(s).all()):
            raise DubitoError(f"{where}: {name} must be finite")
    _, inverse, counts = torch.unique(torch.cat([s_in, s_out]), return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    start = torch.cumsum(counts, 0) - counts  # elements below each distinct value
    avg_rank = start + (counts + 1) / 2  # 1-based average rank of the tied group
    n_in, n_out = s_in.numel(), s_out.numel()
    rank_sum_out = float(avg_rank[inverse[n_in:]].sum())
    u = rank_sum_out - n_out * (n_out + 1) / 2
    return u / (n_in * n_out)
