"""``dubito data check``: read every file of a real dataset, summarise it and list every bad file."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm  # not tqdm.auto: its asyncio variant opens an extra iterator (DataLoader workers)

from dubito import DubitoError
from dubito.platform.data.base import DatasetError, FileDataset, Problem, find_root
from dubito.platform.data.stats import median_frequency_weights
from dubito.platform.files import write_json

__all__ = ["SplitSummary", "CheckReport", "check_dataset", "EXPECTED_COUNTS"]

#: published split sizes, shown beside the counts found
EXPECTED_COUNTS = {
    "camvid": {"train": 367, "val": 101, "test": 233},
    "make3d": {"train": 400, "test": 134},
    "nyuv2": {"train": 795, "test": 654},
}
DEPTH_BINS = 40


@dataclass
class SplitSummary:
    """What one split holds (filled while reading it)."""

    split: str
    count: int = 0
    readable: int = 0
    sizes: Counter = field(default_factory=Counter)
    label_min: int | None = None
    label_max: int | None = None
    class_counts: np.ndarray | None = None
    present_pixels: np.ndarray | None = None
    invalid_pixels: int = 0
    pixels: int = 0
    depth_min: float | None = None
    depth_max: float | None = None
    depth_sum: float = 0.0
    depth_histogram: np.ndarray | None = None
    channel_sum: np.ndarray = field(default_factory=lambda: np.zeros(3))
    channel_sumsq: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def add(self, item: dict, native: tuple[int, int], dataset: FileDataset) -> None:
        self.readable += 1
        self.sizes[tuple(int(v) for v in native)] += 1
        image = item["image"].double().numpy().reshape(3, -1)
        self.channel_sum += image.sum(1)
        self.channel_sumsq += (image**2).sum(1)
        mask = item["mask"].numpy()
        target = item["target"].numpy()
        self.pixels += mask.size
        self.invalid_pixels += int((~mask).sum())
        if dataset.task == "segmentation":
            low, high = int(target.min()), int(target.max())
            self.label_min = low if self.label_min is None else min(self.label_min, low)
            self.label_max = high if self.label_max is None else max(self.label_max, high)
            counts = np.bincount(target[mask], minlength=dataset.num_classes)[: dataset.num_classes]
            self.class_counts = counts if self.class_counts is None else self.class_counts + counts
            present = (counts > 0) * int(mask.sum())
            self.present_pixels = present if self.present_pixels is None else self.present_pixels + present
        else:
            depth = target[mask]
            if depth.size:
                self.depth_min = (
                    float(depth.min()) if self.depth_min is None else min(self.depth_min, float(depth.min()))
                )
                self.depth_max = (
                    float(depth.max()) if self.depth_max is None else max(self.depth_max, float(depth.max()))
                )
                self.depth_sum += float(depth.sum())
            hist, _ = np.histogram(depth, bins=DEPTH_BINS, range=(0.0, dataset.max_depth))
            self.depth_histogram = hist if self.depth_histogram is None else self.depth_histogram + hist


@dataclass
class CheckReport:
    """The result of ``check_dataset``: per-split summaries and every problem found."""

    dataset: str
    root: str
    task: str
    class_names: tuple[str, ...]
    max_depth: float | None
    splits: list[SplitSummary]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def _total(self, attr: str):
        values = [getattr(s, attr) for s in self.splits if getattr(s, attr) is not None]
        return sum(values[1:], values[0]) if values else None

    def _class_source(self) -> SplitSummary | None:
        """The split class statistics come from: train (as SegNet's weights; never test labels)."""
        with_counts = [s for s in self.splits if s.class_counts is not None]
        return next((s for s in with_counts if s.split == "train"), with_counts[0] if with_counts else None)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the images in [0, 1] (pass as ``normalize=``)."""
        n = sum(s.pixels for s in self.splits)
        if n == 0:
            return [float("nan")] * 3, [float("nan")] * 3
        mean = self._total("channel_sum") / n
        var = self._total("channel_sumsq") / n - mean**2
        return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in np.sqrt(np.maximum(var, 0))]

    def to_dict(self) -> dict:
        out = {
            "dataset": self.dataset,
            "root": self.root,
            "task": self.task,
            "ok": self.ok,
            "splits": {
                s.split: {
                    "count": s.count,
                    "readable": s.readable,
                    "expected": EXPECTED_COUNTS.get(self.dataset, {}).get(s.split),
                    "sizes_hw": {f"{h}x{w}": c for (h, w), c in s.sizes.most_common()},
                    "invalid_pixel_fraction": s.invalid_pixels / s.pixels if s.pixels else None,
                    **(
                        {"label_min": s.label_min, "label_max": s.label_max}
                        if self.task == "segmentation"
                        else {"depth_min": s.depth_min, "depth_max": s.depth_max}
                    ),
                }
                for s in self.splits
            },
            "channel_mean_std": self.channel_stats(),
            "problems": [{"path": p.path, "reason": p.reason, "kind": p.kind} for p in self.problems],
        }
        source = self._class_source()
        if source is not None:
            counts, present = source.class_counts, source.present_pixels
            freq = counts / max(counts.sum(), 1)
            weights = median_frequency_weights(counts, present).tolist()
            out["class_statistics_split"] = source.split
            out["class_frequencies"] = {n: float(f) for n, f in zip(self.class_names, freq)}
            out["median_frequency_weights"] = {n: round(w, 4) for n, w in zip(self.class_names, weights)}
        hist = self._total("depth_histogram")
        if hist is not None:
            out["depth_histogram"] = {
                "bin_edges_m": np.linspace(0, self.max_depth, DEPTH_BINS + 1).tolist(),
                "counts": hist.tolist(),
            }
        return out

    def format(self) -> str:
        """The summary as text (what ``dubito data check`` prints)."""
        d = self.to_dict()
        lines = [f"{self.dataset} at {self.root} ({self.task})", ""]
        lines.append(f"{'split':8s}{'images':>8s}{'expected':>10s}  sizes (HxW)")
        for name, s in d["splits"].items():
            sizes = ", ".join(f"{k} x{v}" for k, v in s["sizes_hw"].items()) or "-"
            expected = "" if s["expected"] is None else str(s["expected"])
            count = f"{s['readable']}/{s['count']}" if s["readable"] != s["count"] else str(s["count"])
            lines.append(f"{name:8s}{count:>8s}{expected:>10s}  {sizes}")
        lines.append("")
        for name, s in d["splits"].items():
            invalid = s["invalid_pixel_fraction"]
            what = "void" if self.task == "segmentation" else "invalid depth"
            if self.task == "segmentation":
                lines.append(
                    f"{name}: label values {s['label_min']}-{s['label_max']}, {what} {_pct(invalid)}"
                )
            else:
                lo, hi = s["depth_min"], s["depth_max"]
                rng = "-" if lo is None else f"{lo:.2f}-{hi:.2f} m"
                lines.append(f"{name}: valid depth {rng} (cap {self.max_depth:g} m), {what} {_pct(invalid)}")
        if "class_frequencies" in d:
            lines += [
                "",
                f"{'class (' + d['class_statistics_split'] + ')':14s}{'frequency':>10s}{'median-freq. weight':>21s}",
            ]
            for n, f in d["class_frequencies"].items():
                bar = "#" * int(round(f * 50))
                lines.append(f"{n:14s}{f * 100:9.2f}%{d['median_frequency_weights'][n]:21.4f}  {bar}")
        mean, std = d["channel_mean_std"]
        lines += ["", f"channel mean {mean}, std {std} (normalize=(mean, std) to use them)", ""]
        if self.ok:
            lines.append("no problems found")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {p.path}: {p.reason}" for p in self.problems]
        return "\n".join(lines)

    def save(self, output: str | Path) -> list[Path]:
        """Write ``results.json`` and a class-frequency (or depth) histogram PNG into ``output``."""
        from dubito.platform.plots import histogram_figure

        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        write_json(out / "results.json", d)
        paths = [out / "results.json"]
        if "class_frequencies" in d:
            freq = d["class_frequencies"]
            paths.append(
                histogram_figure(
                    list(freq),
                    list(freq.values()),
                    out / "class_frequencies.png",
                    f"{self.dataset}: class frequencies",
                    "fraction of labelled pixels",
                )
            )
        elif "depth_histogram" in d:
            edges = d["depth_histogram"]["bin_edges_m"]
            labels = [f"{edges[i]:.0f}" for i in range(len(edges) - 1)]
            paths.append(
                histogram_figure(
                    labels,
                    d["depth_histogram"]["counts"],
                    out / "depth_histogram.png",
                    f"{self.dataset}: valid depth (m)",
                    "pixels",
                )
            )
        return paths


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f} %"


def _splits_for(name: str) -> tuple[str, ...]:
    return {"camvid": ("train", "val", "test"), "make3d": ("train", "test"), "nyuv2": ("train", "test")}[name]


def _open(name: str, root, split: str, task: str | None) -> FileDataset:
    from dubito.platform.data import CamVid, Make3D, NYUv2

    if name == "camvid":
        return CamVid(root, split, normalize=None, strict=False)
    if name == "make3d":
        return Make3D(root, split, normalize=None, strict=False)
    return NYUv2(root, split, task=task or "depth", normalize=None, strict=False)


def _read_all(
    ds: FileDataset, desc: str, summary: SplitSummary | None, problems: list[Problem], progress: bool
) -> None:
    """Read every item of ``ds``, adding it to ``summary`` (if any) and every failure to ``problems``."""
    for i in tqdm(range(len(ds)), desc=desc, unit="img", disable=not progress):
        try:
            item, native = ds.read(i)
        except DatasetError as err:
            problems.append(Problem.from_error(err))
            continue
        except Exception as err:  # broken in a way no check foresaw: report it and go on
            problems.append(
                Problem(ds.path_of(i), f"unexpected {type(err).__name__}: {err}", "UnexpectedError")
            )
            continue
        if summary is not None:
            summary.add(item, native, ds)


def check_dataset(
    name: str, root: str | Path, *, task: str | None = None, progress: bool = True
) -> CheckReport:
    """Read every item of dataset ``name`` ("camvid", "make3d" or "nyuv2") under ``root``.

    Returns the report; never stops at the first bad file. A missing root raises ``DatasetError``.
    NYUv2 without ``task``: segmentation when ``classMapping40.mat`` is there (its depths are then
    read too, for problems), else depth. Class frequencies and weights come from the train split.
    """
    from dubito.platform.data.nyuv2 import NYU_LABELED, NYU_MAPPING

    if name not in EXPECTED_COUNTS:
        raise DubitoError(f"data check knows camvid, make3d and nyuv2, not {name!r}")
    if not Path(root).expanduser().is_dir():
        raise DatasetError(root, "dataset root not found")
    summaries, problems = [], []
    meta: dict = {}
    if name == "nyuv2" and task is None:
        mapping = find_root(root, "NYUv2", [NYU_LABELED]) / NYU_MAPPING
        task = "segmentation" if mapping.is_file() else "depth"
    for split in _splits_for(name):
        try:
            ds = _open(name, root, split, task)
        except DatasetError as err:
            problems.append(Problem.from_error(err))
            continue
        meta = {
            "root": str(ds.root),
            "task": ds.task,
            "class_names": tuple(ds.class_names),
            "max_depth": getattr(ds, "max_depth", None),
        }
        summary = SplitSummary(split, count=len(ds) + len(ds.problems))
        problems.extend(ds.problems)
        _read_all(ds, f"checking {name} {split}", summary, problems, progress)
        summaries.append(summary)
        if name == "nyuv2" and task == "segmentation":  # the depths of the same images, problems only
            try:
                _read_all(
                    _open(name, root, split, "depth"),
                    f"checking {name} {split} depths",
                    None,
                    problems,
                    progress,
                )
            except DatasetError as err:
                problems.append(Problem.from_error(err))
    return CheckReport(
        dataset=name,
        root=meta.get("root", str(root)),
        task=meta.get("task", "unknown"),
        class_names=meta.get("class_names", ()),
        max_depth=meta.get("max_depth"),
        splits=summaries,
        problems=list(dict.fromkeys(problems)),  # a missing shared file is reported once
    )
