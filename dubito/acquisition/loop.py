"""The pool-based labeling loop: an initial random set, then rounds of

    train (from scratch, seeded) → test → score the unlabelled pool through the
    UncertaintyService → reduce pixel scores per image → select a batch → label → record

for a budget of rounds or labels. Every round is one transaction in the :class:`Ledger`
(``--output/ledger.sqlite``) and its model is saved atomically first, so a run killed at any
point and started again with the same command continues after its last recorded round, never
labels an id twice, and (on a CPU) ends with the same results as an uninterrupted run: each
round's training, MC sampling and selection are seeded by (seed, round).

Oracles: ``simulated`` reads the dataset's ground truth; ``human`` stops after each query,
writes the queried images to ``--output/queries/round-R`` (``dubito label export``), and
continues once ``dubito label import`` has stored the returned label files.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from dubito import DubitoError
from dubito.acquisition.ledger import INITIAL, Ledger, LedgerError
from dubito.platform.data import DATASETS, DatasetError, get_dataset, train_transform
from dubito.platform.config import check_device, check_finite, check_range, default_model
from dubito.platform.files import atomic_path, check_output, exclusive, file_errors, private_dir, read_json, write_json
from dubito.platform.models import DROPOUT_PLACEMENTS
from dubito.platform.service import UncertaintyService, check_finite_outputs, resolve_device
from dubito.platform.tracking import check_tracking, tracked_run
from dubito.platform.training import TrainConfig, fit, save_model, validate

__all__ = ["LoopConfig", "run_loop", "check_resume", "export_queries", "export_waiting", "import_labels", "pool_datasets", "loop_config", "waiting_for_labels"]

LEDGER = "ledger.sqlite"
# settings that may change when a run is resumed (the budget may grow; where it runs may change)
_RESUMABLE = ("output", "rounds", "budget", "device", "experiment", "scorers", "scorer_gpus", "scorer_threads")


@dataclass
class LoopConfig:
    """Settings of one labeling loop (one acquisition, one seed)."""

    output: str = field(default="runs/label", metadata={"help": "folder for the ledger, round checkpoints, results.json"})
    dataset: str = field(default="synthetic-camvid", metadata={"help": f"one of {', '.join(DATASETS)}"})
    root: str = field(default="", metadata={"help": "dataset folder (real datasets)"})
    acquisition: str = field(default="bald", metadata={"help": "acquisition function (dubito.acquisition.ACQUISITIONS)"})
    reduction: str = field(default="topq:0.1", metadata={"help": "pixel → image: mean, max, topq:Q (mean of the top Q), class_balanced, grid:G"})
    selection: str = field(default="topk", metadata={"help": "topk, power, softmax, kcenter, batchbald"})
    temperature: float = field(default=1.0, metadata={"help": "power / softmax selection temperature"})
    initial: int = field(default=8, metadata={"help": "initial random labels"})
    query: int = field(default=4, metadata={"help": "labels queried per round"})
    rounds: int = field(default=4, metadata={"help": "query rounds (models trained: rounds + 1)"})
    budget: int = field(default=0, metadata={"help": "total labels; when > 0 it sets the rounds"})
    pool_images: int = field(default=80, metadata={"help": "synthetic datasets: scenes in the unlabelled pool"})
    test_images: int = field(default=16, metadata={"help": "synthetic datasets: test scenes"})
    static_fraction: float = field(default=0.2, metadata={"help": "synthetic datasets: pool images with TV static"})
    model: str = field(default="auto", metadata={"help": "auto (mlp for digits, tiny for images), tiny, fc_densenet56/67/103, or mlp"})
    variant: str = field(default="both", metadata={"help": "baseline, homoscedastic, aleatoric, epistemic, both"})
    dropout: float = field(default=0.2, metadata={"help": "dropout p"})
    dropout_at: str = field(default="all", metadata={"help": "FC-DenseNet dropout placement: all (paper), decoder, last_block or head (fastest scoring)"})
    height: int = field(default=32, metadata={"help": "image height"})
    width: int = field(default=40, metadata={"help": "image width"})
    epochs: int = field(default=8, metadata={"help": "training epochs per round (from scratch)"})
    batch_size: int = field(default=8, metadata={"help": "batch size (training and scoring)"})
    lr: float = field(default=1e-3, metadata={"help": "RMSProp learning rate"})
    samples: int = field(default=8, metadata={"help": "MC-dropout samples T for scoring"})
    seed: int = field(default=0, metadata={"help": "seed of the initial set, training, MC samples and selection"})
    data_seed: int = field(default=0, metadata={"help": "seed of the synthetic scenes / the digits split"})
    oracle: str = field(default="simulated", metadata={"help": "simulated (ground truth) or human (export / import)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    scorers: int = field(default=0, metadata={"help": "Ray actors scoring the pool (0: score in this process); same scores either way"})
    scorer_gpus: str = field(default="auto", metadata={"help": "GPUs per scoring actor: auto (1 where the Ray cluster has GPUs) or a number"})
    scorer_threads: int = field(default=0, metadata={"help": "PyTorch threads per CPU scoring actor; 0: this process's count (bit-identical scores), fewer: no oversubscribed cores, scores equal to float rounding"})
    experiment: str = field(default="dubito-label", metadata={"help": "MLflow experiment name"})

    def __post_init__(self) -> None:
        if self.model == "auto":  # recorded as the model it stands for (ledger, MLflow)
            self.model = default_model(self.dataset)

    def validate(self) -> None:
        """Every setting, before anything is written (:class:`DubitoError` naming the flag)."""
        from dubito.acquisition.functions import get_acquisition
        from dubito.acquisition.reductions import parse_reduction
        from dubito.acquisition.selection import SELECTIONS

        check_finite(self)
        if self.dataset not in DATASETS:
            raise DubitoError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        self.train_config(0).validate()  # the training settings every round uses
        check_range("static_fraction", self.static_fraction, 0.0, 1.0)
        check_device("device", self.device)
        if self.scorer_gpus != "auto":
            try:
                check_range("scorer_gpus", float(self.scorer_gpus), 0.0)
            except ValueError:
                raise DubitoError(f"--scorer-gpus must be auto or a number >= 0, got {self.scorer_gpus!r}") from None
        for flag, check, value in (("--acquisition", get_acquisition, self.acquisition), ("--reduction", parse_reduction, self.reduction)):
            try:
                check(value)
            except DubitoError as err:
                raise DubitoError(f"{flag}: {err}") from None
        if self.selection not in SELECTIONS:
            raise DubitoError(f"--selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        for name in ("initial", "query", "pool_images", "test_images", "epochs", "batch_size", "samples"):
            if getattr(self, name) < 1:
                raise DubitoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.rounds < 0 or self.budget < 0:
            raise DubitoError("--rounds and --budget must be >= 0")
        if self.budget and self.budget < self.initial:
            raise DubitoError(f"--budget {self.budget} is smaller than --initial {self.initial}")
        if self.oracle not in ("simulated", "human"):
            raise DubitoError(f"--oracle must be simulated or human, got {self.oracle!r}")
        if self.scorers < 0 or self.scorer_threads < 0:
            raise DubitoError(f"--scorers and --scorer-threads must be >= 0, got {self.scorers} and {self.scorer_threads}")
        check_range("temperature", self.temperature, 0.0, low_open=True)
        if self.dropout_at not in DROPOUT_PLACEMENTS or (self.dropout_at != "all" and self.model == "mlp"):
            raise DubitoError(f"--dropout-at must be one of {', '.join(DROPOUT_PLACEMENTS)} (FC-DenseNet models only), got {self.dropout_at!r}")

    def check_pool(self, size: int) -> None:
        """The pool holds the initial set and every query round's labels."""
        needed = self.initial + self.query * self.total_rounds()
        if min(needed, self.budget or needed) > size:
            raise DubitoError(
                f"--initial {self.initial} + --query {self.query} x {self.total_rounds()} rounds needs "
                f"{min(needed, self.budget or needed)} images; the pool has {size} (raise --pool-images or lower the budget)"
            )

    def total_rounds(self) -> int:
        """Query rounds: ``rounds``, or as many as ``budget`` labels allow."""
        return math.ceil((self.budget - self.initial) / self.query) if self.budget else self.rounds

    def settings(self) -> dict[str, Any]:
        settings = {k: v for k, v in asdict(self).items() if k not in _RESUMABLE}
        if settings["dropout_at"] == "all":  # as ledgers written before placements existed record it
            del settings["dropout_at"]
        return settings

    def train_config(self, round: int) -> TrainConfig:
        return TrainConfig(
            dataset=self.dataset, root=self.root, model=self.model, variant=self.variant, dropout=self.dropout,
            dropout_at=self.dropout_at, height=self.height, width=self.width, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
            seed=self.seed * 1000 + round, data_seed=self.data_seed, device=self.device,
        )  # fmt: skip


