"""Synthetic scenes whose noise is known: ``SyntheticCamVid`` (segmentation) and ``SyntheticMake3D``
(depth), rendered from the same small 3-D street model, so class maps and depth are consistent.

Each item is drawn from its own generator, seeded by (seed, split, ood, index): the same seed gives
the same item whatever the dataset size or the order of access. A street scene is a camera at
eye height looking down a road: road, pavements, building facades (with gaps of trees), poles with
signs, fences, cars, pedestrians and cyclists as boxes and discs, sky where no surface is hit.
The out-of-distribution variant (``ood=True``) renders indoor rooms instead (floor, walls, ceiling,
furniture, a person, a window) with an indoor palette and lighting.

Known aleatoric structure, returned with every item:

- ``noise`` (H, W): the true noise of the target given the scene. Segmentation: the entropy (nats)
  of the label given the scene: 0 on clean pixels; ``H(boundary_flip)`` in the ambiguous boundary
  bands, where the label is the neighbouring region's class with probability ``boundary_flip``;
  ``log 11`` in TV static. Depth: the standard deviation (m) of the depth target: sensor noise
  ``sensor_noise[0] + sensor_noise[1] * depth²``, growing with depth; the mixture's std in the
  boundary bands ("flying pixels" take the neighbour's depth with probability ``boundary_flip``);
  the std of Uniform(1 m, max_depth) in TV static.
- ``input_noise`` (H, W): the std of the Gaussian pixel noise added to the image (in [0, 1] units):
  0.015, or 0.06 in low-contrast "dusk" images (a fraction ``dusk_fraction``), and the std of the
  static itself (0.289) inside TV static.
- ``static`` (H, W) bool and ``has_static``: a fraction ``static_fraction`` of images contains one
  rectangle of TV-like static (grey uniform pixels) whose labels (or depths) are drawn at random.
  The static is visible in the input, so a model can learn it is unpredictable (high aleatoric
  uncertainty) — the labeling version of the noisy-TV problem.
- ``clean_target``: the target before any label or depth noise; ``dusk`` and ``ood`` flags.

Class frequencies of ``SyntheticCamVid`` (``SYNTHETIC_CAMVID_FREQUENCIES``; the README has the table)
are within a factor 0.74-1.13 of CamVid's own (``CAMVID_FREQUENCIES``, implied by SegNet's class
weights), in the same order: road 34 %, building 24 %, sky 15 %, tree 13 %, car 5.3 %, pavement
4.6 %, fence 1.8 %, pole 0.8 %, pedestrian 0.7 %, bicyclist 0.6 %, sign 0.5 %. The test suite
checks them on another seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dubito import DubitoError
from dubito.platform.data.base import IMAGENET_MEAN, IMAGENET_STD, check_size, item_generator, normalize_image
from dubito.platform.data.camvid import CAMVID_CLASS_WEIGHTS, CAMVID_CLASSES, CAMVID_VOID

__all__ = [
    "SyntheticCamVid",
    "SyntheticMake3D",
    "SyntheticScenes",
    "SYNTHETIC_CAMVID_FREQUENCIES",
    "CAMVID_FREQUENCIES",
    "binary_entropy",
]

SKY, BUILDING, POLE, ROAD, PAVEMENT, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST = range(11)
NUM_CLASSES = len(CAMVID_CLASSES)
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
DEFAULT_COUNTS = {
    "camvid": {"train": 367, "val": 101, "test": 233},
    "make3d": {"train": 400, "val": 100, "test": 134},
}
#: CamVid's class frequencies implied by SegNet's median-frequency weights (frequency ∝ 1 / weight)
CAMVID_FREQUENCIES = tuple(
    round((1 / w) / sum(1 / v for v in CAMVID_CLASS_WEIGHTS), 4) for w in CAMVID_CLASS_WEIGHTS
)
#: SyntheticCamVid's clean-label frequencies, measured on the train split (200 images, 90x120, seed 0)
SYNTHETIC_CAMVID_FREQUENCIES = (
    0.1478,
    0.2375,
    0.008,
    0.3433,
    0.0456,
    0.13,
    0.005,
    0.0177,
    0.0526,
    0.0068,
    0.0059,
)
CLEAN_INPUT_NOISE, DUSK_INPUT_NOISE = 0.015, 0.06
STATIC_INPUT_NOISE = 1 / math.sqrt(12)


def binary_entropy(p: float) -> float:
    """H(p) in nats."""
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log(p) + (1 - p) * math.log(1 - p))


# ----------------------------------------------------------------------------- the scene model
@dataclass
class Surface:
    """An axis-aligned bounded plane: coordinate ``axis`` (0 = x, 1 = y up, 2 = z forward) equals
    ``value``; the other two coordinates lie in ``bounds`` (or inside the disc ``disc`` = (a, b, r))."""

    axis: int
    value: float
    bounds: tuple[tuple[float, float], tuple[float, float]]
    cls: int
    color: tuple[float, float, float]
    texture: str = "plain"
    disc: tuple[float, float, float] | None = None


@dataclass
class Scene:
    surfaces: list[Surface]
    camera: tuple[float, float]  # (x, height)
    yaw: float
    horizon: float  # row of the horizon as a fraction of H
    focal: float  # in units of H
    sky: tuple[tuple[float, float, float], tuple[float, float, float]] | None  # (top, horizon) colours
    haze: float  # metres; inf for none
    light: tuple[float, float, float]
    indoor: bool


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _jitter(rng, color, amount=0.06):
    return tuple(float(np.clip(c + rng.uniform(-amount, amount), 0, 1)) for c in color)


_BUILDING_COLORS = [
    (0.55, 0.35, 0.28),
    (0.7, 0.68, 0.62),
    (0.82, 0.76, 0.6),
    (0.45, 0.45, 0.48),
    (0.6, 0.5, 0.42),
]
_CAR_COLORS = [
    (0.75, 0.1, 0.1),
    (0.1, 0.2, 0.6),
    (0.85, 0.85, 0.85),
    (0.12, 0.12, 0.12),
    (0.6, 0.6, 0.62),
    (0.9, 0.75, 0.1),
]
_CLOTHES = [(0.15, 0.15, 0.35), (0.6, 0.1, 0.15), (0.2, 0.2, 0.2), (0.8, 0.7, 0.5), (0.1, 0.4, 0.3)]
_SIGN_COLORS = [(0.8, 0.1, 0.1), (0.1, 0.25, 0.75), (0.95, 0.8, 0.1)]


def _daylight(rng) -> tuple[float, float, float]:
    """A brightness between 0.85 and 1.15 with a slight warm or cool cast."""
    brightness, tint = _u(rng, 0.85, 1.15), _u(rng, -0.04, 0.04)
    return (brightness * (1 + tint), brightness, brightness * (1 - tint))


def _box(surfaces, rng, x, z, width, height, length, cls, color, texture, cam_x, y0=0.0):
    """A box's back face at depth ``z`` and the side face the camera can see."""
    surfaces.append(Surface(2, z, ((x - width / 2, x + width / 2), (y0, y0 + height)), cls, color, texture))
    side = x - width / 2 if x > cam_x else x + width / 2
    surfaces.append(
        Surface(0, side, ((y0, y0 + height), (z, z + length)), cls, _jitter(rng, color, 0.03), texture)
    )


