"""The `dubito` command end to end on small data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dubito.cli import main


def test_demo_end_to_end(tmp_path, mlflow_uri, capsys):
    out = tmp_path / "demo"
    stray = Path.cwd() / "mlruns"
    stray_before = stray.exists()
    rc = main(
        ["demo", "--output", str(out), "--steps", "120", "--height", "32", "--width", "48",
         "--train-images", "24", "--test-images", "6", "--samples", "10", "--no-progress"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mutual information" in printed and "aleatoric entropy" in printed
    results = json.loads((out / "results.json").read_text())
    s = results["summary"]
    # the demo's findings: static noise is aleatoric, unseen scenes are epistemic
    assert s["aleatoric_entropy_static"] > 5 * s["aleatoric_entropy_clean"]
    assert s["mutual_information_out_of_distribution"] > 2 * s["mutual_information_in_distribution"]
    assert s["pixel_accuracy_clean"] > 0.9
    assert (out / "uncertainty.png").stat().st_size > 10_000
    # the same numbers are in MLflow
    run = MlflowClient(mlflow_uri).get_run(results["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["steps"] == "120"
    assert run.data.metrics["aleatoric_entropy_static"] == pytest.approx(s["aleatoric_entropy_static"])
    history = MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history][:2] == [0, 10]
    # artifacts sit beside the database (absolute), not in ./mlruns of whatever directory ran it
    stored = tmp_path / "mlartifacts"
    assert sorted(p.name for p in stored.rglob("*") if p.is_file()) == ["results.json", "uncertainty.png"]
    assert stray.exists() == stray_before


def test_bad_arguments_exit_with_a_clear_message(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_unusable_tracking_uri_is_reported_at_start(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str(blocker / "mlflow.db"))
    assert main(["demo", "--output", str(tmp_path), "--steps", "1", "--no-progress"]) == 2
    assert "MLflow tracking URI" in capsys.readouterr().err


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "dubito", "info"], capture_output=True, text=True, check=True)
    assert "dubito 0.1.0" in done.stdout and "sqlite:///" in done.stdout