# ----------------------------------------------------------------------------- data
def pool_datasets(config: LoopConfig) -> tuple[Dataset, Dataset, Dataset]:
    """(pool for training, with augmentation; the same pool plain, for scoring; test set)."""
    name = config.dataset
    if name == "digits":
        return (get_dataset(name, "train", seed=config.data_seed), get_dataset(name, "train", seed=config.data_seed),
                get_dataset(name, "test", seed=config.data_seed))  # fmt: skip
    size = (config.height, config.width)
    if name.startswith("synthetic-"):
        opts = {"size": size, "seed": config.data_seed}
        pool = dict(n=config.pool_images, static_fraction=config.static_fraction, **opts)
        return (get_dataset(name, "train", transform=train_transform(None, flip=True), **pool), get_dataset(name, "train", **pool),
                get_dataset(name, "test", n=config.test_images, static_fraction=0.0, **opts))  # fmt: skip
    return (get_dataset(name, "train", config.root, size=size, transform=train_transform(None, flip=True)),
            get_dataset(name, "train", config.root, size=size), get_dataset(name, "test", config.root, size=size))  # fmt: skip


def _ids(data: Dataset) -> list[int]:
    ids = getattr(data, "ids", None)
    return [int(i) for i in ids] if ids is not None else list(range(len(data)))


