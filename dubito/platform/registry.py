"""Named registries users can extend: acquisition functions, reductions, selections, datasets.

A :class:`Registry` maps names to declared entries (each a small object with a ``name``). dubito
declares its own entries when the module that defines them is imported; users add theirs

- from Python, with the module's ``register_*`` function (``register_acquisition(...)``), or
- from an installed distribution, through an entry point of the registry's group (for example
  ``[project.entry-points."dubito.acquisitions"] mean_std = "my_pkg.acq:MEAN_STD"``): the entry
  point names an entry object, loaded the first time the registry is read.

Entries a user added (either way) are *plugins*: :func:`plugins` lists them so they can travel to
Ray workers (:func:`install_plugins` registers them there), since a worker process does not run
the ``register_*`` calls its driver ran.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from dubito import DubitoError

__all__ = ["Registry", "plugins", "install_plugins"]

T = TypeVar("T")

_REGISTRIES: dict[str, Registry] = {}


class Registry(Mapping[str, T], Generic[T]):
    """Entries of one kind by name; a read-only mapping (``name in registry``, ``registry[name]``,
    iteration in registration order) plus :meth:`register`. Entry points of ``group`` are loaded
    at the first read."""

    def __init__(self, kind: str, group: str, entry_type: type, home: str) -> None:
        """``home``: the module that creates the registry (and declares dubito's entries): a Ray
        worker imports it before registering plugins there."""
        self.kind, self.group, self.entry_type, self.home = kind, group, entry_type, home
        self._entries: dict[str, T] = {}
        self._builtin: set[str] = set()
        self._outside: set[str] = set()  # names loaded from entry points or installed from a driver's plugins
        self._loaded = False
        self._lock = threading.RLock()
        _REGISTRIES[group] = self

    # ---------------------------------------------------------------- adding
    def register(self, entry: T, *, replace: bool = False, builtin: bool = False) -> T:
        """Add ``entry`` under ``entry.name``; a name taken by another entry needs ``replace``
        (dubito's own entries cannot be replaced). Returns the entry."""
        if not isinstance(entry, self.entry_type):
            raise DubitoError(
                f"a {self.kind} entry must be an instance of {self.entry_type.__name__} "
                f"({self.entry_type.__module__}), got {type(entry).__name__}"
            )
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not name or any(c in name for c in ",: \t\n"):
            raise DubitoError(f"a {self.kind} needs a name without spaces, commas or colons, got {name!r}")
        if name in self._builtin and not builtin:
            raise DubitoError(
                f"{self.kind} {name!r} is one of dubito's own; register yours under another name"
            )
        if name in self._entries and self._entries[name] is not entry and not (replace or builtin):
            raise DubitoError(
                f"a {self.kind} named {name!r} is already registered (pass replace=True to replace it)"
            )
        self._entries[name] = entry
        if builtin:
            self._builtin.add(name)
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry a user added (dubito's own stay)."""
        if name in self._builtin:
            raise DubitoError(f"{self.kind} {name!r} is one of dubito's own and cannot be removed")
        self._entries.pop(name, None)
        self._outside.discard(name)

    def builtin_names(self) -> list[str]:
        """dubito's own names, without reading entry points (for help texts built at import)."""
        return [n for n in self._entries if n in self._builtin]

    def rescan(self) -> None:
        """Read the entry points again (after installing a distribution into a running process)."""
        with self._lock:
            self._loaded = False
            self._load()

    def _install(self, entry: T) -> None:
        """Register an entry a driver shipped (:func:`install_plugins`), over this process's own copy."""
        with self._lock:
            self._load()  # this process's entry points first: the driver's copy then replaces its own
            self.register(entry, replace=True)
            self._outside.add(entry.name)  # type: ignore[attr-defined]

    def _load(self) -> None:
        """Register the entry points of ``group`` once; a broken one is named on every read until
        it is fixed (nothing is half-loaded). Names already taken by an entry point or a driver's
        shipment are kept; one a user registered in this process conflicts."""
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            for point in importlib.metadata.entry_points(group=self.group):
                if point.name in self._outside:
                    continue
                try:
                    entry = point.load()
                except Exception as err:  # noqa: BLE001 - a broken plugin is named, not a traceback
                    raise DubitoError(
                        f"entry point {point.name!r} of {self.group} ({point.value}) failed to load: "
                        f"{type(err).__name__}: {err}; fix or uninstall the package that declares it"
                    ) from None
                if getattr(entry, "name", None) != point.name:
                    raise DubitoError(
                        f"entry point {point.name!r} of {self.group} ({point.value}) loads a {self.kind} "
                        f"named {getattr(entry, 'name', None)!r}; the names must match"
                    )
                self.register(entry)
                self._outside.add(point.name)
            self._loaded = True

    # ---------------------------------------------------------------- reading
    def __getitem__(self, name: str) -> T:
        self._load()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def get_entry(self, name: str, flag: str | None = None) -> T:
        """The entry ``name``; a :class:`DubitoError` naming ``flag`` and the known names otherwise."""
        self._load()
        if name not in self._entries:
            where = f"{flag}: " if flag else ""
            raise DubitoError(f"{where}unknown {self.kind} {name!r}; known: {', '.join(self._entries)}")
        return self._entries[name]

    def user_entries(self) -> dict[str, T]:
        """Entries a user added (through ``register`` or an entry point)."""
        self._load()
        return {k: v for k, v in self._entries.items() if k not in self._builtin}

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self)})"


def plugins() -> dict[str, dict[str, Any]]:
    """Every registry's user entries, by group: what a Ray worker needs to see what the driver
    sees. Their modules are marked to be pickled by value, so a worker that cannot import them
    (a test file, a notebook, a folder on the driver's ``sys.path``) still gets them."""
    found = {group: {"home": r.home, "entries": r.user_entries()} for group, r in _REGISTRIES.items()}
    found = {g: e for g, e in found.items() if e["entries"]}
    if found:
        _pickle_by_value(entry for f in found.values() for entry in f["entries"].values())
    return found


def install_plugins(found: dict[str, dict[str, Any]]) -> None:
    """Register the entries :func:`plugins` listed (in a Ray worker), replacing same-named ones."""
    import importlib

    for group, listed in found.items():
        importlib.import_module(listed["home"])  # creates the registry and declares dubito's own entries
        for entry in listed["entries"].values():
            _REGISTRIES[group]._install(entry)


def _pickle_by_value(entries: Any) -> None:
    """Mark the modules that define the entries' functions to be pickled by value (a user's file,
    notebook or folder a worker may not import); the standard library, dubito and the libraries it
    builds on stay by reference."""
    import sys

    try:
        from ray import cloudpickle
    except ImportError:  # no Ray: nothing travels
        return
    keep = {"dubito", "builtins", "torch", "numpy", "ray", "sklearn", "scipy", *sys.stdlib_module_names}
    for entry in entries:
        for obj in (entry, *vars(entry).values()) if hasattr(entry, "__dict__") else (entry,):
            module = getattr(obj, "__module__", None) or type(obj).__module__
            if module and module.split(".")[0] not in keep and module in sys.modules and module != "__main__":
                try:
                    cloudpickle.register_pickle_by_value(sys.modules[module])
                except ValueError:  # not a module cloudpickle can take by value
                    pass
