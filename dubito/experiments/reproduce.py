"""``dubito reproduce``: the paper's studies on any dataset (Kendall & Gal 2017; docs/formulas.md).

For each dataset:

(a) the four variants — baseline, + aleatoric, + epistemic, + both — trained and tested: a table
    like the paper's CamVid / NYUv2 table (mean IoU, or depth errors);
(b) the ``both`` model trained on nested fractions of the training set (1/4, 1/2, all; each with the
    same number of gradient steps, i.e. trained to a comparable point) and tested in and out of
    distribution: a table like the paper's dataset-size table (IoU or RMS, aleatoric, epistemic);
(c) precision–uncertainty, sparsification and calibration plots of the full ``both`` model;
(d) with ``--ensemble K``: for each fraction of (b), a deep ensemble of K ``both`` models (the
    (b) model is member 0, members 1..K-1 are trained with their own seeds), tested as an
    ensemble and as ensemble + dropout (T samples per member): rows of its own in the (b) table
    and the findings judged again on its epistemic part.

It also checks the paper's qualitative findings and records them in ``results.json``: epistemic
uncertainty falls with more data and is larger out of distribution; aleatoric uncertainty follows
the true noise (synthetic data) and stays roughly flat with data size; error falls as the most
uncertain pixels are removed. Every training and evaluation is an MLflow child run of one parent
run per dataset. Rerunning the same command resumes: finished trainings and evaluations are not
repeated, and the parent run is the same.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dubito import DubitoError
from dubito.experiments import int_list
from dubito.platform.config import coerce_lists, to_flat
from dubito.platform.data import DATASETS, get_dataset
from dubito.platform.ensemble import Ensemble
from dubito.platform.evaluation import EVALUATION_FORMAT, EvalConfig, evaluate
from dubito.platform.files import check_output, copy_file, exclusive, read_json, write_json, write_text
from dubito.platform.models import VARIANTS
from dubito.platform.tracking import check_tracking, tracked_run
from dubito.platform.training import TrainConfig, load_model, member_config, save_model, train

__all__ = ["ReproduceConfig", "run_reproduce", "format_tables"]

#: the epistemic sources of table (b): the both model's MC dropout, and its ensembles (--ensemble K)
SOURCE_LABELS = {"both": "MC dropout", "ensemble": "ensemble", "ensemble+dropout": "ensemble + dropout"}
VARIANT_LABELS = {
    "baseline": "baseline",
    "homoscedastic": "+ homoscedastic",
    "aleatoric": "+ aleatoric",
    "epistemic": "+ epistemic",
    "both": "+ both",
}


@dataclass
class ReproduceConfig:
    """Settings of ``dubito reproduce`` (each is a flag). The defaults run both synthetic datasets
    with the tiny model on a CPU; for the paper's setting use e.g. ``--datasets camvid --root DIR
    --model fc_densenet103 --height 360 --width 480 --epochs 100 --ood-dataset nyuv2 --ood-root DIR``."""

    output: str = field(default="runs/reproduce", metadata={"help": "folder for tables, plots, results.json"})
    datasets: tuple[str, ...] = field(
        default=("synthetic-camvid", "synthetic-make3d"), metadata={"help": "comma-separated datasets"}
    )
    root: str = field(default="", metadata={"help": "folder of a real dataset in --datasets"})
    ood_dataset: str = field(
        default="",
        metadata={
            "help": "real out-of-distribution test set (e.g. nyuv2); synthetic data use their indoor variant"
        },
    )
    ood_root: str = field(default="", metadata={"help": "folder of --ood-dataset"})
    model: str = field(
        default="tiny", metadata={"help": "tiny, fc_densenet56, fc_densenet67, fc_densenet103"}
    )
    variants: tuple[str, ...] = field(
        default=("baseline", "aleatoric", "epistemic", "both"), metadata={"help": "study (a): variants"}
    )
    fractions: tuple[float, ...] = field(
        default=(0.25, 0.5, 1.0), metadata={"help": "study (b): training-set fractions"}
    )
    height: int = field(default=64, metadata={"help": "item height"})
    width: int = field(default=80, metadata={"help": "item width"})
    train_images: int = field(default=96, metadata={"help": "synthetic: training scenes"})
    val_images: int = field(default=16, metadata={"help": "synthetic: validation scenes"})
    test_images: int = field(default=24, metadata={"help": "synthetic: test scenes (and as many OOD scenes)"})
    epochs: int = field(
        default=10, metadata={"help": "epochs of the full training set (fractions get epochs/fraction)"}
    )
    batch_size: int = field(default=8, metadata={"help": "batch size"})
    lr: float = field(default=1e-3, metadata={"help": "RMSProp learning rate"})
    samples: int = field(default=10, metadata={"help": "MC-dropout samples T at test time (paper: 50)"})
    ensemble: int = field(
        default=0,
        metadata={
            "help": "K >= 2: also a K-member deep ensemble of the both model per training fraction (the "
            "fraction's model is member 0), tested as ensemble and ensemble+dropout"
        },
    )
    seeds: tuple[int, ...] = field(
        default=(0,), metadata={"help": "comma-separated seeds; tables and findings average over them"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    experiment: str = field(default="dubito-reproduce", metadata={"help": "MLflow experiment"})

    def __post_init__(self) -> None:
        coerce_lists(self)

    def seed_list(self) -> list[int]:
        return int_list("--seeds", self.seeds)

    def parsed(self) -> tuple[list[str], list[str], list[float]]:
        self.seed_list()
        datasets, variants, fractions = list(self.datasets), list(self.variants), sorted(set(self.fractions))
        if not datasets:
            raise DubitoError("--datasets is empty")
        if self.ensemble == 1 or self.ensemble < 0:
            raise DubitoError(f"--ensemble must be 0 (none) or K >= 2 members, got {self.ensemble}")
        bad = [v for v in variants if v not in VARIANTS]
        if bad or not variants:
            raise DubitoError(f"--variants must be from {', '.join(VARIANTS)}, got {','.join(variants)!r}")
        if not fractions or fractions[-1] != 1.0 or fractions[0] <= 0:
            raise DubitoError(
                f"--fractions must be in (0, 1] and include 1, got {','.join(map(str, self.fractions))!r}"
            )
        return datasets, variants, fractions


def _synthetic(dataset: str) -> bool:
    """Generated from a seed (with an indoor out-of-distribution variant), not read from ``--root``."""
    return dataset in DATASETS and DATASETS[dataset].synthetic


def _train_config(
    config: ReproduceConfig, dataset: str, variant: str, fraction: float, output: Path, seed: int = 0
) -> TrainConfig:
    return TrainConfig(
        output=str(output),
        dataset=dataset,
        root=config.root if not _synthetic(dataset) else "",
        model=config.model,
        variant=variant,
        height=config.height,
        width=config.width,
        train_images=config.train_images,
        val_images=config.val_images,
        fraction=fraction,
        epochs=max(1, math.ceil(config.epochs / fraction)),
        batch_size=config.batch_size,
        lr=config.lr,
        seed=seed,
        device=config.device,
        experiment=config.experiment,
    )


def _eval_config(
    config: ReproduceConfig, dataset: str, model: Path, output: Path, ood: bool, seed: int = 0
) -> EvalConfig:
    real = not _synthetic(dataset)  # synthetic data are tested OOD on their indoor variant
    return EvalConfig(
        model=str(model),
        output=str(output),
        root=config.root if real else "",
        images=config.test_images,
        ood=ood,
        ood_dataset=config.ood_dataset if real else "",
        ood_root=config.ood_root if real else "",
        samples=config.samples,
        seed=seed,
        device=config.device,
        experiment=config.experiment,
    )


def _fraction_label(dataset: str, fraction: float) -> str:
    if fraction == 1.0:
        return dataset
    inverse = 1 / fraction
    return (
        f"{dataset}/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-6 else f"{dataset}×{fraction:g}"
    )


def _check_inputs(config: ReproduceConfig, datasets: list[str]) -> None:
    """Every dataset, folder and OOD set is checked before any training starts."""
    real = [d for d in datasets if not _synthetic(d)]
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise DubitoError(f"--datasets: unknown {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    if len(real) > 1:
        raise DubitoError(
            f"--datasets: one real dataset per call (--root names one folder), got {', '.join(real)}"
        )
    for name in ("epochs", "train_images", "val_images", "test_images"):
        if getattr(config, name) < 1:
            raise DubitoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    for d in datasets:  # the settings every training and evaluation of the study shares
        _train_config(config, d, "both", 1.0, Path(config.output)).validate()
        _eval_config(config, d, Path(config.output) / "model.pt", Path(config.output), ood=True).validate()
    for d in real:
        if not config.root:
            raise DubitoError(f"--datasets {d} is read from disk: give --root DIR")
        get_dataset(d, "train", config.root, size=(config.height, config.width))  # raises naming the bad file
    if config.ood_dataset:
        if not config.ood_root and not _synthetic(config.ood_dataset):
            raise DubitoError(f"--ood-dataset {config.ood_dataset} is read from disk: give --ood-root DIR")
        get_dataset(config.ood_dataset, "test", config.ood_root or None, size=(config.height, config.width))


def _evaluate_once(
    eval_config: EvalConfig, trained: dict[str, Any], tags: dict[str, str], progress: bool
) -> dict[str, Any]:
    """Evaluate, unless this very evaluation of this very model already finished (a rerun).
    ``trained``: the training's results (an ensemble's: a list, one per member)."""
    folder = Path(eval_config.output)
    runs = trained if isinstance(trained, list) else [trained]
    source = {
        "eval_config": asdict(eval_config),
        "epochs_run": runs[0]["epochs_run"] if len(runs) == 1 else [r["epochs_run"] for r in runs],
        "best_epoch": runs[0]["best_epoch"] if len(runs) == 1 else [r["best_epoch"] for r in runs],
        "format": EVALUATION_FORMAT,
    }  # results of an older dubito lack newer measures: evaluate again
    done = folder / "results.json"
    if done.exists() and (folder / "source.json").exists():
        if read_json(folder / "source.json") == json.loads(json.dumps(source)):
            return read_json(done)
    results = evaluate(eval_config, progress=progress, tags=tags)
    write_json(folder / "source.json", source)
    return results


def run_reproduce(config: ReproduceConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the studies; returns what ``results.json`` holds (tables as rows, findings, paths).

    Results of datasets run earlier into the same ``--output`` are kept (one real dataset per call).
    """
    datasets, variants, fractions = config.parsed()
    _check_inputs(config, datasets)
    out = check_output(config.output)
    check_tracking()
    with exclusive(out):
        return _run_reproduce(config, out, datasets, variants, fractions, progress)


