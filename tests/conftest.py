"""Shared test setup: no test writes MLflow runs into the working directory; hypothesis
runs derandomized in CI so a run is reproducible from its commit."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, created once (MLflow's schema migrations take seconds);
    every test gets its own copy."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient("sqlite:///" + str(path.resolve())).search_experiments()
    return path


def _fresh_store(template: Path, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mlflow.db"
    shutil.copyfile(template, path)
    return "sqlite:///" + str(path.resolve())


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch, _mlflow_template) -> str:
    """A temporary absolute SQLite tracking URI, also exported as MLFLOW_TRACKING_URI."""
    uri = _fresh_store(_mlflow_template, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(autouse=True)
def _no_stray_mlflow(tmp_path_factory, monkeypatch, _mlflow_template):
    """Tests that forget the mlflow_uri fixture still log into a temporary store."""
    if "MLFLOW_TRACKING_URI" not in os.environ:
        uri = _fresh_store(_mlflow_template, tmp_path_factory.mktemp("mlflow"))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a busy 2-core machine extra threads make
    them several times slower. The previous count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on this machine."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry.name)] = (parent, command)
    return table


def ray_processes(session: str) -> set[int]:
    """Process ids of one Ray session on this machine: its daemons (their command lines name the
    session) and every process they started (workers)."""
    table = _processes()
    ours = {pid for pid, (_, command) in table.items() if session in command}
    grown = True
    while grown:
        children = {pid for pid, (parent, _) in table.items() if parent in ours} - ours
        ours |= children
        grown = bool(children)
    return ours


@pytest.fixture(scope="session")
def ray_session():
    """The one local Ray instance the tests share (2 CPUs, no dashboard, small object store);
    its address, for commands run in a subprocess (``RAY_ADDRESS``). Shut down at the end, and
    checked: no process of its session is left behind."""
    import time

    import ray

    from dubito.platform.cluster import connect

    os.environ.pop("RAY_ADDRESS", None)
    connect(num_cpus=2)
    address = ray.get_runtime_context().gcs_address
    session = Path(ray._private.worker._global_node.get_session_dir_path()).name
    yield address
    ours = ray_processes(session)  # before shutting down: workers orphaned by it would no longer look like ours

    def alive() -> set[int]:
        return {pid for pid in ours if Path(f"/proc/{pid}").exists()} | ray_processes(session)

    ray.shutdown()
    deadline = time.monotonic() + 30
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of Ray session {session} left behind: {sorted(left)}"
