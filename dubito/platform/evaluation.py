"""Evaluation of a trained model with the uncertainty service: task metrics, calibration,
uncertainty quality, out-of-distribution detection and, on synthetic data, agreement of the
learned aleatoric uncertainty with the generator's true noise. Streams the test set (sufficient
statistics and a bounded random subsample of pixels), writes ``results.json`` and plots, logs
to MLflow.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # not tqdm.auto: its asyncio variant opens an extra iterator (DataLoader workers)

from dubito import DubitoError
from dubito.platform import metrics as M
from dubito.platform.calibration import Calibration, classification_nll, fit_calibration, regression_nll
from dubito.platform.config import needs_root
from dubito.platform.data import DATASETS, dataset_info, get_dataset
from dubito.platform.files import check_output, exclusive, write_json
from dubito.platform.models import ModelSpec
from dubito.platform.service import (
    EPISTEMIC,
    UncertaintyService,
    check_finite_outputs,
    check_source,
    resolve_device,
    source_options,
)
from dubito.platform.tracking import check_tracking, tracked_run

__all__ = [
    "EVALUATION_FORMAT",
    "EvalConfig",
    "evaluate",
    "format_evaluation",
    "Accumulator",
    "evaluation_dataset",
    "calibration_dataset",
]

EVALUATION_FORMAT = 3  # raised when results.json gains or changes measures
SAMPLE_POINTS = 200_000  # pixels kept per uncertainty for curves, AUSE and rank correlations


@dataclass
class EvalConfig:
    """Settings of an evaluation (each is a ``dubito evaluate`` flag)."""

    model: str = field(default="runs/train/model.pt", metadata={"help": "model.pt written by dubito train"})
    output: str = field(default="runs/evaluate", metadata={"help": "folder for results.json and plots"})
    dataset: str = field(
        default="", metadata={"help": "dataset to test on (default: the model's training dataset)"}
    )
    root: str = field(default="", metadata={"help": "dataset folder (real datasets)"})
    split: str = field(default="test", metadata={"help": "split to test on"})
    images: int = field(default=30, metadata={"help": "synthetic datasets: test scenes generated"})
    ood: bool = field(
        default=True, metadata={"help": "also test out of distribution (synthetic: indoor rooms)"}
    )
    ood_dataset: str = field(
        default="", metadata={"help": "real OOD dataset, e.g. nyuv2 (default: the synthetic OOD variant)"}
    )
    ood_root: str = field(default="", metadata={"help": "folder of --ood-dataset"})
    samples: int = field(
        default=20, metadata={"help": "MC-dropout samples T (paper: 50); per member with ensemble+dropout"}
    )
    epistemic: str = field(
        default="",
        metadata={
            "help": "epistemic source: dropout, ensemble or ensemble+dropout (default: ensemble for an "
            "ensemble's model file, else dropout)"
        },
    )
    logit_noise_samples: int = field(default=10, metadata={"help": "logit-noise samples per pass"})
    batch_size: int = field(default=4, metadata={"help": "images per batch"})
    static_fraction: float = field(
        default=0.2, metadata={"help": "synthetic datasets: images with TV static"}
    )
    data_seed: int = field(default=0, metadata={"help": "seed of the synthetic scenes"})
    seed: int = field(default=0, metadata={"help": "seed of the MC samples"})
    calibrate: bool = field(
        default=False,
        metadata={
            "help": "fit temperature scaling (classes) or variance scaling (depth) on the validation "
            "split; report ECE, NLL and coverage before and after; write calibration.json"
        },
    )
    figures: int = field(default=3, metadata={"help": "test images shown in uncertainty.png"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    experiment: str = field(default="dubito-evaluate", metadata={"help": "MLflow experiment name"})

    def validate(self) -> None:
        for name in ("images", "samples", "logit_noise_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise DubitoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.figures < 0:
            raise DubitoError(f"--figures must be >= 0, got {self.figures}")
        if self.epistemic and self.epistemic not in EPISTEMIC:
            raise DubitoError(f"--epistemic must be one of {', '.join(EPISTEMIC)}, got {self.epistemic!r}")
        if self.ood_dataset and needs_root(self.ood_dataset) and not self.ood_root:
            raise DubitoError(f"--ood-dataset {self.ood_dataset} is read from disk: give --ood-root DIR")


def evaluation_dataset(
    name: str, split: str, root: str, spec: ModelSpec, config: EvalConfig, ood: bool = False
) -> Dataset:
    """The dataset to test on, at the model's resolution."""
    info = dataset_info(name)
    if (
        info.source == "bundled"
    ):  # digits: the split of the seed the model was trained with (its items are held out)
        return get_dataset(
            name, split, seed=spec.data_seed if spec.data_seed is not None else config.data_seed
        )
    options: dict[str, Any] = {"size": (spec.height, spec.width)}
    if info.task == "depth" and spec.max_depth and info.takes("max_depth"):
        options["max_depth"] = spec.max_depth  # the cap the model was trained with
    if info.synthetic:
        options.update(
            n=config.images,
            seed=config.data_seed,
            static_fraction=0.0 if ood else config.static_fraction,
            ood=ood,
        )
    return get_dataset(name, split, root or None, **options)


