"""dubito evaluate: metrics equal independent computations on the same predictions; MLflow gets them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import default_collate

from dubito import DubitoError
from dubito.cli import main
from dubito.platform.evaluation import EvalConfig, evaluate, evaluation_dataset
from dubito.platform.service import UncertaintyService
from dubito.platform.training import TrainConfig, load_model, train
from tests.conftest import _fresh_store


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _mlflow_template):
    """Two small trained models (segmentation, depth), shared by the tests of this module."""
    out = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", _fresh_store(_mlflow_template, out))
        seg = train(
            TrainConfig(
                output=str(out / "seg"), epochs=2, train_images=16, val_images=4, height=32, width=40
            ),
            progress=False,
        )
        depth = train(
            TrainConfig(
                output=str(out / "depth"),
                dataset="synthetic-make3d",
                epochs=2,
                train_images=16,
                val_images=4,
                height=32,
                width=40,
            ),
            progress=False,
        )
    return seg["model"], depth["model"]


@pytest.mark.slow
def test_segmentation_evaluation_matches_a_direct_computation(trained, tmp_path, mlflow_uri):
    config = EvalConfig(
        model=trained[0], output=str(tmp_path / "ev"), images=6, samples=4, batch_size=3, figures=2
    )
    results = evaluate(config, progress=False)
    s = results["summary"]
    # the same predictions, recomputed by hand: one batch of all 6 images, the service's seeded draws
    model, spec = load_model(trained[0])
    data = evaluation_dataset("synthetic-camvid", "test", "", spec, config)
    service = UncertaintyService(
        model, samples=4, seed=0, device="cpu", logit_noise_samples=10, progress=False
    )
    preds, targets, aleatoric, noise, probs = [], [], [], [], []
    for start in (0, 3):
        batch = default_collate([data[i] for i in range(start, start + 3)])
        u = service.predict(batch["image"])
        probs.append(u.mean_probs)
        preds.append(u.prediction)
        targets.append(batch["target"])
        aleatoric.append(u.aleatoric_entropy)
        noise.append(batch["noise"])
    pred, target = torch.cat(preds).numpy().ravel(), torch.cat(targets).numpy().ravel()
    cm = np.zeros((11, 11), dtype=np.int64)
    np.add.at(cm, (target, pred), 1)
    inter, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    assert s["mean_iou"] == pytest.approx(np.nanmean(iou))
    assert s["pixel_accuracy"] == pytest.approx((pred == target).mean())
    p_true = torch.cat(probs).double().movedim(1, -1).reshape(-1, 11).numpy()[np.arange(len(target)), target]
    assert s["nll"] == pytest.approx(-np.log(p_true).mean(), rel=1e-5)
    assert s["aleatoric_entropy"] == pytest.approx(float(torch.cat(aleatoric).mean()), rel=1e-5)
    from scipy.stats import spearmanr

    assert s["noise_spearman"] == pytest.approx(
        spearmanr(torch.cat(aleatoric).ravel(), torch.cat(noise).ravel()).statistic, abs=1e-6
    )
    # out of distribution: the indoor variant, scored by per-image mutual information
    assert 0.0 <= s["ood_auroc"] <= 1.0 and s["ood_mutual_information"] > 0
    assert results["ood_dataset"] == "synthetic-camvid (indoor OOD)"
    curve = results["curves"]["total"]["error"]
    assert curve[0] == pytest.approx(1 - s["pixel_accuracy"])
    for name in (
        "uncertainty.png",
        "precision_uncertainty.png",
        "sparsification.png",
        "calibration.png",
        "results.json",
    ):
        assert (tmp_path / "ev" / name).stat().st_size > 1000, name
    run = MlflowClient(mlflow_uri).get_run(results["mlflow_run_id"])
    assert run.data.metrics["mean_iou"] == pytest.approx(s["mean_iou"])
    assert {a.path for a in MlflowClient(mlflow_uri).list_artifacts(run.info.run_id)} >= {
        "calibration.png",
        "results.json",
    }


def test_depth_evaluation_reports_depth_errors_and_coverage(trained, tmp_path):
    results = evaluate(
        EvalConfig(model=trained[1], output=str(tmp_path / "ev"), images=4, samples=3, ood=False),
        progress=False,
    )
    s = results["summary"]
    assert {
        "rel",
        "rms",
        "log10",
        "delta1",
        "calibration_error",
        "aleatoric_var",
        "epistemic_var",
        "noise_spearman",
    } <= set(s)
    levels, observed = results["coverage"]["levels"], results["coverage"]["observed"]
    assert len(levels) == len(observed) and all(
        b >= a - 1e-9 for a, b in zip(observed, observed[1:])
    )  # nested intervals
    assert "ood_auroc" not in s


def test_depth_ood_is_scored_for_error_and_depth_scale(trained, tmp_path):
    """The rooms are labelled with depth, so the OOD test also reports how wrong the model is there, and
    the depth scale it predicts, which the epistemic variance in m² moves with."""
    config = EvalConfig(
        model=trained[1], output=str(tmp_path / "ev"), images=3, samples=3, batch_size=3, figures=0
    )
    s = evaluate(config, progress=False)["summary"]
    model, spec = load_model(trained[1])
    service = UncertaintyService(model, samples=3, seed=0, device="cpu", progress=False)
    for prefix, ood in (("", False), ("ood_", True)):
        batch = default_collate(
            list(evaluation_dataset("synthetic-make3d", "test", "", spec, config, ood=ood))
        )
        u = service.predict(batch["image"])
        mask = batch["mask"].numpy()
        pred, epi = u.mean[:, 0].numpy()[mask], u.epistemic_var[:, 0].numpy()[mask]
        target = batch["target"].numpy()[mask]
        assert s[prefix + "predicted_depth"] == pytest.approx(pred.mean(), rel=1e-5)
        assert s[prefix + "relative_epistemic_std"] == pytest.approx(
            (np.sqrt(epi) / pred.clip(1e-3)).mean(), rel=1e-4
        )
        assert s[prefix + "rms"] == pytest.approx(np.sqrt(((pred - target) ** 2).mean()), rel=1e-4)
        assert s[prefix + "epistemic_var"] == pytest.approx(epi.mean(), rel=1e-5)
    assert s["ood_predicted_depth"] != pytest.approx(
        s["predicted_depth"]
    )  # different scenes, different answers


def test_evaluate_command_prints_the_headline(trained, tmp_path, capsys):
    assert (
        main(
            [
                "evaluate",
                "--model",
                trained[0],
                "--output",
                str(tmp_path / "c"),
                "--images",
                "3",
                "--samples",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "mean IoU" in printed and "OOD detection AUROC" in printed
    assert json.loads((tmp_path / "c" / "results.json").read_text())["summary"]["mean_iou"] >= 0
    assert main(["evaluate", "--model", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "d")]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_a_model_is_only_tested_on_data_of_its_task(trained, tmp_path, mlflow_uri):
    with pytest.raises(DubitoError, match="is a depth model; synthetic-camvid is a segmentation dataset"):
        evaluate(
            EvalConfig(model=trained[1], dataset="synthetic-camvid", output=str(tmp_path / "a")),
            progress=False,
        )
    with pytest.raises(DubitoError, match="is a segmentation model"):
        evaluate(
            EvalConfig(model=trained[0], dataset="synthetic-make3d", output=str(tmp_path / "b")),
            progress=False,
        )
    assert (
        MlflowClient(mlflow_uri).search_runs(
            [e.experiment_id for e in MlflowClient(mlflow_uri).search_experiments()]
        )
        == []
    )


def test_nan_results_are_written_as_json_null(tmp_path):
    from dubito.platform.files import write_json

    path = write_json(
        tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(0.5)}
    )
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": 0.5}


def test_bad_evaluation_settings():
    with pytest.raises(DubitoError, match="--samples"):
        EvalConfig(samples=0).validate()
    with pytest.raises(DubitoError, match="--ood-root"):
        EvalConfig(ood_dataset="nyuv2").validate()


@pytest.mark.slow
def test_calibrate_fits_on_validation_and_reports_before_and_after(trained, tmp_path, capsys):
    from dubito.platform.calibration import Calibration, fit_temperature, fit_variance_scale, regression_nll
    from dubito.platform.evaluation import calibration_dataset

    config = EvalConfig(
        model=trained[0],
        output=str(tmp_path / "seg"),
        images=4,
        samples=3,
        batch_size=2,
        ood=False,
        calibrate=True,
    )
    results = evaluate(config, progress=False)
    c, s = results["calibration"], results["summary"]
    # the temperature is the NLL minimiser on the validation scenes' MC logits, gathered by hand
    model, spec = load_model(trained[0])
    held_out = calibration_dataset("synthetic-camvid", "", spec, config)
    service = UncertaintyService(
        model, samples=3, seed=1, device="cpu", logit_noise_samples=10, progress=False
    )
    logits, log_vars, targets = [], [], []
    for start in range(0, len(held_out), 2):
        batch = default_collate([held_out[i] for i in range(start, min(start + 2, len(held_out)))])
        _, out = service.predict_with_samples(batch["image"])
        mask = batch["mask"]
        logits.append(out.mean.movedim(2, -1)[:, mask])
        log_vars.append(out.log_var.movedim(2, -1)[:, mask])
        targets.append(batch["target"][mask])
    expected = fit_temperature(torch.cat(logits, 1), torch.cat(targets), torch.cat(log_vars, 1), 10, 0)
    assert c["temperature"] == pytest.approx(expected, rel=1e-6)
    assert c["fit"]["points"] == sum(len(t) for t in targets)
    assert c["fit"]["nll_after"] <= c["fit"]["nll_before"]
    assert s["calibrated_ece"] == c["after"]["ece"] and s["calibrated_nll"] == c["after"]["nll"]
    assert Calibration.of(tmp_path / "seg" / "calibration.json") == Calibration(temperature=c["temperature"])
    assert len(c["reliability"]["confidence"]) == 15

    depth = evaluate(
        EvalConfig(
            model=trained[1], output=str(tmp_path / "depth"), images=4, samples=3, ood=False, calibrate=True
        ),
        progress=False,
    )
    c = depth["calibration"]
    assert c["method"] == "variance scaling" and c["variance_scale"] > 0
    assert set(c["after"]) == {"calibration_error", "nll"} and len(c["coverage"]["observed"]) > 3
    # the scale is the closed form on the validation pixels; the test NLL follows from it
    model, spec = load_model(trained[1])
    held_out = calibration_dataset("synthetic-make3d", "", spec, EvalConfig(images=4))
    service = UncertaintyService(model, samples=3, seed=1, device="cpu", progress=False)
    mean, var, target = [], [], []
    for start in range(0, len(held_out), 4):
        batch = default_collate([held_out[i] for i in range(start, min(start + 4, len(held_out)))])
        u = service.predict(batch["image"])
        mask = batch["mask"]
        mean.append(u.mean[:, 0][mask])
        var.append(u.total_var[:, 0][mask])
        target.append(batch["target"][mask])
    mean, var, target = torch.cat(mean), torch.cat(var), torch.cat(target)
    assert c["variance_scale"] == pytest.approx(
        fit_variance_scale(mean, var, target, spec.likelihood), rel=1e-5
    )
    assert float(regression_nll(mean, var * c["variance_scale"], target, spec.likelihood).mean()) <= float(
        regression_nll(mean, var, target, spec.likelihood).mean()
    )
    main(
        [
            "evaluate",
            "--model",
            trained[0],
            "--output",
            str(tmp_path / "cli"),
            "--images",
            "3",
            "--samples",
            "2",
            "--no-ood",
            "--calibrate",
        ]
    )
    assert "temperature scaling" in capsys.readouterr().out
