"""Plots (matplotlib, Agg backend), saved as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["uncertainty_figure", "CAMVID_COLORS"]

#: SegNet's CamVid palette (11 classes + void in black)
CAMVID_COLORS = np.array(
    [
        (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
        (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0),
    ],
    dtype=np.uint8,
)


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _show_image(image) -> np.ndarray:
    img = _numpy(image)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img.transpose(1, 2, 0)
    low, high = np.percentile(img, 1), np.percentile(img, 99)
    return np.clip((img - low) / max(high - low, 1e-8), 0, 1).squeeze()


def _show_labels(labels, colors: np.ndarray) -> np.ndarray:
    lab = _numpy(labels).astype(int)
    return colors[np.clip(lab, 0, len(colors) - 1)]


def uncertainty_figure(
    rows: Sequence[dict],
    path: str | Path,
    colors: np.ndarray = CAMVID_COLORS,
    titles: Sequence[str] = ("input", "ground truth", "prediction", "aleatoric", "epistemic"),
) -> Path:
    """One row per image: input | ground truth | prediction | aleatoric | epistemic (as in the paper).

    Each row is a dict with ``image`` (3, H, W), ``target`` and ``prediction`` (H, W)
    class maps (or depth maps), ``aleatoric`` and ``epistemic`` (H, W), and an optional
    ``label`` shown at the left.
    """
    path = Path(path)
    fig, axes = plt.subplots(len(rows), 5, figsize=(15, 2.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        segmentation = not torch.is_floating_point(torch.as_tensor(row["target"]))
        panels = [
            (_show_image(row["image"]), {}),
            (_show_labels(row["target"], colors) if segmentation else _numpy(row["target"]), {} if segmentation else {"cmap": "magma"}),
            (_show_labels(row["prediction"], colors) if segmentation else _numpy(row["prediction"]), {} if segmentation else {"cmap": "magma"}),
            (_numpy(row["aleatoric"]), {"cmap": "inferno"}),
            (_numpy(row["epistemic"]), {"cmap": "inferno"}),
        ]
        for c, (data, kw) in enumerate(panels):
            ax = axes[r, c]
            im = ax.imshow(data, **kw)
            if c >= 3:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c])
        if row.get("label"):
            axes[r, 0].set_ylabel(row["label"])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
