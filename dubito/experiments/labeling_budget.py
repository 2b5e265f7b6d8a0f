"""The labeling-budget experiment (``dubito label``): for every acquisition and seed, a labeling
loop (:mod:`dubito.acquisition.loop`); then learning curves with seed bands, the area under the
learning curve, the labels each acquisition needs to reach random's final score, and (on
synthetic data) the fraction of the budget spent on images carrying pure-noise TV static — the
labeling version of the noisy-TV problem. One MLflow parent run per study, a child per loop
(step = round). Rerunning the same command resumes every loop from its ledger.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dubito import DubitoError
from dubito.acquisition.config import LoopConfig
from dubito.acquisition.loop import check_resume, headline_metric, run_loop
from dubito.acquisition.pool import pool_datasets
from dubito.experiments import area_under_curve, int_list, record_study, seed_std
from dubito.platform.config import Nested, coerce_lists, nested, to_flat
from dubito.platform.files import check_output, exclusive, read_json, write_json
from dubito.platform.tracking import check_tracking, tracked_run

__all__ = ["LabelConfig", "run_labeling", "format_labeling"]


@dataclass
class LabelConfig(Nested):
    """Settings of a labeling-budget study (each is a ``dubito label`` flag): which loops to run
    (acquisitions × seeds) and, in ``loop``, the settings every loop shares."""

    output: str = field(
        default="runs/label",
        metadata={"help": "folder: one sub-folder per acquisition and seed, results.json, plots"},
    )
    acquisition: tuple[str, ...] = field(
        default=("random", "entropy", "bald", "aleatoric", "epistemic"),
        metadata={"help": "acquisition functions, comma-separated"},
    )
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "comma-separated seeds"})
    loop: LoopConfig = nested(
        LoopConfig,
        omit=("output", "acquisition", "seed"),
    )  # the settings every loop of the study shares (each writes to OUTPUT/ACQUISITION/seed-S)

    def __post_init__(self) -> None:
        coerce_lists(self)

    def parsed(self) -> tuple[list[str], list[int]]:
        acquisitions = list(self.acquisition)
        if not acquisitions or len(set(acquisitions)) != len(acquisitions):
            raise DubitoError(
                f"--acquisition must name distinct acquisitions, got {','.join(self.acquisition)!r}"
            )
        seeds = int_list("--seeds", self.seeds)
        if self.loop.oracle == "human" and len(acquisitions) * len(seeds) > 1:
            raise DubitoError("--oracle human runs one loop: give one --acquisition and one --seeds")
        return acquisitions, seeds

    def loop_for(self, acquisition: str, seed: int) -> LoopConfig:
        output = Path(self.output) / acquisition / f"seed-{seed}"
        return dataclasses.replace(self.loop, output=str(output), acquisition=acquisition, seed=seed)


def run_labeling(config: LabelConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the study; returns what ``--output/results.json`` holds."""
    acquisitions, seeds = config.parsed()
    loops = {(a, s): config.loop_for(a, s) for a in acquisitions for s in seeds}
    for loop in loops.values():
        loop.validate()  # every setting checked before anything is written
    out = check_output(config.output)
    check_tracking()
    first = next(iter(loops.values()))
    first.check_pool(len(pool_datasets(first)[1]))  # every loop shares the pool
    with exclusive(out):
        return _run_labeling(config, loops, out, progress)


def _run_labeling(
    config: LabelConfig, loops: dict[tuple[str, int], LoopConfig], out: Path, progress: bool
) -> dict[str, Any]:
    for loop in loops.values():  # a loop that cannot go on is refused before the study's MLflow run is opened
        check_resume(loop)
    marker = out / "study.json"
    study = (
        read_json(marker, "dubito wrote it: delete it and run again (the loops resume from their ledgers)")
        if marker.exists()
        else {}
    )
    here = str(out.resolve())  # a copied or moved study gets a parent run of its own
    parent_id = study.get("mlflow_parent_run_id") if study.get("folder", here) == here else None
    started = time.perf_counter()
    per_loop: dict[tuple[str, int], dict] = {}
    with tracked_run(
        config.loop.experiment,
        run_name=f"label-{config.loop.train.dataset}",
        params=config,
        tags={"dubito.command": "label"},
        run_id=parent_id,
    ) as parent:
        write_json(marker, {"mlflow_parent_run_id": parent.run_id, "folder": here})
        for n, ((acquisition, seed), loop) in enumerate(loops.items(), 1):
            if progress:
                print(
                    f"[{n}/{len(loops)}] {acquisition}, seed {seed} ({time.perf_counter() - started:.0f} s so far)",
                    flush=True,
                )
            per_loop[(acquisition, seed)] = run_loop(
                loop, progress=progress, tags={"mlflow.parentRunId": parent.run_id}
            )
        results = summarize(config, per_loop)
        results["seconds"] = time.perf_counter() - started
        results["mlflow_parent_run_id"] = parent.run_id
        results["plots"] = _plots(results, out)
        record_study(
            parent,
            out,
            results,
            format_labeling(results),
            {f"alc_{a}": s["alc_mean"] for a, s in results["summary"].items() if s["alc_mean"] is not None},
        )
    return results


