"""Pixel → image reductions of acquisition score maps.

:func:`reduce_scores` maps (N, ...) score maps to one score per image, (N,), over the valid
pixels only: masked (void) pixels never count, and an image without a valid pixel scores 0.
Everything is vectorised over the batch and the pixels.

Each reduction is declared once as a :class:`Reduction` in :data:`REDUCTIONS`, with its one
option (``topq:Q``, ``grid:G``) and what it needs (``class_balanced`` reads the predicted class
of each pixel). Add your own with :func:`register_reduction` or an entry point of the
``dubito.reductions`` group; it then appears in ``--reduction`` and sweeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dubito import DubitoError
from dubito.platform.registry import Registry
from dubito.platform.uncertainty import _reduce_per_item

__all__ = ["REDUCTIONS", "Reduction", "reduce_scores", "parse_reduction", "register_reduction"]

NEEDS = ("classes",)  # what a reduction may ask for beyond the scores and the mask


@dataclass(frozen=True)
class Reduction:
    """A named pixel → image reduction.

    Attributes:
        name: registry name (``--reduction NAME`` or ``NAME:VALUE``).
        fn: ``fn(scores (N, ...), mask (bool, broadcastable) or None, **options)`` → (N,);
            with ``needs=("classes",)`` also ``classes=`` (N, ...) long predicted class per
            pixel and ``num_classes=``.
        doc: what it computes.
        option: the name of its one option, given as ``NAME:VALUE`` (None: it takes none).
        parse: the option's text → its value (raise ``ValueError`` or :class:`DubitoError`).
        needs: a subset of :data:`NEEDS`.
    """

    name: str
    fn: Callable[..., Tensor] = field(repr=False, compare=False)
    doc: str = ""
    option: str | None = None
    parse: Callable[[str], Any] | None = field(default=None, repr=False, compare=False)
    needs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise DubitoError(f"reduction {self.name!r}: fn must be callable, got {self.fn!r}")
        if set(self.needs) - set(NEEDS):
            raise DubitoError(f"reduction {self.name!r}: needs must be among {NEEDS}, got {self.needs!r}")
        if self.option is not None and self.parse is None:
            raise DubitoError(f"reduction {self.name!r}: an option needs parse (its text → value)")


#: every reduction by name: dubito's own, those registered, and those of installed entry points
REDUCTIONS: Registry[Reduction] = Registry("reduction", "dubito.reductions", Reduction, __name__)


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


def _check_q(q: float) -> float:
    if not 0.0 < q <= 1.0:
        raise DubitoError(f"q must be in (0, 1] for 'topq', got {q}")
    return q


def _flat(scores: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    valid = _valid(scores, mask)
    N = scores.shape[0]
    return scores.reshape(N, -1), valid.reshape(N, -1)


def _mean(scores: Tensor, mask: Tensor | None) -> Tensor:
    return _reduce_per_item(scores, mask, "mean")


def _max(scores: Tensor, mask: Tensor | None) -> Tensor:
    return _reduce_per_item(scores, mask, "max")


def _top_fraction(scores: Tensor, mask: Tensor | None, q: float = 0.1) -> Tensor:
    return _topq(*_flat(scores, mask), _check_q(q))


def _class_balanced(
    scores: Tensor, mask: Tensor | None, classes: Tensor | None = None, num_classes: int | None = None
) -> Tensor:
    if classes is None:
        raise DubitoError(
            "how='class_balanced' needs classes (the predicted class per pixel, shaped like scores)"
        )
    if classes.shape != scores.shape:
        raise DubitoError(
            f"classes of shape {tuple(classes.shape)} must match scores of shape {tuple(scores.shape)}"
        )
    if classes.dtype.is_floating_point or classes.dtype == torch.bool:
        raise DubitoError(f"classes must be an integer tensor, got {classes.dtype}")
    flat, flat_valid = _flat(scores, mask)
    groups = classes.to(device=scores.device, dtype=torch.long).reshape(scores.shape[0], -1)
    used = groups[flat_valid]
    if used.numel() and int(used.min()) < 0:
        raise DubitoError(f"classes must be ≥ 0 at valid pixels, found {int(used.min())}")
    top = int(used.max()) + 1 if used.numel() else 1
    if num_classes is None:
        num_classes = top
    elif top > num_classes:
        raise DubitoError(f"classes has class {top - 1} at a valid pixel but num_classes is {num_classes}")
    means, present = _group_mean_table(flat, flat_valid, groups, num_classes)
    count = present.sum(1)
    total = torch.where(present, means, torch.zeros_like(means)).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1).to(means.dtype), torch.zeros_like(total))


def _grid(scores: Tensor, mask: Tensor | None, grid: int = 4) -> Tensor:
    if scores.dim() != 3:
        raise DubitoError(f"how='grid' needs (N, H, W) score maps, got shape {tuple(scores.shape)}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise DubitoError(f"grid must be an integer ≥ 1, got {grid!r}")
    flat, flat_valid = _flat(scores, mask)
    cells = _grid_cells(scores.shape[1], scores.shape[2], grid, scores.device).expand(scores.shape[0], -1)
    means, present = _group_mean_table(flat, flat_valid, cells, grid * grid)
    best = torch.where(present, means, torch.full_like(means, float("-inf"))).amax(1)
    return torch.where(present.any(1), best, torch.zeros_like(best))


def _parse_q(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise DubitoError(f"q must be in (0, 1], got {text}")
    return value


def _parse_grid(text: str) -> int:
    cells = int(text)
    if cells < 1:
        raise DubitoError(f"grid must be an integer ≥ 1, got {text}")
    return cells


for _reduction in (
    Reduction("mean", _mean, "mean of the valid pixels' scores"),
    Reduction("max", _max, "max of the valid pixels' scores"),
    Reduction(
        "topq",
        _top_fraction,
        "mean of the top max(1, ceil(q·n)) of the n valid pixels (topq:Q, default 0.1)",
        "q",
        _parse_q,
    ),
    Reduction(
        "class_balanced",
        _class_balanced,
        "mean score per predicted class, then the unweighted mean over the classes present in the image",
        needs=("classes",),
    ),
    Reduction(
        "grid",
        _grid,
        "(N, H, W) maps in G×G cells (row cell ⌊h·G/H⌋): mean per cell, then the max over cells with a "
        "valid pixel (grid:G, default 4)",
        "grid",
        _parse_grid,
    ),
):
    REDUCTIONS.register(_reduction, builtin=True)


def register_reduction(
    name: str,
    fn: Callable[..., Tensor],
    *,
    option: str | None = None,
    parse: Callable[[str], Any] | None = None,
    needs: tuple[str, ...] = (),
    doc: str | None = None,
    replace: bool = False,
) -> Reduction:
    """Add a pixel → image reduction under ``name`` (for ``--reduction`` and sweeps).

    ``fn(scores, mask, **options)`` maps (N, ...) score maps to (N,) over the valid pixels
    (``mask`` True, or None for all); ``option``/``parse`` declare its one option
    (``--reduction NAME:VALUE`` calls it with ``option=parse(VALUE)``); ``needs=("classes",)``
    adds ``classes=`` and ``num_classes=``. Returns the :class:`Reduction`.
    """
    entry = Reduction(
        name, fn, doc if doc is not None else (fn.__doc__ or "").strip(), option, parse, tuple(needs)
    )
    return REDUCTIONS.register(entry, replace=replace)


def reduce_scores(
    scores: Tensor,
    mask: Tensor | None = None,
    how: str = "mean",
    *,
    classes: Tensor | None = None,
    num_classes: int | None = None,
    **options: Any,
) -> Tensor:
    """Reduce score maps (N, ...) to per-image scores (N,) over the valid pixels.

    Args:
        scores: (N,) (returned as is) or (N, ...) maps, e.g. (N, H, W).
        mask: bool, broadcastable to ``scores``; True marks valid pixels. None: all valid.
        how: a name in :data:`REDUCTIONS`: ``"mean"``; ``"max"``; ``"topq"``: mean of the top
            ``max(1, ceil(q·n))`` of the n valid pixels; ``"class_balanced"``: mean score per
            predicted class (``classes``, shaped like ``scores``, long), then the unweighted mean
            over the classes present in the image; ``"grid"``: (N, H, W) only, split into
            ``grid``×``grid`` cells (row cell ⌊h·grid/H⌋, so uneven edges are spread out), mean
            per cell, then the max over cells with a valid pixel; or one a user registered.
        classes: (N, ...) long predicted class per pixel, for reductions that need it.
        num_classes: number of classes (default: 1 + the largest valid class).
        options: the reduction's option, e.g. ``q=0.05`` (``topq``) or ``grid=8`` (``grid``).
    Returns:
        (N,) scores; 0 for an image without valid pixels.
    """
    if how not in REDUCTIONS:
        raise DubitoError(f"how must be one of {tuple(REDUCTIONS)}, got {how!r}")
    entry = REDUCTIONS[how]
    # each reduction gets its own option; q and grid are accepted for any (a topq / grid setting alongside)
    unknown = set(options) - {entry.option, "q", "grid"}
    if unknown:
        raise DubitoError(
            f"reduction {how!r} takes {'option ' + entry.option if entry.option else 'no option'}, "
            f"got {', '.join(sorted(unknown))}"
        )
    options = {k: v for k, v in options.items() if k == entry.option}
    if scores.dim() == 0:
        raise DubitoError("scores must be (N,) or (N, ...), got a scalar")
    if scores.dim() == 1:
        return scores
    if "classes" in entry.needs:
        options = {**options, "classes": classes, "num_classes": num_classes}
    return entry.fn(scores, mask, **options)


def parse_reduction(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse ``NAME`` or ``NAME:VALUE`` (``"mean"``, ``"topq:0.05"``, ``"grid:8"``, ...).

    Returns ``(how, kwargs)`` for :func:`reduce_scores`, e.g. ``"topq:0.05"`` →
    ``("topq", {"q": 0.05})`` and ``"grid:8"`` → ``("grid", {"grid": 8})``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DubitoError(
            f"reduction must be a non-empty string such as 'mean', 'topq:0.05' or 'grid:8', got {spec!r}"
        )
    how, sep, arg = spec.strip().partition(":")
    how, arg = how.strip(), arg.strip()
    if how not in REDUCTIONS:
        raise DubitoError(f"unknown reduction {how!r} in {spec!r}; known: {', '.join(REDUCTIONS)}")
    entry = REDUCTIONS[how]
    if not sep:
        return how, {}
    if entry.option is None:
        raise DubitoError(f"reduction {how!r} takes no parameter, got {spec!r}")
    try:
        return how, {entry.option: entry.parse(arg)}
    except DubitoError as err:
        raise DubitoError(f"reduction {spec!r}: {err}") from None
    except (ValueError, TypeError):
        raise DubitoError(f"reduction {spec!r}: {entry.option} {arg!r} is not valid ({entry.doc})") from None