def street_scene(rng: np.random.Generator) -> Scene:
    """A street: road, pavements, facades with gaps, poles, signs, fences, cars, people."""
    s: list[Surface] = []
    road = _u(rng, 3.0, 6.0)
    pav_l, pav_r = _u(rng, 1.5, 4.0), _u(rng, 1.5, 4.0)
    fac_l, fac_r = -(road + pav_l), road + pav_r
    cam_x = _u(rng, -0.5, 0.5) * road
    far = 250.0
    asphalt = _u(rng, 0.3, 0.42)
    s.append(Surface(1, 0.0, ((-road, road), (0, far)), ROAD, (asphalt, asphalt, asphalt + 0.02), "road"))
    pav_color = _jitter(rng, (0.62, 0.6, 0.55), 0.05)
    s.append(Surface(1, 0.0, ((fac_l - 30, -road), (0, far)), PAVEMENT, pav_color, "tiles"))
    s.append(Surface(1, 0.0, ((road, fac_r + 30), (0, far)), PAVEMENT, pav_color, "tiles"))
    for side, x in ((-1, fac_l), (1, fac_r)):
        z = 0.0
        while z < far:
            length = _u(rng, 8, 30)
            if rng.random() < 0.18:  # a gap: a row of trees set back
                h = _u(rng, 4, 10)
                s.append(
                    Surface(
                        0,
                        x + side * 3,
                        ((0, h), (z, z + length)),
                        TREE,
                        _jitter(rng, (0.2, 0.42, 0.16)),
                        "leaves",
                    )
                )
            else:
                h = _u(rng, 6, 24)
                color = _jitter(rng, _BUILDING_COLORS[rng.integers(len(_BUILDING_COLORS))])
                s.append(Surface(0, x, ((0, h), (z, z + length)), BUILDING, color, "windows"))
            z += length
        if rng.random() < 0.6:  # a fence along the pavement
            z0 = _u(rng, 2, 20)
            fx = x - side * 0.3
            s.append(
                Surface(
                    0,
                    fx,
                    ((0, _u(rng, 1.0, 2.0)), (z0, z0 + _u(rng, 15, 50))),
                    FENCE,
                    _jitter(rng, (0.45, 0.38, 0.3)),
                    "slats",
                )
            )
    for _ in range(rng.integers(2, 7)):  # trees on the pavement
        side = rng.choice([-1, 1])
        x = (fac_l + 1.2) if side < 0 else (fac_r - 1.2)
        z, y, r = _u(rng, 5, 50), _u(rng, 3.5, 6.5), _u(rng, 1.8, 3.8)
        leaves = _jitter(rng, (0.2, 0.45, 0.15))
        s.append(Surface(2, z, ((x - r, x + r), (y - r, y + r)), TREE, leaves, "leaves", disc=(x, y, r)))
        s.append(Surface(2, z + 0.01, ((x - 0.15, x + 0.15), (0, y)), TREE, (0.35, 0.25, 0.15)))
    for _ in range(rng.integers(2, 6)):  # poles, most with a sign
        side = rng.choice([-1, 1])
        x, z, h = side * (road + _u(rng, 0.3, 0.8)), _u(rng, 4, 35), _u(rng, 3.5, 7.0)
        s.append(Surface(2, z, ((x - 0.12, x + 0.12), (0, h)), POLE, _jitter(rng, (0.3, 0.3, 0.32), 0.04)))
        if rng.random() < 0.8:
            w = _u(rng, 0.7, 1.2)
            y = h - _u(rng, 0.3, 1.5)
            color = _SIGN_COLORS[rng.integers(len(_SIGN_COLORS))]
            s.append(Surface(2, z - 0.05, ((x - w / 2, x + w / 2), (y - w / 2, y + w / 2)), SIGN, color))
    for _ in range(rng.integers(2, 7)):  # cars, driving or parked
        parked = rng.random() < 0.4
        x = (rng.choice([-1, 1]) * (road - 1.1)) if parked else _u(rng, -road + 1.1, road - 1.1)
        color = _CAR_COLORS[rng.integers(len(_CAR_COLORS))]
        _box(s, rng, x, _u(rng, 4, 35), 1.8, _u(rng, 1.35, 1.6), 4.4, CAR, color, "car", cam_x, y0=0.15)
    for _ in range(rng.integers(1, 5)):  # pedestrians on the pavement
        side = rng.choice([-1, 1])
        x = side * (road + _u(rng, 0.5, 1.5))
        z, h = _u(rng, 3, 25), _u(rng, 1.55, 1.9)
        s.append(
            Surface(
                2,
                z,
                ((x - 0.3, x + 0.3), (0, h)),
                PEDESTRIAN,
                _CLOTHES[rng.integers(len(_CLOTHES))],
                "person",
            )
        )
    for _ in range(rng.integers(0, 4)):  # cyclists at the road's edge
        x = rng.choice([-1, 1]) * (road - _u(rng, 0.4, 1.0))
        z = _u(rng, 4, 30)
        s.append(
            Surface(
                2, z, ((x - 0.3, x + 0.3), (0, 1.75)), BICYCLIST, _jitter(rng, (0.2, 0.2, 0.25)), "person"
            )
        )
        s.append(Surface(0, x, ((0, 1.1), (z, z + 1.7)), BICYCLIST, (0.12, 0.12, 0.12)))
    sky_top = _jitter(rng, (0.35, 0.55, 0.9), 0.08)
    return Scene(
        surfaces=s,
        camera=(cam_x, _u(rng, 1.3, 1.8)),
        yaw=math.radians(_u(rng, -6, 6)),
        horizon=_u(rng, 0.44, 0.56),
        focal=_u(rng, 0.9, 1.2),
        sky=(sky_top, _jitter(rng, (0.8, 0.85, 0.9), 0.05)),
        haze=_u(rng, 90, 180),
        light=_daylight(rng),
        indoor=False,
    )


