"""Training of segmentation and depth models in any of the five variants (the paper's recipe),
resumable, tracked in MLflow.

``train(config)`` is one function of a :class:`TrainConfig` (or the same fields as a dict, which
is what Ray Train's ``TorchTrainer`` passes to a worker). Each epoch ends with an atomic
``checkpoint.pt`` (model, optimizer, scaler, epoch, RNG states, history, MLflow run id); rerunning
the same command with the same ``--output`` continues from it and, on a CPU, reaches the same
weights as an uninterrupted run. ``model.pt`` holds the weights of the best validation epoch and
the model's spec, so :func:`load_model` can rebuild it.

Losses (docs/formulas.md): segmentation with a log-variance head → sampled softmax cross-entropy with
``logit_noise_samples`` draws; without → cross-entropy. Depth with a head → Gaussian or Laplace
NLL; without → L2 or L1. Void / invalid pixels never count. Optimiser RMSProp (lr 1e-3, weight
decay 1e-4); gradient clipping; AMP on CUDA (bf16 where supported, else fp16 with a scaler).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm  # not tqdm.auto: its asyncio variant opens an extra iterator (DataLoader workers)

from dubito import DubitoError
from dubito.platform.config import (
    check_choice,
    check_device,
    check_finite,
    check_model,
    check_range,
    default_model,
    needs_root,
)
from dubito.platform.data import DATASETS, get_dataset, train_transform
from dubito.platform.ensemble import Ensemble
from dubito.platform.files import (
    check_output,
    exclusive,
    file_errors,
    load_torch,
    read_json,
    save_torch,
    write_json,
)
from dubito.platform.losses import gaussian_nll, laplace_nll, sampled_softmax_cross_entropy
from dubito.platform.models import DROPOUT_PLACEMENTS, VARIANTS, ModelSpec
from dubito.platform.service import resolve_device
from dubito.platform.tracking import check_tracking, default_tracking_uri, tracked_run

__all__ = [
    "TrainConfig",
    "train",
    "fit",
    "member_config",
    "train_epoch",
    "validate",
    "make_datasets",
    "build_for",
    "load_model",
    "model_from_spec",
    "save_model",
    "task_loss",
    "base_dataset",
    "train_with_ray",
]

#: member k of an ensemble trains with seed + k × MEMBER_SEED_STRIDE (member 0: the seed itself)
MEMBER_SEED_STRIDE = 1_000_003
IGNORE = -100  # label of the pixels outside the mask inside the loss
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"


@dataclass
class TrainConfig:
    """Settings of a training run (each is a ``dubito train`` flag; MLflow logs them as params)."""

    output: str = field(
        default="runs/train", metadata={"help": "folder for checkpoints, model.pt, results.json, plots"}
    )
    dataset: str = field(
        default="synthetic-camvid",
        metadata={"help": f"one of {', '.join(DATASETS.builtin_names())}, or one registered"},
    )
    root: str = field(default="", metadata={"help": "dataset folder (real datasets)"})
    model: str = field(
        default="auto",
        metadata={
            "help": "auto (mlp for digits, tiny for images), tiny, fc_densenet56, fc_densenet67, fc_densenet103, mlp"
        },
    )
    variant: str = field(default="both", metadata={"help": f"one of {', '.join(VARIANTS)}"})
    likelihood: str = field(
        default="laplace", metadata={"help": "depth noise model: laplace (the paper's L1) or gaussian"}
    )
    height: int = field(default=72, metadata={"help": "item height (CamVid 360, half 180)"})
    width: int = field(default=96, metadata={"help": "item width (CamVid 480, half 240)"})
    crop: int = field(
        default=0, metadata={"help": "square random training crop side (paper: 224); 0 = whole items"}
    )
    flip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    train_images: int = field(
        default=120, metadata={"help": "synthetic datasets: scenes generated for training"}
    )
    val_images: int = field(
        default=30, metadata={"help": "synthetic datasets: scenes generated for validation"}
    )
    fraction: float = field(
        default=1.0, metadata={"help": "fraction of the training set used (nested subsets)"}
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "held out of train when there is no val split"}
    )
    static_fraction: float = field(
        default=0.2, metadata={"help": "synthetic datasets: images with TV static"}
    )
    max_depth: float = field(default=70.0, metadata={"help": "depth datasets: larger depth is masked (m)"})
    data_seed: int = field(default=0, metadata={"help": "seed of the synthetic scenes and of the subsets"})
    epochs: int = field(default=15, metadata={"help": "training epochs"})
    batch_size: int = field(default=8, metadata={"help": "batch size"})
    lr: float = field(default=1e-3, metadata={"help": "RMSProp learning rate (paper: 1e-3)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay (paper: 1e-4)"})
    dropout: float = field(default=0.2, metadata={"help": "dropout p (paper: 0.2)"})
    dropout_at: str = field(
        default="all",
        metadata={
            "help": "FC-DenseNet dropout placement: all (paper), decoder, last_block or head (faster MC scoring)"
        },
    )
    class_weights: bool = field(
        default=False, metadata={"help": "median-frequency class weights (segmentation)"}
    )
    logit_noise_samples: int = field(default=10, metadata={"help": "logit-noise samples T_a in the loss"})
    grad_clip: float = field(default=5.0, metadata={"help": "gradient-norm clipping; 0 = off"})
    amp: bool = field(default=True, metadata={"help": "mixed precision on CUDA"})
    patience: int = field(
        default=0, metadata={"help": "early stopping after this many epochs without improvement; 0 = off"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the initialisation, batches, dropout and noise"})
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when available), cpu, cuda, cuda:1, ..."}
    )
    loader_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    workers: int = field(
        default=0,
        metadata={
            "help": "Ray Train workers (0: in this process, Ray Train's local mode; "
            "N: N data-parallel workers on the Ray cluster)"
        },
    )
    gpu: bool = field(
        default=False,
        metadata={"help": "one GPU per Ray Train worker (with --workers N on a cluster that has GPUs)"},
    )
    experiment: str = field(default="dubito-train", metadata={"help": "MLflow experiment name"})

    def __post_init__(self) -> None:
        if self.model == "auto":  # recorded as the model it stands for (checkpoints, MLflow)
            self.model = default_model(self.dataset)

    def validate(self) -> None:
        """Every setting, before anything is written (:class:`DubitoError` naming the flag)."""
        check_finite(self)
        check_choice("dataset", self.dataset, DATASETS)
        if needs_root(self.dataset) and not self.root:
            raise DubitoError(f"--dataset {self.dataset} is read from disk: give --root DIR")
        check_model(self.dataset, self.model)
        check_choice("variant", self.variant, VARIANTS)
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_range("lr", self.lr, 0.0, low_open=True)
        check_range("static_fraction", self.static_fraction, 0.0, 1.0)
        synthetic_depth = self.dataset in DATASETS and DATASETS[self.dataset].synthetic
        synthetic_depth = synthetic_depth and DATASETS[self.dataset].task == "depth"
        check_range("max_depth", self.max_depth, 1.0 if synthetic_depth else 0.0, low_open=True)
        for name in ("seed", "data_seed"):
            check_range(name, getattr(self, name), 0)
        check_device("device", self.device)
        if not self.experiment.strip():
            raise DubitoError("--experiment must name an MLflow experiment")
        if self.dropout_at not in DROPOUT_PLACEMENTS:
            raise DubitoError(
                f"--dropout-at must be one of {', '.join(DROPOUT_PLACEMENTS)}, got {self.dropout_at!r}"
            )
        if self.dropout_at != "all" and self.model == "mlp":
            raise DubitoError(
                f"--dropout-at {self.dropout_at} is an FC-DenseNet option; an MLP has dropout in every layer"
            )
        if self.likelihood not in ("gaussian", "laplace"):
            raise DubitoError(f"--likelihood must be gaussian or laplace, got {self.likelihood!r}")
        for name in (
            "epochs",
            "batch_size",
            "height",
            "width",
            "train_images",
            "val_images",
            "logit_noise_samples",
        ):
            if getattr(self, name) < 1:
                raise DubitoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.fraction <= 1.0:
            raise DubitoError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not 0.0 < self.val_fraction < 1.0:
            raise DubitoError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.crop < 0 or self.crop > min(self.height, self.width):
            raise DubitoError(
                f"--crop must be in [0, {min(self.height, self.width)}] for {self.height}x{self.width} items, got {self.crop}"
            )
        if (
            self.lr <= 0
            or self.weight_decay < 0
            or self.grad_clip < 0
            or self.patience < 0
            or self.workers < 0
            or self.loader_workers < 0
        ):
            raise DubitoError(
                "--lr must be > 0; --weight-decay, --grad-clip, --patience, --workers, --loader-workers must be >= 0"
            )
        if self.gpu and self.workers == 0:
            raise DubitoError(
                "--gpu is for Ray Train workers: give --workers N too (with --workers 0 use --device cuda)"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise DubitoError(f"unknown training settings {sorted(unknown)}")
        return cls(**values)


# ----------------------------------------------------------------------------- data and model
def base_dataset(ds: Dataset) -> Dataset:
    """The dataset under any ``Subset`` wrappers."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def _subset(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """The first ``ceil(fraction·n)`` items of a seeded permutation: smaller fractions are nested
    inside larger ones (the paper's 1/4 ⊂ 1/2 ⊂ all)."""
    if fraction >= 1.0:
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(ds, sorted(order[: max(1, math.ceil(fraction * len(ds)))]))


def make_datasets(config: TrainConfig, split_for_val: str = "val") -> tuple[Dataset, Dataset]:
    """Training and validation sets of ``config``: the dataset's val split when it has one, else a
    seeded ``val_fraction`` of train; the training set then reduced to ``fraction``."""
    info = DATASETS[config.dataset]
    if info.inputs == "vectors":  # digits: no size, crops or flips; validation held out of train
        full = get_dataset(config.dataset, "train", seed=config.data_seed)
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(config.data_seed)).tolist()
        n_val = max(1, round(config.val_fraction * len(full)))
        return _subset(Subset(full, sorted(order[n_val:])), config.fraction, config.data_seed), Subset(
            full, sorted(order[:n_val])
        )
    size = (config.height, config.width)
    transform = train_transform((config.crop, config.crop) if config.crop else None, flip=config.flip)
    options: dict[str, Any] = {"size": size}
    # larger depth is masked out of the loss (evaluation keeps the cap)
    if info.task == "depth" and info.takes("max_depth"):
        options["max_depth"] = config.max_depth
    if info.synthetic:
        options.update(seed=config.data_seed, static_fraction=config.static_fraction)
        train_set = get_dataset(
            config.dataset, "train", n=config.train_images, transform=transform, **options
        )
        val_set = get_dataset(config.dataset, split_for_val, n=config.val_images, **options)
    else:
        if "val" in info.splits:  # CamVid: its own validation split
            train_set = get_dataset(config.dataset, "train", config.root, transform=transform, **options)
            val_set = get_dataset(config.dataset, "val", config.root, **options)
        else:
            full = get_dataset(config.dataset, "train", config.root, transform=transform, **options)
            plain = get_dataset(config.dataset, "train", config.root, **options)
            order = torch.randperm(
                len(full), generator=torch.Generator().manual_seed(config.data_seed)
            ).tolist()
            n_val = max(1, round(config.val_fraction * len(full)))
            val_set, train_set = Subset(plain, sorted(order[:n_val])), Subset(full, sorted(order[n_val:]))
    return _subset(train_set, config.fraction, config.data_seed), val_set