def _run_reproduce(
    config: ReproduceConfig,
    out: Path,
    datasets: list[str],
    variants: list[str],
    fractions: list[float],
    progress: bool,
) -> dict[str, Any]:
    seeds = config.seed_list()
    plan = [(d, s, v, 1.0) for d in datasets for s in seeds for v in variants]
    plan += [
        (d, s, "both", f)
        for d in datasets
        for s in seeds
        for f in fractions
        if not (f == 1.0 and "both" in variants)
    ]
    total, step, started = len(plan), 0, time.perf_counter()
    previous = read_json(out / "results.json") if (out / "results.json").exists() else {}
    results: dict[str, Any] = {
        "config": to_flat(config, text=True),
        "datasets": dict(previous.get("datasets", {})),
    }
    for dataset in datasets:
        folder = out / dataset
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / "reproduce.json"
        known = read_json(marker) if marker.exists() else {}
        here = str(folder.resolve())  # a copied or moved output gets parent runs of its own
        parent_id = known.get("mlflow_parent_run_id") if known.get("folder", here) == here else None
        with tracked_run(
            config.experiment,
            run_name=f"reproduce-{dataset}",
            params=config,
            tags={"dubito.command": "reproduce"},
            run_id=parent_id,
        ) as parent:
            write_json(marker, {"mlflow_parent_run_id": parent.run_id, "folder": here})
            child = {"mlflow.parentRunId": parent.run_id}
            per_seed: dict[int, dict[tuple[str, float], dict]] = {s: {} for s in seeds}
            for _, seed, variant, fraction in [p for p in plan if p[0] == dataset]:
                step += 1
                name = f"{variant}" if fraction == 1.0 else f"{variant}-{fraction:g}"
                place = folder / name if len(seeds) == 1 else folder / f"seed-{seed}" / name
                print(
                    f"[{step}/{total}] {dataset}: {variant}, {fraction:g} of the training set, seed {seed} "
                    f"({time.perf_counter() - started:.0f} s so far)",
                    flush=True,
                )
                trained = train(
                    _train_config(config, dataset, variant, fraction, place, seed),
                    progress=progress,
                    tags=child,
                )
                eval_config = _eval_config(
                    config, dataset, Path(trained["model"]), place / "evaluation", variant == "both", seed
                )
                per_seed[seed][(variant, fraction)] = _evaluate_once(eval_config, trained, child, progress)
                if variant == "both" and config.ensemble:
                    per_seed[seed].update(
                        _ensemble_study(config, dataset, fraction, place, seed, trained, child, progress)
                    )
            entry = _dataset_results(dataset, variants, fractions, _mean_over_seeds(per_seed))
            if len(seeds) > 1:
                _seed_agreement(
                    entry,
                    [
                        _dataset_results(dataset, variants, fractions, e)["findings"]
                        for e in per_seed.values()
                    ],
                )
            entry["seeds"] = seeds
            full = (folder if len(seeds) == 1 else folder / f"seed-{seeds[0]}") / "both" / "evaluation"
            for plot in (
                "precision_uncertainty.png",
                "sparsification.png",
                "calibration.png",
                "uncertainty.png",
            ):
                if (full / plot).exists():
                    copy_file(full / plot, folder / plot)
                    parent.log_artifact(folder / plot)
            entry["plots"] = [
                str(folder / p)
                for p in (
                    "precision_uncertainty.png",
                    "sparsification.png",
                    "calibration.png",
                    "uncertainty.png",
                )
            ]
            parent.log_metrics(_finding_metrics(entry["findings"]))
            entry["mlflow_parent_run_id"] = parent.run_id
            results["datasets"][dataset] = entry
    results["seconds"] = time.perf_counter() - started
    write_text(out / "tables.md", format_tables(results))
    write_json(out / "results.json", results)
    return results