def room_scene(rng: np.random.Generator) -> Scene:
    """An indoor room (the out-of-distribution variant), labelled in CamVid's classes: floor → Road,
    walls and window → Building, ceiling → Sky, furniture → Fence, person → Pedestrian, plant → Tree,
    lamp → Pole, picture → SignSymbol."""
    s: list[Surface] = []
    width, depth, height = _u(rng, 3.0, 6.0), _u(rng, 4.0, 9.0), _u(rng, 2.4, 3.2)
    cam_x = _u(rng, -0.25, 0.25) * width
    wall = _jitter(rng, (0.85, 0.78, 0.65), 0.08)
    s.append(
        Surface(
            1, 0.0, ((-width / 2, width / 2), (0, depth)), ROAD, _jitter(rng, (0.5, 0.33, 0.18)), "planks"
        )
    )
    s.append(
        Surface(1, height, ((-width / 2, width / 2), (0, depth)), SKY, _jitter(rng, (0.92, 0.9, 0.86), 0.04))
    )
    s.append(Surface(0, -width / 2, ((0, height), (0, depth)), BUILDING, wall))
    s.append(Surface(0, width / 2, ((0, height), (0, depth)), BUILDING, _jitter(rng, wall, 0.04)))
    s.append(Surface(2, depth, ((-width / 2, width / 2), (0, height)), BUILDING, _jitter(rng, wall, 0.04)))
    wx, ww = _u(rng, -width / 4, width / 4), _u(rng, 0.8, 1.6)
    s.append(Surface(2, depth - 0.02, ((wx - ww / 2, wx + ww / 2), (1.0, 2.1)), BUILDING, (0.95, 0.95, 0.85)))
    if rng.random() < 0.7:
        px = _u(rng, -width / 3, width / 3)
        s.append(
            Surface(
                2, depth - 0.02, ((px - 0.4, px + 0.4), (1.3, 1.9)), SIGN, _jitter(rng, (0.3, 0.5, 0.6), 0.2)
            )
        )
    for _ in range(rng.integers(1, 5)):
        w, h, z = _u(rng, 0.6, 2.0), _u(rng, 0.5, 2.0), _u(rng, 1.5, depth - 0.6)
        x = _u(rng, -width / 2 + w / 2, width / 2 - w / 2)
        _box(
            s,
            rng,
            x,
            z,
            w,
            h,
            _u(rng, 0.4, 1.0),
            FENCE,
            _jitter(rng, (0.35, 0.22, 0.12), 0.1),
            "plain",
            cam_x,
        )
    if rng.random() < 0.6:
        x, z = _u(rng, -width / 3, width / 3), _u(rng, 1.5, depth - 0.5)
        s.append(
            Surface(
                2,
                z,
                ((x - 0.25, x + 0.25), (0, _u(rng, 1.5, 1.9))),
                PEDESTRIAN,
                _CLOTHES[rng.integers(5)],
                "person",
            )
        )
    if rng.random() < 0.5:
        x, z = rng.choice([-1, 1]) * (width / 2 - 0.5), _u(rng, 1.0, depth - 0.5)
        s.append(
            Surface(
                2, z, ((x - 0.4, x + 0.4), (0.5, 1.3)), TREE, (0.15, 0.5, 0.2), "leaves", disc=(x, 0.9, 0.4)
            )
        )
    if rng.random() < 0.5:
        x, z = rng.choice([-1, 1]) * (width / 2 - 0.3), _u(rng, 1.0, depth - 0.3)
        s.append(Surface(2, z, ((x - 0.03, x + 0.03), (0, 1.6)), POLE, (0.2, 0.2, 0.2)))
    return Scene(
        surfaces=s,
        camera=(cam_x, _u(rng, 1.2, 1.7)),
        yaw=math.radians(_u(rng, -12, 12)),
        horizon=_u(rng, 0.42, 0.58),
        focal=_u(rng, 0.7, 0.95),
        sky=None,
        haze=math.inf,
        light=(_u(rng, 1.0, 1.15), _u(rng, 0.9, 1.0), _u(rng, 0.7, 0.85)),
        indoor=True,
    )


