"""Checks shared by every command's config dataclass, run before anything is written."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dubito import DubitoError

__all__ = [
    "flag",
    "check_finite",
    "check_range",
    "check_choice",
    "check_device",
    "default_model",
    "check_model",
    "needs_root",
    "IMAGE_MODELS",
]

#: the FC-DenseNet configurations (image models); ``mlp`` is the model for vectors (digits)
IMAGE_MODELS = ("tiny", "fc_densenet56", "fc_densenet67", "fc_densenet103")


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


def check_finite(config: Any) -> None:
    """Every float field of a config dataclass is a finite number (NaN and infinities are refused)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise DubitoError(f"{flag(f.name)} must be a finite number, got {value}")


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``low <= value <= high`` (``<`` where open), else a :class:`DubitoError` naming the flag."""
    bad = value != value  # NaN
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        if high is None:
            where = f"{'>' if low_open else '>='} {low:g}"
        elif low is None:
            where = f"{'<' if high_open else '<='} {high:g}"
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise DubitoError(f"{flag(name)} must be {where}, got {value}")


def check_choice(name: str, value: str, choices: Any) -> None:
    if value not in choices:
        raise DubitoError(f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}")


def check_device(name: str, value: str) -> None:
    """``auto`` or a device torch can name (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...)."""
    if value == "auto":
        return
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise DubitoError(
            f"{flag(name)} must be auto or a torch device such as cpu, cuda, cuda:1, got {value!r}"
        ) from None


def default_model(dataset: str) -> str:
    """``--model auto``: the MLP for vector data (digits), the tiny FC-DenseNet for images (an
    unknown dataset gets the image model here; its name is refused where it is checked)."""
    from dubito.platform.data import DATASETS

    return DATASETS[dataset].default_model if dataset in DATASETS else "tiny"


def check_model(dataset: str, model: str, task: str | None = None) -> None:
    """The model can learn the dataset: the MLP takes vectors (digits), FC-DenseNet images."""
    known = (*IMAGE_MODELS, "mlp")
    if model not in known:
        raise DubitoError(f"--model must be auto or one of {', '.join(known)}, got {model!r}")
    from dubito.platform.data import DATASETS

    vectors = dataset in DATASETS and DATASETS[dataset].inputs == "vectors"
    if vectors and model != "mlp":
        raise DubitoError(
            f"--model {model} is an image model; --dataset {dataset} holds vectors: use --model mlp (or auto)"
        )
    if not vectors and model == "mlp":
        raise DubitoError(
            f"--model mlp takes vectors; --dataset {dataset} holds images: use an FC-DenseNet "
            "(tiny, fc_densenet56/67/103) or auto"
        )


def needs_root(dataset: str) -> bool:
    """Whether a dataset is read from disk (``--root``): not the synthetic scenes, not digits."""
    from dubito.platform.data import DATASETS

    return DATASETS[dataset].needs_root if dataset in DATASETS else True