def build_for(config: TrainConfig, dataset: Dataset) -> tuple[nn.Module, ModelSpec]:
    """The model ``config`` asks for, shaped for ``dataset``, and its spec (what ``load_model`` needs)."""
    data = base_dataset(dataset)
    spec = ModelSpec(
        model=config.model,
        task=data.task,
        num_classes=getattr(data, "num_classes", None),
        ignore_index=getattr(data, "ignore_index", None),
        variant=config.variant,
        dropout=config.dropout,
        dropout_at=config.dropout_at,
        likelihood=config.likelihood,
        dataset=config.dataset,
        height=config.height,
        width=config.width,
        max_depth=getattr(data, "max_depth", None),
        # vector inputs (digits): the input size comes from the data
        in_features=int(data[0]["image"].numel()) if config.model == "mlp" else None,
        # digits: its train/test split depends on the seed, evaluation uses the same one
        data_seed=config.data_seed if DATASETS[config.dataset].source == "bundled" else None,
    )
    return spec.build(), spec


def model_from_spec(spec: ModelSpec | dict[str, Any]) -> nn.Module:
    """A fresh (untrained) model of a spec, or of the dict a model file holds (``ModelSpec.of(spec).build()``)."""
    return ModelSpec.of(spec).build()


def save_model(path: str | Path, model: nn.Module, spec: ModelSpec) -> Path:
    """Write ``{"spec", "state_dict"}`` atomically (loadable with ``weights_only=True``); an
    :class:`~dubito.platform.ensemble.Ensemble` as ``{"spec", "members": [state_dict, ...]}``
    (its members share the spec)."""
    spec = ModelSpec.of(spec).as_dict()
    if isinstance(model, Ensemble):
        return save_torch({"spec": spec, "members": [m.state_dict() for m in model.members]}, Path(path))
    return save_torch({"spec": spec, "state_dict": model.state_dict()}, Path(path))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model saved by :func:`save_model` (or a training ``checkpoint.pt``): one
    model, or an :class:`~dubito.platform.ensemble.Ensemble` for an ensemble's file."""
    path = Path(path)
    saved = load_torch(path, "model file", map_location=device)
    try:
        spec = ModelSpec.of(saved["spec"], str(path))
        if "members" in saved:
            if not saved["members"]:
                raise DubitoError(f"{path}: an ensemble's model file without members")
            model = Ensemble([spec.build() for _ in saved["members"]])
            for member, state in zip(model.members, saved["members"]):
                member.load_state_dict(state)
        else:
            model = spec.build()
            model.load_state_dict(saved["state_dict"] if "state_dict" in saved else saved["model"])
    except DubitoError:
        raise
    except Exception as err:
        raise DubitoError(f"{path}: not a dubito model file ({type(err).__name__}: {err})") from None
    return model.to(device).eval(), spec