@dataclass
class Rendered:
    cls: np.ndarray  # (H, W) int, SKY where nothing is hit
    depth: np.ndarray  # (H, W) float, inf where nothing is hit
    color: np.ndarray  # (H, W, 3) float in [0, 1], before noise


def render(scene: Scene, height: int, width: int, grain: np.ndarray) -> Rendered:
    """Ray-cast ``scene`` at (height, width): class map, depth (camera z, metres) and colours.
    ``grain`` is an (H, W) uniform [0, 1) map used for fine texture."""
    rows = (np.arange(height) + 0.5) / height
    cols = (np.arange(width) + 0.5 - width / 2) / height
    dx = np.broadcast_to(cols[None, :] / scene.focal, (height, width))
    dy = np.broadcast_to((scene.horizon - rows)[:, None] / scene.focal, (height, width))
    c, s_ = math.cos(scene.yaw), math.sin(scene.yaw)
    d = np.stack([c * dx + s_, dy, -s_ * dx + c], axis=-1)  # world directions; camera depth = t
    origin = np.array([scene.camera[0], scene.camera[1], 0.0])
    best = np.full((height, width), np.inf)
    index = np.full((height, width), -1)
    windows: list[tuple[slice, slice] | None] = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for k, surf in enumerate(scene.surfaces):
            window = _screen_window(scene, surf, height, width)
            windows.append(window)
            if window is None:
                continue
            dw, bw = d[window], best[window]
            t = (surf.value - origin[surf.axis]) / dw[..., surf.axis]
            hit = (t > 1e-3) & (t < bw)
            if not hit.any():
                continue
            a, b = [ax for ax in range(3) if ax != surf.axis]
            pa = origin[a] + t * dw[..., a]
            pb = origin[b] + t * dw[..., b]
            if surf.disc is not None:
                hit &= (pa - surf.disc[0]) ** 2 + (pb - surf.disc[1]) ** 2 <= surf.disc[2] ** 2
            else:
                (alo, ahi), (blo, bhi) = surf.bounds
                hit &= (pa >= alo) & (pa <= ahi) & (pb >= blo) & (pb <= bhi)
            best[window] = np.where(hit, t, bw)
            index[window] = np.where(hit, k, index[window])
    cls = np.full((height, width), SKY, dtype=np.int64)
    color = np.zeros((height, width, 3))
    point = origin + np.where(np.isfinite(best), best, 0.0)[..., None] * d
    for k, surf in enumerate(scene.surfaces):
        window = windows[k]
        if window is None:
            continue
        sel = index[window] == k
        if not sel.any():
            continue
        cls[window][sel] = surf.cls
        pts = point[window][sel]
        shade = np.asarray(surf.color) * _texture(surf.texture, pts, grain[window][sel])[:, None]
        if surf.texture == "car":  # dark windows on the upper part of the body
            shade[pts[:, 1] > 1.0] = (0.15, 0.18, 0.22)
        elif surf.texture == "person":  # a head
            shade[pts[:, 1] > 1.45] = (0.8, 0.62, 0.5)
        color[window][sel] = shade
    sky = index < 0
    if scene.sky is not None:
        top, horizon_color = (np.asarray(v) for v in scene.sky)
        mix = np.clip(rows / max(scene.horizon, 1e-3), 0, 1)[:, None, None] * np.ones((1, width, 1))
        color = np.where(sky[..., None], top * (1 - mix) + horizon_color * mix, color)
        if math.isfinite(scene.haze):
            fog = (1 - np.exp(-np.where(np.isfinite(best), best, 0.0) / scene.haze))[..., None]
            color = np.where(sky[..., None], color, color * (1 - fog) + horizon_color * fog)
    else:  # indoor: warm light falling off with depth and towards the borders
        fall = 1.0 / (1 + 0.04 * np.where(np.isfinite(best), best, 0.0) ** 1.5)
        vign = 1 - 0.35 * (((rows - 0.5) ** 2)[:, None] + ((cols * height / width) ** 2)[None, :])
        color = color * (0.55 + 0.45 * fall)[..., None] * vign[..., None]
    color = color * np.asarray(scene.light)
    return Rendered(cls=cls, depth=best, color=np.clip(color, 0, 1))


