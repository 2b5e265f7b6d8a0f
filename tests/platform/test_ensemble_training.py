"""dubito train --ensemble K: members are ordinary runs with their own seeds, each resumable; the
ensemble's model file loads (weights_only) as an Ensemble that evaluate scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dubito import DubitoError
from dubito.cli import main
from dubito.platform.ensemble import Ensemble
from dubito.platform.ensemble_training import train_ensemble
from dubito.platform.evaluation import EvalConfig, evaluate
from dubito.platform.training import MEMBER_SEED_STRIDE, TrainConfig, load_model, train, validate
from tests.fixtures import TINY_TRAIN

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {**TINY_TRAIN, "epochs": 1}


def test_members_are_runs_of_their_own_seeds_and_the_file_is_an_ensemble(tmp_path, mlflow_uri):
    out = tmp_path / "ens"
    results = train_ensemble(TrainConfig(output=str(out), **BASE), 3, progress=False)
    assert [m["seed"] for m in results["member_results"]] == [3 + k * MEMBER_SEED_STRIDE for k in range(3)]
    for k in range(3):
        assert (out / f"member-{k}" / "checkpoint.pt").exists() and (
            out / f"member-{k}" / "model.pt"
        ).exists()
    saved = torch.load(out / "model.pt", weights_only=True)
    assert set(saved) == {"spec", "members"} and len(saved["members"]) == 3
    # member k's weights are its own run's best weights; the members differ from each other
    for k in range(3):
        own = torch.load(out / f"member-{k}" / "model.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(own[n], saved["members"][k][n]) for n in own)
    first, second = saved["members"][0], saved["members"][1]
    assert not torch.equal(first["first.weight"], second["first.weight"])
    # member 0 is the plain run of the same settings
    plain = train(TrainConfig(output=str(tmp_path / "plain"), **BASE), progress=False)
    plain_weights = torch.load(plain["model"], weights_only=True)["state_dict"]
    assert all(torch.equal(plain_weights[n], first[n]) for n in plain_weights)

    model, spec = load_model(out / "model.pt")
    assert isinstance(model, Ensemble) and len(model) == 3 and spec.task == "segmentation"
    # the ensemble's validation: the members' mean probabilities, recomputed here
    from dubito.platform.training import make_datasets

    _, val_set = make_datasets(TrainConfig(output=str(out), **BASE))
    assert results["ensemble_validation"] == validate(model, val_set, spec, torch.device("cpu"), 4)
    assert json.loads((out / "results.json").read_text())["members"] == 3
    assert (out / "training.png").stat().st_size > 1000

    ev = evaluate(
        EvalConfig(model=str(out / "model.pt"), output=str(tmp_path / "ev"), images=2, ood=False),
        progress=False,
    )
    assert ev["epistemic"] == "ensemble K=3" and ev["summary"]["mutual_information"] > 0
    both = evaluate(
        EvalConfig(
            model=str(out / "model.pt"),
            output=str(tmp_path / "ev2"),
            images=2,
            ood=False,
            samples=2,
            epistemic="ensemble+dropout",
        ),
        progress=False,
    )
    assert both["epistemic"] == "ensemble K=3 × dropout T=2"
    with pytest.raises(DubitoError, match="does not fit the ensemble Ensemble"):
        evaluate(
            EvalConfig(model=str(out / "model.pt"), output=str(tmp_path / "ev3"), epistemic="dropout"),
            progress=False,
        )
    assert not (tmp_path / "ev3").exists()  # refused before anything was written


def test_each_member_resumes_and_the_ensemble_can_grow(tmp_path, mlflow_uri, monkeypatch):
    out = tmp_path / "ens"
    train_ensemble(TrainConfig(output=str(out), **BASE), 2, progress=False)
    # a rerun trains no epoch: every member returns from its checkpoint
    import dubito.platform.training as training

    epochs = []
    real = training._epoch
    monkeypatch.setattr(training, "_epoch", lambda run, epoch: epochs.append(epoch) or real(run, epoch))
    again = train_ensemble(TrainConfig(output=str(out), **BASE), 2, progress=False)
    assert epochs == [] and again["members"] == 2
    # one more member: only it trains; more epochs: every member continues from its checkpoint
    grown = train_ensemble(TrainConfig(output=str(out), **BASE), 3, progress=False)
    assert epochs == [0] and len(load_model(out / "model.pt")[0]) == 3 and grown["members"] == 3
    with pytest.raises(DubitoError, match="would drop some"):
        train_ensemble(TrainConfig(output=str(out), **BASE), 2, progress=False)
    longer = train_ensemble(TrainConfig(output=str(out), **{**BASE, "epochs": 2}), 3, progress=False)
    assert epochs == [0, 1, 1, 1] and all(m["epochs_run"] == 2 for m in longer["member_results"])


def test_bad_ensembles_are_refused_before_anything_is_written(tmp_path, mlflow_uri, capsys):
    with pytest.raises(DubitoError, match="at least 2 members"):
        train_ensemble(TrainConfig(output=str(tmp_path / "one"), **BASE), 1)
    single = tmp_path / "single"
    train(TrainConfig(output=str(single), **BASE), progress=False)
    with pytest.raises(DubitoError, match="single model's training run"):
        train_ensemble(TrainConfig(output=str(single), **BASE), 2)
    assert not (single / "member-0").exists()
    with pytest.raises(DubitoError, match="--root"):
        train_ensemble(TrainConfig(output=str(tmp_path / "camvid"), dataset="camvid"), 2)
    assert not (tmp_path / "camvid").exists()
    args = ["train", "--output", str(tmp_path / "cli"), "--ensemble", "2", "--no-progress"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in BASE.items()]
    assert main(args) == 0
    shown = capsys.readouterr().out
    assert "member 1 (seed" in shown and "ensemble of 2 (mean prediction)" in shown


def test_members_run_in_one_process_each_with_absolute_paths(tmp_path):
    """--workers and --gpu place the members' Ray tasks; each member trains in its task's process (a
    member config with --gpu but no --workers would be refused), with the same absolute root however
    the ensemble runs, so a member resumes either way."""
    from dubito.platform.ensemble_training import _member_configs

    config = TrainConfig(output=str(tmp_path / "e"), root="data/../data", workers=2, gpu=True, **BASE)
    members = _member_configs(config, 3, tmp_path / "e")
    for k, m in enumerate(members):
        assert (m.workers, m.gpu, m.seed) == (0, False, 3 + k * MEMBER_SEED_STRIDE)
        assert m.output == str((tmp_path / "e").resolve() / f"member-{k}")
        assert m.root == str(Path("data").resolve())
        m.validate()
