"""The settings of one labeling loop (:class:`LoopConfig`) and how a loop folder records them.

A loop folder holds ``ledger.sqlite`` (:data:`LEDGER`); the ledger keeps the settings the loop was
started with (:meth:`LoopConfig.settings`), and :func:`loop_config` reads them back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dubito import DubitoError
from dubito.acquisition.functions import get_acquisition
from dubito.acquisition.ledger import Ledger
from dubito.acquisition.pool import PoolSpec
from dubito.acquisition.reductions import parse_reduction
from dubito.acquisition.scoring import ScoringSpec
from dubito.acquisition.selection import SELECTIONS
from dubito.platform.config import Nested, check_finite, check_range, flat_fields, from_flat, nested, to_flat
from dubito.platform.data import dataset_info
from dubito.platform.models import variant_spec
from dubito.platform.service import parse_epistemic
from dubito.platform.training import TrainConfig

__all__ = ["LEDGER", "LoopConfig", "loop_config", "loop_folder"]

LEDGER = "ledger.sqlite"
# settings that may change when a run is resumed (the budget may grow; where it runs may change)
_RESUMABLE = (
    "output",
    "rounds",
    "budget",
    "device",
    "experiment",
    "scorers",
    "scorer_gpus",
    "scorer_threads",
    "member_workers",
    "loader_workers",
)
# the settings the first ledgers recorded; any other (a training setting added since) is left out
# of a ledger while at its default, so the ledgers written before it compare equal and resume
_FIRST_LEDGERS = (
    "acquisition",
    "batch_size",
    "data_seed",
    "dataset",
    "dropout",
    "epochs",
    "height",
    "initial",
    "lr",
    "model",
    "oracle",
    "pool_images",
    "query",
    "reduction",
    "root",
    "samples",
    "seed",
    "selection",
    "static_fraction",
    "temperature",
    "test_images",
    "variant",
    "width",
)
# training settings a loop sets itself (seed, where it writes) or does not use (the pool decides
# the data and its augmentation; every round trains its epochs without validation or early stopping)
_NOT_IN_A_LOOP = (
    "output",
    "experiment",
    "seed",
    "crop",
    "flip",
    "train_images",
    "val_images",
    "fraction",
    "val_fraction",
    "max_depth",
    "class_weights",
    "patience",
    "workers",
    "gpu",
)


@dataclass
class LoopConfig(Nested):
    """Settings of one labeling loop (one acquisition, one seed); ``train`` holds its rounds'
    training settings. Flags, the ledger and MLflow name every setting flat (``--epochs``)."""

    output: str = field(
        default="runs/label", metadata={"help": "folder for the ledger, round checkpoints, results.json"}
    )
    train: TrainConfig = nested(
        TrainConfig,
        height=32,
        width=40,
        epochs=8,
        omit=_NOT_IN_A_LOOP,
        helps={
            "epochs": "training epochs per round (each round trains from scratch)",
            "batch_size": "batch size (training and scoring)",
            "static_fraction": "synthetic datasets: pool images with TV static",
            "data_seed": "seed of the synthetic scenes / the digits split",
        },
    )  # the training settings of every round (its seed: seed x 1000 + round)
    acquisition: str = field(
        default="bald", metadata={"help": "acquisition function (dubito.acquisition.ACQUISITIONS)"}
    )
    reduction: str = field(
        default="topq:0.1",
        metadata={"help": "pixel → image: mean, max, topq:Q (mean of the top Q), class_balanced, grid:G"},
    )
    selection: str = field(default="topk", metadata={"help": "topk, power, softmax, kcenter, batchbald"})
    temperature: float = field(default=1.0, metadata={"help": "power / softmax selection temperature"})
    initial: int = field(default=8, metadata={"help": "initial random labels"})
    query: int = field(default=4, metadata={"help": "labels queried per round"})
    rounds: int = field(default=4, metadata={"help": "query rounds (models trained: rounds + 1)"})
    budget: int = field(default=0, metadata={"help": "total labels; when > 0 it sets the rounds"})
    pool_images: int = field(
        default=80, metadata={"help": "synthetic datasets: scenes in the unlabelled pool"}
    )
    test_images: int = field(default=16, metadata={"help": "synthetic datasets: test scenes"})
    samples: int = field(
        default=8, metadata={"help": "MC-dropout samples T for scoring (per member with ensemble+dropout)"}
    )
    epistemic: str = field(
        default="dropout",
        metadata={
            "help": "epistemic source of scoring: dropout (one model, T samples), ensemble:K (each round "
            "trains K members with distinct seeds) or ensemble+dropout:K (K members x T samples)"
        },
    )
    calibrate: bool = field(
        default=False,
        metadata={
            "help": "each round: fit temperature (classes) / variance (depth) scaling on the dataset's "
            "validation data before scoring the pool"
        },
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the initial set, training, MC samples and selection"}
    )
    oracle: str = field(
        default="simulated", metadata={"help": "simulated (ground truth) or human (export / import)"}
    )
    scorers: int = field(
        default=0,
        metadata={"help": "Ray actors scoring the pool (0: score in this process); same scores either way"},
    )
    scorer_gpus: str = field(
        default="auto",
        metadata={"help": "GPUs per scoring actor: auto (1 where the Ray cluster has GPUs) or a number"},
    )
    member_workers: int = field(
        default=0,
        metadata={
            "help": "--epistemic ensemble: Ray tasks training a round's members side by side (0: one after "
            "the other in this process); the same members either way"
        },
    )
    scorer_threads: int = field(
        default=0,
        metadata={
            "help": "PyTorch threads per CPU scoring actor; 0: this process's count (bit-identical scores), "
            "fewer: no oversubscribed cores, scores equal to float rounding"
        },
    )
    experiment: str = field(default="dubito-label", metadata={"help": "MLflow experiment name"})

    def validate(self) -> None:
        """Every setting, before anything is written (:class:`DubitoError` naming the flag)."""
        check_finite(self)
        self.train_config(0).validate()  # the training settings every round uses
        if self.scorer_gpus != "auto":
            try:
                check_range("scorer_gpus", float(self.scorer_gpus), 0.0)
            except ValueError:
                raise DubitoError(
                    f"--scorer-gpus must be auto or a number >= 0, got {self.scorer_gpus!r}"
                ) from None
        source, _ = parse_epistemic(self.epistemic)
        noise, mc_dropout = variant_spec(self.train.variant)
        if source == "ensemble+dropout" and not mc_dropout:
            raise DubitoError(
                f"--epistemic {self.epistemic}: members of --variant {self.train.variant} have no test-time "
                "dropout; use ensemble:K, or --variant epistemic / both"
            )
        depth = dataset_info(self.train.dataset, "--dataset").task == "depth"
        if self.calibrate and depth and source == "dropout" and noise is None and not mc_dropout:
            raise DubitoError(
                f"--calibrate: a depth model of --variant {self.train.variant} predicts no variance to scale; "
                "use --variant aleatoric, epistemic or both (or an ensemble)"
            )
        if self.calibrate:
            info = dataset_info(self.train.dataset, "--dataset")
            if not info.synthetic and "val" not in info.splits:
                raise DubitoError(
                    f"--calibrate needs held-out labelled data: {self.train.dataset} has no validation split "
                    "(use synthetic scenes or CamVid)"
                )
        for flag, check, value in (
            ("--acquisition", get_acquisition, self.acquisition),
            ("--reduction", parse_reduction, self.reduction),
        ):
            try:
                check(value)
            except DubitoError as err:
                raise DubitoError(f"{flag}: {err}") from None
        if self.selection not in SELECTIONS:
            raise DubitoError(f"--selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        for name in ("initial", "query", "pool_images", "test_images", "samples"):
            if getattr(self, name) < 1:
                raise DubitoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.rounds < 0 or self.budget < 0:
            raise DubitoError("--rounds and --budget must be >= 0")
        if self.budget and self.budget < self.initial:
            raise DubitoError(f"--budget {self.budget} is smaller than --initial {self.initial}")
        if self.oracle not in ("simulated", "human"):
            raise DubitoError(f"--oracle must be simulated or human, got {self.oracle!r}")
        if self.scorers < 0 or self.scorer_threads < 0:
            raise DubitoError(
                f"--scorers and --scorer-threads must be >= 0, got {self.scorers} and {self.scorer_threads}"
            )
        if self.member_workers < 0:
            raise DubitoError(f"--member-workers must be >= 0, got {self.member_workers}")
        check_range("temperature", self.temperature, 0.0, low_open=True)

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
        """The settings a resumed loop must share (flat names, as the ledger records them)."""
        settings = {k: v for k, v in to_flat(self).items() if k not in _RESUMABLE}
        source, members = parse_epistemic(self.epistemic)  # one spelling: ensemble = ensemble:5
        settings["epistemic"] = source if source == "dropout" else f"{source}:{members}"
        defaults = flat_fields(LoopConfig)
        return {k: v for k, v in settings.items() if k in _FIRST_LEDGERS or v != defaults[k].default}

    def pool(self) -> PoolSpec:
        """The pool's datasets, as a small picklable spec (Ray actors rebuild the pool from it)."""
        train = self.train
        return PoolSpec(
            dataset=train.dataset,
            root=train.root,
            height=train.height,
            width=train.width,
            pool_images=self.pool_images,
            test_images=self.test_images,
            static_fraction=train.static_fraction,
            data_seed=train.data_seed,
        )

    def scoring(self) -> ScoringSpec:
        """What scoring the pool needs (picklable: the Ray scorer gets this, not the whole config)."""
        return ScoringSpec(
            acquisition=self.acquisition,
            reduction=self.reduction,
            selection=self.selection,
            samples=self.samples,
            batch_size=self.train.batch_size,
            seed=self.seed,
            epistemic=self.epistemic,
        )

    def train_config(self, round: int) -> TrainConfig:
        """Round ``round``'s training settings."""
        return dataclasses.replace(self.train, seed=self.seed * 1000 + round)


def loop_config(output: Path, ledger: Ledger) -> LoopConfig:
    """The settings a loop's ledger was written with."""
    settings = ledger.get_meta("settings")
    if not isinstance(settings, dict) or set(settings) - set(flat_fields(LoopConfig)):
        raise DubitoError(f"{ledger.path}: no loop settings this version of dubito can read")
    return from_flat(LoopConfig, {**settings, "output": str(output)})


def loop_folder(output: str | Path) -> Path:
    """The folder of one loop (it holds a ledger), checked before anything is written there."""
    output = Path(output)
    if not (output / LEDGER).is_file():
        raise DubitoError(
            f"{output}: no labeling run here (no {LEDGER}); give the folder of one loop, e.g. runs/label/bald/seed-0"
        )
    return output
