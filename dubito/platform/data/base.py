"""What every dubito dataset shares: the item contract, the errors, file readers and the
file-backed dataset base class.

An item is a dict of tensors:

- ``image``: float (3, H, W), normalised (``(x - mean) / std`` per channel, x in [0, 1]);
- ``target``: (H, W) long class indices (segmentation; ``ignore_index`` marks void) or float
  depth in metres (depth);
- ``mask``: (H, W) bool, the pixels that count (not void, valid depth);
- ``id``: the item's stable integer index in its dataset (never a pool position).

Synthetic datasets add the maps of their known noise (see ``dubito.platform.data.synthetic``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dubito import DubitoError
from dubito.platform.data.transforms import resize_map

__all__ = [
    "DatasetError",
    "MissingDataError",
    "CorruptFileError",
    "SizeMismatchError",
    "LabelValueError",
    "InvalidDepthError",
    "MatKeyError",
    "Problem",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "read_image",
    "read_label",
    "image_size",
    "read_mat",
    "check_numeric",
    "item_generator",
    "find_root",
    "check_size",
    "normalize_image",
    "FileDataset",
]

#: default normalisation (ImageNet's channel statistics); ``dubito data check`` prints a dataset's own
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(DubitoError):
    """A dataset file or folder is missing or wrong. ``path`` names it; the message says what is wrong."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class MissingDataError(DatasetError):
    """A root, split folder, list file or an image's label is missing."""


class CorruptFileError(DatasetError):
    """A file exists but cannot be decoded (truncated image, not a .mat, ...)."""


class SizeMismatchError(DatasetError):
    """An image and its label (or depth) do not have the same size, or a file has an unexpected shape."""


class LabelValueError(DatasetError):
    """Label values outside the dataset's range."""


class InvalidDepthError(DatasetError):
    """NaN or negative depth."""


class MatKeyError(DatasetError):
    """A .mat file without the variable dubito needs."""


@dataclass(frozen=True)
class Problem:
    """One bad file found while indexing or checking a dataset."""

    path: str
    reason: str
    kind: str = "DatasetError"

    @classmethod
    def from_error(cls, err: DatasetError) -> Problem:
        return cls(err.path, err.problem, type(err).__name__)


