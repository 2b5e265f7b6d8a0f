"""The settings of one labeling loop (:class:`LoopConfig`) and how a loop folder records them.

A loop folder holds ``ledger.sqlite`` (:data:`LEDGER`); the ledger keeps the settings the loop was
started with (:meth:`LoopConfig.settings`), and :func:`loop_config` reads them back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dubito import DubitoError
from dubito.acquisition.functions import get_acquisition
from dubito.acquisition.ledger import Ledger
from dubito.acquisition.pool import PoolSpec
from dubito.acquisition.reductions import parse_reduction
from dubito.acquisition.scoring import ScoringSpec
from dubito.acquisition.selection import SELECTIONS
from dubito.platform.config import check_device, check_finite, check_range, default_model
from dubito.platform.data import DATASETS
from dubito.platform.models import DROPOUT_PLACEMENTS
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
)


@dataclass
class LoopConfig:
    """Settings of one labeling loop (one acquisition, one seed)."""

    output: str = field(
        default="runs/label", metadata={"help": "folder for the ledger, round checkpoints, results.json"}
    )
    dataset: str = field(
        default="synthetic-camvid",
        metadata={"help": f"one of {', '.join(DATASETS.builtin_names())}, or one registered"},
    )
    root: str = field(default="", metadata={"help": "dataset folder (real datasets)"})
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
    static_fraction: float = field(
        default=0.2, metadata={"help": "synthetic datasets: pool images with TV static"}
    )
    model: str = field(
        default="auto",
        metadata={"help": "auto (mlp for digits, tiny for images), tiny, fc_densenet56/67/103, or mlp"},
    )
    variant: str = field(
        default="both", metadata={"help": "baseline, homoscedastic, aleatoric, epistemic, both"}
    )
    dropout: float = field(default=0.2, metadata={"help": "dropout p"})
    dropout_at: str = field(
        default="all",
        metadata={
            "help": "FC-DenseNet dropout placement: all (paper), decoder, last_block or head (fastest scoring)"
        },
    )
    height: int = field(default=32, metadata={"help": "image height"})
    width: int = field(default=40, metadata={"help": "image width"})
    epochs: int = field(default=8, metadata={"help": "training epochs per round (from scratch)"})
    batch_size: int = field(default=8, metadata={"help": "batch size (training and scoring)"})
    lr: float = field(default=1e-3, metadata={"help": "RMSProp learning rate"})
    samples: int = field(default=8, metadata={"help": "MC-dropout samples T for scoring"})
    seed: int = field(
        default=0, metadata={"help": "seed of the initial set, training, MC samples and selection"}
    )
    data_seed: int = field(default=0, metadata={"help": "seed of the synthetic scenes / the digits split"})
    oracle: str = field(
        default="simulated", metadata={"help": "simulated (ground truth) or human (export / import)"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    scorers: int = field(
        default=0,
        metadata={"help": "Ray actors scoring the pool (0: score in this process); same scores either way"},
    )
    scorer_gpus: str = field(
        default="auto",
        metadata={"help": "GPUs per scoring actor: auto (1 where the Ray cluster has GPUs) or a number"},
    )
    scorer_threads: int = field(
        default=0,
        metadata={
            "help": "PyTorch threads per CPU scoring actor; 0: this process's count (bit-identical scores), "
            "fewer: no oversubscribed cores, scores equal to float rounding"
        },
    )
    experiment: str = field(default="dubito-label", metadata={"help": "MLflow experiment name"})

    def __post_init__(self) -> None:
        if self.model == "auto":  # recorded as the model it stands for (ledger, MLflow)
            self.model = default_model(self.dataset)

    def validate(self) -> None:
        """Every setting, before anything is written (:class:`DubitoError` naming the flag)."""
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
                raise DubitoError(
                    f"--scorer-gpus must be auto or a number >= 0, got {self.scorer_gpus!r}"
                ) from None
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
            raise DubitoError(
                f"--scorers and --scorer-threads must be >= 0, got {self.scorers} and {self.scorer_threads}"
            )
        check_range("temperature", self.temperature, 0.0, low_open=True)
        if self.dropout_at not in DROPOUT_PLACEMENTS or (self.dropout_at != "all" and self.model == "mlp"):
            raise DubitoError(
                f"--dropout-at must be one of {', '.join(DROPOUT_PLACEMENTS)} (FC-DenseNet models only), got {self.dropout_at!r}"
            )

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

    def pool(self) -> PoolSpec:
        """The pool's datasets, as a small picklable spec (Ray actors rebuild the pool from it)."""
        return PoolSpec(
            dataset=self.dataset,
            root=self.root,
            height=self.height,
            width=self.width,
            pool_images=self.pool_images,
            test_images=self.test_images,
            static_fraction=self.static_fraction,
            data_seed=self.data_seed,
        )

    def scoring(self) -> ScoringSpec:
        """What scoring the pool needs (picklable: the Ray scorer gets this, not the whole config)."""
        return ScoringSpec(
            acquisition=self.acquisition,
            reduction=self.reduction,
            selection=self.selection,
            samples=self.samples,
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def train_config(self, round: int) -> TrainConfig:
        return TrainConfig(
            dataset=self.dataset,
            root=self.root,
            model=self.model,
            variant=self.variant,
            dropout=self.dropout,
            dropout_at=self.dropout_at,
            height=self.height,
            width=self.width,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed * 1000 + round,
            data_seed=self.data_seed,
            device=self.device,
        )


def loop_config(output: Path, ledger: Ledger) -> LoopConfig:
    """The settings a loop's ledger was written with."""
    settings = ledger.get_meta("settings")
    known = {f.name for f in dataclasses.fields(LoopConfig)}
    if not isinstance(settings, dict) or set(settings) - known:
        raise DubitoError(f"{ledger.path}: no loop settings this version of dubito can read")
    return LoopConfig(output=str(output), **settings)


def loop_folder(output: str | Path) -> Path:
    """The folder of one loop (it holds a ledger), checked before anything is written there."""
    output = Path(output)
    if not (output / LEDGER).is_file():
        raise DubitoError(
            f"{output}: no labeling run here (no {LEDGER}); give the folder of one loop, e.g. runs/label/bald/seed-0"
        )
    return output
