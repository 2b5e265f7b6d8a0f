"""Plots (matplotlib, Agg backend), saved as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dubito.platform.files import atomic_path  # noqa: E402

__all__ = [
    "uncertainty_figure",
    "training_curves",
    "learning_curves_figure",
    "scaling_figure",
    "visitation_figure",
    "epistemic_visits_figure",
    "uncertainty_curves_figure",
    "sparsification_figure",
    "calibration_figure",
    "ensemble_curves",
    "histogram_figure",
    "samples_figure",
    "CAMVID_COLORS",
]

#: SegNet's CamVid palette (11 classes + void in black)
CAMVID_COLORS = np.array(
    [
        (128, 128, 128),
        (128, 0, 0),
        (192, 192, 128),
        (128, 64, 128),
        (60, 40, 222),
        (128, 128, 0),
        (192, 128, 128),
        (64, 64, 128),
        (64, 0, 128),
        (64, 64, 0),
        (0, 128, 192),
        (0, 0, 0),
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
            (
                _show_labels(row["target"], colors) if segmentation else _numpy(row["target"]),
                {} if segmentation else {"cmap": "magma"},
            ),
            (
                _show_labels(row["prediction"], colors) if segmentation else _numpy(row["prediction"]),
                {} if segmentation else {"cmap": "magma"},
            ),
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
    return _save(fig, path)


def _save(fig, path: str | Path, dpi: int = 90) -> Path:
    """Save ``fig`` atomically as PNG (never a half-written file) and close it."""
    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:  # a unique name beside it: two writers never share a temporary file
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path


def training_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Training loss and the validation metrics against the epoch (one entry per epoch)."""
    epochs = [h["epoch"] for h in history]
    val_keys = [k for k in (history[0] if history else {}) if k.startswith("val_")]
    fig, axes = plt.subplots(
        1, 1 + max(1, len(val_keys)), figsize=(4.2 * (1 + max(1, len(val_keys))), 3.2), squeeze=False
    )
    axes[0, 0].plot(epochs, [h["train_loss"] for h in history], marker="o", color="#4477aa")
    axes[0, 0].set_title("training loss")
    for ax, key in zip(axes[0, 1:], val_keys):
        ax.plot(epochs, [h[key] for h in history], marker="o", color="#ee6677")
        ax.set_title(key.replace("_", " "))
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def ensemble_curves(
    histories: Sequence[Sequence[dict]], ensemble: dict[str, float], path: str | Path
) -> Path:
    """Each member's training loss and validation metrics against the epoch, with the
    ensemble's own validation metrics (``ensemble``, the members' mean prediction) as dashed lines."""
    val_keys = [k for k in (histories[0][0] if histories and histories[0] else {}) if k.startswith("val_")]
    fig, axes = plt.subplots(
        1, 1 + max(1, len(val_keys)), figsize=(4.2 * (1 + max(1, len(val_keys))), 3.2), squeeze=False
    )
    colors = plt.get_cmap("tab10")
    for k, history in enumerate(histories):
        epochs = [h["epoch"] for h in history]
        axes[0, 0].plot(
            epochs,
            [h["train_loss"] for h in history],
            marker="o",
            ms=3,
            color=colors(k % 10),
            label=f"member {k}",
        )
        for ax, key in zip(axes[0, 1:], val_keys):
            ax.plot(epochs, [h[key] for h in history], marker="o", ms=3, color=colors(k % 10))
    for ax, key in zip(axes[0, 1:], val_keys):
        if key in ensemble:
            ax.axhline(ensemble[key], color="#222222", linestyle="--", label="ensemble")
            ax.legend(fontsize=8)
        ax.set_title(key.replace("_", " "))
    axes[0, 0].set_title("training loss")
    axes[0, 0].legend(fontsize=7)
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _save(fig, path)


_KIND_COLORS = {"total": "#222222", "aleatoric": "#ee6677", "epistemic": "#4477aa"}