def calibration_dataset(name: str, root: str, spec: ModelSpec, config: EvalConfig) -> Dataset:
    """The held-out data calibration is fit on, never an image the model was trained on: the
    dataset's val split, fresh synthetic validation scenes, or — for data whose validation set is
    a seeded fraction of train — the very fraction the training run held out (its seed and
    fraction read from the ``results.json`` beside the model file)."""
    from dubito.platform.training import TrainConfig, make_datasets

    info = DATASETS[name]
    options: dict[str, Any] = dict(
        dataset=name,
        root=root,
        height=spec.height or TrainConfig.height,
        width=spec.width or TrainConfig.width,
        data_seed=spec.data_seed if spec.data_seed is not None else config.data_seed,
        val_images=config.images,
        static_fraction=config.static_fraction,
        max_depth=spec.max_depth or TrainConfig.max_depth,
    )
    if not info.synthetic and "val" not in info.splits:
        options.update(_training_split(config.model, name))
    return make_datasets(TrainConfig(**options))[1]


def _training_split(model: str, name: str) -> dict[str, Any]:
    """``data_seed`` and ``val_fraction`` of the training run that wrote ``model`` (its folder's
    results.json), which decide the images it held out of training."""
    from dubito.platform.files import read_json

    results = Path(model).parent / "results.json"
    trained = read_json(results, "dubito train wrote it").get("config", {}) if results.exists() else {}
    if trained.get("dataset") != name or "data_seed" not in trained or "val_fraction" not in trained:
        raise DubitoError(
            f"--calibrate: {name} has no validation split, and {results} (the training run's record) does not "
            "say which images training held out; calibrate a model in its training folder, or on a dataset "
            "with a validation split"
        )
    return {"data_seed": trained["data_seed"], "val_fraction": trained["val_fraction"]}