def _finding_metrics(findings: dict[str, Any]) -> dict[str, float]:
    """The yes/no findings as MLflow metrics (an ensemble's prefixed with its source)."""
    out = {f"finding_{k}": float(v) for k, v in findings.items() if isinstance(v, bool)}
    for source in SOURCE_LABELS:
        if isinstance(findings.get(source), dict):
            tag = source.replace("+", "_")
            out.update(
                {f"finding_{tag}_{k}": float(v) for k, v in findings[source].items() if isinstance(v, bool)}
            )
    return out


def _ensemble_study(
    config: ReproduceConfig,
    dataset: str,
    fraction: float,
    place: Path,
    seed: int,
    first: dict[str, Any],
    child: dict[str, str],
    progress: bool,
) -> dict[tuple[str, float], dict]:
    """(d): members 1..K-1 of the fraction's ``both`` model (member 0: ``first``), the ensemble's
    model file, and its evaluations as ``ensemble`` and ``ensemble+dropout``."""
    base = _train_config(config, dataset, "both", fraction, place, seed)
    folder = place / "ensemble"
    runs = [first]
    for k in range(1, config.ensemble):
        print(f"    ensemble member {k + 1}/{config.ensemble}", flush=True)
        member = member_config(base, k, output=str(folder / f"member-{k}"))
        runs.append(train(member, progress=progress, tags=child))
    models = [load_model(r["model"]) for r in runs]
    path = save_model(folder / "model.pt", Ensemble([m for m, _ in models]), models[0][1])
    out = {}
    for source in ("ensemble", "ensemble+dropout"):
        place_eval = folder / f"evaluation-{source.replace('+', '-')}"
        eval_config = _eval_config(config, dataset, path, place_eval, True, seed)
        eval_config.epistemic = source
        out[(source, fraction)] = _evaluate_once(eval_config, runs, child, progress)
    return out