def summarize(config: LabelConfig, per_loop: dict[tuple[str, int], dict]) -> dict[str, Any]:
    """Learning curves (mean ± std over seeds), ALC, labels to reach random's final score, and the
    fraction of bought labels on noisy images, per acquisition."""
    acquisitions, seeds = config.parsed()
    finished = {k: r for k, r in per_loop.items() if r["curve"]}
    loops = {
        f"{a}/seed-{s}": {"output": r["config"]["output"], "finished": r["finished"]}
        for (a, s), r in per_loop.items()
    }
    if not finished:  # e.g. a human-oracle loop waiting for its initial labels
        return {
            "config": to_flat(config, text=True),
            "metric": None,
            "curves": {},
            "summary": {},
            "loops": loops,
        }
    name, _, higher = headline_metric(next(iter(finished.values()))["curve"][0])
    curves, static_curves, summary = {}, {}, {}
    known = all("static_fraction" in c for r in finished.values() for c in r["curve"])  # synthetic pools only
    for a in acquisitions:
        runs = [finished[(a, s)]["curve"] for s in seeds if (a, s) in finished]
        length = min(len(c) for c in runs)
        labels = [c["labels"] for c in runs[0][:length]]

        def band(key: str) -> tuple[np.ndarray, dict]:
            values = np.array([[c[key] for c in run[:length]] for run in runs])  # (seeds, rounds)
            return values, {
                "labels": labels,
                "mean": values.mean(0).tolist(),
                "std": seed_std(values).tolist(),
            }

        values, curves[a] = band(name)
        curves[a]["per_seed"] = values.tolist()
        if known:
            static_curves[a] = band("static_fraction")[1]
        alcs = [area_under_curve(labels, v.tolist()) for v in values]
        static = [finished[(a, s)]["static_fraction"] for s in seeds if (a, s) in finished]
        static = [v for v in static if v is not None]
        summary[a] = {
            "alc_mean": float(np.mean(alcs)),
            "alc_std": float(seed_std(np.array(alcs))),
            "alc_per_seed": alcs,
            "final_mean": float(values[:, -1].mean()),
            "final_std": float(seed_std(values[:, -1])),
            "static_fraction_mean": float(np.mean(static)) if static else None,
            "static_fraction_std": float(seed_std(np.array(static))) if static else None,
            "seeds": len(runs),
        }
    if "random" in curves:
        target = curves["random"]["mean"][-1]
        for a, c in curves.items():
            reached = [n for n, m in zip(c["labels"], c["mean"]) if (m >= target if higher else m <= target)]
            summary[a]["labels_to_reach_random_final"] = reached[0] if reached else None
    return {
        "config": to_flat(config, text=True),
        "metric": name,
        "higher_is_better": higher,
        "curves": curves,
        "static_curves": static_curves,
        "summary": summary,
        "loops": loops,
    }


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    from dubito.platform.plots import learning_curves_figure

    if not results["curves"]:
        return []
    noisy = any(s["static_fraction_mean"] for s in results["summary"].values())
    path = learning_curves_figure(
        results["curves"],
        out / "learning_curves.png",
        results["metric"].replace("_", " "),
        extra=results["static_curves"] if noisy else None,
        extra_label="fraction of bought labels on images with TV static",
    )
    return [str(path)]


def format_labeling(results: dict[str, Any]) -> str:
    """The study's summary as a markdown table."""
    if not results["summary"]:
        return "no finished round yet\n"
    metric = results["metric"]
    lines = [
        f"# labeling budget: {results['config']['dataset']}, metric {metric} "
        f"({'higher' if results['higher_is_better'] else 'lower'} is better)",
        "",
        "| acquisition | area under learning curve | final | labels to reach random's final | labels on static images |",
        "|---|---|---|---|---|",
    ]
    for a, s in results["summary"].items():
        static = (
            "–"
            if s["static_fraction_mean"] is None
            else f"{s['static_fraction_mean']:.2f} ± {s['static_fraction_std']:.2f}"
        )
        reach = s.get("labels_to_reach_random_final")
        lines.append(
            f"| {a} | {s['alc_mean']:.4f} ± {s['alc_std']:.4f} | {s['final_mean']:.4f} ± {s['final_std']:.4f} | "
            f"{'–' if reach is None else reach} | {static} |"
        )
    lines += [
        "",
        f"({next(iter(results['summary'].values()))['seeds']} seeds; ± is the sample standard deviation over seeds)",
        "",
    ]
    return "\n".join(lines)
