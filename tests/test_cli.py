"""The `dubito` command end to end on small data."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dubito.cli import main


@pytest.mark.slow
@pytest.mark.finding
def test_demo_end_to_end(tmp_path, mlflow_uri, capsys, finding):
    out = tmp_path / "demo"
    stray = Path.cwd() / "mlruns"
    stray_before = stray.exists()
    rc = main(
        [
            "demo",
            "--output",
            str(out),
            "--steps",
            "120",
            "--height",
            "32",
            "--width",
            "48",
            "--train-images",
            "24",
            "--test-images",
            "12",
            "--samples",
            "10",
            "--seed",
            str(finding.seed(0)),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mutual information" in printed and "aleatoric entropy" in printed
    results = json.loads((out / "results.json").read_text())
    s = results["summary"]
    # the demo's findings: static noise is aleatoric, unseen scenes are epistemic
    finding.check(
        "demo: aleatoric entropy, static over clean pixels",
        s["aleatoric_entropy_static"] / s["aleatoric_entropy_clean"],
        ">",
        5.0,
    )
    finding.check(
        "demo: mutual information, OOD over in distribution",
        s["mutual_information_out_of_distribution"] / s["mutual_information_in_distribution"],
        ">",
        2.0,
    )
    finding.check("demo: pixel accuracy on clean pixels", s["pixel_accuracy_clean"], ">", 0.9)
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
    done = subprocess.run(
        [sys.executable, "-m", "dubito", "info"], capture_output=True, text=True, check=True
    )
    assert "dubito 0.1.0" in done.stdout and "sqlite:///" in done.stdout


def test_data_check_camvid_prints_the_summary(tmp_path, capsys):
    from tests.fixtures import make_camvid

    make_camvid(tmp_path)
    assert (
        main(
            [
                "data",
                "check",
                "camvid",
                "--root",
                str(tmp_path / "CamVid"),
                "--no-progress",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "no problems found" in printed
    lines = {
        line.split()[0]: line.split()
        for line in printed.splitlines()
        if line.split()[:1] in (["train"], ["val"], ["test"])
    }
    assert lines["train"][1:4] == ["3", "367", "36x48"] and lines["val"][1] == "2" and lines["test"][1] == "2"
    assert "label values 0-11" in printed and "Bicyclist" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["ok"] and results["splits"]["train"]["sizes_hw"] == {"36x48": 3}
    assert sum(results["class_frequencies"].values()) == pytest.approx(1.0)
    assert (tmp_path / "out" / "class_frequencies.png").stat().st_size > 5_000


def test_data_check_on_a_broken_camvid_lists_every_bad_file(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from tests.fixtures import make_camvid

    written = make_camvid(tmp_path, counts=(4, 2, 2))
    root = tmp_path / "CamVid"
    corrupt = written["train"]["paths"][0]
    corrupt.write_bytes(corrupt.read_bytes()[:50])
    unlabelled = written["train"]["paths"][1]
    (root / "trainannot" / unlabelled.name).unlink()
    out_of_range = root / "valannot" / written["val"]["paths"][0].name
    Image.fromarray(np.full((36, 48), 40, np.uint8)).save(out_of_range)
    mismatched = root / "testannot" / written["test"]["paths"][1].name
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(mismatched)

    assert main(["data", "check", "camvid", "--root", str(root), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "4 problem(s):" in printed
    problems = printed.split("problem(s):")[1]
    for path, reason in (
        (corrupt, "cannot decode"),
        (unlabelled, "without its label"),
        (out_of_range, "outside 0-11"),
        (mismatched, "label is 20x20"),
    ):
        assert f"{path}: " in problems and reason in problems
    train_row = next(line.split() for line in printed.splitlines() if line.startswith("train "))
    assert train_row[1] == "2/4"  # 4 images listed, 2 read without a problem


def test_data_check_make3d_and_nyuv2(tmp_path, capsys):
    from tests.fixtures import make_make3d, make_nyuv2

    make_make3d(tmp_path / "make3d")
    assert main(["data", "check", "make3d", "--root", str(tmp_path / "make3d"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "valid depth 1." in printed and "(cap 70 m)" in printed and "64x48 x2" in printed
    make_nyuv2(tmp_path / "nyu")
    assert main(["data", "check", "nyuv2", "--root", str(tmp_path / "nyu"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "(segmentation)" in printed and "12x16 x3" in printed
    assert main(["data", "check", "nyuv2", "--root", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "dataset root not found" in capsys.readouterr().err


def test_data_show_writes_a_figure(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "show",
                "synthetic-make3d",
                "--count",
                "2",
                "--size",
                "40",
                "30",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / "synthetic-make3d-train.png").stat().st_size > 5_000
    assert main(["data", "show", "camvid", "--output", str(tmp_path)]) == 2
    assert "--root" in capsys.readouterr().err


def test_data_check_reports_unexpected_failures_and_goes_on(tmp_path, capsys, monkeypatch):
    from dubito.platform.data import CamVid
    from tests.fixtures import make_camvid

    make_camvid(tmp_path)
    original = CamVid._read

    def flaky(self, index, size):
        if self.split == "val" and index == 0:
            raise RuntimeError("disk hiccup")
        return original(self, index, size)

    monkeypatch.setattr(CamVid, "_read", flaky)
    assert main(["data", "check", "camvid", "--root", str(tmp_path), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "0001TP_val_0000.png: unexpected RuntimeError: disk hiccup" in printed
    assert "test           2" in printed  # the splits after it were still read


def test_data_check_class_weights_come_from_the_train_split(tmp_path, capsys):
    import numpy as np

    from dubito.platform.data import median_frequency_weights
    from tests.fixtures import make_camvid

    written = make_camvid(tmp_path)
    assert (
        main(
            [
                "data",
                "check",
                "camvid",
                "--root",
                str(tmp_path / "CamVid"),
                "--no-progress",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["class_statistics_split"] == "train"
    labels = np.stack(written["train"]["labels"])
    counts = np.array([(labels == c).sum() for c in range(11)])
    present = np.array([sum(int((lab != 11).sum()) for lab in labels if (lab == c).any()) for c in range(11)])
    assert list(results["class_frequencies"].values()) == pytest.approx(counts / counts.sum())
    expected = median_frequency_weights(counts, present).tolist()
    assert list(results["median_frequency_weights"].values()) == pytest.approx(expected, abs=1e-4)


def test_data_check_nyuv2_reads_depths_even_with_the_class_mapping(tmp_path, capsys):
    import h5py
    import numpy as np

    from tests.fixtures import make_nyuv2

    make_nyuv2(tmp_path / "NYUv2")
    with h5py.File(tmp_path / "NYUv2" / "nyu_depth_v2_labeled.mat", "a") as f:
        depths = f["depths"][...]
        depths[1, 2, 3] = np.nan
        depths[2, 0, 0] = -1.0
        f["depths"][...] = depths
    assert (
        main(["data", "check", "nyuv2", "--root", str(tmp_path), "--no-progress"]) == 1
    )  # the parent folder
    printed = capsys.readouterr().out
    assert "(segmentation)" in printed and "2 problem(s):" in printed
    assert "nyu_depth_v2_labeled.mat[1]: 1 NaN depth values" in printed
    assert "nyu_depth_v2_labeled.mat[2]: negative depth" in printed


def test_data_show_rejects_a_zero_count(tmp_path, capsys):
    assert main(["data", "show", "synthetic-camvid", "--count", "0", "--output", str(tmp_path)]) == 2
    assert "--count must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (None, "FINISHED"),
        (RuntimeError("x"), "FAILED"),
        (KeyboardInterrupt(), "KILLED"),
        (SystemExit(0), "KILLED"),
        (SystemExit(3), "FAILED"),
    ],
)
def test_tracked_run_status_says_how_the_run_ended(mlflow_uri, error, status):
    """sys.exit(0) is how Ray Tune stops a trial early: the run was stopped (KILLED), not failed."""
    from dubito.platform.tracking import tracked_run

    with pytest.raises(type(error)) if error is not None else contextlib.nullcontext():
        with tracked_run("status", run_name="r") as run:
            if error is not None:
                raise error
    assert MlflowClient(mlflow_uri).get_run(run.run_id).info.status == status


def test_experiments_are_tagged_as_model_training(mlflow_uri):
    """MLflow 3 opens an experiment of unknown kind on its GenAI traces page: dubito's say they hold
    model training (new ones at creation; one created before, without the tag, when next used)."""
    from dubito.platform.tracking import EXPERIMENT_KIND, tracked_run

    client = MlflowClient(mlflow_uri)
    with tracked_run("kind-new", run_name="r"):
        pass
    older = client.create_experiment("kind-older")
    assert EXPERIMENT_KIND not in client.get_experiment(older).tags
    with tracked_run("kind-older", run_name="r"):
        pass
    client.create_experiment("kind-theirs", tags={EXPERIMENT_KIND: "genai_development"})
    with tracked_run("kind-theirs", run_name="r"):
        pass
    kinds = {
        name: client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND)
        for name in ("kind-new", "kind-older", "kind-theirs")
    }
    assert kinds == {
        "kind-new": "custom_model_development",
        "kind-older": "custom_model_development",
        "kind-theirs": "genai_development",
    }