def _screen_window(scene: Scene, surf: Surface, height: int, width: int) -> tuple[slice, slice] | None:
    """The image rows/columns a surface can cover: the bounding box (plus a pixel) of its rectangle,
    clipped to the part in front of the camera, projected; None when it is entirely behind."""
    (alo, ahi), (blo, bhi) = surf.bounds
    a, b = [ax for ax in range(3) if ax != surf.axis]
    corners = np.zeros((4, 3))
    corners[:, surf.axis] = surf.value
    corners[:, a] = [alo, alo, ahi, ahi]
    corners[:, b] = [blo, bhi, blo, bhi]
    rel = corners[[0, 1, 3, 2]] - np.array([scene.camera[0], scene.camera[1], 0.0])  # in polygon order
    c, s_ = math.cos(scene.yaw), math.sin(scene.yaw)
    cam = np.stack([c * rel[:, 0] - s_ * rel[:, 2], rel[:, 1], s_ * rel[:, 0] + c * rel[:, 2]], axis=1)
    if not np.isfinite(cam).all():
        return (slice(None), slice(None))
    cam = _clip_near(cam, 1e-3)  # the part in front of the camera
    if len(cam) == 0:
        return None
    cx, cy, cz = cam[:, 0], cam[:, 1], cam[:, 2]
    f = scene.focal * height
    col = cx / cz * f + width / 2 - 0.5
    row = scene.horizon * height - cy / cz * f - 0.5
    r0, r1 = max(int(np.floor(row.min())) - 1, 0), min(int(np.ceil(row.max())) + 2, height)
    c0, c1 = max(int(np.floor(col.min())) - 1, 0), min(int(np.ceil(col.max())) + 2, width)
    if r0 >= r1 or c0 >= c1:
        return None
    return (slice(r0, r1), slice(c0, c1))


