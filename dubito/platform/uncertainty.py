"""Decomposition of predictive uncertainty into aleatoric and epistemic parts (Kendall & Gal 2017;
docs/formulas.md).

Pure tensor functions over Monte Carlo samples with a leading T axis. Natural
logarithms; variances with ddof 0. Any trailing spatial dimensions are carried through.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from dubito import DubitoError
from dubito.platform.losses import LOG_SCALE_MAX, LOG_SCALE_MIN, LOG_VAR_MAX, LOG_VAR_MIN

__all__ = [
    "ClassificationUncertainty",
    "RegressionUncertainty",
    "classification_uncertainty",
    "regression_uncertainty",
    "entropy",
    "noise_variance",
    "LIKELIHOODS",
]

LIKELIHOODS = ("gaussian", "laplace")


def _float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def entropy(probs: Tensor, dim: int = 1) -> Tensor:
    """Shannon entropy ``−Σ p log p`` along ``dim`` (natural log, 0·log 0 = 0)."""
    probs = _float(probs)
    return -torch.special.xlogy(probs, probs).sum(dim)


def _reduce_per_item(value: Tensor, mask: Tensor | None, reduce: str) -> Tensor:
    """Reduce a (N, ...) map to (N,) over its valid elements."""
    if value.dim() == 1:
        return value
    flat = value.reshape(value.shape[0], -1)
    if mask is None:
        valid = torch.ones_like(flat, dtype=torch.bool)
    else:
        try:
            valid = torch.broadcast_to(mask.to(torch.bool), value.shape).reshape(value.shape[0], -1)
        except RuntimeError as err:
            raise DubitoError(
                f"mask of shape {tuple(mask.shape)} does not match the per-item maps of shape {tuple(value.shape)}"
            ) from err
    if reduce == "mean":
        count = valid.sum(1).clamp_min(1)
        return torch.where(valid, flat, torch.zeros_like(flat)).sum(1) / count
    if reduce == "max":
        low = torch.full_like(flat, float("-inf"))
        out = torch.where(valid, flat, low).amax(1)
        return torch.where(torch.isinf(out), torch.zeros_like(out), out)
    raise DubitoError(f"reduce must be 'mean' or 'max', got {reduce!r}")


class _Fields:
    """Shared behaviour of the uncertainty objects."""

    def to_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def per_item(self, mask: Tensor | None = None, reduce: str = "mean") -> dict[str, Tensor]:
        """Every per-element map reduced to one value per item, (N,), over valid elements.

        ``mask`` (N, ...) marks the valid pixels (void pixels never count). Regression
        fields with several output channels are averaged over the channel axis first;
        ``mean_probs`` (a distribution, not a score) is left out.
        """
        out: dict[str, Tensor] = {}
        for name, value in self.to_dict().items():
            if name == "mean_probs":
                continue
            if isinstance(self, RegressionUncertainty) and value.dim() > 1:
                value = value.mean(1)
            out[name] = _reduce_per_item(value, mask, reduce)
        return out


@dataclass
class ClassificationUncertainty(_Fields):
    """Uncertainty of a classifier (image or per-pixel).

    Shapes for inputs (T, N, C, ...): ``mean_probs`` (N, C, ...); every other field (N, ...).
    ``predictive_entropy = aleatoric_entropy + mutual_information`` (total = aleatoric + epistemic).
    """

    mean_probs: Tensor
    predictive_entropy: Tensor
    aleatoric_entropy: Tensor
    mutual_information: Tensor
    variation_ratio: Tensor
    epistemic_logit_variance: Tensor | None = None

    @property
    def prediction(self) -> Tensor:
        """Predicted class, (N, ...)."""
        return self.mean_probs.argmax(1)

    @property
    def confidence(self) -> Tensor:
        """Probability of the predicted class, (N, ...)."""
        return self.mean_probs.amax(1)


@dataclass
class RegressionUncertainty(_Fields):
    """Uncertainty of a regressor: all fields shaped like one sample, (N, ...).

    ``total_var = aleatoric_var + epistemic_var``.
    """

    mean: Tensor
    aleatoric_var: Tensor
    epistemic_var: Tensor
    total_var: Tensor

    @property
    def prediction(self) -> Tensor:
        return self.mean


def classification_uncertainty(
    prob_samples: Tensor, logit_samples: Tensor | None = None
) -> ClassificationUncertainty:
    """Decompose T samples of class probabilities.

    Args:
        prob_samples: (T, N, C, ...) probabilities p_t (each sums to 1 over C).
        logit_samples: optional (T, N, C, ...) logits f_t; adds ``epistemic_logit_variance``,
            the variance over T (ddof 0) averaged over classes.
    Returns:
        :class:`ClassificationUncertainty` with predictive entropy H[p̄], aleatoric entropy
        1/T Σ H[p_t], mutual information H[p̄] − 1/T Σ H[p_t] (≥ 0) and the variation ratio.
    """
    if prob_samples.dim() < 3:
        raise DubitoError(f"prob_samples must be (T, N, C, ...), got shape {tuple(prob_samples.shape)}")
    probs = _float(prob_samples)
    num_samples = probs.shape[0]
    mean_probs = probs.mean(0)
    predictive = entropy(mean_probs, dim=1)
    aleatoric = entropy(probs, dim=2).mean(0)
    # Jensen: H[p̄] ≥ mean H[p_t]; only rounding can make the difference negative.
    mutual_information = (predictive - aleatoric).clamp_min(0.0)

    counts = torch.zeros_like(mean_probs)
    ones = torch.ones_like(mean_probs[:, :1])
    for t in range(num_samples):
        counts.scatter_add_(1, probs[t].argmax(1, keepdim=True), ones)
    variation_ratio = 1.0 - counts.amax(1) / num_samples

    logit_var = None
    if logit_samples is not None:
        if logit_samples.shape != prob_samples.shape:
            raise DubitoError(
                f"logit_samples shape {tuple(logit_samples.shape)} must equal prob_samples shape {tuple(prob_samples.shape)}"
            )
        logit_var = _float(logit_samples).var(0, unbiased=False).mean(1)
    return ClassificationUncertainty(
        mean_probs=mean_probs,
        predictive_entropy=predictive,
        aleatoric_entropy=aleatoric,
        mutual_information=mutual_information,
        variation_ratio=variation_ratio,
        epistemic_logit_variance=logit_var,
    )


def noise_variance(log_noise: Tensor, likelihood: str = "gaussian") -> Tensor:
    """The aleatoric variance a head's log noise parameter stands for.

    Gaussian: ``s = log σ²`` → ``σ²``. Laplace: ``s = log b`` → ``2 b²``. ``s`` is clamped
    to the range the losses train in (:mod:`dubito.platform.losses`), so a head output
    beyond it means the same here as in training.
    """
    if likelihood == "gaussian":
        return torch.exp(_float(log_noise).clamp(LOG_VAR_MIN, LOG_VAR_MAX))
    if likelihood == "laplace":
        return 2.0 * torch.exp(2.0 * _float(log_noise).clamp(LOG_SCALE_MIN, LOG_SCALE_MAX))
    raise DubitoError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def regression_uncertainty(
    mean_samples: Tensor, log_var_samples: Tensor | None = None, likelihood: str = "gaussian"
) -> RegressionUncertainty:
    """Decompose T samples of a regressor's (mean, log noise) outputs.

    Args:
        mean_samples: (T, N, ...) predicted means ŷ_t.
        log_var_samples: optional log noise, broadcastable to ``mean_samples``: ``log σ²``
            (Gaussian) or ``log b`` (Laplace). ``None`` means no aleatoric head (zero).
        likelihood: ``"gaussian"`` or ``"laplace"`` (aleatoric variance 2b²).
    Returns:
        :class:`RegressionUncertainty`: mean = 1/T Σ ŷ_t; epistemic_var = Var_t ŷ_t (ddof 0);
        aleatoric_var = 1/T Σ σ̂²_t; total_var = their sum.
    """
    if likelihood not in LIKELIHOODS:
        raise DubitoError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if mean_samples.dim() < 2:
        raise DubitoError(f"mean_samples must be (T, N, ...), got shape {tuple(mean_samples.shape)}")
    means = _float(mean_samples)
    mean = means.mean(0)
    epistemic = means.var(0, unbiased=False)
    if log_var_samples is None:
        aleatoric = torch.zeros_like(mean)
    else:
        try:
            log_noise = torch.broadcast_to(log_var_samples.to(means.dtype), means.shape)
        except RuntimeError as err:
            raise DubitoError(
                f"log_var_samples of shape {tuple(log_var_samples.shape)} does not broadcast to "
                f"mean_samples {tuple(mean_samples.shape)}"
            ) from err
        aleatoric = noise_variance(log_noise, likelihood).mean(0)
    return RegressionUncertainty(
        mean=mean, aleatoric_var=aleatoric, epistemic_var=epistemic, total_var=aleatoric + epistemic
    )
