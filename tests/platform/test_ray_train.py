"""The trainer under Ray Train's TorchTrainer: local mode (num_workers=0, in this process)
reproduces the plain trainer exactly; two data-parallel workers (DDP over gloo on the CPU) train,
and only rank 0 writes files and MLflow; GPUs the cluster lacks are refused."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from dubito import DubitoError
from dubito.platform.cluster import gpu_request
from dubito.platform.training import TrainConfig, train, train_with_ray
from tests.fixtures import TINY_TRAIN

BASE = TINY_TRAIN


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]


def test_torch_trainer_local_mode_reproduces_the_plain_trainer(tmp_path, mlflow_uri):
    plain = train(TrainConfig(output=str(tmp_path / "plain"), **BASE), progress=False)
    ray = train_with_ray(TrainConfig(output=str(tmp_path / "ray"), **BASE), progress=False)
    assert _without_timing(ray["history"]) == _without_timing(plain["history"])
    a, b = _weights(tmp_path / "plain" / "model.pt"), _weights(tmp_path / "ray" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run = MlflowClient(mlflow_uri).get_run(ray["mlflow_run_id"])
    assert (
        run.info.status == "FINISHED"
        and len(MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "val_mean_iou")) == 2
    )
    # a third epoch resumes from the checkpoint, under Ray Train as without it
    more = train_with_ray(TrainConfig(output=str(tmp_path / "ray"), **{**BASE, "epochs": 3}), progress=False)
    assert more["epochs_run"] == 3 and _without_timing(more["history"])[:2] == _without_timing(
        plain["history"]
    )


@pytest.mark.slow
def test_two_ray_train_workers_train_data_parallel(tmp_path, ray_session, mlflow_uri):
    config = TrainConfig(output=str(tmp_path / "ddp"), workers=2, **BASE)
    results = train_with_ray(config, progress=False)
    assert results["epochs_run"] == 2 and len(results["history"]) == 2
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in results["history"])
    assert (tmp_path / "ddp" / "model.pt").exists() and (tmp_path / "ddp" / "checkpoint.pt").exists()
    weights = _weights(tmp_path / "ddp" / "model.pt")
    assert not any(k.startswith("module.") for k in weights)  # the model's own weights, not the DDP wrapper's
    runs = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name("dubito-train").experiment_id]
    )
    assert len(runs) == 1 and runs[0].data.tags["dubito.ray_train_workers"] == "2"  # rank 0 only
    # a third epoch: both workers resume from rank 0's checkpoint, into the same MLflow run
    more = train_with_ray(
        TrainConfig(output=str(tmp_path / "ddp"), workers=2, **{**BASE, "epochs": 3}), progress=False
    )
    assert (
        more["epochs_run"] == 3
        and more["history"][:2] == results["history"]
        and more["mlflow_run_id"] == runs[0].info.run_id
    )


def test_a_dubito_error_in_a_worker_reaches_the_user_unwrapped():
    from ray.exceptions import RayTaskError

    from dubito.platform.cluster import dubito_cause

    try:
        raise DubitoError("--root /nowhere: not found")
    except DubitoError as err:
        wrapped = RayTaskError(
            "train", "traceback", err
        ).as_instanceof_cause()  # what Ray raises in the driver
    outer = RuntimeError("training failed")
    outer.worker_failures = {0: wrapped}  # Ray Train's WorkerGroupError carries the workers' errors so
    cause = dubito_cause(outer)
    assert type(cause) is DubitoError and str(cause) == "--root /nowhere: not found"
    assert dubito_cause(RuntimeError("no dubito error here")) is None


def test_gpus_are_only_asked_of_clusters_that_have_them(ray_session, tmp_path):
    from dubito.platform.cluster import check_gpu_capacity

    check_gpu_capacity(0.0, 4, "--scorers 4")  # no GPU asked: fine anywhere
    with pytest.raises(DubitoError, match="has 0 GPUs in all"):
        check_gpu_capacity(0.5, 2, "--scorers 2")
    assert gpu_request("auto", "--gpus-per-trial") == 0.0  # the test instance has no GPU
    assert gpu_request("0", "--gpus-per-trial") == 0.0
    with pytest.raises(DubitoError, match="no GPU"):
        gpu_request("0.5", "--gpus-per-trial")
    with pytest.raises(DubitoError, match="'auto' or a number"):
        gpu_request("many", "--gpus-per-trial")
    with pytest.raises(DubitoError, match="no GPU"):
        train_with_ray(TrainConfig(output=str(tmp_path / "out"), workers=2, gpu=True, **BASE), progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(DubitoError, match="--workers N"):
        TrainConfig(gpu=True).validate()


@pytest.mark.slow
def test_ensemble_members_train_as_parallel_ray_tasks(tmp_path, ray_session, mlflow_uri):
    from dubito.platform.ensemble_training import train_ensemble
    from dubito.platform.training import MEMBER_SEED_STRIDE, load_model

    config = TrainConfig(output=str(tmp_path / "ens"), workers=2, **{**BASE, "epochs": 1})
    results = train_ensemble(config, 2, progress=False)
    assert [m["seed"] for m in results["member_results"]] == [3, 3 + MEMBER_SEED_STRIDE]
    model, _ = load_model(tmp_path / "ens" / "model.pt")
    assert len(model) == 2
    client = MlflowClient(mlflow_uri)
    children = client.search_runs(
        [client.get_run(results["mlflow_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{results['mlflow_run_id']}'",
    )
    assert sorted(r.data.tags["dubito.member"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in children)
    # the members were trained in Ray workers; the same seeds in this process give the same first epoch
    again = train_ensemble(
        TrainConfig(output=str(tmp_path / "local"), **{**BASE, "epochs": 1}), 2, progress=False
    )
    for a, b in zip(results["member_results"], again["member_results"]):
        assert a["best"]["val_mean_iou"] == pytest.approx(b["best"]["val_mean_iou"], abs=0.05)
