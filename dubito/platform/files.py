"""Writing results so that a crash never leaves a half-written file: write beside, then rename."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_json", "save_torch"]


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (bare NaN is not JSON), numpy scalars become floats."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON at ``path``, atomically; NaN/inf are written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(_plain(data), indent=2, default=lambda v: _plain(float(v)), allow_nan=False)
    tmp.write_text(text)
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
