"""Dataset statistics: median-frequency class weights."""

from __future__ import annotations

import torch

__all__ = ["median_frequency_weights"]


def median_frequency_weights(
    counts: torch.Tensor, present_pixels: torch.Tensor | None = None
) -> torch.Tensor:
    """Median-frequency balancing (Eigen & Fergus 2015, SegNet's CamVid weights): ``median(f) / f_c``.

    ``counts`` (C,): pixels of each class (or frequencies). ``present_pixels`` (C,): the total pixels
    of the images in which each class appears — Eigen & Fergus's definition ``f_c = counts_c /
    present_pixels_c``; without it ``f_c = counts_c / sum(counts)``. The median is over classes that
    occur; classes that never occur get weight 0.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if present_pixels is None:
        freq = counts / counts.sum().clamp_min(1e-12)
    else:
        freq = counts / torch.as_tensor(present_pixels, dtype=torch.float64).clamp_min(1.0)
    seen = freq > 0
    if not seen.any():
        return torch.zeros(freq.shape, dtype=torch.float32)
    median = freq[seen].quantile(0.5)
    return torch.where(seen, median / freq.clamp_min(1e-12), torch.zeros_like(freq)).float()
