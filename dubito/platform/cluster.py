"""Ray: attaching to a cluster or starting a local instance, and what it can give a task.

``connect(address)`` attaches to ``address`` (or ``RAY_ADDRESS``) when given — a running
cluster, no resource arguments — and otherwise starts a local instance with explicit CPUs, no
dashboard and a small object store (docs/architecture.md, "MLflow and Ray"). A session that is already connected is reused,
so tests share one instance. Nothing here ever asks for GPUs the cluster lacks: a request for
one raises :class:`DubitoError` at once instead of leaving tasks pending forever.
"""

from __future__ import annotations

import os
from typing import Any

from dubito import DubitoError

__all__ = [
    "connect",
    "cluster_gpus",
    "max_node_gpus",
    "gpu_request",
    "check_gpu_capacity",
    "dubito_cause",
    "LOCAL_OBJECT_STORE_BYTES",
]

#: object store of a local instance (the default takes 30 % of RAM)
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """Make sure this process is connected to Ray; returns the cluster's total resources.

    ``address`` (else ``RAY_ADDRESS``): an existing cluster (``auto``, ``ray://host:10001``,
    ``host:6379``). Without either, a local instance with ``num_cpus`` CPUs (default: the
    cores this process may use). An existing connection is kept as it is."""
    import ray

    if not ray.is_initialized():
        import signal
        import threading

        # ray.init replaces the SIGTERM handler with a bare exit: a handler set before (the dubito
        # command's: end like Ctrl-C, runs marked KILLED, locks released) is put back
        previous = (
            signal.getsignal(signal.SIGTERM)
            if threading.current_thread() is threading.main_thread()
            else None
        )
        try:
            _init(ray, address, num_cpus, quiet)
        finally:
            if callable(previous):
                signal.signal(signal.SIGTERM, previous)
    return ray.cluster_resources()


def _init(ray: Any, address: str | None, num_cpus: int | None, quiet: bool) -> None:
    address = address or os.environ.get("RAY_ADDRESS") or None
    options: dict[str, Any] = {
        "log_to_driver": not quiet,
        "configure_logging": True,
        "logging_level": "WARNING" if quiet else "INFO",
    }
    try:
        if address:
            ray.init(address=address, **options)
        else:
            cpus = num_cpus or (
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            )
            ray.init(
                num_cpus=cpus,
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                **options,
            )
    except ConnectionError as err:
        raise DubitoError(f"cannot reach the Ray cluster at {address!r}: {err}") from None


def cluster_gpus() -> float:
    """GPUs in the connected cluster (0 on a CPU-only one)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def max_node_gpus() -> float:
    """The most GPUs any one live node has (a task cannot span nodes)."""
    import ray

    return max(
        (float(n.get("Resources", {}).get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")), default=0.0
    )


def gpu_request(requested: str | float | None, what: str) -> float:
    """GPUs per task: ``auto``/None gives 1 where the cluster has GPUs, else 0; a number is
    checked against the cluster (fractions share a GPU: 0.25 packs four tasks on one)."""
    have = max_node_gpus()
    if requested in (None, "auto"):
        return 1.0 if have >= 1 else 0.0
    try:
        value = float(requested)
    except (TypeError, ValueError):
        raise DubitoError(f"{what} must be 'auto' or a number of GPUs, got {requested!r}") from None
    if value < 0:
        raise DubitoError(f"{what} must be >= 0, got {value}")
    if value > 0 and have == 0:
        raise DubitoError(
            f"{what} {value}: the Ray cluster has no GPU (tasks asking for one would wait forever); use 0"
        )
    if value > have:
        raise DubitoError(f"{what} {value}: no node of the Ray cluster has more than {have:g} GPUs")
    if value > 1 and value != int(value):
        raise DubitoError(f"{what} above 1 must be a whole number, got {value}")
    return value


def check_gpu_capacity(per_task: float, tasks: int, what: str) -> None:
    """Refuse ``tasks`` tasks of ``per_task`` GPUs each when the cluster holds fewer GPUs in all
    (the tasks beyond them would wait forever)."""
    have = cluster_gpus()
    if per_task > 0 and per_task * tasks > have + 1e-9:
        raise DubitoError(
            f"{what}: {tasks} x {per_task:g} GPUs, but the Ray cluster has {have:g} GPUs in all; "
            "ask for fewer, or a fraction of a GPU each"
        )


def dubito_cause(error: BaseException) -> DubitoError | None:
    """The :class:`DubitoError` behind an error Ray raised for a remote task or worker (Ray wraps
    it in its own errors), if any: it names what the user has to fix."""
    seen, todo, found = set(), [error], None
    while todo:
        err = todo.pop(0)
        if id(err) in seen or not isinstance(err, BaseException):
            continue
        seen.add(id(err))
        if isinstance(err, DubitoError):
            found = err  # the innermost wins: Ray's RayTaskError(DubitoError) wrapper is a DubitoError too
        failures = getattr(err, "worker_failures", None) or {}
        todo += [
            err.__cause__,
            err.__context__,
            getattr(err, "cause", None),
            getattr(err, "controller_failure", None),
            getattr(err, "_base_exc", None),
            *failures.values(),
        ]
        todo += [e for e in getattr(err, "args", ()) if isinstance(e, BaseException)]
    return found
