"""Human in the loop: a person labels what the loop queries.

A loop with ``--oracle human`` stops after each query. ``dubito label export``
(:func:`export_waiting`) writes the images still waiting for labels, with ``queries.json`` saying
which label file to return for each and its format; ``dubito label import``
(:func:`import_labels`) checks every returned file — a regular file inside ``--labels`` (links
are not followed), size and header before anything is decoded, shape, class range, finite depth —
before any is stored, and the loop continues with the labels in place of the dataset's targets
(:class:`HumanLabels`). Export never deletes what dubito did not write.
"""

from __future__ import annotations

import errno
import io
import math
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dubito import DubitoError
from dubito.acquisition.config import LEDGER, LoopConfig, loop_config, loop_folder
from dubito.acquisition.ledger import Ledger
from dubito.acquisition.pool import Pool, pool_datasets
from dubito.platform.data import DatasetError
from dubito.platform.data.base import item_generator, read_label
from dubito.platform.files import atomic_path, exclusive, file_errors, private_dir, read_json, write_json

__all__ = [
    "HumanLabels",
    "export_queries",
    "export_waiting",
    "import_labels",
    "waiting_for_labels",
    "LABEL_SUFFIX",
]

LABEL_SUFFIX = {"segmentation": ".png", "depth": ".npy"}  # else (image classification) .txt


class HumanLabels(Dataset):
    """The pool with the imported human labels in place of the dataset's targets. A label replaces
    the target of the plain (untransformed) item, and then the training pool's random transform
    (crop, flip) is applied, so label and image stay aligned; other attributes (``task``,
    ``num_classes``, ...) are the training pool's."""

    def __init__(self, data: Dataset, plain: Dataset, files: dict[int, str]) -> None:
        self.data, self.plain, self.files = data, plain, files

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("data", "plain", "files"):
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
        target = read_label_file(Path(path), item["target"])
        if target.is_floating_point():  # depth: NaN or 0 = unknown
            valid = torch.isfinite(target) & (target > 0)
            target = torch.where(valid, target, torch.zeros_like(target))
        else:
            ignore = getattr(self.data, "ignore_index", None)
            valid = target != ignore if ignore is not None else torch.ones_like(target, dtype=torch.bool)
        item["target"], item["mask"] = target, valid
        transform = getattr(self.data, "transform", None)
        if transform is not None:
            item = transform(item, item_generator(self.data.seed, self.data.epoch, int(item["id"])))
        return item


def read_label_file(path: Path, like: Tensor, data: bytes | None = None) -> Tensor:
    """A human label file: a one-channel PNG of class indices, a ``.npy`` of depths, or a ``.txt``
    holding one class index; decoded from ``data`` (its bytes, already checked by
    :func:`label_bytes`) when given, else read from ``path`` (a label dubito stored)."""
    source = io.BytesIO(data) if data is not None else path
    if path.suffix == ".png":
        return torch.from_numpy(read_label(source)).to(like.dtype)
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(source, allow_pickle=False)).to(like.dtype)
    text = data if data is not None else path.read_bytes()
    return torch.tensor(int(text.decode("ascii").strip()), dtype=like.dtype)


