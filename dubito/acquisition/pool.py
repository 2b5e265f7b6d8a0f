"""The unlabelled pool: its datasets (:class:`PoolSpec`) and the translation between positions in
the pool dataset and the items' dataset ids (:class:`Pool`).

Ledgers, results, exports and MLflow name items by their dataset **id**; selections and scoring
work on **positions** (indices into the pool dataset). :class:`Pool` owns the translation both
ways, as baal's ``ActiveLearningDataset`` owns its labelled / unlabelled index, so no other code
keeps a position map of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch.utils.data import Dataset, Subset

from dubito import DubitoError
from dubito.platform.data import dataset_info, get_dataset, train_transform

__all__ = ["Pool", "PoolSpec", "pool_datasets", "validation_dataset"]


@dataclass(frozen=True)
class PoolSpec:
    """Which datasets a labeling loop draws its pool and test set from (small and picklable)."""

    dataset: str
    root: str = ""
    height: int = 32
    width: int = 40
    pool_images: int = 80
    test_images: int = 16
    static_fraction: float = 0.2
    data_seed: int = 0

    def datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """(the pool for training, with augmentation; the same pool plain, for scoring; the test set)."""
        name, info = self.dataset, dataset_info(self.dataset)
        if info.source == "bundled":  # digits: its split depends on the data seed
            return (
                get_dataset(name, "train", seed=self.data_seed),
                get_dataset(name, "train", seed=self.data_seed),
                get_dataset(name, "test", seed=self.data_seed),
            )
        size = (self.height, self.width)
        if info.synthetic:
            opts = {"size": size, "seed": self.data_seed}
            pool = dict(n=self.pool_images, static_fraction=self.static_fraction, **opts)
            return (
                get_dataset(name, "train", transform=train_transform(None, flip=True), **pool),
                get_dataset(name, "train", **pool),
                get_dataset(name, "test", n=self.test_images, static_fraction=0.0, **opts),
            )
        return (
            get_dataset(name, "train", self.root, size=size, transform=train_transform(None, flip=True)),
            get_dataset(name, "train", self.root, size=size),
            get_dataset(name, "test", self.root, size=size),
        )


def validation_dataset(spec: PoolSpec) -> Dataset:
    """Held-out labelled data of ``spec``'s dataset that is neither pool nor test, for calibrating
    each round's model (``--calibrate``): fresh synthetic validation scenes (as many as test scenes,
    with the pool's share of TV static) or the dataset's own val split."""
    name, info = spec.dataset, dataset_info(spec.dataset)
    size = (spec.height, spec.width)
    if info.synthetic:
        return get_dataset(
            name,
            "val",
            n=spec.test_images,
            size=size,
            seed=spec.data_seed,
            static_fraction=spec.static_fraction,
        )
    if "val" in info.splits:
        return get_dataset(name, "val", spec.root, size=size)
    raise DubitoError(
        f"--calibrate needs held-out labelled data: {name} has no validation split (its splits: "
        f"{', '.join(info.splits)}); use a dataset with one (synthetic scenes, CamVid)"
    )


def pool_datasets(config: PoolSpec | object) -> tuple[Dataset, Dataset, Dataset]:
    """The datasets of ``config`` (a :class:`PoolSpec`, or a loop config with ``pool()``)."""
    spec = config if isinstance(config, PoolSpec) else config.pool()  # type: ignore[attr-defined]
    return spec.datasets()


class Pool:
    """The plain (unaugmented) pool dataset with its ids: ``position(id)`` ↔ ``ids[position]``."""

    def __init__(self, data: Dataset) -> None:
        self.data = data
        ids = getattr(data, "ids", None)
        self.ids: list[int] = [int(i) for i in ids] if ids is not None else list(range(len(data)))  # type: ignore[arg-type]
        self.position: dict[int, int] = {i: p for p, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: Iterable[int]) -> list[int]:
        """The positions of ``ids``, in their order."""
        return [self.position[i] for i in ids]

    def ids_at(self, positions: Iterable[int]) -> list[int]:
        """The ids at ``positions``, in their order."""
        return [self.ids[p] for p in positions]

    def unlabelled(self, labeled: Iterable[int]) -> list[int]:
        """Positions of the items not in ``labeled`` (ids), in pool order."""
        taken = set(labeled)
        return [p for p, i in enumerate(self.ids) if i not in taken]

    def subset(self, data: Dataset, ids: Iterable[int]) -> Subset:
        """``data`` (the pool or a dataset aligned with it) restricted to ``ids``, in their order."""
        return Subset(data, self.positions(ids))

    def flags(self, ids: Iterable[int]) -> list[dict]:
        """Known flags of the items (synthetic pools: ``has_static``, ``dusk``), for the noisy-pool study."""
        ids = list(ids)
        if not hasattr(self.data, "flags"):
            return [{} for _ in ids]
        return [self.data.flags(self.position[i]) for i in ids]  # type: ignore[attr-defined]

    @property
    def has_flags(self) -> bool:
        return hasattr(self.data, "flags")
