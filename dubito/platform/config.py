"""What every command's config dataclass shares: the checks run before anything is written, and
the flat names under which nested configs show their settings (flags, MLflow params, sweeps)."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from dubito import DubitoError

__all__ = [
    "flag",
    "check_finite",
    "check_range",
    "check_choice",
    "check_device",
    "default_model",
    "check_model",
    "needs_root",
    "IMAGE_MODELS",
    "nested",
    "Nested",
    "FlatField",
    "flat_fields",
    "from_flat",
    "to_flat",
    "parse_list",
    "coerce_lists",
]

#: the FC-DenseNet configurations (image models); ``mlp`` is the model for vectors (digits)
IMAGE_MODELS = ("tiny", "fc_densenet56", "fc_densenet67", "fc_densenet103")


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


def check_finite(config: Any) -> None:
    """Every float field of a config dataclass is a finite number (NaN and infinities are refused)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise DubitoError(f"{flag(f.name)} must be a finite number, got {value}")


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``low <= value <= high`` (``<`` where open), else a :class:`DubitoError` naming the flag."""
    bad = value != value  # NaN
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        if high is None:
            where = f"{'>' if low_open else '>='} {low:g}"
        elif low is None:
            where = f"{'<' if high_open else '<='} {high:g}"
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise DubitoError(f"{flag(name)} must be {where}, got {value}")


def check_choice(name: str, value: str, choices: Any) -> None:
    if value not in choices:
        raise DubitoError(f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}")


def check_device(name: str, value: str) -> None:
    """``auto`` or a device torch can name (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...)."""
    if value == "auto":
        return
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise DubitoError(
            f"{flag(name)} must be auto or a torch device such as cpu, cuda, cuda:1, got {value!r}"
        ) from None


def default_model(dataset: str) -> str:
    """``--model auto``: the MLP for vector data (digits), the tiny FC-DenseNet for images (an
    unknown dataset gets the image model here; its name is refused where it is checked)."""
    from dubito.platform.data import DATASETS

    return DATASETS[dataset].default_model if dataset in DATASETS else "tiny"


def check_model(dataset: str, model: str, task: str | None = None) -> None:
    """The model can learn the dataset: the MLP takes vectors (digits), FC-DenseNet images."""
    known = (*IMAGE_MODELS, "mlp")
    if model not in known:
        raise DubitoError(f"--model must be auto or one of {', '.join(known)}, got {model!r}")
    from dubito.platform.data import DATASETS

    vectors = dataset in DATASETS and DATASETS[dataset].inputs == "vectors"
    if vectors and model != "mlp":
        raise DubitoError(
            f"--model {model} is an image model; --dataset {dataset} holds vectors: use --model mlp (or auto)"
        )
    if not vectors and model == "mlp":
        raise DubitoError(
            f"--model mlp takes vectors; --dataset {dataset} holds images: use an FC-DenseNet "
            "(tiny, fc_densenet56/67/103) or auto"
        )


def needs_root(dataset: str) -> bool:
    """Whether a dataset is read from disk (``--root``): not the synthetic scenes, not digits."""
    from dubito.platform.data import DATASETS

    return DATASETS[dataset].needs_root if dataset in DATASETS else True


# ---------------------------------------------------------------- nested configs, flat names
# A config may hold another config (``nested``): a labeling study holds the loop's settings, a
# loop the training settings of its rounds, an exploration study its agents' settings. Users see
# one flat namespace: every leaf setting keeps its own name as a flag (``--epochs``), an MLflow
# param, a Tune space key, a ledger or sweep-file key. ``flat_fields`` lists those names,
# ``from_flat`` builds the nested object from them and ``to_flat`` gives them back.


def nested(
    config_cls: type,
    *,
    omit: tuple[str, ...] = (),
    helps: Mapping[str, str] | None = None,
    **defaults: Any,
) -> Any:
    """A field holding a ``config_cls`` whose own fields become the outer config's (under their
    names), with ``defaults`` in place of the class's and ``helps`` in place of their help where
    they mean something more specific here. ``omit``: its fields the outer config sets itself or
    does not use; they are neither flags nor settings and keep their defaults."""
    return dataclasses.field(
        default_factory=lambda: config_cls(**defaults),
        metadata={
            "nested": config_cls,
            "omit": tuple(omit),
            "defaults": dict(defaults),
            "helps": dict(helps or {}),
        },
    )


class Nested:
    """Base of the configs that hold other configs: ``Config.flat(epochs=2, seeds="0,1")`` builds
    one from flat settings, as the flags give them."""

    @classmethod
    def flat(cls, **settings: Any) -> Any:
        return from_flat(cls, settings)


@dataclasses.dataclass(frozen=True)
class FlatField:
    """One leaf setting of a (possibly nested) config: its flat ``name``, its ``path`` of
    attributes, its type (``X`` for ``X | None``), whether None is allowed, default and help."""

    name: str
    path: tuple[str, ...]
    type: Any
    optional: bool
    default: Any
    help: str

    def is_list(self) -> bool:
        return typing.get_origin(self.type) is tuple

    def item_type(self) -> type:
        return typing.get_args(self.type)[0] if self.is_list() else self.type


@functools.cache
def _hints(config_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


@functools.cache
def flat_fields(config_cls: type) -> dict[str, FlatField]:
    """The leaf settings of ``config_cls`` by flat name, in field order (nested configs in place)."""
    return _flat(config_cls, (), {}, (), {})


def _flat(
    config_cls: type, prefix: tuple[str, ...], defaults: dict, omit: tuple[str, ...], helps: dict
) -> dict:
    out: dict[str, FlatField] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in omit:
            continue
        if "nested" in f.metadata:
            meta = f.metadata
            inner = _flat(
                meta["nested"], (*prefix, f.name), meta["defaults"], meta["omit"], {**meta["helps"], **helps}
            )
        else:
            kind = _hints(config_cls)[f.name]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            optional = typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            inner = {
                f.name: FlatField(
                    name=f.name,
                    path=(*prefix, f.name),
                    type=args[0] if optional else kind,
                    optional=optional,
                    default=defaults.get(f.name, default),
                    help=helps.get(f.name, f.metadata.get("help", " ")),
                )
            }
        clash = set(inner) & set(out)
        if clash:
            raise TypeError(f"{config_cls.__name__}: settings {sorted(clash)} are declared twice")
        out.update(inner)
    return out


def from_flat(config_cls: type, values: Mapping[str, Any], what: str = "") -> Any:
    """A ``config_cls`` from flat settings (the nested configs built in place; absent settings take
    their defaults). An unknown name is a :class:`DubitoError` (naming ``what`` they came from)."""
    unknown = sorted(set(values) - set(flat_fields(config_cls)))
    if unknown:
        raise DubitoError(
            f"{what + ': ' if what else ''}unknown {config_cls.__name__} settings {unknown} "
            f"(known: {', '.join(flat_fields(config_cls))})"
        )
    return _build(config_cls, values, {}, ())


def _build(config_cls: type, values: Mapping[str, Any], defaults: dict, omit: tuple[str, ...]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in omit:
            continue
        if "nested" in f.metadata:
            kwargs[f.name] = _build(f.metadata["nested"], values, f.metadata["defaults"], f.metadata["omit"])
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.name in defaults:
            kwargs[f.name] = defaults[f.name]
    return config_cls(**kwargs)


def to_flat(config: Any, *, text: bool = False) -> dict[str, Any]:
    """The leaf settings of a config object by flat name (``text``: list settings comma-joined, as
    MLflow params and the records written before lists were tuples hold them)."""
    out = {}
    for name, f in flat_fields(type(config)).items():
        value = functools.reduce(getattr, f.path, config)
        if text and isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        out[name] = value
    return out


_KINDS = {int: "integers", float: "numbers", str: "names"}


def parse_list(name: str, value: Any, item_type: type) -> tuple:
    """A list setting given as ``"a,b"`` (a flag, a sweep value), a list or a tuple, as a tuple of
    ``item_type`` (a :class:`DubitoError` naming the flag otherwise)."""
    try:
        if isinstance(value, str):
            items: list[Any] = [v.strip() for v in value.split(",")]
        elif isinstance(value, Iterable):
            items = list(value)
        else:  # one value (``seeds=3``) is a list of one
            items = [value]
        return tuple(item_type(v) for v in items if not (isinstance(v, str) and not v))
    except (TypeError, ValueError):
        raise DubitoError(
            f"{flag(name)} must be {_KINDS.get(item_type, 'values')} separated by commas, got {value!r}"
        ) from None


def coerce_lists(config: Any) -> None:
    """Turn the list fields of ``config`` given as text or lists into tuples (its ``__post_init__``)."""
    for f in dataclasses.fields(config):
        kind = _hints(type(config))[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if len(args) == 1 and typing.get_origin(kind) is not tuple else kind
        value = getattr(config, f.name)
        if typing.get_origin(kind) is tuple and value is not None:
            setattr(config, f.name, parse_list(f.name, value, typing.get_args(kind)[0]))