def _clip_near(polygon: np.ndarray, near: float) -> np.ndarray:
    """Sutherland-Hodgman: the part of a convex polygon (n, 3) with camera depth z >= near."""
    out = []
    for i in range(len(polygon)):
        p, q = polygon[i], polygon[(i + 1) % len(polygon)]
        p_in, q_in = p[2] >= near, q[2] >= near
        if p_in:
            out.append(p)
        if p_in != q_in:
            out.append(p + (q - p) * (near - p[2]) / (q[2] - p[2]))
    return np.array(out).reshape(-1, 3)


def _texture(kind: str, p: np.ndarray, grain: np.ndarray) -> np.ndarray:
    """Brightness factor (n,) of a texture at world points ``p`` (n, 3)."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    if kind == "road":
        lane = (np.abs(x) < 0.08) & (np.mod(z, 8.0) < 4.0)
        return np.where(lane, 2.4, 0.92 + 0.16 * grain)
    if kind == "tiles":
        seam = (np.mod(z, 1.2) < 0.06) | (np.mod(x, 1.2) < 0.06)
        return np.where(seam, 0.75, 0.95 + 0.1 * grain)
    if kind == "windows":
        window = (
            (np.mod(z, 3.0) > 0.9)
            & (np.mod(z, 3.0) < 2.1)
            & (np.mod(y, 3.2) > 1.0)
            & (np.mod(y, 3.2) < 2.3)
            & (y > 2.5)
        )
        return np.where(window, 0.45, 0.95 + 0.1 * grain)
    if kind == "leaves":
        return 0.6 + 0.8 * grain
    if kind == "slats":
        return np.where(np.mod(z + x, 0.3) < 0.1, 0.7, 1.05)
    if kind == "planks":
        return np.where(np.mod(x, 0.25) < 0.02, 0.7, 0.92 + 0.16 * grain)
    return 0.95 + 0.1 * grain


# ----------------------------------------------------------------------------- noise processes
def _boundary_neighbour(values: np.ndarray, width: int, differs: Callable) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel, the value of the nearest pixel (4 directions, up to ``width`` away) for which
    ``differs(own, other)``; returns (has_neighbour, neighbour_value)."""
    h, w = values.shape
    found = np.zeros((h, w), dtype=bool)
    other = values.copy()
    for k in range(1, width + 1):
        for dy, dx in ((k, 0), (-k, 0), (0, k), (0, -k)):
            shifted = np.empty_like(values)
            ys, yd = (
                (slice(dy, None), slice(None, h - dy)) if dy >= 0 else (slice(None, h + dy), slice(-dy, None))
            )
            xs, xd = (
                (slice(dx, None), slice(None, w - dx)) if dx >= 0 else (slice(None, w + dx), slice(-dx, None))
            )
            shifted[...] = values
            shifted[yd, xd] = values[ys, xs]
            new = ~found & differs(values, shifted)
            other[new] = shifted[new]
            found |= new
    return found, other


def _static_region(rng, height: int, width: int) -> np.ndarray:
    """A rectangle covering 6-15 % of the image at a random place. The four draws do not depend on
    the resolution, so an item's static sits at the same relative place at every size."""
    area, aspect = _u(rng, 0.06, 0.15) * height * width, _u(rng, 0.6, 1.6)
    top_frac, left_frac = rng.random(), rng.random()
    h = int(np.clip(round(math.sqrt(area / aspect)), 2, height))
    w = int(np.clip(round(math.sqrt(area * aspect)), 2, width))
    top, left = int(top_frac * (height - h + 1)), int(left_frac * (width - w + 1))
    region = np.zeros((height, width), dtype=bool)
    region[top : top + h, left : left + w] = True
    return region


