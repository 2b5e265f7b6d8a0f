"""The UncertaintyService: one object that turns a model into uncertainty estimates.

Acquisition functions score a pool with it and agents ask it for exploration bonuses;
both get the same decomposition from the same samples, whatever their epistemic source:

- ``dropout``: T MC-dropout passes of one model (the MC engine, :mod:`dubito.platform.mc`);
- ``ensemble``: one deterministic pass of each of K members (:mod:`dubito.platform.ensemble`);
- ``ensemble+dropout``: T dropout passes of each member, K·T samples.

The samples are stacked on one leading axis in every case, so every consumer (reductions,
selections such as BatchBALD, evaluation, agents) sees the same objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # not tqdm.auto: its asyncio variant opens an extra iterator (DataLoader workers)

from dubito import DubitoError
from dubito.platform.calibration import Calibration
from dubito.platform.ensemble import Ensemble, ensemble_samples, ensemble_size, packed_members
from dubito.platform.mc import MCSamples, mc_samples
from dubito.platform.uncertainty import (
    LIKELIHOODS,
    ClassificationUncertainty,
    RegressionUncertainty,
    classification_uncertainty,
    regression_uncertainty,
)

__all__ = [
    "UncertaintyService",
    "check_finite_outputs",
    "default_device",
    "source_options",
    "parse_epistemic",
    "check_source",
    "TASKS",
    "EPISTEMIC",
]

#: the epistemic sources the service offers
EPISTEMIC = ("dropout", "ensemble", "ensemble+dropout")
#: dropout samples per source when ``samples`` is not given
DEFAULT_SAMPLES = {"dropout": 50, "ensemble": 1, "ensemble+dropout": 10}

#: accepted task names → the kind of decomposition they use
TASKS = {
    "classification": "classification",
    "segmentation": "classification",
    "regression": "regression",
    "depth": "regression",
}
_IMAGE_KEYS = ("image", "x", "input")


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"``/None → :func:`default_device`; otherwise the named device, which must exist here."""
    if name is None or name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DubitoError(f"device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DubitoError(f"device {name}: CUDA is not available on this machine")
    return device


class UncertaintyService:
    """Uncertainty estimates of ``model`` for a batch or a whole dataset.

    Args:
        model: any module following the forward contract of docs/architecture.md (a tensor, or
            ``(mean_or_logits, log_var)``), or an :class:`~dubito.platform.ensemble.Ensemble`
            (a list of such modules is made one), or a packed ensemble (one module whose
            forward stacks K members' outputs, with a ``packed_members`` attribute: see
            :func:`~dubito.platform.ensemble.packed_members`). It is moved to ``device``.
        task: ``classification``/``segmentation`` or ``regression``/``depth``; defaults to
            ``model.task`` for dubito models.
        samples: T, MC-dropout samples (per member for ``ensemble+dropout``); defaults to 50
            for ``dropout``, 10 for ``ensemble+dropout``; ``ensemble`` takes 1 (each member's
            deterministic pass).
        epistemic: the epistemic source, one of :data:`EPISTEMIC`; defaults to ``ensemble``
            for an ensemble and ``dropout`` for one model.
        calibration: a :class:`~dubito.platform.calibration.Calibration` (or its dict or
            ``calibration.json`` path) applied to every prediction: temperature-scaled
            probabilities, scaled regression variances.
        device: defaults to CUDA when available, else CPU.
        mc_dropout: sample dropout at test time (``dropout`` source); defaults to
            ``model.mc_dropout`` for dubito models (true for the ``epistemic`` and ``both``
            variants), else true. When false one deterministic pass is made and epistemic
            terms are zero.
        likelihood: regression noise model (``gaussian``: log σ²; ``laplace``: log b);
            defaults to ``model.likelihood`` or ``gaussian``.
        logit_noise_samples: ε draws per dropout sample for heads with logit noise.
        chunk_size, autocast, channels_last, prefix_cache, compile: passed to
            :func:`dubito.platform.mc.mc_samples` (engine speed options; the defaults are
            the fastest exact ones).
        seed: makes every call reproducible (each call draws its own seed from it).
        batch_size: batch size when :meth:`stream` is given a Dataset.
        progress: show a progress bar while streaming.
    """

    def __init__(
        self,
        model: nn.Module | Ensemble | list[nn.Module],
        task: str | None = None,
        samples: int | None = None,
        *,
        epistemic: str | None = None,
        calibration: Calibration | dict | str | None = None,
        device: str | torch.device | None = None,
        mc_dropout: bool | None = None,
        likelihood: str | None = None,
        logit_noise_samples: int = 16,
        chunk_size: int | str = "auto",
        autocast: bool | torch.dtype | None = None,
        channels_last: bool | str = "auto",
        prefix_cache: bool = True,
        compile: bool | str = False,
        seed: int | None = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> None:
        if isinstance(model, (list, tuple)):
            model = Ensemble(model)
        epistemic, samples = check_source(model, epistemic, samples)
        task = task if task is not None else getattr(model, "task", None)
        if task not in TASKS:
            raise DubitoError(f"task must be one of {sorted(TASKS)} (or a model with a .task), got {task!r}")
        likelihood = likelihood or getattr(model, "likelihood", "gaussian")
        if likelihood not in LIKELIHOODS:
            raise DubitoError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if batch_size < 1:
            raise DubitoError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device)
        self.task = task
        self.kind = TASKS[task]
        self.samples = samples
        self.epistemic = epistemic
        self.members = ensemble_size(model) or 1
        self.calibration = Calibration.of(calibration)
        self.mc_dropout = bool(getattr(model, "mc_dropout", True) if mc_dropout is None else mc_dropout)
        self.likelihood = likelihood
        self.logit_noise_samples = logit_noise_samples
        self.chunk_size = chunk_size
        self.autocast = autocast
        self.engine_options = {
            "channels_last": channels_last,
            "prefix_cache": prefix_cache,
            "compile": compile,
        }
        self.batch_size = batch_size
        self.progress = progress
        self._rng = torch.Generator().manual_seed(seed) if seed is not None else None

    def describe(self) -> str:
        """The epistemic source in words: ``MC dropout T=50``, ``ensemble K=5``, ``ensemble K=5 × dropout T=10``."""
        if self.epistemic == "dropout":
            return f"MC dropout T={self.samples}"
        if self.epistemic == "ensemble":
            return f"ensemble K={self.members}"
        return f"ensemble K={self.members} × dropout T={self.samples}"

    def state_dict(self) -> dict[str, Any]:
        """Where the service's seed stream stands (its model's weights are the model's own
        ``state_dict``): a service restored with :meth:`load_state_dict` draws the same masks next."""
        return {"rng": self._rng.get_state() if self._rng is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["rng"] is None) != (self._rng is None):
            raise DubitoError(
                "service state of a seeded service given to an unseeded one, or the other way round"
            )
        if self._rng is not None:
            self._rng.set_state(state["rng"])

    def _random(self) -> bool:
        """Whether a prediction draws anything (dropout masks, logit noise): a plain ensemble's
        regression does not, and then takes no seed (nor a draw from torch's global RNG)."""
        return self.epistemic != "ensemble" or self.kind == "classification"

    def _next_seed(self) -> int:
        return int(torch.randint(0, 1 << 62, (1,), generator=self._rng).item())

    def predict(self, x: Tensor) -> ClassificationUncertainty | RegressionUncertainty:
        """Uncertainty of one batch ``x`` (N, ...); the fields are on the service's device."""
        return self.predict_with_samples(x)[0]

    def predict_with_samples(
        self, x: Tensor, *, seed: int | None = None
    ) -> tuple[ClassificationUncertainty | RegressionUncertainty, MCSamples]:
        """:meth:`predict` and the T stacked samples it decomposed (e.g. the (T, N, C) probabilities
        BatchBALD needs), from the same draws. ``seed`` fixes this call's dropout masks (else the
        next seed of the service's own sequence): a batch scored with the same seed anywhere —
        another process, another Ray actor — gets the same samples."""
        x = x.to(self.device, non_blocking=True)
        options = dict(
            chunk_size=self.chunk_size,
            autocast=self.autocast,
            probs=self.kind == "classification",
            logit_noise_samples=self.logit_noise_samples,
            seed=(self._next_seed() if self._random() else 0) if seed is None else seed,
            temperature=self.calibration.temperature if self.calibration else 1.0,
            **self.engine_options,
        )
        if self.epistemic == "dropout":
            out = mc_samples(self.model, x, self.samples, stochastic=self.mc_dropout, **options)
        else:
            out = ensemble_samples(self.model, x, self.samples, **options)
        if self.kind == "classification":
            return classification_uncertainty(out.probs, out.mean), out
        u = regression_uncertainty(out.mean, out.log_var, self.likelihood)
        return (self.calibration.scale(u) if self.calibration else u), out

    @property
    def draws(self) -> int:
        """Samples per prediction: T for dropout, K for an ensemble, K·T for both."""
        return self.members * self.samples

    def stream(
        self,
        data: Dataset | Iterable[Mapping[str, Tensor]],
        *,
        reduce: str = "mean",
        fields: Iterable[str] | None = None,
        progress: bool | None = None,
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """Score a dataset batch by batch, yielding ``(ids, {field: (N,) values})`` on the CPU.

        ``data`` is a Dataset of dict items or an iterable of dict batches (a DataLoader),
        each with an image under ``"image"`` and stable integer ``"id"``s; an optional
        ``"mask"`` (N, H, W) marks valid pixels, which are the only ones reduced (``mean``
        or ``max``). Memory is bounded by one batch: per-pixel maps are never kept.
        """
        if isinstance(data, Dataset) and not isinstance(data, DataLoader):
            data = DataLoader(data, batch_size=self.batch_size, shuffle=False)
        wanted = None if fields is None else set(fields)
        total = len(data) if hasattr(data, "__len__") else None
        show = self.progress if progress is None else progress
        bar = tqdm(data, total=total, desc=f"scoring ({self.describe()})", unit="batch", disable=not show)
        for index, batch in enumerate(bar):
            x, ids, mask = _unpack(batch, index)
            unc = self.predict(x)
            check_finite_outputs(unc, ids)
            if mask is not None:
                mask = mask.to(self.device)
            values = unc.per_item(mask, reduce=reduce)
            if wanted is not None:
                unknown = wanted - values.keys()
                if unknown:
                    raise DubitoError(f"unknown fields {sorted(unknown)}; available: {sorted(values)}")
                values = {k: v for k, v in values.items() if k in wanted}
            yield ids, {k: v.detach().float().cpu() for k, v in values.items()}


#: members of an ensemble when ``--epistemic ensemble`` names no K (Beluch et al. 2018's choice)
DEFAULT_MEMBERS = 5


def parse_epistemic(text: str, flag: str = "--epistemic") -> tuple[str, int]:
    """``dropout`` → ``("dropout", 1)``; ``ensemble:K`` / ``ensemble+dropout:K`` → the source and
    its K members (``ensemble`` alone: K = 5)."""
    source, _, count = str(text).partition(":")
    if source not in EPISTEMIC or (source == "dropout" and count):
        raise DubitoError(f"{flag} must be dropout, ensemble:K or ensemble+dropout:K, got {text!r}")
    if source == "dropout":
        return source, 1
    try:
        members = int(count) if count else DEFAULT_MEMBERS
    except ValueError:
        members = 0
    if members < 2:
        raise DubitoError(f"{flag} {text}: an ensemble needs K >= 2 members")
    return source, members


def source_options(model: nn.Module, epistemic: str | None, samples: int) -> dict[str, Any]:
    """The service's ``epistemic`` and ``samples`` for a command's ``--epistemic`` (empty: the
    model's own source, ``ensemble`` for an ensemble's file) and ``--samples`` (dropout samples,
    per member for ``ensemble+dropout``; a plain ensemble runs each member once)."""
    epistemic = epistemic or ("ensemble" if ensemble_size(model) else "dropout")
    return {"epistemic": epistemic, "samples": None if epistemic == "ensemble" else samples}


def check_source(model: nn.Module, epistemic: str | None, samples: int | None) -> tuple[str, int]:
    """The epistemic source and the dropout samples per model, checked against the model."""
    ensemble = ensemble_size(model) is not None
    if epistemic is None:
        epistemic = "ensemble" if ensemble else "dropout"
    if epistemic not in EPISTEMIC:
        raise DubitoError(f"epistemic must be one of {', '.join(EPISTEMIC)}, got {epistemic!r}")
    if ensemble != (epistemic != "dropout"):
        what = f"the ensemble {type(model).__name__}" if ensemble else f"one {type(model).__name__}"
        raise DubitoError(
            f"epistemic={epistemic!r} does not fit {what}: 'dropout' samples one model, "
            "'ensemble' and 'ensemble+dropout' need an Ensemble (or a list of members)"
        )
    if samples is None:
        samples = DEFAULT_SAMPLES[epistemic]
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise DubitoError(f"samples must be a positive integer, got {samples!r}")
    if epistemic == "ensemble+dropout" and packed_members(model) is not None:
        raise DubitoError(
            f"{type(model).__name__} is a packed ensemble (one forward for all members): it takes "
            "epistemic='ensemble', not 'ensemble+dropout'"
        )
    if epistemic == "ensemble+dropout" and isinstance(model, Ensemble):
        still = sorted(
            {str(getattr(m, "variant", "")) for m in model.members if not getattr(m, "mc_dropout", True)}
        )
        if still:
            raise DubitoError(
                f"epistemic='ensemble+dropout' needs members with test-time dropout; these are of variant "
                f"{', '.join(still)} (no MC dropout): use 'ensemble', or members of variant epistemic / both"
            )
    if epistemic == "ensemble" and samples != 1:
        raise DubitoError(
            f"epistemic='ensemble' runs each member once (samples=1), got samples={samples}: "
            "use 'ensemble+dropout' for dropout samples per member"
        )
    return epistemic, samples


def check_finite_outputs(
    u: ClassificationUncertainty | RegressionUncertainty, ids: Tensor | list[int], what: str = "the model"
) -> None:
    """Raise a :class:`DubitoError` naming the items (``ids``, one per row of the batch) whose
    uncertainty has a NaN or infinite value anywhere (a diverged or damaged model), instead of
    letting NaN flow into scores, selections and metrics."""
    bad = None
    for value in u.to_dict().values():
        if not torch.is_floating_point(value):
            continue
        rows = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(1)
        bad = rows if bad is None else bad | rows
    if bad is not None and bool(bad.any()):
        ids = [int(i) for i in torch.as_tensor(ids).reshape(-1)]
        named = [ids[j] for j in torch.nonzero(bad.cpu()).flatten().tolist()]
        shown = ", ".join(map(str, named[:20])) + (" ..." if len(named) > 20 else "")
        raise DubitoError(
            f"{what} gives non-finite (NaN or infinite) outputs for item ids {shown}: its weights or inputs "
            "hold NaN or infinities (a diverged training?); retrain it or check the data"
        )


def _unpack(batch, index: int) -> tuple[Tensor, Tensor, Tensor | None]:
    if not isinstance(batch, Mapping):
        raise DubitoError(
            f"stream: batch {index} is a {type(batch).__name__}; expected a dict with 'image' and 'id' "
            "(dubito datasets yield such items)"
        )
    key = next((k for k in _IMAGE_KEYS if k in batch), None)
    if key is None:
        raise DubitoError(
            f"stream: batch {index} has no image (keys {sorted(batch)}; expected one of {_IMAGE_KEYS})"
        )
    if "id" not in batch:
        raise DubitoError(f"stream: batch {index} has no 'id'; every item needs a stable integer id")
    ids = torch.as_tensor(batch["id"]).long().reshape(-1).cpu()
    x = batch[key]
    if ids.numel() != x.shape[0]:
        raise DubitoError(f"stream: batch {index} has {x.shape[0]} images but {ids.numel()} ids")
    return x, ids, batch.get("mask")
