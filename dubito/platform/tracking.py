"""MLflow tracking: where runs go, and a small run object every command logs through.

Default tracking URI (docs/architecture.md): ``MLFLOW_TRACKING_URI`` when set, else an *absolute*
``sqlite:///<cwd>/mlflow.db`` (Ray trials change directory, so relative URIs break).
Artifacts of a SQLite store go to an absolute ``mlartifacts/`` folder beside the database.
See the runs with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dubito import DubitoError
from dubito.platform.config import to_flat

__all__ = [
    "default_tracking_uri",
    "artifact_location",
    "check_tracking",
    "flatten_params",
    "TrackedRun",
    "tracked_run",
]

CONNECT_TIMEOUT = 5.0  # seconds to reach a tracking server before giving up


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute SQLite URI in the working directory."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(Path.cwd().resolve() / "mlflow.db")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for an in-memory database)."""
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def check_tracking(uri: str | None = None, timeout: float = CONNECT_TIMEOUT) -> str:
    """Check the tracking store before any work, writing nothing; returns the URI.

    A SQLite store needs its folder to exist (it is never created) and to be writable; a tracking
    server must answer within ``timeout`` seconds (later requests then fail after a few short
    retries instead of minutes); a file store must be a writable folder. Raises
    :class:`DubitoError` naming the URI and what to do."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlparse

    uri = uri or default_tracking_uri()
    what = f"MLflow tracking URI {uri!r}"
    fix = "set MLFLOW_TRACKING_URI to a usable store (e.g. sqlite:////absolute/path/mlflow.db)"
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        db = _sqlite_path(uri)
        if db is None:
            return uri
        if not db.parent.is_dir():
            raise DubitoError(
                f"{what}: the folder {db.parent} does not exist (dubito does not create it): create it, or {fix}"
            )
        if db.exists() and (not db.is_file() or not os.access(db, os.R_OK | os.W_OK)):
            raise DubitoError(f"{what}: {db} is not a writable file: {fix}")
        if not os.access(db.parent, os.W_OK | os.X_OK):
            raise DubitoError(
                f"{what}: the folder {db.parent} is not writable (SQLite writes its journal there): {fix}"
            )
    elif scheme in ("http", "https"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # MLflow's default retries for minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as answer:
                answer.read(64)
        except urllib.error.HTTPError as err:  # it answers: a server, maybe behind a proxy without /health
            if err.code >= 500:
                raise DubitoError(
                    f"{what}: the tracking server answered {err.code} {err.reason}: {fix}"
                ) from None
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise DubitoError(
                f"{what}: no tracking server answered within {timeout:g} s ({reason}): start it, or {fix}"
            ) from None
    elif scheme in ("", "file"):
        folder = Path(urlparse(uri).path if scheme == "file" else uri)
        probe = folder if folder.exists() else folder.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise DubitoError(f"{what}: {probe} is not a writable folder: {fix}")
    return uri


def artifact_location(uri: str) -> str | None:
    """Absolute artifact folder beside a SQLite store (``<db dir>/mlartifacts/``).

    MLflow's default for a database store is ``./mlruns`` relative to the working
    directory, which scatters artifacts and breaks when Ray trials change directory.
    Other stores (a tracking server) keep their own default (``None``).
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """A config dataclass (its settings under their flat names, lists comma-joined, as the flags
    name them) or a mapping (nested mappings as ``{"a.b": "value"}``) as MLflow params."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = to_flat(config, text=True)
    out: dict[str, str] = {}
    for key, value in dict(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, prefix=name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


class TrackedRun:
    """One open MLflow run, written through an explicit client (no global state)."""

    def __init__(self, client, run_id: str, experiment_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_series(self, series: Mapping[str, Sequence[float]], start: int = 0) -> None:
        """Whole metric histories at once, step = ``start`` + position in the list (e.g. episode
        numbers from 1), in batches."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, values in series.items()
            for step, v in enumerate(values, start)
            if v is not None
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def last_step(self, metric: str) -> int:
        """The largest step logged for ``metric`` (0 when none): where a resumed series goes on."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, metric)), default=0)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))


#: MLflow 3's experiment-kind tag: with it ``mlflow ui`` opens dubito's experiments on their runs and
#: charts (model training), not on the GenAI traces page it shows an experiment of unknown kind
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


@contextlib.contextmanager
def tracked_run(
    experiment: str,
    run_name: str | None = None,
    params: Mapping[str, Any] | Any | None = None,
    tags: Mapping[str, Any] | None = None,
    uri: str | None = None,
    run_id: str | None = None,
) -> Iterator[TrackedRun]:
    """Open a run in ``experiment`` (created if missing); it ends FINISHED, or FAILED/KILLED on error.

    ``run_id`` reopens an earlier run of this store (a resumed job keeps one run; its params must
    not change). Raises :class:`DubitoError` at the start when the tracking URI is unusable.
    """
    from mlflow.tracking import MlflowClient

    uri = check_tracking(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found
            else client.create_experiment(
                experiment, artifact_location=artifact_location(uri), tags={EXPERIMENT_KIND: MODEL_TRAINING}
            )
        )
        if (
            found is not None and EXPERIMENT_KIND not in found.tags
        ):  # an older store: say what kind it is, once
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        run = None
        if run_id is not None:
            with contextlib.suppress(Exception):  # gone (another store, deleted): start a new run
                found_run = client.get_run(run_id)
                if found_run.info.lifecycle_stage == "active":
                    client.update_run(run_id, status="RUNNING")
                    run = found_run
        if run is None:
            run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    except Exception as err:  # mlflow raises many types for a bad store
        raise DubitoError(f"MLflow tracking URI {uri!r} is unusable: {err}") from err
    tracked = TrackedRun(client, run.info.run_id, experiment_id)
    if params is not None:
        flat = flatten_params(params)
        logged = run.data.params if run_id is not None and run.info.run_id == run_id else {}
        tracked.log_params({k: v for k, v in flat.items() if k not in logged})
        # MLflow params are immutable: a resumed run that changed one (e.g. more epochs) says so in a tag
        tracked.set_tags({f"resumed.{k}": v for k, v in flat.items() if k in logged and logged[k] != v})
    status = "FINISHED"
    try:
        yield tracked
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except SystemExit as err:  # sys.exit(0) is how Ray Tune stops a trial early (ASHA): stopped, not failed
        status = "KILLED" if err.code in (0, None) else "FAILED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        client.set_terminated(tracked.run_id, status=status)