# ----------------------------------------------------------------------------- datasets
class SyntheticScenes(torch.utils.data.Dataset):
    """Shared machinery of the synthetic datasets (see the module docstring for the noise model)."""

    task = "segmentation"
    name = "synthetic"
    _kind = "camvid"
    _stream = 0

    def __init__(
        self,
        split: str = "train",
        n: int | None = None,
        size: tuple[int, int] = (360, 480),
        seed: int = 0,
        static_fraction: float = 0.2,
        dusk_fraction: float = 0.1,
        boundary_flip: float = 0.3,
        boundary_width: int | None = None,
        ood: bool = False,
        transform: Callable | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = (IMAGENET_MEAN, IMAGENET_STD),
    ):
        if split not in SPLIT_CODES:
            raise DubitoError(f"split must be one of {', '.join(SPLIT_CODES)}, got {split!r}")
        self.n = DEFAULT_COUNTS[self._kind][split] if n is None else int(n)
        if self.n < 0:
            raise DubitoError(f"n must be >= 0, got {n}")
        self.size = check_size(size, minimum=8)
        for arg, value in (
            ("static_fraction", static_fraction),
            ("dusk_fraction", dusk_fraction),
            ("boundary_flip", boundary_flip),
        ):
            if not 0.0 <= value <= 1.0:
                raise DubitoError(f"{arg} must be in [0, 1], got {value}")
        if int(seed) < 0:
            raise DubitoError(f"seed must be >= 0, got {seed}")
        self.split, self.seed, self.ood = split, int(seed), bool(ood)
        self.static_fraction, self.dusk_fraction, self.boundary_flip = (
            static_fraction,
            dusk_fraction,
            boundary_flip,
        )
        self.boundary_width = (
            max(1, round(min(self.size) / 180)) if boundary_width is None else int(boundary_width)
        )
        self.transform, self.normalize = transform, normalize
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_CODES[self.split], int(self.ood), index, self._stream])

    def scene(self, index: int) -> tuple[Scene, np.random.Generator]:
        """The 3-D scene of item ``index`` and the generator that continues its noise."""
        rng = self._rng(index)
        return (room_scene(rng) if self.ood else street_scene(rng)), rng

    def _draw_flags(self, rng: np.random.Generator) -> tuple[bool, bool]:
        # resolution-independent draws first: the same item has the same flags at every size,
        # and raising a fraction only adds flagged items
        return bool(rng.random() < self.dusk_fraction), bool(rng.random() < self.static_fraction)

    def flags(self, index: int) -> dict[str, bool]:
        """Item ``index``'s ``dusk`` and ``has_static`` flags without rendering it."""
        dusk, has_static = self._draw_flags(self.scene(int(index) % max(self.n, 1))[1])
        return {"dusk": dusk, "has_static": has_static}

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -self.n <= index < self.n:
            raise IndexError(f"{self.name}: index {index} out of range for {self.n} items")
        index %= self.n
        scene, rng = self.scene(index)
        h, w = self.size
        dusk, has_static = self._draw_flags(rng)
        static = _static_region(rng, h, w)
        if not has_static:
            static[...] = False
        rendered = render(scene, h, w, grain=rng.random((h, w)))
        item = self._targets(rendered, rng, static)
        color = rendered.color
        if dusk:  # dark, low contrast, bluish, noisier sensor
            color = 0.05 + 0.4 * (color.mean(axis=(0, 1)) + 0.5 * (color - color.mean(axis=(0, 1))))
            color = color * np.array([0.85, 0.9, 1.1])
        input_noise = np.full((h, w), DUSK_INPUT_NOISE if dusk else CLEAN_INPUT_NOISE)
        color = color + rng.normal(size=color.shape) * input_noise[..., None]
        if has_static:
            color[static] = rng.random((int(static.sum()), 1))  # grey TV static
            input_noise[static] = STATIC_INPUT_NOISE
        image = torch.from_numpy(np.clip(color, 0, 1).astype(np.float32)).permute(2, 0, 1).contiguous()
        image = normalize_image(image, self.normalize)
        item.update(
            image=image,
            input_noise=torch.from_numpy(input_noise.astype(np.float32)),
            static=torch.from_numpy(static),
            has_static=has_static,
            dusk=dusk,
            ood=self.ood,
        )
        if self.transform is not None:
            item = self.transform(item, item_generator(self.seed, self.epoch, index))
        item["id"] = index
        return item

    def _targets(
        self, rendered: Rendered, rng: np.random.Generator, static: np.ndarray
    ) -> dict:  # pragma: no cover
        raise NotImplementedError


class SyntheticCamVid(SyntheticScenes):
    """Road scenes with CamVid's 11 classes and known label noise (see the module docstring).

    Items: ``image`` (3, H, W), ``target`` (H, W) long 0-10 (noisy labels), ``clean_target``,
    ``mask`` (all True: no void), ``noise`` (entropy of the label in nats), ``input_noise``,
    ``static``, ``has_static``, ``dusk``, ``ood``, ``id``. Default counts per split as CamVid
    (367 / 101 / 233).
    """

    task = "segmentation"
    num_classes = NUM_CLASSES
    ignore_index = CAMVID_VOID
    class_names = CAMVID_CLASSES
    name = "SyntheticCamVid"
    _kind = "camvid"

    def _targets(self, rendered: Rendered, rng: np.random.Generator, static: np.ndarray) -> dict:
        clean = rendered.cls
        band, neighbour = _boundary_neighbour(clean, self.boundary_width, np.not_equal)
        band &= ~static
        flip = band & (rng.random(clean.shape) < self.boundary_flip)
        target = np.where(flip, neighbour, clean)
        noise = np.where(band, binary_entropy(self.boundary_flip), 0.0)
        if static.any():
            target[static] = rng.integers(0, NUM_CLASSES, int(static.sum()))
            noise[static] = math.log(NUM_CLASSES)
        return {
            "target": torch.from_numpy(target.astype(np.int64)),
            "clean_target": torch.from_numpy(clean.astype(np.int64)),
            "mask": torch.ones(clean.shape, dtype=torch.bool),
            "noise": torch.from_numpy(noise.astype(np.float32)),
        }

    def class_weights(self) -> torch.Tensor:
        """Median-frequency weights from the documented class frequencies (as SegNet's for CamVid)."""
        from dubito.platform.data.stats import median_frequency_weights

        return median_frequency_weights(torch.tensor(SYNTHETIC_CAMVID_FREQUENCIES))


