"""Shared test setup: no test writes MLflow runs into the working directory; hypothesis
runs derandomized in CI so a run is reproducible from its commit."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A temporary absolute SQLite tracking URI, also exported as MLFLOW_TRACKING_URI."""
    uri = "sqlite:///" + str((tmp_path / "mlflow.db").resolve())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(autouse=True)
def _no_stray_mlflow(tmp_path_factory, monkeypatch):
    """Tests that forget the mlflow_uri fixture still log into a temporary store."""
    if "MLFLOW_TRACKING_URI" not in os.environ:
        path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str(path.resolve()))
