"""Experiments: the studies users run, each a config dataclass plus a run function —
:mod:`~dubito.experiments.demo`, :mod:`~dubito.experiments.reproduce`,
:mod:`~dubito.experiments.labeling_budget` and :mod:`~dubito.experiments.exploration`."""

from __future__ import annotations

from dubito import DubitoError

__all__ = ["int_list"]


def int_list(flag: str, text: str, low: int = 0) -> list[int]:
    """Distinct integers >= ``low`` from a comma-separated flag value such as ``--seeds 0,1,2``."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DubitoError(f"{flag} must be integers separated by commas, got {text!r}") from None
    if not values or len(set(values)) != len(values) or min(values) < low:
        raise DubitoError(f"{flag} must be distinct integers >= {low}, got {text!r}")
    return values