class Accumulator:
    """Streaming evaluation state for one dataset (the task metrics only when ``labels``)."""

    def __init__(self, spec: ModelSpec | dict[str, Any], labels: bool, seed: int) -> None:
        spec = ModelSpec.of(spec)
        self.spec, self.labels = spec, labels
        self.classes = spec.task in ("segmentation", "classification")  # per pixel, or per item (digits)
        self.sums: dict[str, float] = {}
        self.pixels = 0
        self.image_scores: list[Tensor] = []
        if self.classes:
            self.confusion = M.ConfusionMatrix(spec.num_classes, spec.ignore_index)
            self.calibration = M.CalibrationHistogram(15)
            self.names = {
                "total": "predictive_entropy",
                "aleatoric": "aleatoric_entropy",
                "epistemic": "mutual_information",
            }
        else:
            self.depth = M.DepthMetrics()
            self.calibration = M.RegressionCalibration(likelihood=spec.likelihood)
            self.names = {"total": "total_var", "aleatoric": "aleatoric_var", "epistemic": "epistemic_var"}
        self.samples = {
            k: M.UncertaintySample(SAMPLE_POINTS, seed=seed + i) for i, k in enumerate(self.names)
        }
        self.noise = M.UncertaintySample(SAMPLE_POINTS, seed=seed + 7)

    def update(self, u, batch: dict[str, Tensor]) -> None:
        mask = batch["mask"]
        fields = u.to_dict()
        for key in (
            "predictive_entropy",
            "aleatoric_entropy",
            "mutual_information",
            "epistemic_logit_variance",
            "variation_ratio",
            "aleatoric_var",
            "epistemic_var",
            "total_var",
        ):
            if key in fields:
                value = fields[key].float().cpu()
                value = value[:, 0] if value.dim() == 4 else value
                self.sums[key] = self.sums.get(key, 0.0) + float(value[mask].double().sum())
        if not self.classes:  # the depth scale predicted, to read variances in m² against
            pred = u.mean[:, 0].float().cpu()
            spread = fields["epistemic_var"][:, 0].float().cpu().sqrt() / pred.clamp_min(1e-3)
            self.sums["predicted_depth"] = self.sums.get("predicted_depth", 0.0) + float(
                pred[mask].double().sum()
            )
            self.sums["relative_epistemic_std"] = self.sums.get("relative_epistemic_std", 0.0) + float(
                spread[mask].double().sum()
            )
        self.pixels += int(mask.sum())
        device = fields[self.names["epistemic"]].device  # the service's (CUDA) device
        self.image_scores.append(u.per_item(mask.to(device))[self.names["epistemic"]].float().cpu())
        if not self.labels:
            return
        target = batch["target"]
        if self.classes:
            pred = u.prediction.cpu()
            probs = u.mean_probs.float().cpu()
            self.confusion.update(pred, target, mask)
            self.calibration.update(probs, target, mask=mask)
            classes = probs.movedim(1, -1)[mask]  # (M, C) at the valid pixels
            nll = classification_nll(classes, target[mask])
            error = (pred != target).double()
        else:
            pred = u.mean[:, 0].float().cpu()
            var = u.total_var[:, 0].float().cpu()
            self.depth.update(pred, target, mask)
            self.calibration.update(pred, var, target, mask=mask)
            nll = regression_nll(pred[mask], var[mask], target[mask], self.spec.likelihood)
            if bool((var[mask] <= 0).any()):  # no predictive variance (a baseline): no likelihood
                nll = torch.full((1,), math.nan)
            error = (pred - target).abs().double()
        self.sums["nll"] = self.sums.get("nll", 0.0) + float(nll.sum())
        for kind, name in self.names.items():
            value = fields[name].float().cpu()
            value = value[:, 0] if value.dim() == 4 else value
            self.samples[kind].update(value, error, mask)
        if "noise" in batch:  # synthetic data: the true aleatoric noise of every pixel
            aleatoric = fields[self.names["aleatoric"]].float().cpu()
            aleatoric = aleatoric[:, 0] if aleatoric.dim() == 4 else aleatoric
            self.noise.update(aleatoric, batch["noise"].double(), mask)

    def summary(self) -> dict[str, float]:
        out = {k: v / max(self.pixels, 1) for k, v in self.sums.items()}
        if not self.labels:
            return out
        if self.classes:
            per_class, miou = self.confusion.iou()
            out.update(
                mean_iou=miou, pixel_accuracy=self.confusion.pixel_accuracy(), ece=self.calibration.ece()
            )
            if self.spec.task == "classification":  # one label per item: the accuracy is the items'
                out["accuracy"] = out.pop("pixel_accuracy")
            out["per_class_iou"] = [None if math.isnan(v) else float(v) for v in per_class.tolist()]
        else:
            out.update(self.depth.compute())
            out["calibration_error"] = self.calibration.error()
        for kind in self.names:
            unc, err = self.samples[kind].points()
            if len(unc):
                out[f"ause_{kind}"] = M.ause(unc.sqrt() if not self.classes else unc, err)
        unc, noise = self.noise.points()
        if len(unc) > 2:
            from scipy.stats import spearmanr

            out["noise_spearman"] = float(spearmanr(unc.numpy(), noise.numpy()).statistic)
        return out

    def curves(self) -> dict[str, dict[str, list[float]]]:
        """Error (1 − accuracy, or |depth error|) of the pixels left after dropping the most
        uncertain fraction, and sparsification curves, per kind of uncertainty."""
        out = {}
        for kind in self.names:
            unc, err = self.samples[kind].points()
            if len(unc) == 0:
                continue
            curve = M.uncertainty_curve(unc, err)
            sparse = M.sparsification(unc, err)
            out[kind] = {
                "removed_fraction": curve["quantiles"].tolist(),
                "error": curve["value"].tolist(),
                "sparsification_fraction": sparse["fractions"].tolist(),
                "sparsification_model": sparse["model"].tolist(),
                "sparsification_oracle": sparse["oracle"].tolist(),
            }
        return out


