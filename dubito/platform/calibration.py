"""Post-hoc calibration: temperature scaling (classification, segmentation) and variance scaling
(regression, depth), fit on held-out data and applied by the uncertainty service.

- **Temperature scaling** (Guo et al., 2017) divides every sample's logits by one scalar τ
  (a heteroscedastic head's logit noise σ too) before the softmax, so the MC-averaged
  probabilities p̄ = 1/T Σ_t softmax(f_t / τ) change and the predicted class does not. τ
  minimises the negative log-likelihood of p̄ on the held-out pixels (a bounded 1-D search
  over log τ, deterministic: the logit noise is drawn from a fixed seed).
- **Variance scaling** (Levi et al., 2019; Laves et al., 2020) multiplies the predictive
  variance, aleatoric and epistemic parts alike, by one scalar s. Under a Gaussian predictive
  N(μ, s·v) the NLL is minimal at s = mean((y − μ)² / v); under a Laplace one with variance
  s·v (scale b = √(s·v/2)) at √s = mean(|y − μ| / b). Both are closed forms.

A :class:`Calibration` is a pair of scalars: ``dubito evaluate --calibrate`` writes it to
``calibration.json``, and :class:`~dubito.platform.service.UncertaintyService` takes it
(``calibration=``), so the labeling loop's scorer and any caller score calibrated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dubito import DubitoError
from dubito.platform.files import read_json, write_json
from dubito.platform.mc import scaled_softmax
from dubito.platform.uncertainty import RegressionUncertainty

__all__ = [
    "Calibration",
    "fit_calibration",
    "fit_temperature",
    "fit_variance_scale",
    "classification_nll",
    "regression_nll",
]

#: the temperatures searched (log-uniformly): a model 20x too confident or too timid at most
TEMPERATURE_RANGE = (0.05, 20.0)
_TINY = 1e-12


@dataclass(frozen=True)
class Calibration:
    """Scalars that calibrate a model's uncertainty: ``temperature`` divides logits
    (classification), ``variance_scale`` multiplies predictive variances (regression).
    The identity is ``Calibration()``."""

    temperature: float = 1.0
    variance_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "variance_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise DubitoError(f"calibration {name} must be a positive number, got {value!r}")

    def scale(self, u: RegressionUncertainty) -> RegressionUncertainty:
        """``u`` with every variance multiplied by ``variance_scale`` (the mean unchanged)."""
        if self.variance_scale == 1.0:
            return u
        s = self.variance_scale
        return replace(
            u, aleatoric_var=u.aleatoric_var * s, epistemic_var=u.epistemic_var * s, total_var=u.total_var * s
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def of(cls, value: Calibration | Mapping[str, Any] | str | Path | None) -> Calibration | None:
        """A calibration from itself, a dict, or a ``calibration.json`` path (``None`` stays ``None``)."""
        if value is None or isinstance(value, Calibration):
            return value
        where = "calibration"
        if isinstance(value, (str, Path)):
            where = str(value)
            value = read_json(value, "calibration file")
        if not isinstance(value, Mapping):
            raise DubitoError(f"{where}: expected temperature / variance_scale, got {type(value).__name__}")
        unknown = set(value) - {"temperature", "variance_scale", "fit"}
        if unknown:
            raise DubitoError(f"{where}: unknown calibration keys {sorted(unknown)}")
        try:
            return cls(**{k: float(v) for k, v in value.items() if k != "fit"})
        except (TypeError, ValueError):
            raise DubitoError(
                f"{where}: temperature and variance_scale must be numbers, got {dict(value)}"
            ) from None

    def save(self, path: str | Path, fit: dict[str, Any] | None = None) -> Path:
        """Write ``calibration.json`` (``fit``: what it was fit on, kept for the reader)."""
        return write_json(path, {**self.as_dict(), **({"fit": fit} if fit else {})})


def classification_nll(probs: Tensor, target: Tensor) -> Tensor:
    """Per-point −log p[y] of probabilities (M, C) at integer targets (M,)."""
    picked = probs.gather(1, target.long().unsqueeze(1)).squeeze(1)
    return -torch.log(picked.double().clamp_min(_TINY))


def regression_nll(mean: Tensor, var: Tensor, target: Tensor, likelihood: str = "gaussian") -> Tensor:
    """Per-point NLL of ``target`` under a Gaussian (or Laplace) predictive of mean ``mean`` and
    variance ``var`` (the Laplace scale is b = √(var / 2))."""
    var = var.double().clamp_min(_TINY)
    error = target.double() - mean.double()
    if likelihood == "laplace":
        b = (var / 2).sqrt()
        return torch.log(2 * b) + error.abs() / b
    return 0.5 * (torch.log(2 * math.pi * var) + error**2 / var)


def fit_temperature(
    logits: Tensor,
    target: Tensor,
    log_var: Tensor | None = None,
    noise_samples: int = 0,
    seed: int = 0,
) -> float:
    """The temperature minimising the NLL of p̄ = 1/T Σ_t softmax(f_t / τ) at ``target``.

    ``logits``: (T, M, C) per-sample logits of M held-out points; ``log_var``: their logit
    noise (heteroscedastic heads), averaged over ``noise_samples`` ε drawn from ``seed``.
    """
    from scipy.optimize import minimize_scalar

    if logits.dim() != 3 or target.shape != logits.shape[1:2]:
        raise DubitoError(
            f"fit_temperature: logits must be (T, M, C) and target (M,), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if target.numel() == 0:
        raise DubitoError("fit_temperature: no held-out points to fit on")
    logits = logits.float()

    def nll(log_t: float) -> float:
        return _mean_nll_classification(logits, log_var, target, noise_samples, seed, math.exp(log_t))

    low, high = (math.log(v) for v in TEMPERATURE_RANGE)
    with torch.no_grad():
        best = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(best.x))


def fit_variance_scale(mean: Tensor, var: Tensor, target: Tensor, likelihood: str = "gaussian") -> float:
    """The factor s of the predictive variance minimising the NLL of ``target`` (closed form:
    mean((y − μ)² / v) for a Gaussian, mean(|y − μ| / b)² with b = √(v/2) for a Laplace)."""
    if target.numel() == 0:
        raise DubitoError("fit_variance_scale: no held-out points to fit on")
    var = var.double().clamp_min(_TINY)
    error = target.double() - mean.double()
    if likelihood == "laplace":
        return float((error.abs() / (var / 2).sqrt()).mean() ** 2)
    return float((error**2 / var).mean())


def fit_calibration(
    service,
    data: Iterable[Mapping[str, Tensor]],
    *,
    max_points: int = 50_000,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Calibration, dict[str, Any]]:
    """Fit the calibration of ``service``'s model on held-out batches ``data`` (dicts with
    ``image``, ``target`` and ``mask``, as dubito's loaders yield): temperature scaling for
    classification tasks, variance scaling for regression. At most ``max_points`` valid pixels
    (a seeded random subset of each batch) are kept, so memory does not grow with the data.
    Returns the calibration and a description of the fit (points, NLL before and after)."""
    from tqdm import tqdm

    if getattr(service, "calibration", None) not in (None, Calibration()):
        raise DubitoError("fit_calibration needs an uncalibrated service (calibration=None)")
    batches = list(data) if not hasattr(data, "__len__") else data
    quota = max(1, max_points // max(1, len(batches)))
    g = torch.Generator().manual_seed(seed)
    kept: dict[str, list[Tensor]] = {}
    for batch in tqdm(batches, desc="fitting calibration", unit="batch", disable=not progress):
        u, out = service.predict_with_samples(batch["image"])
        target, mask = batch["target"], batch["mask"].bool()
        if service.kind == "classification":
            parts = {"logits": _points(out.mean, mask)}
            if out.log_var is not None:
                parts["log_var"] = _points(out.log_var, mask)
        else:
            parts = {
                "mean": u.mean[:, 0].float().cpu()[mask],
                "var": u.total_var[:, 0].float().cpu()[mask],
            }
        parts["target"] = target[mask]
        n = parts["target"].shape[0]
        pick = torch.randperm(n, generator=g)[:quota].sort().values if n > quota else None
        for key, value in parts.items():
            if pick is not None:
                value = value[:, pick] if value.dim() == 3 else value[pick]
            kept.setdefault(key, []).append(value)
    if not kept:
        raise DubitoError("fit_calibration: the held-out data is empty")
    if service.kind == "classification":
        logits = torch.cat(kept["logits"], 1)
        log_var = torch.cat(kept["log_var"], 1) if "log_var" in kept else None
        target = torch.cat(kept["target"])
        noise = service.logit_noise_samples if log_var is not None else 0
        t = fit_temperature(logits, target, log_var, noise, seed)
        before = _mean_nll_classification(logits, log_var, target, noise, seed, 1.0)
        after = _mean_nll_classification(logits, log_var, target, noise, seed, t)
        return Calibration(temperature=t), {
            "points": int(target.numel()),
            "nll_before": before,
            "nll_after": after,
        }
    mean, var, target = (torch.cat(kept[k]) for k in ("mean", "var", "target"))
    if bool((var <= 0).any()):
        raise DubitoError(
            "variance scaling needs a predictive variance, and this model predicts zero variance at some pixels "
            "(no noise head and no MC dropout: a baseline); calibrate a model of variant aleatoric, epistemic or both"
        )
    s = fit_variance_scale(mean, var, target, service.likelihood)
    before = float(regression_nll(mean, var, target, service.likelihood).mean())
    after = float(regression_nll(mean, var * s, target, service.likelihood).mean())
    return Calibration(variance_scale=s), {
        "points": int(target.numel()),
        "nll_before": before,
        "nll_after": after,
    }


def _points(samples: Tensor, mask: Tensor) -> Tensor:
    """(T, N, C, *S) per-sample values at the valid positions ``mask`` (N, *S) → (T, M, C)."""
    samples = samples.float().cpu()
    if samples.dim() > 3:  # images: the class axis last
        samples = samples.movedim(2, -1)
    return samples[:, mask]


def _mean_nll_classification(
    logits: Tensor, log_var: Tensor | None, target: Tensor, noise: int, seed: int, t: float
) -> float:
    p = torch.zeros(logits.shape[1:])
    for j in range(logits.shape[0]):
        g = torch.Generator().manual_seed(seed + j)
        p += scaled_softmax(logits[j], None if log_var is None else log_var[j], noise, g, t)
    return float(classification_nll(p / logits.shape[0], target).mean())