# ----------------------------------------------------------------------------- the loss
def task_loss(
    model: nn.Module,
    output: Tensor | tuple[Tensor, Tensor],
    batch: dict[str, Tensor],
    *,
    weight: Tensor | None = None,
    logit_noise_samples: int = 10,
) -> Tensor:
    """The paper's loss for ``model``'s task and head (module docstring); pixels outside
    ``batch["mask"]`` (void, invalid depth) never count."""
    model = getattr(model, "module", model)  # DistributedDataParallel: the attributes are the wrapped model's
    logits_or_mean, log_var = output if isinstance(output, tuple) else (output, None)
    logits_or_mean = logits_or_mean.float()
    log_var = log_var.float() if log_var is not None else None
    target, mask = batch["target"], batch["mask"]
    if getattr(model, "task", "segmentation") in ("segmentation", "classification"):
        target = target.masked_fill(~mask, IGNORE)
        if log_var is not None:
            return sampled_softmax_cross_entropy(
                logits_or_mean,
                log_var,
                target,
                samples=logit_noise_samples,
                ignore_index=IGNORE,
                weight=weight,
            )
        return F.cross_entropy(logits_or_mean, target, weight=weight, ignore_index=IGNORE)
    target = target.unsqueeze(1).float()
    likelihood = getattr(model, "likelihood", "gaussian")
    if log_var is not None:
        nll = laplace_nll if likelihood == "laplace" else gaussian_nll
        return nll(logits_or_mean, log_var, target, mask)
    error = (logits_or_mean - target).abs() if likelihood == "laplace" else (logits_or_mean - target) ** 2
    valid = mask.unsqueeze(1).expand_as(error)
    return error[valid].mean() if valid.any() else error.sum() * 0.0


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(
    model: nn.Module, data: Dataset, spec: ModelSpec | dict[str, Any], device: torch.device, batch_size: int
) -> dict[str, float]:
    """One deterministic pass (dropout off): mean IoU and pixel accuracy, or depth errors. An
    :class:`~dubito.platform.ensemble.Ensemble` predicts with its members' mean."""
    from dubito.platform.metrics import ConfusionMatrix, DepthMetrics

    spec = ModelSpec.of(spec)
    model.eval()
    classes = spec.task in ("segmentation", "classification")
    acc = ConfusionMatrix(spec.num_classes, spec.ignore_index) if classes else DepthMetrics()
    # its own generator: creating a DataLoader iterator otherwise draws from the global RNG
    for batch in DataLoader(data, batch_size=batch_size, generator=torch.Generator().manual_seed(0)):
        x = batch["image"].to(device)
        if isinstance(model, Ensemble):  # the members' mean probabilities (or depth)
            pred = model.predict(x).cpu()
        else:
            out = model(x)
            pred = (out[0] if isinstance(out, tuple) else out).float().cpu()
        if classes:
            acc.update(pred.argmax(1), batch["target"], batch["mask"])
        else:
            acc.update(pred[:, 0], batch["target"], batch["mask"])
    if spec.task == "classification":
        return {"val_accuracy": acc.pixel_accuracy()}
    if classes:
        _, miou = acc.iou()
        return {"val_mean_iou": miou, "val_pixel_accuracy": acc.pixel_accuracy()}
    return {f"val_{k}": v for k, v in acc.compute().items()}


