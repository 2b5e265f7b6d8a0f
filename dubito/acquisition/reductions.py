"""Pixel → image reductions of acquisition score maps.

:func:`reduce_scores` maps (N, ...) score maps to one score per image, (N,), over the valid
pixels only: masked (void) pixels never count, and an image without a valid pixel scores 0.
Everything is vectorised over the batch and the pixels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dubito import DubitoError
from dubito.platform.uncertainty import _reduce_per_item

__all__ = ["REDUCTIONS", "reduce_scores", "parse_reduction"]

REDUCTIONS = ("mean", "max", "topq", "class_balanced", "grid")


def _valid(scores: Tensor, mask: Tensor | None) -> Tensor:
    """(N, ...) bool validity of each element; ``mask`` must broadcast to ``scores``."""
    if mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    try:
        return torch.broadcast_to(mask.to(device=scores.device, dtype=torch.bool), scores.shape)
    except RuntimeError as err:
        raise DubitoError(
            f"mask of shape {tuple(mask.shape)} does not match the score maps of shape {tuple(scores.shape)}"
        ) from err


def _group_mean_table(flat: Tensor, valid: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per image and group: mean of the valid scores, and whether the group has any, both (N, G).

    ``flat``, ``valid`` (N, M); ``groups`` (N, M) long in [0, G) (only read at valid elements).
    """
    groups = torch.where(valid, groups, torch.zeros_like(groups))
    weights = valid.to(flat.dtype)
    sums = torch.zeros(flat.shape[0], num_groups, dtype=flat.dtype, device=flat.device)
    counts = torch.zeros_like(sums)
    sums.scatter_add_(1, groups, torch.where(valid, flat, torch.zeros_like(flat)))
    counts.scatter_add_(1, groups, weights)
    present = counts > 0
    return sums / counts.clamp_min(1), present


def _topq(flat: Tensor, valid: Tensor, q: float) -> Tensor:
    """Mean of the top ``max(1, ceil(q·n))`` valid elements of each row (n valid elements)."""
    n = valid.sum(1)
    ordered = torch.where(valid, flat, torch.full_like(flat, float("-inf"))).sort(1, descending=True).values
    positions = torch.arange(flat.shape[1], device=flat.device)
    ordered = torch.where(positions < n[:, None], ordered, torch.zeros_like(ordered))
    # The small tolerance keeps q·n = 7.000000001 (rounding) from taking 8 elements.
    take = torch.ceil(q * n.to(torch.float64) - 1e-9).long().clamp_min(1)
    take = torch.minimum(take, n.clamp_min(1))
    sums = ordered.cumsum(1).gather(1, (take - 1)[:, None]).squeeze(1)
    return torch.where(n > 0, sums / take.to(flat.dtype), torch.zeros_like(sums))


def _grid_cells(height: int, width: int, grid: int, device: torch.device) -> Tensor:
    """(H·W,) cell index in [0, grid²): row cell ⌊h·grid/H⌋, column cell ⌊w·grid/W⌋."""
    rows = torch.arange(height, device=device) * grid // height
    cols = torch.arange(width, device=device) * grid // width
    return (rows[:, None] * grid + cols[None, :]).reshape(-1)