def _decode(path: Path, what: str, read: Callable):
    """Run ``read(PIL image)`` on the file, turning every failure into a DatasetError naming it."""
    try:
        with Image.open(path) as img:
            return read(img)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise MissingDataError(path, "file not found") from None
    except Image.DecompressionBombError as err:
        raise CorruptFileError(path, f"{what} too large to decode safely ({err})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CorruptFileError(path, f"cannot decode {what} ({err})") from None


def read_image(path: Path, draft_size: tuple[int, int] | None = None) -> np.ndarray:
    """An RGB image as uint8 (H, W, 3). ``draft_size`` (H, W) lets JPEG decode at a reduced scale
    no smaller than that size (much faster for Make3D's 2272x1704 photos)."""

    def read(img):
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size[1], draft_size[0]))
        if img.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits (convert() would clip at 255)
            grey = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        if img.mode in ("I", "F"):
            raise CorruptFileError(path, f"32-bit {img.mode!r} image; expected 8-bit RGB (or grey)")
        return np.array(img.convert("RGB"))

    return _decode(path, "image", read)


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding it."""
    return _decode(path, "image", lambda img: (img.size[1], img.size[0]))


def read_label(path: Path) -> np.ndarray:
    """A single-channel label image as an integer (H, W) array (8- or 16-bit PNG)."""

    def read(img):
        if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise CorruptFileError(path, f"label image must have one channel, found mode {img.mode!r}")
        return np.asarray(img).astype(np.int64)

    return _decode(path, "label image", read)


def read_mat(path: Path, key: str, integer: bool = False) -> np.ndarray:
    """Numeric variable ``key`` of a MATLAB file (v4-v7 through scipy; v7.3 is HDF5, see the NYUv2
    loader) as a real array; ``integer=True`` also requires whole numbers (indices, class ids)."""
    import scipy.io

    try:
        data = scipy.io.loadmat(str(path), variable_names=[key])
    except FileNotFoundError:
        raise MissingDataError(path, "file not found") from None
    except NotImplementedError:
        raise CorruptFileError(path, "MATLAB v7.3 (HDF5) file where a v5 .mat was expected") from None
    except Exception as err:  # scipy raises ValueError, TypeError, OSError, MatReadError on bad files
        raise CorruptFileError(path, f"cannot read .mat file ({type(err).__name__}: {err})") from None
    if key not in data:
        raise MatKeyError(path, f"no variable {key!r} in the .mat file")
    return check_numeric(np.asarray(data[key]), path, key, integer)


def check_numeric(values: np.ndarray, path, key: str, integer: bool = False) -> np.ndarray:
    """``values`` if it is a non-empty real numeric array (of whole numbers when ``integer``), else a
    CorruptFileError naming the file and variable."""
    if (
        values.dtype == bool
        or not np.issubdtype(values.dtype, np.number)
        or np.issubdtype(values.dtype, np.complexfloating)
    ):
        raise CorruptFileError(path, f"variable {key!r} holds {values.dtype} values, expected real numbers")
    if integer and values.size and not np.array_equal(values, np.round(values)):
        raise CorruptFileError(
            path, f"variable {key!r} must hold whole numbers, found {values[values != np.round(values)][0]}"
        )
    return values


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one item's random transforms: a function of (seed, epoch, index) only, so
    crops and flips do not depend on the number of DataLoader workers or on the order of access."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class FileDataset(torch.utils.data.Dataset):
    """Base of the real-dataset loaders: resize to ``size``, normalise, then the random ``transform``.

    Subclasses list their files in ``__init__`` (recording bad ones in ``problems``) and implement
    ``_read(index, size)`` → (item with image in [0, 1], native (H, W)). With ``strict=True`` (default)
    the first problem found while indexing is raised; ``strict=False`` skips those files (what
    ``dubito data check`` uses to report all of them).
    """

    task: str = "segmentation"
    num_classes: int | None = None
    ignore_index: int | None = None
    class_names: tuple[str, ...] = ()
    name: str = "dataset"

    def __init__(
        self,
        size: tuple[int, int] | None,
        transform: Callable | None,
        normalize: tuple[Sequence[float], Sequence[float]] | None,
        seed: int,
        strict: bool,
    ):
        if size is not None:
            size = check_size(size)
        self.size = size
        self.transform = transform
        self.normalize = normalize
        self.seed = seed
        self.epoch = 0
        self.strict = strict
        self.problems: list[Problem] = []
        self.ids: list[int] = []  # subclasses append each kept file's position in the listing

    # --- subclass API -------------------------------------------------------------------------
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(
        self, index: int, size: tuple[int, int] | None
    ) -> tuple[dict, tuple[int, int]]:  # pragma: no cover
        raise NotImplementedError

    def path_of(self, index: int) -> str:
        """The file that holds item ``index`` (for messages and the ledger)."""
        raise NotImplementedError  # pragma: no cover

    def item_id(self, index: int) -> int:
        """The stable id of item ``index``: its position in the split's listing, which a file skipped
        with ``strict=False`` does not change."""
        return self.ids[index]

    # --- shared -------------------------------------------------------------------------------
    def _problem(self, err: DatasetError) -> None:
        if self.strict:
            raise err
        self.problems.append(Problem.from_error(err))

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops/flips (a function of seed, epoch and id). Call it before each
        epoch's DataLoader iterator is created: workers copy the dataset when they start, so with
        ``persistent_workers=True`` they keep the epoch they started with."""
        self.epoch = int(epoch)

    def read(self, index: int) -> tuple[dict, tuple[int, int]]:
        """Item ``index`` resized to ``size`` but not normalised or transformed, with its native (H, W)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} items")
        return self._read(index % len(self), self.size)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        item, _ = self.read(index)
        item_id = self.item_id(index % len(self))
        item["image"] = normalize_image(item["image"], self.normalize)
        if self.transform is not None:
            item = self.transform(item, item_generator(self.seed, self.epoch, item_id))
        item["id"] = item_id
        return item

    def class_weights(self) -> torch.Tensor:  # pragma: no cover - overridden where known
        raise DubitoError(f"{self.name} has no published class weights; use median_frequency_weights")


def check_size(size, minimum: int = 1) -> tuple[int, int]:
    """``size`` as (height, width) ints of at least ``minimum`` pixels, or a DubitoError."""
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise DubitoError(f"size must be (height, width), got {size!r}") from None
    if h < minimum or w < minimum:
        raise DubitoError(f"size must be at least {minimum}x{minimum}, got {size!r}")
    return h, w


def normalize_image(
    image: torch.Tensor, normalize: tuple[Sequence[float], Sequence[float]] | None
) -> torch.Tensor:
    """``(image - mean) / std`` per channel for an image (3, H, W) in [0, 1]; unchanged when None."""
    if normalize is None:
        return image
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in normalize)
    return (image - mean) / std


def find_root(root: str | Path, subfolder: str, expected: Sequence[str]) -> Path:
    """``root`` itself, or ``root/subfolder`` when the user gave the parent folder (``root`` holds
    none of the ``expected`` entries but ``root/subfolder`` exists)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingDataError(root, "dataset root not found (give the folder that holds the dataset)")
    if (root / subfolder).is_dir() and not any((root / e).exists() for e in expected):
        return root / subfolder
    return root


def to_tensors(image: np.ndarray, target: np.ndarray, mask: np.ndarray, size: tuple[int, int] | None) -> dict:
    """uint8 (H, W, 3) image, (H, W) target and mask → an item dict resized to ``size``."""
    item = {
        "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0,
        "target": torch.from_numpy(np.ascontiguousarray(target)),
        "mask": torch.from_numpy(np.ascontiguousarray(mask)),
    }
    if size is not None and tuple(item["image"].shape[-2:]) != size:
        item = {k: resize_map(v, size, image=(k == "image")) for k, v in item.items()}
    return item