def uncertainty_curves_figure(curves: dict[str, dict], path: str | Path, ylabel: str) -> Path:
    """Precision–uncertainty: the error of the pixels kept after dropping the most uncertain
    fraction, one line per kind of uncertainty (``curves[kind]["removed_fraction"/"error"]``)."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for kind, c in curves.items():
        ax.plot(c["removed_fraction"], c["error"], marker="o", ms=3, label=kind, color=_KIND_COLORS.get(kind))
    ax.set_xlabel("fraction of most uncertain pixels removed")
    ax.set_ylabel(ylabel)
    ax.set_title("error vs uncertainty percentile")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def sparsification_figure(curves: dict[str, dict], path: str | Path) -> Path:
    """Sparsification curves (model vs oracle, normalised to start at 1) per kind of uncertainty."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * max(1, len(curves)), 3.4), squeeze=False)
    for ax, (kind, c) in zip(axes[0], curves.items()):
        x = c["sparsification_fraction"]
        ax.plot(x, c["sparsification_model"], label=f"{kind} uncertainty", color=_KIND_COLORS.get(kind))
        ax.plot(x, c["sparsification_oracle"], label="oracle (true error)", color="#999999", linestyle="--")
        ax.fill_between(
            x, c["sparsification_oracle"], c["sparsification_model"], alpha=0.15, color=_KIND_COLORS.get(kind)
        )
        ax.set_xlabel("fraction removed")
        ax.set_title(f"sparsification: {kind}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("remaining error / initial")
    return _save(fig, path)


def calibration_figure(
    data: dict,
    path: str | Path,
    kind: str,
    ece: float | None = None,
    calibrated: dict | None = None,
    calibrated_ece: float | None = None,
) -> Path:
    """A reliability diagram (classification: accuracy against confidence per bin, with the
    bin counts) or a coverage plot (regression: observed against nominal interval level).
    ``calibrated``: the same data after post-hoc calibration, drawn over it."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", label="perfect calibration")
    if kind == "classification":
        edges = np.asarray(data["bin_edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        acc = np.nan_to_num(np.asarray(data["accuracy"], dtype=float))
        ax.bar(centres, acc, width=width * 0.95, color="#4477aa", alpha=0.8, label="accuracy")
        for values, color, name in (
            (data, "#ee6677", "bin mean confidence"),
            (calibrated, "#228833", "calibrated"),
        ):
            if values is None:
                continue
            conf = np.asarray(values["confidence"], dtype=float)
            ok = ~np.isnan(conf)
            ax.plot(
                conf[ok],
                np.asarray(values["accuracy"], dtype=float)[ok],
                "o-" if values is calibrated else "o",
                color=color,
                ms=3,
                label=name,
            )
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        title = "reliability" + (f" (ECE {ece:.3f}" if ece is not None else "")
        if ece is not None:
            title += f" → {calibrated_ece:.3f})" if calibrated_ece is not None else ")"
        ax.set_title(title)
    else:
        ax.plot(data["levels"], data["observed"], marker="o", ms=3, color="#4477aa", label="observed")
        if calibrated is not None:
            ax.plot(
                calibrated["levels"],
                calibrated["observed"],
                marker="o",
                ms=3,
                color="#228833",
                label="calibrated",
            )
        ax.set_xlabel("nominal level of the central interval")
        ax.set_ylabel("fraction of targets inside")
        ax.set_title("regression calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def histogram_figure(
    labels: Sequence[str], values: Sequence[float], path: str | Path, title: str, ylabel: str
) -> Path:
    """A labelled bar chart (class frequencies, depth histograms)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(labels)), 3.5))
    ax.bar(range(len(values)), values, color="#4477aa")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(
        labels, rotation=60 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center", fontsize=8
    )
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return _save(fig, path)


def samples_figure(items: Sequence[dict], path: str | Path, colors: np.ndarray = CAMVID_COLORS) -> Path:
    """One row per dataset item: image | target | mask, plus the known ``noise`` map and the
    ``static`` region when the item carries them (synthetic data)."""
    extra = [k for k in ("noise", "static") if all(k in it for it in items)]
    cols = 3 + len(extra)
    fig, axes = plt.subplots(len(items), cols, figsize=(3.2 * cols, 2.6 * len(items)), squeeze=False)
    for r, item in enumerate(items):
        target = item["target"]
        segmentation = not torch.is_floating_point(torch.as_tensor(target))
        mask = _numpy(item["mask"]).astype(bool)
        shown_target = (
            _show_labels(target, colors) if segmentation else np.ma.masked_where(~mask, _numpy(target))
        )
        panels = [
            ("image", _show_image(item["image"]), {}),
            ("target", shown_target, {} if segmentation else {"cmap": "magma"}),
        ]
        panels.append(("mask (valid pixels)", mask, {"cmap": "gray", "vmin": 0, "vmax": 1}))
        for k in extra:
            panels.append((f"known {k}", _numpy(item[k]), {"cmap": "inferno" if k == "noise" else "gray"}))
        for c, (title, data, kw) in enumerate(panels):
            ax = axes[r, c]
            im = ax.imshow(data, **kw)
            if title == "known noise" or (title == "target" and not segmentation):
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title)
        axes[r, 0].set_ylabel(f"id {int(item['id'])}")
    return _save(fig, path)