def label_bytes(path: Path, like: Tensor) -> bytes:
    """The bytes of a returned label file, read once (what is checked is what is decoded and
    stored): a regular file, not a link; of a size and (PNG, .npy) a header shape that fit
    ``like``, checked before anything is decoded; a class file holds plain ASCII digits. Errors
    never echo the file's content."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DubitoError(
                f"{path}: a link; put the label file itself in --labels (links are not followed)"
            ) from None
        raise DubitoError(f"{path}: cannot open the label ({os.strerror(err.errno or 0)})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DubitoError(f"{path}: not a regular file")
        limit = 16 * max(1, like.numel()) + 65_536  # far above any honest encoding of a label of this shape
        if info.st_size > limit:
            raise DubitoError(
                f"{path}: {info.st_size} bytes, more than a label of shape {tuple(like.shape)} needs ({limit}); not read"
            )
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
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }[version]
            shape, _, dtype = read_header(header)  # the header only, no data
        except (ValueError, OSError, SyntaxError, KeyError):
            raise DubitoError(f"{path}: not a .npy array file (format 1.0 or 2.0)") from None
        if tuple(shape) != tuple(like.shape) or dtype.hasobject or dtype.kind not in "fiu":
            raise DubitoError(
                f"{path}: a {dtype} array of shape {tuple(shape)}; expected numbers of shape {tuple(like.shape)}"
            )
    elif not re.fullmatch(rb"\s*[0-9]{1,6}\s*", data):
        raise DubitoError(
            f"{path}: a class file holds one class index in plain ASCII digits (e.g. 3), nothing else"
        )
    return data


def _export_target(loop: Path, folder: Path) -> bool:
    """Check where an export may write; returns whether ``folder`` holds an earlier export of
    this loop under its ``queries/`` folder, which it replaces: every file in it is one that
    export listed. Anything else must be new or empty: nothing dubito did not write is ever
    deleted (a label file kept beside the images stops it), and the loop folder (or one above
    it) is never a target."""
    loop, target = loop.resolve(), folder.resolve()
    if loop == target or loop.is_relative_to(target):
        raise DubitoError(
            f"--to {folder}: the loop folder or a folder above it; exports go to a folder of their own "
            f"(default {loop / 'queries' / 'pending'})"
        )
    under = target.is_relative_to(loop / "queries") and target != loop / "queries"
    if target.is_relative_to(loop) and not under:
        raise DubitoError(
            f"--to {folder}: inside the loop folder but not under its queries/ folder; give a folder there or outside the loop"
        )
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise DubitoError(f"--to {folder}: a file or a link; give a folder")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not entries:
        return False
    foreign = [e for e in entries if e not in _export_files(folder)] if under else entries
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise DubitoError(
            f"--to {folder}: holds files an export did not write ({shown}); export replaces only a folder of its "
            "own or writes into a new or empty one (nothing else is deleted). Keep label files in a folder of "
            "their own, given to `dubito label import --labels`"
        )
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
        position = Pool(plain).position
        task = getattr(plain, "task", "segmentation")
        suffix = LABEL_SUFFIX.get(task, ".txt")
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
                Image.fromarray((array.reshape(side, side) * 255).astype(np.uint8)).resize(
                    (side * 8, side * 8)
                ).save(tmp / f"{i}.png")
            else:
                Image.fromarray((array.clip(0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(
                    tmp / f"{i}.png"
                )
            entries.append({"id": i, "image": f"{i}.png", "label": f"{i}_label{suffix}"})
        shape = list(plain[position[ids[0]]]["target"].shape) if ids else []
        classes = getattr(plain, "num_classes", None)
        write_json(
            tmp / "queries.json",
            {
                "task": task,
                "label_shape": shape,
                "classes": classes,
                "queries": entries,
                "format": {
                    ".png": "single-channel PNG of class indices (0..C-1; the dataset's void index for unlabelled pixels)",
                    ".npy": "float array of depth in metres, shape label_shape (NaN or 0 = unknown)",
                    ".txt": "the class index as text",
                }[suffix],
            },
        )
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


def waiting_for_labels(output: str | Path) -> tuple[LoopConfig, list[int]]:
    """A human-oracle loop's settings and the ids it waits labels for."""
    output = loop_folder(output)
    with Ledger(output / LEDGER, create=False) as ledger:
        config = loop_config(output, ledger)
        if config.oracle != "human":
            raise DubitoError(
                f"{output}: a loop with --oracle {config.oracle}; only --oracle human loops export and import labels"
            )
        return config, ledger.pending(ledger.labeled_ids())


def export_waiting(output: str | Path, to: str | Path | None = None) -> tuple[Path | None, list[int]]:
    """``dubito label export``: write the images still waiting for labels (default
    ``OUTPUT/queries/pending``), holding the loop folder; returns (folder or None, ids)."""
    output = loop_folder(output)
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
    output = loop_folder(output)
    with exclusive(output):
        config, waiting = waiting_for_labels(output)
        if not waiting:
            raise DubitoError(f"{output}: no queried image is waiting for a label")
        plain = pool_datasets(config)[1]
        position = Pool(plain).position
        task = getattr(plain, "task", "segmentation")
        suffix = LABEL_SUFFIX.get(task, ".txt")
        checked = {}
        for i in waiting:
            path = folder / f"{i}_label{suffix}"
            if not path.exists() and not path.is_symlink():
                others = sorted(folder.glob(f"{i}_label.*"))
                if others:
                    raise DubitoError(
                        f"{others[0]}: expected {path.name} (this task's labels are {suffix} files; see queries.json)"
                    )
                continue
            like = plain[position[i]]["target"]
            data = label_bytes(path, like)
            try:
                label = read_label_file(path, like, data)
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
                    raise DubitoError(
                        f"{path}: class values outside 0..{classes - 1}"
                        + (f" (void = {ignore})" if ignore is not None else "")
                    )
            if task == "depth" and not bool((torch.isfinite(label) & (label > 0)).any()):
                raise DubitoError(
                    f"{path}: no finite depth > 0 (NaN or 0 mark unknown pixels; depths are in metres)"
                )
            checked[i] = (path, data)
        if not checked:
            raise DubitoError(
                f"{folder}: none of the label files waited for ({', '.join(f'{i}_label{suffix}' for i in waiting[:5])}"
                f"{' ...' if len(waiting) > 5 else ''})"
            )
        store = output / "labels"
        with Ledger(output / LEDGER, create=False) as ledger:
            for i, (path, data) in checked.items():
                target = store / path.name
                with atomic_path(target) as tmp, file_errors(target):
                    tmp.write_bytes(data)  # the bytes that were checked
                ledger.record_label(i, str(target))
    return sorted(checked), [i for i in waiting if i not in checked]
