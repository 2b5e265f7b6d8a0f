"""Writing results so that a crash never leaves a half-written file: write beside, then rename."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_json", "save_torch"]


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON at ``path``, atomically (floats such as numpy scalars are converted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)
    return path


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically and durably (fsync before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return path