class SyntheticMake3D(SyntheticScenes):
    """Depth scenes (ground plane, facades, objects) with known depth noise (module docstring).

    Items: ``image`` (3, H, W), ``target`` (H, W) float metres (noisy), ``clean_target``, ``mask``
    (0 < clean depth <= ``max_depth``; sky is invalid), ``noise`` (std of the target, m),
    ``input_noise``, ``static``, ``has_static``, ``dusk``, ``ood``, ``id``.
    """

    task = "depth"
    num_classes = None
    ignore_index = None
    name = "SyntheticMake3D"
    _kind = "make3d"
    _stream = 1

    def __init__(
        self,
        split: str = "train",
        n: int | None = None,
        size: tuple[int, int] = (240, 180),
        seed: int = 0,
        static_fraction: float = 0.2,
        dusk_fraction: float = 0.1,
        boundary_flip: float = 0.3,
        boundary_width: int | None = None,
        sensor_noise: tuple[float, float] = (0.05, 0.0004),
        max_depth: float = 70.0,
        ood: bool = False,
        transform: Callable | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = (IMAGENET_MEAN, IMAGENET_STD),
    ):
        super().__init__(
            split,
            n,
            size,
            seed,
            static_fraction,
            dusk_fraction,
            boundary_flip,
            boundary_width,
            ood,
            transform,
            normalize,
        )
        if not max_depth > 1.0:
            raise DubitoError(f"max_depth must be > 1 metre, got {max_depth}")
        if min(sensor_noise) < 0:
            raise DubitoError(f"sensor_noise must be non-negative, got {sensor_noise}")
        self.max_depth = float(max_depth)
        self.sensor_noise = (float(sensor_noise[0]), float(sensor_noise[1]))

    def depth_std(self, depth: np.ndarray) -> np.ndarray:
        """Sensor noise std (m) at ``depth`` (m): a + b·depth²."""
        return self.sensor_noise[0] + self.sensor_noise[1] * depth**2

    def _targets(self, rendered: Rendered, rng: np.random.Generator, static: np.ndarray) -> dict:
        clean = rendered.depth
        valid = np.isfinite(clean) & (clean <= self.max_depth)
        clean_v = np.where(valid, clean, 0.0)

        def jump(a, b):  # a depth edge: >10 % relative change, both sides valid
            return (a > 0) & (b > 0) & (np.abs(a - b) > 0.1 * np.minimum(a, b))

        band, neighbour = _boundary_neighbour(clean_v, self.boundary_width, jump)
        band &= valid & ~static
        p = self.boundary_flip
        take = band & (rng.random(clean.shape) < p)
        surface = np.where(take, neighbour, clean_v)
        sigma = self.depth_std(surface)
        target = surface + sigma * rng.normal(size=clean.shape)
        s_own, s_nb = self.depth_std(clean_v), self.depth_std(neighbour)
        mixture = (1 - p) * s_own**2 + p * s_nb**2 + p * (1 - p) * (clean_v - neighbour) ** 2
        noise = np.where(band, np.sqrt(mixture), s_own)
        if static.any():
            target[static] = rng.uniform(1.0, self.max_depth, int(static.sum()))
            noise[static] = (self.max_depth - 1.0) / math.sqrt(12)
            valid = valid | static
            clean_v = np.where(static, (1.0 + self.max_depth) / 2, clean_v)
        target = np.where(valid, np.maximum(target, 1e-2), 0.0)
        return {
            "target": torch.from_numpy(target.astype(np.float32)),
            "clean_target": torch.from_numpy(clean_v.astype(np.float32)),
            "mask": torch.from_numpy(valid),
            "noise": torch.from_numpy(np.where(valid, noise, 0.0).astype(np.float32)),
        }
