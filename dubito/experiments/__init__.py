"""Experiments: the studies users run, each a config dataclass plus a run function —
:mod:`~dubito.experiments.demo`, :mod:`~dubito.experiments.reproduce`,
:mod:`~dubito.experiments.labeling_budget`, :mod:`~dubito.experiments.exploration` and
:mod:`~dubito.experiments.sweep` (Ray Tune)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dubito import DubitoError
from dubito.platform.config import parse_list

__all__ = ["int_list", "seed_std", "area_under_curve", "record_study"]


def int_list(flag: str, values: str | Sequence[int], low: int = 0) -> list[int]:
    """Distinct integers >= ``low`` from a list setting such as ``--seeds`` (a tuple, or its text
    ``"0,1,2"``)."""
    values = list(parse_list(flag.removeprefix("--").replace("-", "_"), values, int))
    if not values or len(set(values)) != len(values) or min(values) < low:
        shown = ",".join(str(v) for v in values)
        raise DubitoError(f"{flag} must be distinct integers >= {low}, got {shown!r}")
    return values


def seed_std(values: np.ndarray) -> np.ndarray:
    """Sample standard deviation over seeds (axis 0; ddof 1), 0 for a single seed."""
    values = np.asarray(values, dtype=float)
    return values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(values.mean(0))


def area_under_curve(x: list[float], y: list[float]) -> float | None:
    """Area under a learning curve (trapezoid), normalised by the x range, so it is a mean score."""
    if len(x) < 2:
        return float(y[0]) if len(y) else None
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs)) / (xs[-1] - xs[0]))


def record_study(
    parent: Any, out: Path, results: dict[str, Any], table: str, metrics: Mapping[str, float]
) -> None:
    """Write a study's ``tables.md`` and ``results.json`` into ``out`` and log them, its plots
    (``results["plots"]``) and its headline ``metrics`` to the MLflow parent run."""
    from dubito.platform.files import write_json, write_text

    write_text(out / "tables.md", table)
    write_json(out / "results.json", results)
    for path in (out / "results.json", out / "tables.md", *results.get("plots", [])):
        parent.log_artifact(path)
    parent.log_metrics(metrics)