def reduce_scores(
    scores: Tensor,
    mask: Tensor | None = None,
    how: str = "mean",
    *,
    q: float = 0.1,
    grid: int = 4,
    classes: Tensor | None = None,
    num_classes: int | None = None,
) -> Tensor:
    """Reduce score maps (N, ...) to per-image scores (N,) over the valid pixels.

    Args:
        scores: (N,) (returned as is) or (N, ...) maps, e.g. (N, H, W).
        mask: bool, broadcastable to ``scores``; True marks valid pixels. None: all valid.
        how: ``"mean"``; ``"max"``; ``"topq"``: mean of the top ``max(1, ceil(q·n))`` of the
            n valid pixels; ``"class_balanced"``: mean score per predicted class (``classes``,
            shaped like ``scores``, long), then the unweighted mean over the classes present in
            the image; ``"grid"``: (N, H, W) only, split into ``grid``×``grid`` cells (row cell
            ⌊h·grid/H⌋, so uneven edges are spread out), mean per cell, then the max over cells
            with a valid pixel.
        q: fraction in (0, 1] for ``"topq"``.
        grid: cells per side (≥ 1) for ``"grid"``.
        classes: (N, ...) long predicted class per pixel for ``"class_balanced"``.
        num_classes: number of classes (default: 1 + the largest valid class).
    Returns:
        (N,) scores; 0 for an image without valid pixels.
    """
    if how not in REDUCTIONS:
        raise DubitoError(f"how must be one of {REDUCTIONS}, got {how!r}")
    if scores.dim() == 0:
        raise DubitoError("scores must be (N,) or (N, ...), got a scalar")
    if scores.dim() == 1:
        return scores
    if how in ("mean", "max"):
        return _reduce_per_item(scores, mask, how)

    valid = _valid(scores, mask)
    N = scores.shape[0]
    flat = scores.reshape(N, -1)
    flat_valid = valid.reshape(N, -1)

    if how == "topq":
        if not 0.0 < q <= 1.0:
            raise DubitoError(f"q must be in (0, 1] for 'topq', got {q}")
        return _topq(flat, flat_valid, q)

    if how == "class_balanced":
        if classes is None:
            raise DubitoError("how='class_balanced' needs classes (the predicted class per pixel, shaped like scores)")
        if classes.shape != scores.shape:
            raise DubitoError(f"classes of shape {tuple(classes.shape)} must match scores of shape {tuple(scores.shape)}")
        if classes.dtype.is_floating_point or classes.dtype == torch.bool:
            raise DubitoError(f"classes must be an integer tensor, got {classes.dtype}")
        groups = classes.to(device=scores.device, dtype=torch.long).reshape(N, -1)
        used = groups[flat_valid]
        if used.numel() and int(used.min()) < 0:
            raise DubitoError(f"classes must be ≥ 0 at valid pixels, found {int(used.min())}")
        top = int(used.max()) + 1 if used.numel() else 1
        if num_classes is None:
            num_classes = top
        elif top > num_classes:
            raise DubitoError(f"classes has class {top - 1} at a valid pixel but num_classes is {num_classes}")
        means, present = _group_mean_table(flat, flat_valid, groups, num_classes)
    else:  # grid
        if scores.dim() != 3:
            raise DubitoError(f"how='grid' needs (N, H, W) score maps, got shape {tuple(scores.shape)}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise DubitoError(f"grid must be an integer ≥ 1, got {grid!r}")
        cells = _grid_cells(scores.shape[1], scores.shape[2], grid, scores.device).expand(N, -1)
        means, present = _group_mean_table(flat, flat_valid, cells, grid * grid)

    if how == "class_balanced":
        count = present.sum(1)
        total = torch.where(present, means, torch.zeros_like(means)).sum(1)
        return torch.where(count > 0, total / count.clamp_min(1).to(means.dtype), torch.zeros_like(total))
    best = torch.where(present, means, torch.full_like(means, float("-inf"))).amax(1)
    return torch.where(present.any(1), best, torch.zeros_like(best))


def parse_reduction(spec: str) -> tuple[str, dict[str, float | int]]:
    """Parse ``"mean"``, ``"max"``, ``"class_balanced"``, ``"topq[:Q]"`` or ``"grid[:G]"``.

    Returns ``(how, kwargs)`` for :func:`reduce_scores`, e.g. ``"topq:0.05"`` →
    ``("topq", {"q": 0.05})`` and ``"grid:8"`` → ``("grid", {"grid": 8})``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DubitoError(f"reduction must be a non-empty string such as 'mean', 'topq:0.05' or 'grid:8', got {spec!r}")
    how, sep, arg = spec.strip().partition(":")
    how, arg = how.strip(), arg.strip()
    if how not in REDUCTIONS:
        raise DubitoError(f"unknown reduction {how!r} in {spec!r}; known: {', '.join(REDUCTIONS)}")
    if not sep:
        return how, {}
    if how not in ("topq", "grid"):
        raise DubitoError(f"reduction {how!r} takes no parameter, got {spec!r}")
    if how == "topq":
        try:
            value = float(arg)
        except ValueError:
            raise DubitoError(f"reduction {spec!r}: q must be a number in (0, 1]") from None
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise DubitoError(f"reduction {spec!r}: q must be in (0, 1], got {arg}")
        return how, {"q": value}
    try:
        cells = int(arg)
    except ValueError:
        raise DubitoError(f"reduction {spec!r}: grid must be an integer ≥ 1") from None
    if cells < 1:
        raise DubitoError(f"reduction {spec!r}: grid must be an integer ≥ 1, got {arg}")
    return how, {"grid": cells}
