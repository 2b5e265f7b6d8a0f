"""Scoring a pool through the uncertainty service, and choosing from the scores.

One path for the labeling loop, its Ray scorer (:mod:`dubito.acquisition.distributed`) and the
modAL strategy (:mod:`dubito.acquisition.modal`):

    MC samples (the service) → acquisition scores per pixel → reduction per image  → :class:`Scored`
    → selection (:func:`choose`) → positions

What is computed beyond the scores is read from the declarations in the registries: the raw MC
samples go to an acquisition that ``needs`` them, the predicted classes to a reduction that needs
them, and the model's features or the per-sample probabilities into :class:`Scored` only for a
selection that needs them.

Pool batches are numbered (:func:`pool_batches`) and batch ``b`` of round ``r`` is seeded by
:func:`batch_seed` (seed, r, b) alone, so any split of the batches over processes or Ray actors
gives the same scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from tqdm import tqdm

from dubito import DubitoError
from dubito.acquisition.functions import Acquisition, get_acquisition
from dubito.acquisition.reductions import REDUCTIONS, parse_reduction, reduce_scores
from dubito.acquisition.selection import SELECTIONS, select
from dubito.platform.calibration import Calibration
from dubito.platform.ensemble import Ensemble
from dubito.platform.mc import MCSamples
from dubito.platform.models import ModelSpec
from dubito.platform.service import UncertaintyService, check_finite_outputs, parse_epistemic, source_options

__all__ = [
    "ScoringSpec",
    "Scored",
    "batch_seed",
    "pool_batches",
    "score_items",
    "score_batches",
    "score_pool",
    "features",
    "labeled_features",
    "choose",
]


@dataclass(frozen=True)
class ScoringSpec:
    """What scoring needs: small and picklable (the Ray scorer is given this, not a loop config).

    ``selection`` is named so that what it needs (features, per-sample probabilities) is
    computed with the scores; ``seed`` seeds every batch through :func:`batch_seed`."""

    acquisition: str
    reduction: str = "mean"
    selection: str = "topk"
    samples: int = 8
    batch_size: int = 8
    seed: int = 0
    epistemic: str = "dropout"  # dropout, ensemble:K or ensemble+dropout:K (the loop trains the members)
    calibration: Calibration | None = None  # the round's post-hoc calibration (--calibrate)

    def members(self) -> int:
        """Models per round: K for an ensemble, else 1."""
        return parse_epistemic(self.epistemic)[1]

    def build(self, spec: ModelSpec) -> torch.nn.Module:
        """A fresh model (or ensemble of ``members()`` models) of ``spec``, for weights to load into."""
        if self.members() == 1:
            return spec.build()
        return Ensemble([spec.build() for _ in range(self.members())])

    def needs(self) -> tuple[str, ...]:
        """The inputs the selection declared (``features``, ``prob_samples``)."""
        return SELECTIONS.get_entry(self.selection, "--selection").needs

    def check(self, task: str) -> None:
        """The scoring can run for a model of ``task`` (the selection's inputs exist for it)."""
        if "prob_samples" in self.needs() and task != "classification":
            raise DubitoError(
                f"--selection {self.selection} is for image classification (e.g. digits), not per-pixel tasks"
            )


@dataclass
class Scored:
    """Per-item results of scoring, in the order the items were given: ``scores`` (P,); with the
    selection's inputs where it declared them: ``features`` (P, F), ``prob_samples`` (T, P, C)."""

    scores: Tensor
    features: Tensor | None = None
    prob_samples: Tensor | None = None

    @staticmethod
    def concat(parts: Sequence[Scored]) -> Scored:
        if not parts:
            raise DubitoError("nothing was scored (no pool batches)")
        return Scored(
            scores=torch.cat([p.scores for p in parts]),
            features=torch.cat([p.features for p in parts]) if parts[0].features is not None else None,
            prob_samples=torch.cat([p.prob_samples for p in parts], dim=1)
            if parts[0].prob_samples is not None
            else None,
        )


def batch_seed(seed: int, round: int, batch: int) -> int:
    """The seed of one scoring batch: its MC-dropout masks and random draws depend on the loop's
    seed, the round and the batch's index only, so any split of the batches over processes or Ray
    actors gives the same scores."""
    return int(np.random.SeedSequence([seed, round, batch]).generate_state(1, np.uint64)[0] >> 2)


def pool_batches(positions: list[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """``positions`` cut into numbered batches of ``batch_size`` (the last one may be smaller)."""
    return [(b, positions[i : i + batch_size]) for b, i in enumerate(range(0, len(positions), batch_size))]


@torch.no_grad()
def features(model: torch.nn.Module, x: Tensor) -> Tensor:
    """Deterministic (eval-mode) features for k-center: the head's input, pooled over pixels."""
    model.eval()
    f = model.features(x)
    return f.flatten(2).mean(2) if f.dim() > 2 else f


def labeled_features(
    model: torch.nn.Module, data: Dataset, positions: list[int], batch_size: int, device: torch.device
) -> Tensor:
    """:func:`features` of ``data[positions]`` (the labelled set: k-center's first centres)."""
    loader = DataLoader(Subset(data, positions), batch_size=batch_size)
    return torch.cat([features(model, b["image"].to(device)).cpu() for b in loader])


def score_items(
    acquisition: Acquisition,
    u: Any,
    samples: MCSamples | None,
    generator: torch.Generator,
    reduction: tuple[str, dict] = ("mean", {}),
    num_classes: int | None = None,
) -> Tensor:
    """One score per item of a batch: the acquisition's scores of ``u`` (per pixel for
    segmentation and depth), reduced per image by ``reduction`` (``(how, options)`` of
    :func:`~dubito.acquisition.reductions.parse_reduction`); float32 on the CPU."""
    how, options = reduction
    pixel = acquisition.score(u, generator=generator, samples=samples).float().cpu()
    classes = (
        u.prediction.cpu() if "classes" in REDUCTIONS[how].needs else None
    )  # the argmax only where it is used
    # no mask: on real data the valid pixels come from the (unbought) label itself
    return reduce_scores(pixel, None, how, classes=classes, num_classes=num_classes, **options)


def score_batches(
    model: torch.nn.Module,
    model_spec: ModelSpec | dict[str, Any],
    data: Dataset,
    batches: list[tuple[int, list[int]]],
    spec: ScoringSpec,
    round: int,
    device: torch.device,
    progress: bool = False,
) -> list[Scored]:
    """The :class:`Scored` of each of ``batches`` — ``(index, positions in data)`` — with the
    selection's inputs where it declared them. Batch ``index`` is seeded by :func:`batch_seed`
    whoever scores it."""
    model_spec = ModelSpec.of(model_spec)  # or the dict a model file holds
    acquisition = get_acquisition(spec.acquisition)
    reduction = parse_reduction(spec.reduction)
    needs = spec.needs()
    source = parse_epistemic(spec.epistemic)[0]
    service = UncertaintyService(
        model,
        **source_options(model, source, spec.samples),
        calibration=spec.calibration,
        device=device,
        progress=False,
    )
    results = []
    total = sum(len(p) for _, p in batches)
    for index, positions in tqdm(
        batches,
        desc=f"round {round}: scoring {total} pool images ({service.describe()})",
        unit="batch",
        leave=False,
        disable=not progress,
    ):
        batch = default_collate([data[p] for p in positions])
        seed = batch_seed(spec.seed, round, index)
        u, samples = service.predict_with_samples(batch["image"], seed=seed)
        check_finite_outputs(u, batch["id"], f"round {round}'s model")
        scores = score_items(
            acquisition, u, samples, torch.Generator().manual_seed(seed), reduction, model_spec.num_classes
        )
        results.append(
            Scored(
                scores,
                features=features(model, batch["image"].to(device)).cpu() if "features" in needs else None,
                prob_samples=samples.probs.float().cpu()
                if "prob_samples" in needs
                else None,  # the very samples the scores came from
            )
        )
    return results


def score_pool(
    model: torch.nn.Module,
    model_spec: ModelSpec | dict[str, Any],
    data: Dataset,
    positions: list[int],
    spec: ScoringSpec,
    round: int,
    device: torch.device,
    progress: bool = False,
    scorer: Any = None,
) -> Scored:
    """The :class:`Scored` of ``data[positions]``. ``scorer`` (a
    :class:`~dubito.acquisition.distributed.RayPoolScorer`) spreads the batches over Ray actors;
    the numbers are the same as scoring here."""
    model_spec = ModelSpec.of(model_spec)  # or the dict a model file holds
    spec.check(model_spec.task)
    batches = pool_batches(positions, spec.batch_size)
    if scorer is not None:
        parts = scorer.score(model, batches, round, progress, spec=spec)
    else:
        parts = score_batches(model, model_spec, data, batches, spec, round, device, progress)
    return Scored.concat(parts)


def choose(
    scored: Scored,
    k: int,
    selection: str,
    *,
    seed: int,
    temperature: float = 1.0,
    labeled: Tensor | None = None,
) -> Tensor:
    """Positions (into what was scored) of the ``k`` items ``selection`` picks, in its order;
    ``labeled``: the labelled set's features (k-center's first centres)."""
    return select(
        scored.scores,
        k,
        selection,
        seed=seed,
        temperature=temperature,
        features=scored.features,
        labeled_features=labeled,
        prob_samples=scored.prob_samples,
    )