def _run(
    service: UncertaintyService,
    data: Dataset,
    acc: Accumulator,
    config: EvalConfig,
    desc: str,
    progress: bool,
    keep: int,
) -> list[dict]:
    shown = []
    loader = DataLoader(data, batch_size=config.batch_size, generator=torch.Generator().manual_seed(0))
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        u = service.predict(batch["image"])
        check_finite_outputs(u, batch["id"], config.model)  # never a metric computed from NaN
        acc.update(u, batch)
        for j in range(len(batch["image"])):
            if len(shown) < keep and batch["image"].dim() == 4:  # images (a digits vector is not shown)
                shown.append(_figure_row(batch, j, u, acc))
    return shown


def _figure_row(batch: dict, j: int, u, acc: Accumulator) -> dict:
    aleatoric = u.to_dict()[acc.names["aleatoric"]][j].float().cpu()
    epistemic = u.to_dict()[acc.names["epistemic"]][j].float().cpu()
    prediction = u.prediction[j].cpu() if acc.classes else u.mean[j, 0].float().cpu()
    squeeze = lambda t: t[0] if t.dim() == 3 else t  # noqa: E731
    return {
        "image": batch["image"][j],
        "target": batch["target"][j],
        "prediction": prediction,
        "aleatoric": squeeze(aleatoric),
        "epistemic": squeeze(epistemic),
        "label": f"id {int(batch['id'][j])}",
    }


def evaluate(
    config: EvalConfig, *, progress: bool = True, tags: dict[str, str] | None = None
) -> dict[str, Any]:
    """Evaluate ``config.model``; returns what ``results.json`` holds."""
    from dubito.platform.training import load_model

    config.validate()
    out = check_output(config.output)
    check_tracking()
    device = resolve_device(config.device)
    model, spec = load_model(config.model, device)
    try:
        check_source(model, **source_options(model, config.epistemic or None, config.samples))
    except DubitoError as err:
        raise DubitoError(
            f"--epistemic {config.epistemic or '(default)'} for {config.model}: {err}"
        ) from None
    name = config.dataset or spec.dataset
    data = evaluation_dataset(name, config.split, config.root, spec, config)
    _check_fits(data, spec, name, config.model)
    ood_name = config.ood_dataset or (name if DATASETS[name].synthetic else "")
    ood_synthetic = bool(ood_name) and dataset_info(ood_name, "--ood-dataset").synthetic
    ood_data = None
    if config.ood and ood_name:  # opened now, so a wrong folder is reported before any work
        ood_data = evaluation_dataset(ood_name, "test", config.ood_root, spec, config, ood=ood_synthetic)
    held_out = calibration_dataset(name, config.root, spec, config) if config.calibrate else None
    with exclusive(out):
        return _evaluate(
            config, out, model, spec, name, data, ood_name, ood_data, held_out, device, progress, tags
        )


