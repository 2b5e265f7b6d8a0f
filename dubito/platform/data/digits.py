"""scikit-learn's bundled handwritten digits (UCI optical recognition): real data, offline.

1797 grey 8×8 images of the digits 0-9 with pixel values 0..16, shipped inside
scikit-learn (``sklearn.datasets.load_digits``; nothing is downloaded). dubito splits
them with a seeded permutation (not stratified): the same ``seed`` and ``test_fraction``
always give the same split.

Items are dicts:

- ``image``: float32 (64,), the pixels divided by 16 (so in [0, 1]); with ``normalize``
  each feature is then standardised with the mean and standard deviation of the
  *train* split of the same seed (features constant over train are only centred);
- ``target``: long scalar, the digit;
- ``mask``: bool scalar ``True`` (every item counts);
- ``id``: the image's index in ``load_digits()`` (0..1796), whatever the split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dubito import DubitoError

__all__ = ["Digits", "DIGITS_SIZE"]

#: number of images in ``sklearn.datasets.load_digits``
DIGITS_SIZE = 1797
_SPLITS = ("train", "test", "all")
_STD_FLOOR = 1e-6


def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def split_ids(seed: int, test_fraction: float, total: int = DIGITS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, test ids), each sorted: the test set is the first ``round(test_fraction·total)``
    entries of ``numpy.random.default_rng(seed).permutation(total)``."""
    order = np.random.default_rng(seed).permutation(total)
    n_test = int(round(test_fraction * total))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


class Digits(Dataset):
    """The digits images of one split as dubito items (see the module docstring).

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (all 1797 images, in id order).
        seed: seed of the train/test permutation.
        test_fraction: share of the images in the test split, in (0, 1).
        normalize: standardise each of the 64 features with train-split statistics.

    Attributes: ``task = "classification"``, ``num_classes = 10``, ``ids`` (the items'
    ids in order), ``images`` (len, 64) float32 and ``targets`` (len,) long tensors.
    """

    task = "classification"
    num_classes = 10
    name = "digits"
    ignore_index = None
    class_names = tuple(str(d) for d in range(10))

    def __init__(
        self, split: str = "train", *, seed: int = 0, test_fraction: float = 0.25, normalize: bool = True
    ) -> None:
        if split not in _SPLITS:
            raise DubitoError(f"digits: split must be one of {_SPLITS}, got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DubitoError(f"digits: seed must be a non-negative integer, got {seed!r}")
        if (
            isinstance(test_fraction, bool)
            or not isinstance(test_fraction, (int, float))
            or not 0.0 < test_fraction < 1.0
        ):
            raise DubitoError(f"digits: test_fraction must be a number in (0, 1), got {test_fraction!r}")
        train_ids, test_ids = split_ids(int(seed), float(test_fraction))
        if len(train_ids) == 0 or len(test_ids) == 0:
            raise DubitoError(
                f"digits: test_fraction={test_fraction} leaves an empty split "
                f"({len(train_ids)} train, {len(test_ids)} test images)"
            )
        data, targets = _load()
        pixels = data / 16.0
        if normalize:
            mean = pixels[train_ids].mean(0)
            std = pixels[train_ids].std(0)
            pixels = (pixels - mean) / np.where(std > _STD_FLOOR, std, 1.0)
        ids = {"train": train_ids, "test": test_ids, "all": np.arange(len(data))}[split]
        self.split = split
        self.seed = int(seed)
        self.test_fraction = float(test_fraction)
        self.normalize = bool(normalize)
        self.epoch = 0
        self.ids: list[int] = [int(i) for i in ids]
        self.images = torch.from_numpy(pixels[ids].astype(np.float32))
        self.targets = torch.from_numpy(targets[ids])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"digits ({self.split}): index {index} out of range for {len(self)} items")
        index %= len(self)
        return {
            "image": self.images[index].clone(),
            "target": self.targets[index].clone(),
            "mask": torch.tensor(True),
            "id": self.ids[index],
        }

    def item_id(self, index: int) -> int:
        """The stable id (index in ``load_digits``) of item ``index``."""
        return self.ids[index]

    def set_epoch(self, epoch: int) -> None:
        """No-op: digits items have no random transforms."""
        self.epoch = int(epoch)

    def __repr__(self) -> str:
        return (
            f"Digits(split={self.split!r}, seed={self.seed}, test_fraction={self.test_fraction}, "
            f"normalize={self.normalize}, n={len(self)})"
        )