def _score(metrics: dict[str, float], task: str) -> float:
    """Higher is better: mean IoU, accuracy, or minus the RMS depth error."""
    return {
        "segmentation": lambda: metrics["val_mean_iou"],
        "classification": lambda: metrics["val_accuracy"],
    }.get(task, lambda: -metrics["val_rms"])()


# ----------------------------------------------------------------------------- the loop
def _class_weights(train_set: Dataset, spec: ModelSpec, progress: bool) -> Tensor:
    data = base_dataset(train_set)
    try:
        return data.class_weights().float()
    except (DubitoError, AttributeError):
        from dubito.platform.data import median_frequency_weights

        counts = torch.zeros(spec.num_classes, dtype=torch.float64)
        for item in tqdm(train_set, desc="class frequencies", unit="img", disable=not progress, leave=False):
            counts += torch.bincount(item["target"][item["mask"]].flatten(), minlength=spec.num_classes)[
                : spec.num_classes
            ]
        return median_frequency_weights(counts)


def _finite_everywhere(loss: Tensor) -> bool:
    """Whether the loss is finite on this process and, under DDP, on every rank (all ranks then
    stop together instead of one raising while the others wait in the gradients' all-reduce)."""
    finite = bool(torch.isfinite(loss.detach()))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor(
            [1.0 if finite else 0.0], device=loss.device if dist.get_backend() == "nccl" else "cpu"
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)
    return finite


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    device: torch.device,
    *,
    weight: Tensor | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    desc: str = "epoch",
    progress: bool = False,
) -> float:
    """One pass over ``loader`` with the paper's loss, gradient clipping and (on CUDA) autocast;
    returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            output = model(batch["image"])
        loss = task_loss(model, output, batch, weight=weight, logit_noise_samples=config.logit_noise_samples)
        if not _finite_everywhere(loss):
            raise DubitoError(f"{desc}: the loss became {loss.item()} (try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if scaler is not None and scaler.is_enabled():
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        total += loss.item() * len(batch["image"])
        count += len(batch["image"])
    import torch.distributed as dist

    if (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    ):  # the mean over every rank's items
        sums = torch.tensor(
            [total, float(count)],
            dtype=torch.float64,
            device=device if dist.get_backend() == "nccl" else "cpu",
        )
        dist.all_reduce(sums)
        total, count = float(sums[0]), int(sums[1])
    return total / max(count, 1)


def fit(
    config: TrainConfig,
    train_set: Dataset,
    *,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "training",
) -> tuple[nn.Module, dict[str, Any], list[float]]:
    """Train a fresh model of ``config`` on ``train_set`` for ``config.epochs`` epochs, in memory
    (no checkpoints, no MLflow: the caller records what it needs, e.g. a labeling round).
    Deterministic on the CPU for a given ``config.seed``. Returns (model in eval mode, spec,
    per-epoch training losses)."""
    device = device or resolve_device(config.device)
    torch.manual_seed(config.seed)
    model, spec = build_for(config, train_set)
    model.to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    losses = []
    for epoch in tqdm(range(config.epochs), desc=desc, unit="epoch", leave=False, disable=not progress):
        if hasattr(base_dataset(train_set), "set_epoch"):
            base_dataset(train_set).set_epoch(epoch)
        loader = DataLoader(
            train_set,
            batch_size=config.batch_size,
            shuffle=True,
            num_workers=config.loader_workers,
            generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch),
        )
        losses.append(
            train_epoch(model, loader, optimizer, config, device, desc=f"{desc}, epoch {epoch + 1}")
        )
    return model.eval(), spec, losses


def member_config(config: TrainConfig, k: int, **changes: Any) -> TrainConfig:
    """Member ``k`` of an ensemble of ``config``: its own seed (initialisation, batch order,
    dropout masks), the same data; member 0 is ``config`` itself."""
    return dataclasses.replace(config, seed=config.seed + MEMBER_SEED_STRIDE * k, **changes)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """Settings that must match to resume (``epochs`` may grow; where and how it runs may change)."""
    config = {
        "dropout_at": "all",
        **config,
    }  # checkpoints written before placements existed: dropout everywhere
    return {
        k: v
        for k, v in config.items()
        if k not in ("epochs", "workers", "loader_workers", "gpu", "device", "output", "patience")
    }


def _world() -> tuple[int, int]:
    """(rank, world size) of this process in a torch.distributed group (Ray Train workers), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank of the torch.distributed group."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _NoRun:
    """What ranks other than 0 log through: nothing (rank 0 holds the MLflow run)."""

    run_id = None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def train(
    config: TrainConfig | dict[str, Any],
    *,
    progress: bool = True,
    tags: dict[str, str] | None = None,
    on_epoch: Callable[[dict[str, Any], Path | None], None] | None = None,
    lock: bool = True,
) -> dict[str, Any]:
    """Train, validate each epoch, checkpoint, log to MLflow; resume from ``output/checkpoint.pt``.

    ``tags`` go on the MLflow run (e.g. ``mlflow.parentRunId``). ``on_epoch(metrics, checkpoint)``
    is called after each epoch's checkpoint is written (Ray Train and Tune report there). Returns
    the results also written to ``output/results.json``.

    This is also the function every Ray Train worker runs (:func:`train_with_ray`): in a
    torch.distributed group of several processes the model is wrapped in DistributedDataParallel,
    each rank trains on its shard of every epoch (a DistributedSampler seeded by ``seed``), every
    rank validates on the whole validation set (so all take the same early-stopping decisions),
    and only rank 0 writes files and logs to MLflow; ``output`` must then be on storage all
    workers see.
    """
    config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    config.validate()
    rank, world = _world()
    out = check_output(config.output)
    if rank == 0:
        check_tracking()
    datasets = _datasets(config)  # a missing or damaged dataset is named before anything is written
    # one writer per folder: rank 0 (or the driver of Ray Train workers, which then passes lock=False)
    with exclusive(out) if lock and rank == 0 else contextlib.nullcontext():
        return _train(config, out, datasets, rank, world, progress, tags, on_epoch)


