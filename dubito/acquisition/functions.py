"""Acquisition functions: per-element scores from the uncertainty service's objects.

Every :class:`Acquisition` maps a :class:`~dubito.platform.uncertainty.ClassificationUncertainty`
or :class:`~dubito.platform.uncertainty.RegressionUncertainty` to a score map shaped like the
object's per-element fields; a higher score means more worth labelling:

- classification, image level (N,) → (N,); segmentation (N, H, W) → (N, H, W);
- regression fields (N, K, H, W) → (N, H, W) and (N, D) → (N,): the per-element score is
  averaged over the output-channel axis (dim 1), as ``per_item`` does; (N,) stays (N,).

Pixel maps are reduced to one score per image by :mod:`dubito.acquisition.reductions`.
Natural logarithms throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
from torch import Tensor

from dubito import DubitoError
from dubito.platform.uncertainty import ClassificationUncertainty, RegressionUncertainty

__all__ = ["Acquisition", "ACQUISITIONS", "KINDS", "get_acquisition", "uncertainty_kind"]

KINDS = ("classification", "regression")
VAR_FLOOR = 1e-12  # variances are clamped to this before a log

Uncertainty = Union[ClassificationUncertainty, RegressionUncertainty]
ScoreFn = Callable[[Uncertainty, "torch.Generator | None"], Tensor]


def uncertainty_kind(u: object) -> str:
    """``"classification"`` or ``"regression"`` for an uncertainty object; DubitoError otherwise."""
    if isinstance(u, ClassificationUncertainty):
        return "classification"
    if isinstance(u, RegressionUncertainty):
        return "regression"
    raise DubitoError(
        f"expected a ClassificationUncertainty or RegressionUncertainty, got {type(u).__name__}"
    )


def _per_element(u: Uncertainty, value: Tensor) -> Tensor:
    """Regression: average a (N, K, ...) score over the channel axis; classification: as is."""
    if isinstance(u, RegressionUncertainty) and value.dim() > 1:
        return value.mean(1)
    return value


def _reference(u: Uncertainty) -> Tensor:
    """A per-element field reduced like every score (gives the score's shape, dtype, device)."""
    ref = u.predictive_entropy if isinstance(u, ClassificationUncertainty) else u.total_var
    return _per_element(u, ref)


@dataclass(frozen=True)
class Acquisition:
    """A named acquisition function.

    Attributes:
        name: registry name (``"epistemic(logit_variance)"`` for the option variant).
        kinds: uncertainty kinds it supports, a subset of ``("classification", "regression")``.
        doc: what the score is, per kind.
    """

    name: str
    kinds: tuple[str, ...]
    doc: str
    fn: ScoreFn = field(repr=False, compare=False)

    def score(self, u: Uncertainty, *, generator: torch.Generator | None = None) -> Tensor:
        """Per-element scores, (N,) / (N, H, W) (see the module docstring); higher = label first."""
        kind = uncertainty_kind(u)
        if kind not in self.kinds:
            raise DubitoError(
                f"acquisition {self.name!r} does not support {kind} uncertainty (it supports: {', '.join(self.kinds)})"
            )
        return self.fn(u, generator)


# --- the scores ----------------------------------------------------------------------------


def _random(u: Uncertainty, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        raise DubitoError("acquisition 'random' needs a torch.Generator: pass score(u, generator=...)")
    ref = _reference(u)
    draw = torch.rand(ref.shape, generator=generator, device=generator.device, dtype=ref.dtype)
    return draw.to(ref.device)


def _entropy(u: Uncertainty, generator: torch.Generator | None) -> Tensor:
    if isinstance(u, ClassificationUncertainty):
        return u.predictive_entropy
    total = u.total_var.clamp_min(VAR_FLOOR)
    return _per_element(u, 0.5 * torch.log(2.0 * math.pi * math.e * total))


def _bald(u: Uncertainty, generator: torch.Generator | None) -> Tensor:
    if isinstance(u, ClassificationUncertainty):
        return u.mutual_information
    if not bool((u.aleatoric_var != 0).any()):
        # No aleatoric head: the ratio total/aleatoric is undefined; rank by epistemic variance.
        return _per_element(u, u.epistemic_var)
    ratio = u.total_var / u.aleatoric_var.clamp_min(VAR_FLOOR)
    return _per_element(u, 0.5 * torch.log(ratio.clamp_min(1.0)))


def _variation_ratio(u: Uncertainty, generator: torch.Generator | None) -> Tensor:
    return u.variation_ratio


def _top2(u: ClassificationUncertainty) -> Tensor:
    if u.mean_probs.shape[1] < 2:
        raise DubitoError(f"margin needs at least 2 classes, mean_probs has shape {tuple(u.mean_probs.shape)}")
    return u.mean_probs.topk(2, dim=1).values


def _margin(u: Uncertainty, generator: torch.Generator | None) -> Tensor:
    top = _top2(u)
    return 1.0 - (top[:, 0] - top[:, 1])


def _least_confidence(u: Uncertainty, generator: torch.Generator | None) -> Tensor:
    return 1.0 - u.mean_probs.amax(1)


def _aleatoric(u: Uncertainty, generator: torch.Generator | None) -> Tensor:
    if isinstance(u, ClassificationUncertainty):
        return u.aleatoric_entropy
    return _per_element(u, u.aleatoric_var)


def _epistemic(u: Uncertainty, generator: torch.Generator | None) -> Tensor:
    if isinstance(u, ClassificationUncertainty):
        return u.mutual_information
    return _per_element(u, u.epistemic_var)


def _epistemic_logit_variance(u: Uncertainty, generator: torch.Generator | None) -> Tensor:
    if u.epistemic_logit_variance is None:
        raise DubitoError(
            "acquisition 'epistemic(logit_variance)' needs epistemic_logit_variance: "
            "build the uncertainty with logit samples (classification_uncertainty(probs, logit_samples=...))"
        )
    return u.epistemic_logit_variance


def _total_variance(u: Uncertainty, generator: torch.Generator | None) -> Tensor:
    return _per_element(u, u.total_var)


BOTH = ("classification", "regression")
CLS = ("classification",)
REG = ("regression",)

ACQUISITIONS: dict[str, Acquisition] = {
    a.name: a
    for a in (
        Acquisition("random", BOTH, "Uniform [0, 1) per element from the given torch.Generator (required).", _random),
        Acquisition(
            "entropy",
            BOTH,
            "Classification: predictive entropy H[p̄]. Regression: Gaussian predictive entropy "
            "0.5·log(2πe·total_var), total_var clamped ≥ 1e-12.",
            _entropy,
        ),
        Acquisition(
            "bald",
            BOTH,
            "Classification: mutual information H[p̄] − mean_t H[p_t] (BALD). Regression: "
            "0.5·log(total_var / aleatoric_var), aleatoric clamped ≥ 1e-12 (Gaussian approximation, "
            "Depeweg et al. 2018); when aleatoric_var is all zeros (no aleatoric head) the score falls "
            "back to epistemic_var.",
            _bald,
        ),
        Acquisition("variation_ratio", CLS, "1 − (votes for the modal class)/T over the MC samples.", _variation_ratio),
        Acquisition("margin", CLS, "1 − (p̄_top1 − p̄_top2) from mean_probs along the class axis.", _margin),
        Acquisition("least_confidence", CLS, "1 − max_c p̄_c.", _least_confidence),
        Acquisition(
            "aleatoric", BOTH, "Classification: aleatoric entropy mean_t H[p_t]. Regression: aleatoric_var.", _aleatoric
        ),
        Acquisition(
            "epistemic",
            BOTH,
            "Classification: mutual information. Regression: epistemic_var. Option logit_variance=True: "
            "epistemic_logit_variance (classification with logit samples).",
            _epistemic,
        ),
        Acquisition("total_variance", REG, "total_var = aleatoric_var + epistemic_var.", _total_variance),
    )
}

EPISTEMIC_LOGIT_VARIANCE = Acquisition(
    "epistemic(logit_variance)",
    CLS,
    "Variance over MC samples of the logits (ddof 0), averaged over classes: epistemic_logit_variance.",
    _epistemic_logit_variance,
)

_OPTIONS: dict[str, tuple[str, ...]] = {"epistemic": ("logit_variance",)}


def get_acquisition(name: str, **options: object) -> Acquisition:
    """The acquisition called ``name``; ``options`` select a variant.

    Only ``get_acquisition("epistemic", logit_variance=True)`` takes an option; it returns
    the distinct ``"epistemic(logit_variance)"`` acquisition (also reachable by that name).
    """
    if name == EPISTEMIC_LOGIT_VARIANCE.name and not options:
        return EPISTEMIC_LOGIT_VARIANCE
    if name not in ACQUISITIONS:
        raise DubitoError(f"unknown acquisition {name!r}; known: {', '.join(ACQUISITIONS)}")
    allowed = _OPTIONS.get(name, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"takes only {', '.join(allowed)}" if allowed else "takes no options"
        raise DubitoError(f"acquisition {name!r} {takes}; got option(s) {', '.join(unknown)}")
    if name == "epistemic":
        flag = options.get("logit_variance", False)
        if not isinstance(flag, bool):
            raise DubitoError(f"acquisition 'epistemic': logit_variance must be True or False, got {flag!r}")
        if flag:
            return EPISTEMIC_LOGIT_VARIANCE
    return ACQUISITIONS[name]
