"""Acquisition functions: per-element scores from the uncertainty service's objects.

Every :class:`Acquisition` maps a :class:`~dubito.platform.uncertainty.ClassificationUncertainty`
or :class:`~dubito.platform.uncertainty.RegressionUncertainty` to a score map shaped like the
object's per-element fields; a higher score means more worth labelling:

- classification, image level (N,) → (N,); segmentation (N, H, W) → (N, H, W);
- regression fields (N, K, H, W) → (N, H, W) and (N, D) → (N,): the per-element score is
  averaged over the output-channel axis (dim 1), as ``per_item`` does; (N,) stays (N,).

Pixel maps are reduced to one score per image by :mod:`dubito.acquisition.reductions`.
Natural logarithms throughout.

An acquisition declares what it needs beyond the decomposition: ``needs=("samples",)`` gives
its function the raw Monte-Carlo samples too (the service's
:class:`~dubito.platform.mc.MCSamples`: ``mean`` (T, N, ...), ``log_var``, ``probs`` (T, N, C,
...)), e.g. for a mean-std score. Add your own with :func:`register_acquisition` or an entry
point of the ``dubito.acquisitions`` group naming an :class:`Acquisition`; it then appears in
``--acquisition``, sweeps and ``strategy()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
from torch import Tensor

from dubito import DubitoError
from dubito.platform.mc import MCSamples
from dubito.platform.registry import Registry
from dubito.platform.uncertainty import ClassificationUncertainty, RegressionUncertainty

__all__ = [
    "Acquisition",
    "ACQUISITIONS",
    "KINDS",
    "NEEDS",
    "get_acquisition",
    "register_acquisition",
    "uncertainty_kind",
]

KINDS = ("classification", "regression")
NEEDS = ("samples",)  # what an acquisition may ask for beyond the decomposition
VAR_FLOOR = 1e-12  # variances are clamped to this before a log

Uncertainty = Union[ClassificationUncertainty, RegressionUncertainty]
ScoreFn = Callable[..., Tensor]  # (u, generator) → scores; (u, generator, samples) when it needs the samples


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
        fn: ``fn(u, generator)`` → scores; ``fn(u, generator, samples)`` when ``needs`` has
            ``"samples"`` (the labeling loop passes them as the service made them, on its device;
            the modAL estimator on the CPU in float32).
        needs: what it reads beyond the decomposition, a subset of :data:`NEEDS`.
    """

    name: str
    kinds: tuple[str, ...]
    doc: str
    fn: ScoreFn = field(repr=False, compare=False)
    needs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise DubitoError(f"acquisition {self.name!r}: fn must be callable, got {self.fn!r}")
        if not self.kinds or set(self.kinds) - set(KINDS):
            raise DubitoError(f"acquisition {self.name!r}: kinds must be among {KINDS}, got {self.kinds!r}")
        if set(self.needs) - set(NEEDS):
            raise DubitoError(f"acquisition {self.name!r}: needs must be among {NEEDS}, got {self.needs!r}")

    def score(
        self, u: Uncertainty, *, generator: torch.Generator | None = None, samples: MCSamples | None = None
    ) -> Tensor:
        """Per-element scores, (N,) / (N, H, W) (see the module docstring); higher = label first.
        ``samples``: the MC samples ``u`` was computed from (required when the acquisition needs them)."""
        kind = uncertainty_kind(u)
        if kind not in self.kinds:
            raise DubitoError(
                f"acquisition {self.name!r} does not support {kind} uncertainty (it supports: {', '.join(self.kinds)})"
            )
        if "samples" in self.needs:
            if samples is None:
                raise DubitoError(
                    f"acquisition {self.name!r} needs the MC samples: pass score(u, samples=...)"
                )
            return self.fn(u, generator, samples)
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
        raise DubitoError(
            f"margin needs at least 2 classes, mean_probs has shape {tuple(u.mean_probs.shape)}"
        )
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


#: every acquisition by name: dubito's own, those registered, and those of installed entry points
ACQUISITIONS: Registry[Acquisition] = Registry("acquisition", "dubito.acquisitions", Acquisition, __name__)

for _acquisition in (
    Acquisition(
        "random", BOTH, "Uniform [0, 1) per element from the given torch.Generator (required).", _random
    ),
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
    Acquisition(
        "variation_ratio", CLS, "1 − (votes for the modal class)/T over the MC samples.", _variation_ratio
    ),
    Acquisition("margin", CLS, "1 − (p̄_top1 − p̄_top2) from mean_probs along the class axis.", _margin),
    Acquisition("least_confidence", CLS, "1 − max_c p̄_c.", _least_confidence),
    Acquisition(
        "aleatoric",
        BOTH,
        "Classification: aleatoric entropy mean_t H[p_t]. Regression: aleatoric_var.",
        _aleatoric,
    ),
    Acquisition(
        "epistemic",
        BOTH,
        "Classification: mutual information. Regression: epistemic_var. Option logit_variance=True: "
        "epistemic_logit_variance (classification with logit samples).",
        _epistemic,
    ),
    Acquisition("total_variance", REG, "total_var = aleatoric_var + epistemic_var.", _total_variance),
):
    ACQUISITIONS.register(_acquisition, builtin=True)


def register_acquisition(
    name: str,
    fn: ScoreFn,
    *,
    kinds: tuple[str, ...] = KINDS,
    needs: tuple[str, ...] = (),
    doc: str | None = None,
    replace: bool = False,
) -> Acquisition:
    """Add an acquisition function under ``name`` (for ``--acquisition``, sweeps and ``strategy()``).

    ``fn(u, generator)`` returns per-element scores shaped like ``u``'s per-element fields (see the
    module docstring), higher = label first; with ``needs=("samples",)`` it is called as
    ``fn(u, generator, samples)`` with the raw :class:`~dubito.platform.mc.MCSamples`. ``kinds``:
    the uncertainty kinds it supports. Returns the :class:`Acquisition`.
    """
    entry = Acquisition(
        name, tuple(kinds), doc if doc is not None else (fn.__doc__ or "").strip(), fn, tuple(needs)
    )
    return ACQUISITIONS.register(entry, replace=replace)


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
    ACQUISITIONS.get_entry(name)  # unknown names are refused with the known ones
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
