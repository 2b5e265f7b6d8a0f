"""The trainer: the paper's losses, checkpoints that resume to the same weights, MLflow records."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from dubito import DubitoError
from dubito.platform.losses import gaussian_nll, sampled_softmax_cross_entropy
from dubito.platform.models import FCDenseNet
from dubito.platform.training import TrainConfig, load_model, make_datasets, task_loss, train

SMALL = dict(epochs=3, train_images=16, val_images=6, height=32, width=40, batch_size=8)


def small_config(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    return TrainConfig(output=str(tmp_path / name), **{**SMALL, **overrides})


# ----------------------------------------------------------------------------- losses
def test_segmentation_losses_ignore_masked_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 11, 4, 5)
    target = torch.randint(0, 11, (2, 4, 5))
    mask = torch.rand(2, 4, 5) > 0.3
    batch = {"target": target, "mask": mask}
    baseline = FCDenseNet("tiny", variant="baseline")
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[mask], target[mask])
    assert task_loss(baseline, logits, batch) == pytest.approx(expected.item(), rel=1e-5)
    both = FCDenseNet("tiny", variant="both")
    log_var = torch.randn(2, 11, 4, 5)
    noise = torch.randn(7, *logits.shape)
    got = task_loss(both, (logits, log_var), batch, logit_noise_samples=7)
    torch.manual_seed(1)
    # the same loss restricted to the valid pixels (each pixel is independent)
    ref = sampled_softmax_cross_entropy(
        logits.permute(0, 2, 3, 1)[mask].unsqueeze(-1),
        log_var.permute(0, 2, 3, 1)[mask].unsqueeze(-1),
        target[mask].unsqueeze(-1),
        noise=noise.permute(0, 1, 3, 4, 2)[:, mask].unsqueeze(-1),
    )
    assert got.item() == pytest.approx(ref.item(), rel=0.15)  # different ε draws, same expectation
    assert torch.isfinite(got)


def test_depth_losses():
    torch.manual_seed(0)
    mean, target = torch.rand(2, 1, 4, 5) * 10, torch.rand(2, 4, 5) * 10
    mask = torch.rand(2, 4, 5) > 0.5
    batch = {"target": target, "mask": mask}
    l1 = FCDenseNet("tiny", task="depth", variant="baseline", likelihood="laplace")
    l2 = FCDenseNet("tiny", task="depth", variant="baseline", likelihood="gaussian")
    assert task_loss(l1, mean, batch).item() == pytest.approx(
        (mean[:, 0] - target)[mask].abs().mean().item(), rel=1e-6
    )
    assert task_loss(l2, mean, batch).item() == pytest.approx(
        ((mean[:, 0] - target)[mask] ** 2).mean().item(), rel=1e-6
    )
    hetero = FCDenseNet("tiny", task="depth", variant="aleatoric", likelihood="gaussian")
    log_var = torch.randn(2, 1, 4, 5)
    assert task_loss(hetero, (mean, log_var), batch).item() == pytest.approx(
        gaussian_nll(mean, log_var, target.unsqueeze(1), mask).item()
    )


# ----------------------------------------------------------------------------- data
def test_training_fractions_are_nested_subsets(tmp_path):
    ids = {}
    for fraction in (0.25, 0.5, 1.0):
        train_set, val_set = make_datasets(small_config(tmp_path, train_images=40, fraction=fraction))
        ids[fraction] = {int(train_set[i]["id"]) for i in range(len(train_set))}
        assert len(val_set) == 6
    assert len(ids[0.25]) == 10 and len(ids[0.5]) == 20 and len(ids[1.0]) == 40
    assert ids[0.25] < ids[0.5] < ids[1.0]


def test_bad_settings_are_named():
    with pytest.raises(DubitoError, match="--variant"):
        TrainConfig(variant="bayes").validate()
    with pytest.raises(DubitoError, match="--root"):
        TrainConfig(dataset="camvid").validate()
    with pytest.raises(DubitoError, match="--crop"):
        TrainConfig(crop=500).validate()
    with pytest.raises(DubitoError, match="unknown training settings"):
        TrainConfig.from_dict({"epochz": 3})


# ----------------------------------------------------------------------------- runs
def test_train_records_everything_in_mlflow_and_reloads(tmp_path, mlflow_uri):
    results = train(small_config(tmp_path), progress=False)
    out = tmp_path / "run"
    assert results["epochs_run"] == 3 and len(results["history"]) == 3
    client = MlflowClient(mlflow_uri)
    run = client.get_run(results["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["variant"] == "both" and run.data.params["epochs"] == "3"
    for key in ("train_loss", "val_mean_iou", "val_pixel_accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == pytest.approx(
        [h["train_loss"] for h in results["history"]]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "training.png", "model.pt"} <= artifacts
    assert (out / "training.png").stat().st_size > 5_000
    # model.pt rebuilds the best epoch's model
    model, spec = load_model(out / "model.pt")
    assert spec.variant == "both" and spec.num_classes == 11
    best = max(results["history"], key=lambda h: h["val_mean_iou"])
    assert results["best_epoch"] == best["epoch"]
    x = torch.randn(1, 3, 32, 40)
    logits, log_var = model(x)
    assert logits.shape == (1, 11, 32, 40) and log_var.shape == (1, 11, 32, 40)


def test_depth_training_reports_depth_errors(tmp_path):
    results = train(
        small_config(tmp_path, dataset="synthetic-make3d", epochs=1, variant="aleatoric"), progress=False
    )
    assert {"val_rel", "val_rms", "val_delta1"} <= set(results["history"][0])
    assert results["spec"]["task"] == "depth" and results["spec"]["likelihood"] == "laplace"


def test_early_stopping_keeps_the_best_weights(tmp_path):
    config = small_config(tmp_path, lr=1e-12, epochs=8, patience=1, variant="baseline")
    results = train(config, progress=False)
    scores = [h["val_mean_iou"] for h in results["history"]]
    best = results["best_epoch"]
    assert results["stopped_early"] and results["epochs_run"] == best + 1 < 8  # one epoch without improvement
    assert scores[best - 1] == max(scores) and scores[-1] <= scores[best - 1]
    # model.pt holds the best epoch's weights: validating it again gives that epoch's score
    from dubito.platform.training import make_datasets, validate

    model, spec = load_model(tmp_path / "run" / "model.pt")
    _, val_set = make_datasets(config)
    assert validate(model, val_set, spec, torch.device("cpu"), 8)["val_mean_iou"] == pytest.approx(
        scores[best - 1]
    )


def test_resume_refuses_a_folder_with_other_settings(tmp_path):
    train(small_config(tmp_path, epochs=1), progress=False)
    with pytest.raises(DubitoError, match=r"other settings \(lr\)"):
        train(small_config(tmp_path, epochs=2, lr=1e-2), progress=False)
    # more epochs is a continuation, not a conflict
    assert train(small_config(tmp_path, epochs=2), progress=False)["epochs_run"] == 2


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, mlflow_uri):
    config = small_config(tmp_path, "uninterrupted", epochs=4)
    train(config, progress=False)
    reference = _final_weights(tmp_path / "uninterrupted")

    out = tmp_path / "killed"
    args = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in asdict(replace(config, output=str(out))).items()
        if not isinstance(v, bool)
    ]
    command = [sys.executable, "-m", "dubito", "train", *args, "--no-progress"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["epoch"]
    assert 1 <= done < 4, f"the run was killed after epoch {done}"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed = _final_weights(out)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    # one MLflow run, finished, with every epoch once or (the epoch cut short) twice
    runs = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name("dubito-train").experiment_id],
        filter_string="attributes.run_name = 'killed'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = {m.step for m in MlflowClient(mlflow_uri).get_metric_history(runs[0].info.run_id, "train_loss")}
    assert steps == {1, 2, 3, 4}


def test_dataloader_workers_do_not_change_the_weights(tmp_path):
    base = dict(epochs=1, crop=24, train_images=12)
    train(small_config(tmp_path, "w0", loader_workers=0, **base), progress=False)
    train(small_config(tmp_path, "w2", loader_workers=2, **base), progress=False)
    a, b = _final_weights(tmp_path / "w0"), _final_weights(tmp_path / "w2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_deleted_mlflow_run_is_replaced_on_resume(tmp_path, mlflow_uri):
    first = train(small_config(tmp_path, epochs=1), progress=False)
    MlflowClient(mlflow_uri).delete_run(first["mlflow_run_id"])
    second = train(small_config(tmp_path, epochs=2), progress=False)
    assert second["mlflow_run_id"] != first["mlflow_run_id"] and second["epochs_run"] == 2
    assert MlflowClient(mlflow_uri).get_run(second["mlflow_run_id"]).info.status == "FINISHED"


def test_model_spec_reads_the_dicts_model_files_hold(tmp_path):
    from dubito.platform.data import get_dataset
    from dubito.platform.files import save_torch
    from dubito.platform.models import ModelSpec
    from dubito.platform.training import build_for, save_model

    config = TrainConfig(dataset="digits", data_seed=3)
    model, spec = build_for(config, get_dataset("digits", "train", seed=3))
    assert isinstance(spec, ModelSpec)
    assert (spec.task, spec.model, spec.in_features, spec.num_classes, spec.data_seed) == (
        "classification",
        "mlp",
        64,
        10,
        3,
    )
    # a digits model file as the release before the typed spec wrote it (a plain dict, no placement)
    old = {
        "model": "mlp",
        "task": "classification",
        "num_classes": 10,
        "ignore_index": None,
        "variant": "both",
        "dropout": 0.2,
        "likelihood": "laplace",
        "dataset": "digits",
        "height": 72,
        "width": 96,
        "max_depth": None,
        "in_features": 64,
        "data_seed": 3,
    }
    save_torch({"spec": old, "state_dict": model.state_dict()}, tmp_path / "old.pt")
    loaded, read = load_model(tmp_path / "old.pt")
    assert read == spec and read.as_dict() == {**old, "dropout_at": "all"}
    x = torch.randn(5, 64)
    torch.manual_seed(0)
    assert torch.equal(loaded.eval()(x)[0], model.eval()(x)[0])
    # written and read back: the same spec; a segmentation spec has no MLP or digits fields
    save_model(tmp_path / "new.pt", model, spec)
    assert load_model(tmp_path / "new.pt")[1] == spec
    seg = ModelSpec(model="tiny", task="segmentation", variant="baseline", dropout=0.2, num_classes=11)
    assert "in_features" not in seg.as_dict() and ModelSpec.of(seg.as_dict()) == seg
    broken = {k: v for k, v in old.items() if k != "task"}
    save_torch({"spec": broken, "state_dict": model.state_dict()}, tmp_path / "broken.pt")
    with pytest.raises(DubitoError, match=r"broken.pt: the model spec lacks task"):
        load_model(tmp_path / "broken.pt")