def _datasets(config: TrainConfig) -> tuple[Dataset, Dataset]:
    train_set, val_set = make_datasets(config)
    if len(train_set) == 0 or len(val_set) == 0:
        raise DubitoError(
            f"{config.dataset}: empty training ({len(train_set)}) or validation ({len(val_set)}) set"
        )
    return train_set, val_set


@dataclass
class _Run:
    """What every epoch of one training run shares."""

    config: TrainConfig
    out: Path
    model: nn.Module
    net: nn.Module  # what the forward / backward passes run through (DDP with several workers)
    spec: ModelSpec
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # None: full precision
    device: torch.device
    train_set: Dataset
    val_set: Dataset
    rank: int
    world: int
    progress: bool
    weight: Tensor | None = None

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT


def _train(
    config: TrainConfig,
    out: Path,
    datasets: tuple[Dataset, Dataset],
    rank: int,
    world: int,
    progress: bool,
    tags: dict[str, str] | None,
    on_epoch: Callable[[dict[str, Any], Path | None], None] | None,
) -> dict[str, Any]:
    """Set up (or resume) the run, then epochs of train → validate → keep the best → checkpoint."""
    with file_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    run, state = _set_up(config, out, datasets, rank, world, progress and rank == 0)
    started = time.perf_counter()
    with _tracking(run, state, tags) as tracker:
        if config.class_weights and run.spec.task == "segmentation":
            run.weight = _class_weights(run.train_set, run.spec, run.progress).to(run.device)
        epochs = tqdm(
            range(state["epoch"], config.epochs),
            desc=f"training {config.model}/{config.variant}",
            unit="epoch",
            disable=not run.progress,
            initial=state["epoch"],
            total=config.epochs,
        )
        for epoch in epochs:
            if state.get("stopped_early"):
                break
            metrics, rng = _epoch(run, epoch)
            _keep_best(run, state, metrics, epoch)
            tracker.log_metrics(metrics, step=epoch + 1)
            if rank == 0:
                _save_checkpoint(run, state, rng)
            if on_epoch is not None:  # every rank: Ray Train counts each worker's reports
                on_epoch({"epoch": epoch + 1, **metrics}, run.checkpoint if rank == 0 else None)
            shown = {k[4:]: f"{v:.3f}" for k, v in metrics.items() if k in ("val_mean_iou", "val_rms")}
            epochs.set_postfix(loss=f"{metrics['train_loss']:.3f}", **shown)
            if state.get("stopped_early"):
                break
        return _finish(run, state, tracker, time.perf_counter() - started)