def _evaluate(
    config: EvalConfig,
    out: Path,
    model: torch.nn.Module,
    spec: ModelSpec,
    name: str,
    data: Dataset,
    ood_name: str,
    ood_data: Dataset | None,
    held_out: Dataset | None,
    device: torch.device,
    progress: bool,
    tags: dict[str, str] | None,
) -> dict[str, Any]:
    from dubito.platform.plots import (
        calibration_figure,
        sparsification_figure,
        uncertainty_curves_figure,
        uncertainty_figure,
    )

    def service(calibration: Calibration | None = None, seed: int = config.seed) -> UncertaintyService:
        return UncertaintyService(
            model,
            **source_options(model, config.epistemic or None, config.samples),
            device=device,
            seed=seed,
            logit_noise_samples=config.logit_noise_samples,
            calibration=calibration,
            progress=False,
        )

    started = time.perf_counter()
    with tracked_run(
        config.experiment,
        run_name=f"{out.parent.name}/{out.name}",
        params={**asdict(config), "spec": spec.as_dict()},
        tags={"dubito.command": "evaluate", **(tags or {})},
    ) as run:
        acc = Accumulator(spec, labels=True, seed=config.seed)
        scorer = service()  # one seed stream for the test and the OOD data
        rows = _run(
            scorer, data, acc, config, f"evaluating on {name} {config.split}", progress, config.figures
        )
        summary = acc.summary()
        curves = acc.curves()
        results: dict[str, Any] = {
            "config": asdict(config),
            "spec": spec.as_dict(),
            "epistemic": scorer.describe(),
            "dataset": name,
            "summary": summary,
            "curves": curves,
        }
        if acc.classes:
            rel = acc.calibration.reliability()
            results["reliability"] = {k: v.tolist() for k, v in rel.items()}
        else:
            results["coverage"] = {
                "levels": acc.calibration.levels.tolist(),
                "observed": acc.calibration.observed().tolist(),
            }
        if ood_data is not None:
            # OOD data labelled for the same task (the synthetic rooms, NYUv2 depth for a Make3D model)
            # also get the task metrics: how wrong the model is where its uncertainty should be high
            ood_acc = Accumulator(spec, labels=_same_task(ood_data, spec), seed=config.seed)
            rows += _run(
                scorer,
                ood_data,
                ood_acc,
                config,
                f"evaluating on {ood_name} (OOD)",
                progress,
                1 if config.figures else 0,
            )
            ood_summary = ood_acc.summary()
            summary.update({f"ood_{k}": v for k, v in ood_summary.items()})
            summary["ood_auroc"] = M.auroc(torch.cat(acc.image_scores), torch.cat(ood_acc.image_scores))
            results["ood_dataset"] = f"{ood_name} (indoor OOD)" if DATASETS[ood_name].synthetic else ood_name
        calibrated = None
        if held_out is not None:
            calibrated = _calibrate(service, held_out, data, spec, name, config, out, progress)
            results["calibration"] = calibrated
            summary.update({f"calibrated_{k}": v for k, v in calibrated["after"].items()})
        summary["seconds"] = time.perf_counter() - started
        figures = []
        if rows:
            figures.append(uncertainty_figure(rows, out / "uncertainty.png"))
        if curves:
            ylabel = {"segmentation": "pixel error rate", "classification": "error rate"}.get(
                spec.task, "mean |depth error| (m)"
            )
            figures.append(uncertainty_curves_figure(curves, out / "precision_uncertainty.png", ylabel))
            figures.append(sparsification_figure(curves, out / "sparsification.png"))
        if acc.classes:
            figures.append(
                calibration_figure(
                    results["reliability"],
                    out / "calibration.png",
                    kind="classification",
                    ece=summary["ece"],
                    calibrated=calibrated and calibrated["reliability"],
                    calibrated_ece=calibrated and calibrated["after"]["ece"],
                )
            )
        else:
            figures.append(
                calibration_figure(
                    results["coverage"],
                    out / "calibration.png",
                    kind="regression",
                    calibrated=calibrated and calibrated["coverage"],
                )
            )
        results["mlflow_run_id"] = run.run_id
        write_json(out / "results.json", results)
        run.log_metrics(
            {k: v for k, v in summary.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        )
        extra = [out / "calibration.json"] if held_out is not None else []
        for path in (out / "results.json", *extra, *figures):
            run.log_artifact(path)
    return results


def _calibrate(
    service,
    held_out: Dataset,
    data: Dataset,
    spec: ModelSpec,
    name: str,
    config: EvalConfig,
    out: Path,
    progress: bool,
) -> dict[str, Any]:
    """Fit the calibration on ``held_out`` (a seed of its own), evaluate the test data again with
    it (the same seed as the uncalibrated pass: the same dropout masks) and write calibration.json;
    returns the before/after record of results.json."""
    loader = DataLoader(held_out, batch_size=config.batch_size)
    calibration, fit = fit_calibration(
        service(seed=config.seed + 1), loader, seed=config.seed, progress=progress
    )
    acc = Accumulator(spec, labels=True, seed=config.seed)
    _run(
        service(calibration),
        data,
        acc,
        config,
        f"evaluating on {name} {config.split}, calibrated",
        progress,
        0,
    )
    after = acc.summary()
    keys = ("ece", "nll") if acc.classes else ("calibration_error", "nll")
    fit = {"dataset": name, "split": "validation", "items": len(held_out), **fit}
    calibration.save(out / "calibration.json", fit=fit)
    record: dict[str, Any] = {
        "method": "temperature scaling" if acc.classes else "variance scaling",
        **calibration.as_dict(),
        "fit": fit,
        "after": {k: after[k] for k in keys},
    }
    if acc.classes:
        record["reliability"] = {k: v.tolist() for k, v in acc.calibration.reliability().items()}
    else:
        record["coverage"] = {
            "levels": acc.calibration.levels.tolist(),
            "observed": acc.calibration.observed().tolist(),
        }
    return record


def _check_fits(data: Dataset, spec: ModelSpec, name: str, model: str, labels: bool = True) -> None:
    """A model is tested on data of its task and classes; OOD images (``labels=False``) only
    need to be images (a CamVid model may be shown NYUv2)."""
    from dubito.platform.training import base_dataset

    if not labels or _same_task(data, spec):
        return
    base = base_dataset(data)
    if base.task != spec.task:
        raise DubitoError(f"{model} is a {spec.task} model; {name} is a {base.task} dataset")
    raise DubitoError(
        f"{model} predicts {spec.num_classes} classes; {name} has {getattr(base, 'num_classes', None)}"
    )


def _same_task(data: Dataset, spec: ModelSpec) -> bool:
    """Whether ``data`` is labelled for the model's task (and, for segmentation, its classes)."""
    from dubito.platform.training import base_dataset

    base = base_dataset(data)
    if base.task != spec.task:
        return False
    return base.task != "segmentation" or getattr(base, "num_classes", None) == spec.num_classes


def format_evaluation(results: dict[str, Any]) -> str:
    """The headline numbers of an evaluation as text."""
    s, spec = results["summary"], ModelSpec.of(results["spec"])
    source = f", {results['epistemic']}" if "epistemic" in results else ""
    lines = [f"{spec.model}/{spec.variant}{source} on {results['dataset']} ({results['config']['split']})"]
    if spec.task == "classification":
        lines.append(f"accuracy {s['accuracy']:.4f}   mean IoU {s['mean_iou']:.4f}   ECE {s['ece']:.4f}")
        keys = ("accuracy", "aleatoric_entropy", "mutual_information", "epistemic_logit_variance")
    elif spec.task == "segmentation":
        lines.append(
            f"mean IoU {s['mean_iou']:.4f}   pixel accuracy {s['pixel_accuracy']:.4f}   ECE {s['ece']:.4f}"
        )
        keys = ("aleatoric_entropy", "mutual_information", "epistemic_logit_variance")
    else:
        lines.append(
            "   ".join(f"{k} {s[k]:.4f}" for k in ("rel", "rms", "log10", "delta1"))
            + f"   calibration error {s['calibration_error']:.4f}"
        )
        keys = ("rms", "predicted_depth", "aleatoric_var", "epistemic_var", "relative_epistemic_std")
    if spec.task == "segmentation":
        keys = ("mean_iou", *keys)
    lines.append(
        f"{'':28s}{'in distribution':>18s}" + (f"{'out of distribution':>22s}" if "ood_auroc" in s else "")
    )
    for k in keys:
        row = f"{k.replace('_', ' '):28s}{s.get(k, math.nan):18.4f}"
        if "ood_auroc" in s:
            row += f"{s.get('ood_' + k, math.nan):22.4f}"
        lines.append(row)
    if "ood_auroc" in s:
        lines.append(f"OOD detection AUROC (per-image epistemic): {s['ood_auroc']:.3f}")
    if "calibration" in results:
        c = results["calibration"]
        what = (
            f"temperature {c['temperature']:.3f}"
            if "ece" in c["after"]
            else f"variance x{c['variance_scale']:.3f}"
        )
        first = "ece" if "ece" in c["after"] else "calibration_error"
        lines.append(
            f"calibrated ({c['method']}, {what}, fit on {c['fit']['points']} validation pixels): "
            f"{first.replace('_', ' ')} {s[first]:.4f} -> {c['after'][first]:.4f}, NLL {s['nll']:.4f} -> {c['after']['nll']:.4f}"
        )
    if "noise_spearman" in s:
        lines.append(f"aleatoric vs true noise, per-pixel Spearman: {s['noise_spearman']:.3f}")
    ause = ", ".join(
        f"{k} {s['ause_' + k]:.4f}" for k in ("total", "aleatoric", "epistemic") if "ause_" + k in s
    )
    if ause:
        lines.append(f"AUSE: {ause}")
    return "\n".join(lines)
