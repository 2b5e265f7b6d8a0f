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