def _set_up(
    config: TrainConfig, out: Path, datasets: tuple[Dataset, Dataset], rank: int, world: int, progress: bool
) -> tuple[_Run, dict[str, Any]]:
    """The seeded model, its optimizer and scaler, and the run's state: fresh, or resumed from the
    folder's checkpoint (weights, optimizer, RNG); under DDP every rank starts from rank 0's."""
    device = resolve_device(config.device)
    train_set, val_set = datasets
    torch.manual_seed(config.seed)
    model, spec = build_for(config, train_set)
    model.to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    run = _Run(
        config,
        out,
        model,
        model,
        spec,
        optimizer,
        scaler,
        amp_dtype if use_amp else None,
        device,
        train_set,
        val_set,
        rank,
        world,
        progress,
    )
    state = _resume(run)
    if (
        world > 1
    ):  # after loading: DDP starts every rank from rank 0's weights, and every rank from rank 0's epoch
        run.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
        state = _from_rank_zero(state)
        optimizer.load_state_dict(_from_rank_zero(optimizer.state_dict()))
    return run, state


def _resume(run: _Run) -> dict[str, Any]:
    """The state of a new run, or the checkpoint's (loading its weights, optimizer, scaler and RNG
    states); a checkpoint of other settings is refused, naming them."""
    state: dict[str, Any] = {
        "epoch": 0,
        "best": None,
        "best_epoch": None,
        "bad_epochs": 0,
        "history": [],
        "run_id": None,
    }
    if not run.checkpoint.exists():
        return state
    saved = load_torch(
        run.checkpoint,
        "training checkpoint",
        hint="it is dubito's: delete it to train this folder from scratch",
    )
    if _comparable(saved["config"]) != _comparable(asdict(run.config)):
        changed = sorted(k for k, v in _comparable(asdict(run.config)).items() if saved["config"].get(k) != v)
        raise DubitoError(
            f"{run.checkpoint}: a run with other settings ({', '.join(changed)}) is here; "
            "use another --output, or delete the folder to start over"
        )
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    if saved["scaler"] and run.scaler.is_enabled():  # empty when saved without fp16 scaling (CPU, bf16)
        run.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng"]["cpu"])  # RNG states stay on the CPU
    if run.device.type == "cuda" and saved["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(saved["rng"]["cuda"].cpu(), run.device)
    return saved["state"]


def _tracking(run: _Run, state: dict[str, Any], tags: dict[str, str] | None) -> Any:
    """The folder's MLflow run (rank 0; a copied or moved folder gets a run of its own, never the
    original's), its id and folder kept in ``state``; other ranks log nowhere."""
    tags = {
        "dubito.command": "train",
        **(tags or {}),
        **({"dubito.ray_train_workers": run.world} if run.world > 1 else {}),
    }
    here = str(run.out.resolve())
    run_id = state["run_id"] if state.get("folder", here) == here else None

    @contextlib.contextmanager
    def opened() -> Iterator[Any]:
        tracking = (
            tracked_run(
                run.config.experiment, run_name=run.out.name, params=run.config, tags=tags, run_id=run_id
            )
            if run.rank == 0
            else contextlib.nullcontext(_NoRun())
        )
        with tracking as tracker:
            state["run_id"] = tracker.run_id if run.rank == 0 else state["run_id"]
            state["folder"] = here
            tracker.set_tags(tags)
            yield tracker

    return opened()


def _epoch(run: _Run, epoch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One epoch: the seeded shuffle (each rank its shard under DDP), training, validation on the
    whole validation set; returns the epoch's metrics and the RNG states to checkpoint."""
    config = run.config
    base_dataset(run.train_set).set_epoch(epoch)
    if run.world > 1:  # each rank its shard of a seeded permutation
        sampler = DistributedSampler(
            run.train_set, num_replicas=run.world, rank=run.rank, shuffle=True, seed=config.seed
        )
        sampler.set_epoch(epoch)
        loader = DataLoader(
            run.train_set, batch_size=config.batch_size, sampler=sampler, num_workers=config.loader_workers
        )
    else:
        loader = DataLoader(
            run.train_set,
            batch_size=config.batch_size,
            shuffle=True,
            num_workers=config.loader_workers,
            generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch),
        )
    started = time.perf_counter()
    loss = train_epoch(
        run.net,
        loader,
        run.optimizer,
        config,
        run.device,
        weight=run.weight,
        scaler=run.scaler,
        amp_dtype=run.amp_dtype,
        desc=f"epoch {epoch + 1}",
        progress=run.progress,
    )
    metrics = {
        "train_loss": loss,
        **validate(run.model, run.val_set, run.spec, run.device, config.batch_size),
    }
    device = run.device
    rng = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    metrics["epoch_seconds"] = time.perf_counter() - started
    return metrics, rng


def _keep_best(run: _Run, state: dict[str, Any], metrics: dict[str, Any], epoch: int) -> None:
    """The best epoch's model is saved (rank 0); history and early stopping (rank 0 decides under DDP:
    validation on other hardware may round differently)."""
    score = _score(metrics, run.spec.task)
    if state["best"] is None or score > state["best"]:
        state.update(best=score, best_epoch=epoch + 1, bad_epochs=0)
        if run.rank == 0:
            save_model(run.out / MODEL, run.model, run.spec)
    else:
        state["bad_epochs"] += 1
    state["history"].append({"epoch": epoch + 1, **metrics})
    state["epoch"] = epoch + 1
    if run.config.patience and state["bad_epochs"] >= run.config.patience:
        state["stopped_early"] = True
    if run.world > 1:
        state["stopped_early"] = _from_rank_zero(bool(state.get("stopped_early")))


def _save_checkpoint(run: _Run, state: dict[str, Any], rng: dict[str, Any]) -> None:
    save_torch(
        {
            "config": asdict(run.config),
            "spec": run.spec.as_dict(),
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(),
            "state": state,
            "rng": rng,
        },
        run.checkpoint,
    )


def _finish(run: _Run, state: dict[str, Any], tracker: Any, seconds: float) -> dict[str, Any]:
    """The run's results; rank 0 writes results.json and the curves and logs them with the model."""
    results = {
        "config": asdict(run.config),
        "spec": run.spec.as_dict(),
        "epochs_run": state["epoch"],
        "stopped_early": bool(state.get("stopped_early")),
        "best_epoch": state["best_epoch"],
        "history": state["history"],
        "model": str(run.out / MODEL),
        "checkpoint": str(run.checkpoint),
        "train_items": len(run.train_set),
        "val_items": len(run.val_set),
        "seconds_this_session": seconds,
        "mlflow_run_id": tracker.run_id,
    }
    if run.rank == 0:
        from dubito.platform.plots import training_curves

        figure = training_curves(state["history"], run.out / "training.png")
        write_json(run.out / "results.json", results)
        for path in (run.out / "results.json", figure, run.out / MODEL, run.checkpoint):
            tracker.log_artifact(path)
    return results


# ----------------------------------------------------------------------------- Ray Train
def _ray_train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """What each Ray Train worker runs: :func:`train`, reporting every epoch to Ray Train (rank 0
    with the epoch's checkpoint)."""
    import tempfile

    import ray.train
    import ray.train.torch

    os.environ["MLFLOW_TRACKING_URI"] = loop_config[
        "tracking_uri"
    ]  # the driver's store, whatever the worker inherited
    config = dict(loop_config["config"])
    if config["workers"] > 0:  # the device Ray Train gave this worker
        config["device"] = str(ray.train.torch.get_device())

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        if checkpoint is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:  # Ray copies it to its storage
            shutil.copy2(checkpoint, Path(folder) / CHECKPOINT)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    return train(
        config,
        progress=loop_config["progress"],
        tags=loop_config["tags"],
        on_epoch=report,
        lock=loop_config["lock"],
    )


def train_with_ray(
    config: TrainConfig,
    *,
    progress: bool = True,
    tags: dict[str, str] | None = None,
    storage: str | None = None,
) -> dict[str, Any]:
    """:func:`train` under Ray Train's ``TorchTrainer``: with ``config.workers == 0`` in this
    process (Ray Train's local mode: no Ray cluster, the same result as :func:`train` for the same
    seed); with N workers as N data-parallel processes on the Ray cluster (``RAY_ADDRESS``, else a
    local instance), one GPU each with ``config.gpu``. Ray Train's own checkpoints go to
    ``storage`` (default ``<output>/ray``; on a cluster a folder or bucket every node reaches)."""
    from dubito.platform.cluster import check_gpu_capacity, connect, gpu_request

    config.validate()
    check_output(config.output)
    check_tracking()
    _datasets(config)  # opened here too: a missing --root is named before anything is written
    if config.workers > 0:  # the cluster is asked before anything is written
        connect(quiet=not progress)  # the workers' progress reaches this terminal
        if config.gpu:
            gpu_request(1, "--gpu")  # raises on a cluster without GPUs
            check_gpu_capacity(1, config.workers, f"--workers {config.workers} --gpu")
    # the driver holds the folder for the whole run; workers in other processes must not lock it again
    with exclusive(config.output) if config.workers > 0 else contextlib.nullcontext():
        return _train_with_ray(config, progress, tags, storage)


def _train_with_ray(
    config: TrainConfig, progress: bool, tags: dict[str, str] | None, storage: str | None
) -> dict[str, Any]:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dubito.platform.cluster import dubito_cause

    out = Path(config.output).resolve()
    # absolute paths: Ray Train workers run in their own working folders, maybe on other nodes (in local
    # mode the run stays here, and --root stays as given: a checkpoint records it and must match on resume)
    config = dataclasses.replace(config, output=str(out))
    if config.workers > 0 and config.root:
        config = dataclasses.replace(config, root=str(Path(config.root).expanduser().resolve()))
    import logging

    for name in ("ray.train", "ray.tune"):  # the epochs' own progress bar says it; no INFO line per report
        logging.getLogger(name).setLevel(logging.WARNING)
    trainer = TorchTrainer(
        _ray_train_worker,
        train_loop_config={
            "config": asdict(config),
            "progress": progress,
            "tags": tags or {},
            "tracking_uri": default_tracking_uri(),
            "lock": config.workers == 0,
        },
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.gpu),
        run_config=RunConfig(
            name=f"train-{out.name}",
            storage_path=storage or str(out / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # a worker's DubitoError (bad flag, missing file) is what the user must see
        cause = dubito_cause(err)
        if cause is not None and cause is not err:
            raise DubitoError(str(cause)) from err
        raise
    if isinstance(getattr(result, "return_value", None), dict):  # rank 0's results
        return result.return_value
    return read_json(out / "results.json")  # written by rank 0