def _flags(data: Dataset, ids: list[int], position: dict[int, int]) -> list[dict]:
    """Known flags of pool items (synthetic: ``has_static``, ``dusk``), for the noisy-pool study."""
    if not hasattr(data, "flags"):
        return [{} for _ in ids]
    return [data.flags(position[i]) for i in ids]


class _HumanLabels(Dataset):
    """The pool with the imported human labels in place of the dataset's targets. A label replaces
    the target of the plain (untransformed) item, and then the training pool's random transform
    (crop, flip) is applied, so label and image stay aligned; other attributes (``task``,
    ``num_classes``, ...) are the training pool's."""

    def __init__(self, data: Dataset, plain: Dataset, files: dict[int, str], position: dict[int, int]) -> None:
        self.data, self.plain, self.files, self.position = data, plain, files, position

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("data", "plain", "files", "position"):
            raise AttributeError(name)
        return getattr(self.data, name)

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.plain[index])
        path = self.files.get(int(item["id"]))
        if path is None:
            return self.data[index]
        target = _read_label_file(Path(path), item["target"])
        if target.is_floating_point():  # depth: NaN or 0 = unknown
            valid = torch.isfinite(target) & (target > 0)
            target = torch.where(valid, target, torch.zeros_like(target))
        else:
            ignore = getattr(self.data, "ignore_index", None)
            valid = target != ignore if ignore is not None else torch.ones_like(target, dtype=torch.bool)
        item["target"], item["mask"] = target, valid
        transform = getattr(self.data, "transform", None)
        if transform is not None:
            from dubito.platform.data.base import item_generator

            item = transform(item, item_generator(self.data.seed, self.data.epoch, int(item["id"])))
        return item


def _read_label_file(path: Path, like: Tensor, data: bytes | None = None) -> Tensor:
    """A human label file: a one-channel PNG of class indices, a ``.npy`` of depths, or a ``.txt``
    holding one class index; decoded from ``data`` (its bytes, already checked by
    :func:`_label_bytes`) when given, else read from ``path`` (a label dubito stored)."""
    import io

    source = io.BytesIO(data) if data is not None else path
    if path.suffix == ".png":
        from dubito.platform.data.base import read_label

        return torch.from_numpy(read_label(source)).to(like.dtype)
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(source, allow_pickle=False)).to(like.dtype)
    text = data if data is not None else path.read_bytes()
    return torch.tensor(int(text.decode("ascii").strip()), dtype=like.dtype)