def _mean_over_seeds(per_seed: dict[int, dict[tuple[str, float], dict]]) -> dict[tuple[str, float], dict]:
    """One evaluation per (variant, fraction) whose numbers are the means over the seeds."""
    runs = list(per_seed.values())
    merged = {}
    for key, first in runs[0].items():
        summaries = [r[key]["summary"] for r in runs]
        summary = {
            k: sum(s[k] for s in summaries) / len(summaries)
            for k, v in first["summary"].items()
            if isinstance(v, (int, float)) and all(isinstance(s.get(k), (int, float)) for s in summaries)
        }
        curves = {
            kind: {
                name: [sum(vals) / len(vals) for vals in zip(*(r[key]["curves"][kind][name] for r in runs))]
                for name in c
            }
            for kind, c in first["curves"].items()
        }
        merged[key] = {**first, "summary": summary, "curves": curves}
    return merged


def _seed_agreement(entry: dict[str, Any], findings: list[dict[str, Any]]) -> None:
    """For each yes/no finding (an ensemble's too), in how many seeds it holds on its own."""

    def agreeing(found: dict[str, Any], per_seed: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: f"{sum(bool(f.get(k)) for f in per_seed)}/{len(per_seed)}"
            for k, v in found.items()
            if isinstance(v, bool)
        }
        for source in SOURCE_LABELS:
            if isinstance(found.get(source), dict):
                out[source] = agreeing(found[source], [f.get(source, {}) for f in per_seed])
        return out

    entry["findings"]["seeds_agreeing"] = agreeing(entry["findings"], findings)


