"""Transforms applied identically to every spatial map of an item.

A transform is called as ``transform(item, generator=None)`` and returns the item. Spatial maps
are ``image`` (C, H, W) and every other tensor whose last two dimensions are the image's (H, W):
``target``, ``mask``, ``noise``, ``static``, ... The image is resized bilinearly (antialiased when
shrinking); every other map with nearest neighbour, so labels, masks and depth never mix.
Random transforms draw from ``generator``; dubito's datasets pass one seeded by
(seed, epoch, index) — see ``dubito.platform.data.base.item_generator``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dubito import DubitoError

__all__ = [
    "Compose",
    "Resize",
    "resize_map",
    "RandomCrop",
    "CenterCrop",
    "RandomHorizontalFlip",
    "train_transform",
]


def _spatial_keys(item: dict) -> list[str]:
    h, w = item["image"].shape[-2:]
    return [
        k
        for k, v in item.items()
        if isinstance(v, torch.Tensor) and v.ndim >= 2 and tuple(v.shape[-2:]) == (h, w)
    ]


def resize_map(x: torch.Tensor, size: tuple[int, int], image: bool = False) -> torch.Tensor:
    """Resize the last two dimensions of ``x`` to ``size``: bilinear (antialiased when shrinking) for an
    image, nearest neighbour (dtype kept) for labels, masks and depth."""
    lead = x.shape[:-2]
    flat = x.reshape(1, -1, *x.shape[-2:])
    if image:
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        out = F.interpolate(flat.float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)
        out = out.to(x.dtype)
    else:
        out = F.interpolate(flat.float(), size=size, mode="nearest-exact").to(x.dtype)
    return out.reshape(*lead, *size)


class Compose:
    """Apply transforms in order, all with the same generator."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, item: dict, generator: torch.Generator | None = None) -> dict:
        for t in self.transforms:
            item = t(item, generator)
        return item

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Resize:
    """Resize every spatial map to ``size`` = (H, W): bilinear for the image, nearest for the rest."""

    def __init__(self, size: tuple[int, int]):
        self.size = (int(size[0]), int(size[1]))
        if min(self.size) < 1:
            raise DubitoError(f"Resize: size must be positive, got {size!r}")

    def __call__(self, item: dict, generator: torch.Generator | None = None) -> dict:
        if tuple(item["image"].shape[-2:]) == self.size:
            return item
        keys = _spatial_keys(item)
        out = dict(item)
        for k in keys:
            out[k] = resize_map(item[k], self.size, image=(k == "image"))
        return out

    def __repr__(self) -> str:
        return f"Resize({self.size})"


def _crop(item: dict, top: int, left: int, size: tuple[int, int]) -> dict:
    out = dict(item)
    for k in _spatial_keys(item):
        out[k] = item[k][..., top : top + size[0], left : left + size[1]]
    return out


def _crop_size(item: dict, size: tuple[int, int], who: str) -> tuple[int, int]:
    h, w = item["image"].shape[-2:]
    if size[0] > h or size[1] > w:
        raise DubitoError(f"{who}: crop {size[0]}x{size[1]} is larger than the {h}x{w} image")
    return h, w


class RandomCrop:
    """A crop of ``size`` = (H, W) at a uniformly random position (the paper's 224x224 training crops)."""

    def __init__(self, size: tuple[int, int]):
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, item: dict, generator: torch.Generator | None = None) -> dict:
        h, w = _crop_size(item, self.size, "RandomCrop")
        top = int(torch.randint(0, h - self.size[0] + 1, (), generator=generator))
        left = int(torch.randint(0, w - self.size[1] + 1, (), generator=generator))
        return _crop(item, top, left, self.size)

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class CenterCrop:
    """The central crop of ``size`` = (H, W)."""

    def __init__(self, size: tuple[int, int]):
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, item: dict, generator: torch.Generator | None = None) -> dict:
        h, w = _crop_size(item, self.size, "CenterCrop")
        return _crop(item, (h - self.size[0]) // 2, (w - self.size[1]) // 2, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class RandomHorizontalFlip:
    """Mirror every spatial map left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise DubitoError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, item: dict, generator: torch.Generator | None = None) -> dict:
        if float(torch.rand((), generator=generator)) >= self.p:
            return item
        out = dict(item)
        for k in _spatial_keys(item):
            out[k] = item[k].flip(-1)
        return out

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def train_transform(crop: tuple[int, int] | None = None, flip: bool = True) -> Compose:
    """The paper's training augmentation: a random crop (e.g. 224x224) and a horizontal flip."""
    steps: list[Callable] = []
    if crop is not None:
        steps.append(RandomCrop(crop))
    if flip:
        steps.append(RandomHorizontalFlip(0.5))
    return Compose(steps)