def learning_curves_figure(
    curves: dict[str, dict],
    path: str | Path,
    ylabel: str,
    extra: dict[str, dict] | None = None,
    extra_label: str = "",
    xlabel: str = "labelled images",
    title: str = "learning curves (mean ± std over seeds)",
    bounds: tuple[float, float] | None = None,
) -> Path:
    """Learning curves, one line per method with a band of ± one std over seeds.

    ``curves[name] = {"labels": [...], "mean": [...], "std": [...]}`` ("labels": the x values, e.g.
    labelled images or episodes); ``extra`` (same layout,
    optional) is drawn in a second panel, e.g. the fraction of labels spent on noisy images (its
    bands cut to [0, 1]). ``bounds``: the values the first panel's quantity can take (a fraction:
    ``(0, 1)``), where its bands are cut.
    """
    panels = 2 if extra else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    colors = plt.get_cmap("tab10")
    panels_bounds = (bounds or (-np.inf, np.inf), (0.0, 1.0))
    for ax, data, label, (lo, hi) in zip(
        axes[0], (curves, extra or {}), (ylabel, "fraction of bought labels"), panels_bounds
    ):
        for k, (name, c) in enumerate(data.items()):
            x, m, s = (
                np.asarray(c["labels"]),
                np.asarray(c["mean"], dtype=float),
                np.asarray(c["std"], dtype=float),
            )
            ax.plot(x, m, marker="o" if len(x) <= 40 else None, ms=3, label=name, color=colors(k % 10))
            band = np.clip(m - s, lo, hi), np.clip(m + s, lo, hi)
            ax.fill_between(x, *band, alpha=0.18, color=colors(k % 10), linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(title)
    if extra:
        axes[0, 1].set_title(extra_label)
    return _save(fig, path)


def scaling_figure(points: dict[str, dict], path: str | Path, budget: int, threshold: str = "0.9") -> Path:
    """Deep Sea: episodes until the running fraction of bad episodes drops below 0.9, against N,
    on log axes, with the 2^N episodes dithering needs. ``points[agent] = {"size": [...],
    "episode": [...], "solved": [...]}`` (one entry per run); unsolved runs are drawn as ×
    at the episode budget."""
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    colors = plt.get_cmap("tab10")
    sizes = sorted({n for p in points.values() for n in p["size"]})
    for k, (name, p) in enumerate(points.items()):
        n = np.asarray(p["size"], dtype=float)
        e = np.asarray(p["episode"], dtype=float)
        ok = np.asarray(p["solved"], dtype=bool)
        jitter = 1.0 + 0.025 * (k - (len(points) - 1) / 2)  # side by side at each N
        ax.scatter(n[ok] * jitter, e[ok], color=colors(k % 10), label=name, s=22, alpha=0.85)
        ax.scatter(n[~ok] * jitter, e[~ok], color=colors(k % 10), marker="x", s=30, alpha=0.85)
        if ok.any():
            solved_sizes = sorted(set(n[ok]))
            med = [np.median(e[ok & (n == s)]) for s in solved_sizes]
            ax.plot(np.asarray(solved_sizes) * jitter, med, color=colors(k % 10), alpha=0.6, linewidth=1)
    if sizes:
        grid = np.linspace(min(sizes), max(sizes), 50)
        ax.plot(grid, 2.0**grid, "k--", alpha=0.45, linewidth=1.5, label="2^N (dithering)")
    ax.axhline(budget, color="grey", linewidth=0.8, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(1, budget * 2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("Deep Sea size N (log scale)")
    ax.set_ylabel(f"episodes until bad fraction < {threshold} (log scale)")
    ax.set_title(f"episodes to solve (× = not solved within {budget})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def visitation_figure(
    maps: dict[str, np.ndarray], path: str | Path, title: str, mark: tuple[int, int] | None = None
) -> Path:
    """One heatmap of log10(1 + visits) per agent (``maps[agent]`` is (rows, columns));
    ``mark`` outlines one cell (the noisy TV)."""
    n = max(len(maps), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.9 * n, 3.0), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items()):
        im = ax.imshow(np.log10(1 + np.asarray(m, dtype=float)), cmap="magma")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if mark is not None:
            ax.add_patch(
                plt.Rectangle(
                    (mark[1] - 0.5, mark[0] - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.5
                )
            )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title + "  (log10(1 + visits))", fontsize=10)
    return _save(fig, path)


def epistemic_visits_figure(points: dict[str, dict], path: str | Path) -> Path:
    """Each agent's epistemic estimate of a state against its visit count (log-log), with the
    fitted slope. ``points[agent] = {"visits": [...], "epistemic": [...], "slope": float}`` and
    optionally ``"episode"`` (when each point was taken; it colours the points)."""
    n = max(len(points), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.1), squeeze=False)
    for ax, (name, p) in zip(axes[0], points.items()):
        v = 1 + np.asarray(p["visits"], dtype=float)
        e = np.asarray(p["epistemic"], dtype=float)
        when = p.get("episode")
        ax.scatter(
            v,
            e,
            s=8,
            alpha=0.6,
            c=None if when is None else np.log(np.asarray(when, dtype=float)),
            cmap="viridis",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        slope = p.get("slope")
        ax.set_title(f"{name}: slope {slope:.2f}" if slope is not None else name, fontsize=9)
        ax.set_xlabel("1 + visits")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("epistemic estimate")
    return _save(fig, path)