def _label_bytes(path: Path, like: Tensor) -> bytes:
    """The bytes of a returned label file, read once (what is checked is what is decoded and
    stored): a regular file, not a link; of a size and (PNG, .npy) a header shape that fit
    ``like``, checked before anything is decoded; a class file holds plain ASCII digits. Errors
    never echo the file's content."""
    import errno
    import io
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DubitoError(f"{path}: a link; put the label file itself in --labels (links are not followed)") from None
        raise DubitoError(f"{path}: cannot open the label ({os.strerror(err.errno or 0)})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DubitoError(f"{path}: not a regular file")
        limit = 16 * max(1, like.numel()) + 65_536  # far above any honest encoding of a label of this shape
        if info.st_size > limit:
            raise DubitoError(f"{path}: {info.st_size} bytes, more than a label of shape {tuple(like.shape)} needs ({limit}); not read")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise DubitoError(f"{path}: more than {limit} bytes; not read")
    if path.suffix == ".png":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as img:  # the header only
                size = (img.size[1], img.size[0])
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise DubitoError(f"{path}: not a PNG image") from None
        if size != tuple(like.shape):
            raise DubitoError(f"{path}: label shape {size}, expected {tuple(like.shape)}; not decoded")
    elif path.suffix == ".npy":
        try:
            header = io.BytesIO(data)
            version = np.lib.format.read_magic(header)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, _, dtype = read_header(header)  # the header only, no data
        except (ValueError, OSError, SyntaxError, KeyError):
            raise DubitoError(f"{path}: not a .npy array file (format 1.0 or 2.0)") from None
        if tuple(shape) != tuple(like.shape) or dtype.hasobject or dtype.kind not in "fiu":
            raise DubitoError(f"{path}: a {dtype} array of shape {tuple(shape)}; expected numbers of shape {tuple(like.shape)}")
    elif not re.fullmatch(rb"\s*[0-9]{1,6}\s*", data):
        raise DubitoError(f"{path}: a class file holds one class index in plain ASCII digits (e.g. 3), nothing else")
    return data


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def _features(model: torch.nn.Module, x: Tensor) -> Tensor:
    """Deterministic (eval-mode) features for k-center: the head's input, pooled over pixels."""
    model.eval()
    f = model.features(x)
    return f.flatten(2).mean(2) if f.dim() > 2 else f


def batch_seed(seed: int, round: int, batch: int) -> int:
    """The seed of one scoring batch: its MC-dropout masks and random draws depend on the loop's
    seed, the round and the batch's index only, so any split of the batches over processes or Ray
    actors gives the same scores."""
    return int(np.random.SeedSequence([seed, round, batch]).generate_state(1, np.uint64)[0] >> 2)


def score_batches(
    model: torch.nn.Module, spec: dict[str, Any], data: Dataset, batches: list[tuple[int, list[int]]], config: LoopConfig,
    round: int, device: torch.device, progress: bool = False,
) -> list[dict[str, Tensor]]:  # fmt: skip
    """Scores of ``batches`` — ``(index, positions in data)`` — each a dict of ``scores`` (N,) and,
    when the selection needs them, ``features`` (k-center) or ``prob_samples`` (T, N, C) (BatchBALD).
    Batch ``index`` is seeded by :func:`batch_seed` whoever scores it."""
    from torch.utils.data import default_collate

    from dubito.acquisition.functions import get_acquisition
    from dubito.acquisition.reductions import parse_reduction, reduce_scores

    acquisition = get_acquisition(config.acquisition)
    how, options = parse_reduction(config.reduction)
    service = UncertaintyService(model, samples=config.samples, device=device, progress=False)
    results = []
    total = sum(len(p) for _, p in batches)
    for index, positions in tqdm(batches, desc=f"round {round}: scoring {total} pool images (T={config.samples})",
                                 unit="batch", leave=False, disable=not progress):  # fmt: skip
        batch = default_collate([data[p] for p in positions])
        seed = batch_seed(config.seed, round, index)
        u, samples = service.predict_with_samples(batch["image"], seed=seed)
        check_finite_outputs(u, batch["id"], f"round {round}'s model")
        pixel = acquisition.score(u, generator=torch.Generator().manual_seed(seed)).float().cpu()
        classes = u.prediction.cpu() if how == "class_balanced" else None  # the argmax only where it is used
        # no mask: on real data the valid pixels come from the (unbought) label itself
        result = {"scores": reduce_scores(pixel, None, how, classes=classes, num_classes=spec["num_classes"], **options)}
        if config.selection == "kcenter":
            result["features"] = _features(model, batch["image"].to(device)).cpu()
        if config.selection == "batchbald":  # the very samples the scores came from
            result["prob_samples"] = samples.probs.float().cpu()
        results.append(result)
    return results


def pool_batches(positions: list[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """``positions`` cut into numbered batches of ``batch_size`` (the last one may be smaller)."""
    return [(b, positions[i : i + batch_size]) for b, i in enumerate(range(0, len(positions), batch_size))]


def score_pool(
    model: torch.nn.Module, spec: dict[str, Any], data: Dataset, positions: list[int], config: LoopConfig, round: int,
    device: torch.device, progress: bool, scorer: Any = None,
) -> dict[str, Tensor]:  # fmt: skip
    """Per-image scores of ``data[positions]``; with ``features`` (k-center) or ``prob_samples``
    (BatchBALD) when the selection needs them. ``scorer`` (a :class:`RayPoolScorer`) spreads the
    batches over Ray actors; the numbers are the same as scoring here."""
    if config.selection == "batchbald" and spec["task"] != "classification":
        raise DubitoError("--selection batchbald is for image classification (e.g. digits), not per-pixel tasks")
    batches = pool_batches(positions, config.batch_size)
    if scorer is not None:
        parts = scorer.score(model, batches, round, progress)
    else:
        parts = score_batches(model, spec, data, batches, config, round, device, progress)
    result = {"scores": torch.cat([p["scores"] for p in parts])}
    if "features" in parts[0]:
        result["features"] = torch.cat([p["features"] for p in parts])
    if "prob_samples" in parts[0]:
        result["prob_samples"] = torch.cat([p["prob_samples"] for p in parts], dim=1)
    return result


# ----------------------------------------------------------------------------- the loop
class _Scoring:
    """The loop's Ray scorer (``--scorers N``), started at the first query (it needs the model's
    spec) and stopped when the loop ends; ``get`` gives None when scoring stays local."""

    def __init__(self, config: LoopConfig) -> None:
        self.config = config
        self.scorer: Any = None

    def get(self, spec: dict[str, Any]) -> Any:
        if self.config.scorers == 0:
            return None
        if self.scorer is None:
            from dubito.acquisition.distributed import RayPoolScorer

            self.scorer = RayPoolScorer(self.config, spec, self.config.scorers, gpus=self.config.scorer_gpus,
                                        threads=self.config.scorer_threads or None)  # fmt: skip
        return self.scorer

    def __enter__(self) -> _Scoring:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.scorer is not None:
            self.scorer.close()


def run_loop(
    config: LoopConfig, *, progress: bool = True, tags: dict[str, str] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None, run_name: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) the loop of ``config``; returns what ``--output/results.json`` holds.

    ``--rounds`` / ``--budget`` may grow on resume (a finished loop continues as if it had been
    started with the larger budget); they cannot shrink. ``on_round(record)`` is called after
    each round is committed to the ledger, with ``round``, ``labels`` and the round's test
    metrics (a Ray Tune trial reports and checkpoints there)."""
    config.validate()
    out = check_output(config.output)
    check_tracking()
    device = resolve_device(config.device)
    pool_train, pool, test = pool_datasets(config)
    ids = _ids(pool)
    position = {i: p for p, i in enumerate(ids)}
    config.check_pool(len(ids))
    with exclusive(out), Ledger(out / LEDGER, config.settings()) as ledger:
        _check_resumable(ledger, config)
        if not ledger.labeled_ids():
            order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(config.seed)).tolist()
            first = [ids[p] for p in order[: config.initial]]
            ledger.record_initial(first, _flags(pool, first, position))
            if config.oracle == "human":  # a person labels the initial set too
                export_queries(config, out / "queries" / "initial", first)
        # the MLflow run of this folder: a copied or moved loop gets a run of its own, never the original's
        here = str(out.resolve())
        run_id = ledger.get_meta("mlflow_run_id") if ledger.get_meta("mlflow_folder") in (None, here) else None
        scoring = _Scoring(config)
        with scoring, tracked_run(config.experiment, run_name=run_name or f"{config.acquisition}-seed{config.seed}", params=config,
                         tags={"dubito.command": "label", **(tags or {})}, run_id=run_id) as run:  # fmt: skip
            ledger.set_meta("mlflow_run_id", run.run_id)
            ledger.set_meta("mlflow_folder", here)
            total = config.total_rounds()
            extended = _extend(ledger, config, total, pool, ids, position, device, progress, scoring)
            if extended and config.oracle == "human":
                export_queries(config, out / "queries" / f"round-{ledger.next_round() - 1:03d}", extended)
            bar = tqdm(range(ledger.next_round(), total + 1), desc=f"labeling ({config.acquisition}, seed {config.seed})",
                       unit="round", initial=ledger.next_round(), total=total + 1, disable=not progress)  # fmt: skip
            waiting: list[int] = []
            for r in bar:
                started = time.perf_counter()
                labeled = ledger.labeled_ids()
                if config.oracle == "human":
                    waiting = ledger.pending(labeled)
                    if waiting:
                        last = ledger.next_round() - 1  # INITIAL when the initial set waits
                        folder = out / "queries" / ("initial" if last == INITIAL else f"round-{last:03d}")
                        if not (folder / "queries.json").exists():  # killed after recording, before exporting
                            export_queries(config, folder, [q["id"] for q in ledger.queries(last)])
                        break
                    data = _HumanLabels(pool_train, pool, ledger.label_files(), position)
                else:
                    data = pool_train
                train_cfg = config.train_config(r)
                model, spec, _ = fit(train_cfg, Subset(data, [position[i] for i in labeled]), device=device,
                                     progress=progress, desc=f"round {r}: training on {len(labeled)} labels")  # fmt: skip
                metrics = {f"test_{k[4:]}": v for k, v in validate(model, test, spec, device, config.batch_size).items()}
                checkpoint = save_model(out / "rounds" / f"round-{r:03d}.pt", model, spec)
                queried, scores, flags = [], None, None
                if r < total:
                    queried, scores, flags = _query(model, spec, pool, ids, position, labeled, config, r, device, progress, scoring)
                # synthetic pools know which images carry TV static: the share of bought labels on them
                static = {"static_fraction": _static_fraction(ledger)} if hasattr(pool, "flags") else {}
                # MLflow first: a kill between the two repeats this round (same values, same step)
                # rather than leaving a recorded round without its metrics
                run.log_metrics({**metrics, "labels": len(labeled), **static}, step=r)
                ledger.record_round(r, metrics={**metrics, **static}, checkpoint=str(checkpoint),
                                    seconds=time.perf_counter() - started, queried=queried, scores=scores, flags=flags)  # fmt: skip
                bar.set_postfix(labels=len(labeled), **{k: f"{v:.3f}" for k, v in metrics.items() if k in _HEADLINE})
                if on_round is not None:
                    on_round({"round": r, "labels": len(labeled), **metrics, **static})
                if config.oracle == "human" and queried:
                    export_queries(config, out / "queries" / f"round-{r:03d}", queried)
                    waiting = queried
                    break
            results = _results(config, ledger, waiting)
            write_json(out / "results.json", results)
            run.log_artifact(out / "results.json")
    return results


def check_resume(config: LoopConfig) -> None:
    """A loop folder that holds a ledger can go on with ``config`` (the ledger sound, the same
    settings, the budget not shrunk), checked writing nothing, before any MLflow run is opened."""
    path = Path(config.output) / LEDGER
    if not path.is_file() or (path.stat().st_size == 0 and not any((path.parent / "rounds").glob("round-*.pt"))):
        return  # a new loop (or one killed before its first word): nothing to check
    with Ledger(path, config.settings(), create=False) as ledger:
        _check_resumable(ledger, config)


def _check_resumable(ledger: Ledger, config: LoopConfig) -> None:
    total = config.total_rounds()
    if ledger.next_round() > total + 1:
        raise DubitoError(
            f"{ledger.folder}: this loop already has {ledger.next_round()} rounds ({len(ledger.labeled_ids())} labels); "
            f"--rounds / --budget ({total} query rounds) cannot shrink it: use another --output"
        )
    _check_last_checkpoint(ledger)


def _check_last_checkpoint(ledger: Ledger) -> None:
    """The model of the last recorded round is there and loads (a resumed or extended loop needs it)."""
    from dubito.platform.training import load_model

    rounds = ledger.rounds()
    if not rounds or rounds[-1]["checkpoint"] is None:
        return
    try:
        load_model(rounds[-1]["checkpoint"])
    except DubitoError as err:
        raise LedgerError(
            f"{ledger.path}: round {rounds[-1]['round']} is recorded, but its model is not usable ({err}); restore "
            "the file, or move the folder aside and run again into a new --output"
        ) from None


def _query(
    model: torch.nn.Module, spec: dict[str, Any], pool: Dataset, ids: list[int], position: dict[int, int], labeled: list[int],
    config: LoopConfig, round: int, device: torch.device, progress: bool, scoring: _Scoring | None = None,
) -> tuple[list[int], list[float], list[dict]]:  # fmt: skip
    """Round ``round``'s choice: score the unlabelled pool with its model and select a batch."""
    from dubito.acquisition.selection import select

    labeled_set = set(labeled)
    free = [p for p, i in enumerate(ids) if i not in labeled_set]
    scorer = scoring.get(spec) if scoring is not None else None
    scored = score_pool(model, spec, pool, free, config, round, device, progress, scorer=scorer)
    labeled_features = None
    if "features" in scored:
        loader = DataLoader(Subset(pool, [position[i] for i in labeled]), batch_size=config.batch_size)
        labeled_features = torch.cat([_features(model, b["image"].to(device)).cpu() for b in loader])
    picks = select(scored["scores"], _batch_size(config, len(labeled), len(free)), config.selection,
                   seed=config.seed * 1000 + round, temperature=config.temperature, features=scored.get("features"),
                   labeled_features=labeled_features, prob_samples=scored.get("prob_samples")).tolist()  # fmt: skip
    queried = [ids[free[p]] for p in picks]
    return queried, [float(scored["scores"][p]) for p in picks], _flags(pool, queried, position)


def _extend(ledger: Ledger, config: LoopConfig, total: int, pool: Dataset, ids: list[int], position: dict[int, int],
            device: torch.device, progress: bool, scoring: _Scoring | None = None) -> list[int]:  # fmt: skip
    """A finished loop given a larger budget: its last round's model (from its checkpoint) makes
    the choice that round would have made in a longer run; returns the ids queried."""
    from dubito.platform.training import load_model

    rounds = ledger.rounds()
    if not rounds or rounds[-1]["queried"] or rounds[-1]["round"] >= total:
        return []
    last = rounds[-1]
    model, spec = load_model(last["checkpoint"], device)
    labeled = ledger.labeled_ids()
    queried, scores, flags = _query(model, spec, pool, ids, position, labeled, config, last["round"], device, progress, scoring)
    ledger.add_queries(last["round"], queried, scores, flags)
    return queried


_HEADLINE = ("test_mean_iou", "test_accuracy", "test_rms")
_LABEL_SUFFIX = {"segmentation": ".png", "depth": ".npy"}  # else (image classification) .txt


def headline_metric(metrics: dict[str, float]) -> tuple[str, float, bool]:
    """(name, value, higher_is_better) of a round's main test metric."""
    for name in _HEADLINE:
        if name in metrics:
            return name, metrics[name], name != "test_rms"
    raise DubitoError(f"no test metric among {sorted(metrics)}")


def _batch_size(config: LoopConfig, labeled: int, free: int) -> int:
    """Labels to query this round: ``query``, but never past ``budget`` or the pool."""
    left = config.budget - labeled if config.budget else config.query
    return max(1, min(config.query, free, left))


def _static_fraction(ledger: Ledger) -> float:
    """Fraction of the labels bought so far (initial set excluded) on images with TV static."""
    rows = [q for r in range(ledger.next_round()) for q in ledger.queries(r)]
    flagged = [q["flags"] for q in rows if q["flags"]]
    return sum(bool(f.get("has_static")) for f in flagged) / len(flagged) if flagged else 0.0


def _results(config: LoopConfig, ledger: Ledger, waiting: list[int]) -> dict[str, Any]:
    rounds = ledger.rounds()
    bought = [q for r in rounds for q in ledger.queries(r["round"])]
    static = [bool(q["flags"].get("has_static")) for q in bought if q["flags"] and "has_static" in q["flags"]]
    return {
        "config": asdict(config),
        "curve": [{"round": r["round"], "labels": r["labels"], **r["metrics"]} for r in rounds],
        "initial": [q["id"] for q in ledger.queries(INITIAL)],
        "queried": {r["round"]: r["queried"] for r in rounds if r["queried"]},
        "static_fraction": sum(static) / len(static) if static else None,
        "finished": len(rounds) == config.total_rounds() + 1,
        "waiting_for_labels": waiting,
        "seconds": sum(r["seconds"] or 0.0 for r in rounds),
    }


# ----------------------------------------------------------------------------- human in the loop
def _export_target(loop: Path, folder: Path) -> bool:
    """Check where an export may write; returns whether ``folder`` holds an earlier export of
    this loop under its ``queries/`` folder, which it replaces: every file in it is one that
    export listed. Anything else must be new or empty: nothing dubito did not write is ever
    deleted (a label file kept beside the images stops it), and the loop folder (or one above
    it) is never a target."""
    loop, target = loop.resolve(), folder.resolve()
    if loop == target or loop.is_relative_to(target):
        raise DubitoError(f"--to {folder}: the loop folder or a folder above it; exports go to a folder of their own "
                          f"(default {loop / 'queries' / 'pending'})")  # fmt: skip
    under = target.is_relative_to(loop / "queries") and target != loop / "queries"
    if target.is_relative_to(loop) and not under:
        raise DubitoError(f"--to {folder}: inside the loop folder but not under its queries/ folder; give a folder there or outside the loop")
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise DubitoError(f"--to {folder}: a file or a link; give a folder")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not entries:
        return False
    foreign = [e for e in entries if e not in _export_files(folder)] if under else entries
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise DubitoError(f"--to {folder}: holds files an export did not write ({shown}); export replaces only a folder of its "
                          "own or writes into a new or empty one (nothing else is deleted). Keep label files in a folder of "
                          "their own, given to `dubito label import --labels`")  # fmt: skip
    return True


def _export_files(folder: Path) -> set[str]:
    """What an earlier export wrote in ``folder`` (as its ``queries.json`` lists), else nothing."""
    try:
        listed = read_json(folder / "queries.json")
        return {"queries.json", *(str(q["image"]) for q in listed["queries"])}
    except (DubitoError, KeyError, TypeError):
        return set()


def export_queries(config: LoopConfig, folder: Path, ids: list[int]) -> Path:
    """Write the queried images (PNG, as a person sees them) and ``queries.json`` saying which label
    file to return for each id and its format, into ``folder``: built in a uniquely named folder
    beside it, then renamed into place."""
    from PIL import Image

    folder = Path(folder)
    own = _export_target(Path(config.output), folder)
    plain = pool_datasets(config)[1]
    base = getattr(plain, "normalize", None)
    tmp = private_dir(folder.parent, f".{folder.name}.")
    try:
        position = {i: p for p, i in enumerate(_ids(plain))}
        task = getattr(plain, "task", "segmentation")
        suffix = _LABEL_SUFFIX.get(task, ".txt")
        entries = []
        for i in ids:
            item = plain[position[i]]
            image = item["image"]
            if base is not None and image.dim() == 3:  # undo the normalisation for viewing
                mean, std = (torch.tensor(v, dtype=image.dtype).view(-1, 1, 1) for v in base)
                image = image * std + mean
            array = image.numpy()
            if array.ndim == 1:  # digits: a square grey image, min-max scaled (the features are standardised)
                side = int(round(math.sqrt(array.size)))
                array = (array - array.min()) / max(float(np.ptp(array)), 1e-9)
                Image.fromarray((array.reshape(side, side) * 255).astype(np.uint8)).resize((side * 8, side * 8)).save(tmp / f"{i}.png")
            else:
                Image.fromarray((array.clip(0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(tmp / f"{i}.png")
            entries.append({"id": i, "image": f"{i}.png", "label": f"{i}_label{suffix}"})
        shape = list(plain[position[ids[0]]]["target"].shape) if ids else []
        classes = getattr(plain, "num_classes", None)
        write_json(tmp / "queries.json", {
            "task": task, "label_shape": shape, "classes": classes, "queries": entries,
            "format": {".png": "single-channel PNG of class indices (0..C-1; the dataset's void index for unlabelled pixels)",
                       ".npy": "float array of depth in metres, shape label_shape (NaN or 0 = unknown)",
                       ".txt": "the class index as text"}[suffix],
        })  # fmt: skip
        with file_errors(folder):
            if folder.is_dir():
                if own:  # an earlier export of this loop, every file in it written by dubito (checked)
                    shutil.rmtree(folder)
                else:  # empty (checked): removing it loses nothing
                    folder.rmdir()
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def loop_config(output: Path, ledger: Ledger) -> LoopConfig:
    """The settings a loop's ledger was written with."""
    settings = ledger.get_meta("settings")
    known = {f.name for f in dataclasses.fields(LoopConfig)}
    if not isinstance(settings, dict) or set(settings) - known:
        raise DubitoError(f"{ledger.path}: no loop settings this version of dubito can read")
    return LoopConfig(output=str(output), **settings)


def _loop_folder(output: str | Path) -> Path:
    """The folder of one loop (it holds a ledger), checked before anything is written there."""
    output = Path(output)
    if not (output / LEDGER).is_file():
        raise DubitoError(f"{output}: no labeling run here (no {LEDGER}); give the folder of one loop, e.g. runs/label/bald/seed-0")
    return output


def waiting_for_labels(output: str | Path) -> tuple[LoopConfig, list[int]]:
    """A human-oracle loop's settings and the ids it waits labels for."""
    output = _loop_folder(output)
    with Ledger(output / LEDGER, create=False) as ledger:
        config = loop_config(output, ledger)
        if config.oracle != "human":
            raise DubitoError(f"{output}: a loop with --oracle {config.oracle}; only --oracle human loops export and import labels")
        return config, ledger.pending(ledger.labeled_ids())


def export_waiting(output: str | Path, to: str | Path | None = None) -> tuple[Path | None, list[int]]:
    """``dubito label export``: write the images still waiting for labels (default
    ``OUTPUT/queries/pending``), holding the loop folder; returns (folder or None, ids)."""
    output = _loop_folder(output)
    with exclusive(output):
        config, waiting = waiting_for_labels(output)
        if not waiting:
            return None, []
        return export_queries(config, Path(to) if to else output / "queries" / "pending", waiting), waiting


def import_labels(output: str | Path, folder: str | Path) -> tuple[list[int], list[int]]:
    """Check and store the label files in ``folder`` for the queried ids still waiting for labels;
    returns (ids imported, ids still waiting). Every file is checked — a regular file inside
    ``folder``, size and header before decoding, shape, class range, finite depth — before any is
    stored, so a bad file leaves the ledger as it was."""
    output, folder = Path(output), Path(folder)
    if not folder.is_dir():
        raise DubitoError(f"--labels {folder}: not a folder")
    output = _loop_folder(output)
    with exclusive(output):
        config, waiting = waiting_for_labels(output)
        if not waiting:
            raise DubitoError(f"{output}: no queried image is waiting for a label")
        plain = pool_datasets(config)[1]
        position = {i: p for p, i in enumerate(_ids(plain))}
        task = getattr(plain, "task", "segmentation")
        suffix = _LABEL_SUFFIX.get(task, ".txt")
        checked = {}
        for i in waiting:
            path = folder / f"{i}_label{suffix}"
            if not path.exists() and not path.is_symlink():
                others = sorted(folder.glob(f"{i}_label.*"))
                if others:
                    raise DubitoError(f"{others[0]}: expected {path.name} (this task's labels are {suffix} files; see queries.json)")
                continue
            like = plain[position[i]]["target"]
            data = _label_bytes(path, like)
            try:
                label = _read_label_file(path, like, data)
            except DatasetError as err:  # dubito's own words about the file
                raise DubitoError(f"{path}: cannot read the label ({err.problem})") from None
            except Exception as err:  # noqa: BLE001 - reported with the file name, never its content
                raise DubitoError(f"{path}: cannot read the label ({type(err).__name__})") from None
            if tuple(label.shape) != tuple(like.shape):
                raise DubitoError(f"{path}: label shape {tuple(label.shape)}, expected {tuple(like.shape)}")
            classes = getattr(plain, "num_classes", None)
            ignore = getattr(plain, "ignore_index", None)
            if classes is not None:
                bad = (label < 0) | ((label >= classes) & (label != (ignore if ignore is not None else -1)))
                if bool(bad.any()):
                    raise DubitoError(f"{path}: class values outside 0..{classes - 1}" + (f" (void = {ignore})" if ignore is not None else ""))
            if task == "depth" and not bool((torch.isfinite(label) & (label > 0)).any()):
                raise DubitoError(f"{path}: no finite depth > 0 (NaN or 0 mark unknown pixels; depths are in metres)")
            checked[i] = (path, data)
        if not checked:
            raise DubitoError(f"{folder}: none of the label files waited for ({', '.join(f'{i}_label{suffix}' for i in waiting[:5])}"
                              f"{' ...' if len(waiting) > 5 else ''})")  # fmt: skip
        store = output / "labels"
        with Ledger(output / LEDGER, create=False) as ledger:
            for i, (path, data) in checked.items():
                target = store / path.name
                with atomic_path(target) as tmp, file_errors(target):
                    tmp.write_bytes(data)  # the bytes that were checked
                ledger.record_label(i, str(target))
    return sorted(checked), [i for i in waiting if i not in checked]


def load_results(output: str | Path) -> dict[str, Any]:
    path = Path(output) / "results.json"
    if not path.exists():
        raise DubitoError(f"{path}: not found")
    return read_json(path, "dubito wrote it: run the same dubito label command again to write it anew")