def _dataset_results(
    dataset: str, variants: list[str], fractions: list[float], evaluations: dict
) -> dict[str, Any]:
    any_eval = next(iter(evaluations.values()))
    segmentation = any_eval["spec"]["task"] == "segmentation"
    variant_rows = []
    for v in variants:
        s = evaluations[(v, 1.0)]["summary"]
        row = {"variant": v}
        if segmentation:
            row.update(mean_iou=s["mean_iou"], pixel_accuracy=s["pixel_accuracy"], ece=s["ece"])
        else:
            row.update(rel=s["rel"], rms=s["rms"], log10=s["log10"], delta1=s["delta1"])
        variant_rows.append(row)
    keys = (
        ("aleatoric_entropy", "mutual_information", "epistemic_logit_variance")
        if segmentation
        else ("aleatoric_var", "epistemic_var", "predicted_depth", "relative_epistemic_std")
    )
    sources = [m for m in SOURCE_LABELS if (m, 1.0) in evaluations]
    size_rows = []
    for source in sources:
        for ood in (False, True):
            for f in fractions:
                s = evaluations[(source, f)]["summary"]
                if ood and "ood_auroc" not in s:
                    continue
                row = {
                    "epistemic": SOURCE_LABELS[source],
                    "train": _fraction_label(dataset, f),
                    "test": evaluations[(source, f)].get("ood_dataset", "OOD") if ood else dataset,
                    "score": s.get(("ood_" if ood else "") + ("mean_iou" if segmentation else "rms")),
                }
                row.update({k: s.get(("ood_" if ood else "") + k) for k in keys})
                size_rows.append(row)
    findings = _findings(evaluations, "both", fractions, segmentation)
    for source in sources[1:]:  # the same findings, judged on an ensemble's epistemic part
        findings[source] = _findings(evaluations, source, fractions, segmentation)
    return {
        "task": any_eval["spec"]["task"],
        "variants": variant_rows,
        "dataset_size": size_rows,
        "findings": findings,
    }


def _findings(evaluations: dict, source: str, fractions: list[float], segmentation: bool) -> dict[str, Any]:
    """The paper's qualitative findings, judged on the evaluations of ``source`` (the ``both``
    model with MC dropout, or its ensembles)."""
    # classification findings are judged on mutual information, the scale-free epistemic measure; the
    # paper's epistemic logit variance is reported beside it (it grows with the logits' magnitude, i.e.
    # with a model's confidence, so it mixes data size and confidence; README)
    measure = "mutual_information" if segmentation else "epistemic_var"
    aleatoric = "aleatoric_entropy" if segmentation else "aleatoric_var"
    smallest, full = evaluations[(source, fractions[0])]["summary"], evaluations[(source, 1.0)]["summary"]
    total_curve = evaluations[(source, 1.0)]["curves"].get("total", {}).get("error", [])

    def ratio(a: dict, b: dict, key: str) -> float:
        return a[key] / max(b[key], 1e-12)

    findings: dict[str, Any] = {
        "measures": {"data_size": measure, "out_of_distribution": measure},
        "epistemic_falls_with_data": smallest[measure] > full[measure],
        "epistemic_smallest_over_full": ratio(smallest, full, measure),
        "aleatoric_smallest_over_full": ratio(smallest, full, aleatoric),
        "error_falls_as_uncertain_pixels_are_removed": bool(total_curve)
        and total_curve[len(total_curve) // 2] < total_curve[0],
        "error_curve_monotone_fraction": (
            sum(b <= a + 1e-12 for a, b in zip(total_curve, total_curve[1:])) / max(len(total_curve) - 1, 1)
        ),
    }
    if segmentation:
        findings["logit_variance_smallest_over_full"] = ratio(smallest, full, "epistemic_logit_variance")
    if "ood_auroc" in full:
        findings["epistemic_larger_out_of_distribution"] = full[f"ood_{measure}"] > full[measure]
        findings["epistemic_ood_over_in"] = full[f"ood_{measure}"] / max(full[measure], 1e-12)
        if segmentation:
            findings["logit_variance_ood_over_in"] = full["ood_epistemic_logit_variance"] / max(
                full["epistemic_logit_variance"], 1e-12
            )
        elif "ood_predicted_depth" in full:  # variance in m² follows the depth scale predicted (README)
            for name, key in (
                ("predicted_depth", "predicted_depth"),
                ("relative_spread", "relative_epistemic_std"),
            ):
                findings[f"{name}_ood_over_in"] = full[f"ood_{key}"] / max(full[key], 1e-12)
        findings["ood_auroc"] = full["ood_auroc"]
    if "noise_spearman" in full:
        findings["aleatoric_noise_spearman"] = full["noise_spearman"]
        findings["aleatoric_follows_true_noise"] = full["noise_spearman"] > 0.5
    return findings


def _fmt(value: Any, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:.4g}"


def format_tables(results: dict[str, Any]) -> str:
    """The two tables per dataset and the findings, as markdown."""
    lines = ["# dubito reproduce", ""]
    for dataset, entry in results["datasets"].items():
        seg = entry["task"] == "segmentation"
        lines += [f"## {dataset}", ""]
        if len(entry.get("seeds", [])) > 1:
            lines += [
                f"Means over seeds {', '.join(map(str, entry['seeds']))}; the findings say in how many seeds each holds alone.",
                "",
            ]
        lines += ["### (a) variants", ""]
        if seg:
            lines += ["| model | mean IoU (%) | pixel accuracy (%) | ECE |", "|---|---|---|---|"]
            lines += [
                f"| {VARIANT_LABELS[r['variant']]} | {_fmt(r['mean_iou'], 100)} | "
                f"{_fmt(r['pixel_accuracy'], 100)} | {_fmt(r['ece'])} |"
                for r in entry["variants"]
            ]
        else:
            lines += ["| model | rel | rms (m) | log10 | δ1 |", "|---|---|---|---|---|"]
            lines += [
                f"| {VARIANT_LABELS[r['variant']]} | {_fmt(r['rel'])} | {_fmt(r['rms'])} | "
                f"{_fmt(r['log10'])} | {_fmt(r['delta1'])} |"
                for r in entry["variants"]
            ]
        lines += ["", "### (b) training-set size and out-of-distribution test (variant both)", ""]
        if seg:
            lines += [
                "| epistemic | train | test | IoU (%) | aleatoric entropy | mutual information | epistemic logit var. (×10⁻³) |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r.get('epistemic', 'MC dropout')} | {r['train']} | {r['test']} | {_fmt(r['score'], 100)} | "
                f"{_fmt(r['aleatoric_entropy'])} | {_fmt(r['mutual_information'])} | {_fmt(r['epistemic_logit_variance'], 1e3)} |"
                for r in entry["dataset_size"]
            ]
        else:
            lines += [
                "| epistemic | train | test | RMS (m) | aleatoric var. | epistemic var. "
                "| mean predicted depth (m) | epistemic std / depth |",
                "|---|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r.get('epistemic', 'MC dropout')} | {r['train']} | {r['test']} | {_fmt(r['score'])} | "
                f"{_fmt(r['aleatoric_var'])} | {_fmt(r['epistemic_var'])} | {_fmt(r.get('predicted_depth'))} | "
                f"{_fmt(r.get('relative_epistemic_std'))} |"
                for r in entry["dataset_size"]
            ]
        lines += ["", "### findings", ""]
        for k, v in entry["findings"].items():
            if k in SOURCE_LABELS:  # the same findings, judged on an ensemble
                lines.append(f"- judged on the {SOURCE_LABELS[k]}:")
                lines += [
                    f"  - {name.replace('_', ' ')}: {value if isinstance(value, (bool, dict)) else _fmt(value)}"
                    for name, value in v.items()
                ]
            else:
                lines.append(f"- {k.replace('_', ' ')}: {v if isinstance(v, (bool, dict)) else _fmt(v)}")
        lines += [
            "",
            f"Plots: {', '.join(Path(p).name for p in entry['plots'])} in {Path(entry['plots'][0]).parent}",
            "",
        ]
    return "\n".join(lines)
