"""dubito label --epistemic ensemble:K / ensemble+dropout:K: each round trains K members, scores
the pool with the ensemble through the service (the same choice as scoring by hand), records the
round's cost, and BatchBALD takes the members as its samples."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from dubito import DubitoError
from dubito.acquisition.config import LoopConfig
from dubito.acquisition.functions import get_acquisition
from dubito.acquisition.loop import run_loop
from dubito.acquisition.reductions import parse_reduction, reduce_scores
from dubito.acquisition.scoring import batch_seed
from dubito.acquisition.selection import select
from dubito.platform.ensemble import Ensemble
from dubito.platform.service import UncertaintyService, parse_epistemic
from dubito.platform.training import load_model
from tests.fixtures import TINY_LOOP

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_round_trains_k_members_and_scores_with_them(tmp_path, mlflow_uri):
    config = LoopConfig.flat(
        output=str(tmp_path / "ens"), epistemic="ensemble:3", acquisition="bald", **TINY_LOOP
    )
    results = run_loop(config, progress=False)
    assert results["finished"] and len(results["curve"]) == 3
    assert [c["models"] for c in results["cost"]] == [3, 3, 3]
    assert all(c["train_seconds"] > 0 for c in results["cost"]) and results["cost"][-1]["score_seconds"] == 0
    assert all(c["score_seconds"] > 0 for c in results["cost"][:-1])
    # round 0's choice, by hand: its checkpoint is the ensemble, scored batch by batch with the loop's seeds
    model, spec = load_model(tmp_path / "ens" / "rounds" / "round-000.pt")
    assert isinstance(model, Ensemble) and len(model) == 3
    from dubito.acquisition.pool import Pool

    pool = Pool(config.pool().datasets()[1])
    free = pool.unlabelled(results["initial"])
    service = UncertaintyService(model, device="cpu")
    acquisition, (how, options) = get_acquisition("bald"), parse_reduction(config.reduction)
    scores = []
    for b, start in enumerate(range(0, len(free), 4)):
        batch = default_collate([pool.data[p] for p in free[start : start + 4]])
        seed = batch_seed(config.seed, 0, b)
        u, samples = service.predict_with_samples(batch["image"], seed=seed)
        assert samples.mean.shape[0] == 3  # the members are the samples
        pixel = acquisition.score(u, generator=torch.Generator().manual_seed(seed), samples=samples)
        scores.append(reduce_scores(pixel.float(), None, how, **options))
    picks = select(torch.cat(scores), config.query, "topk", seed=config.seed * 1000)
    assert pool.ids_at(free[p] for p in picks.tolist()) == results["queried"][0]


def test_ensemble_plus_dropout_and_batchbald_on_digits(tmp_path, mlflow_uri):
    settings = dict(
        dataset="digits",
        model="mlp",
        variant="epistemic",
        dropout=0.3,
        initial=10,
        query=4,
        rounds=1,
        epochs=3,
        batch_size=16,
        samples=2,
        device="cpu",
    )
    results = run_loop(
        LoopConfig.flat(
            output=str(tmp_path / "bb"), epistemic="ensemble+dropout:2", selection="batchbald", **settings
        ),
        progress=False,
    )
    assert results["cost"][0]["models"] == 2 and results["cost"][0]["samples"] == 2
    queried = results["queried"]
    picked = next(iter(queried.values()))
    assert len(picked) == len(set(picked)) == 4 and not set(picked) & set(results["initial"])
    again = run_loop(
        LoopConfig.flat(
            output=str(tmp_path / "bb2"), epistemic="ensemble+dropout:2", selection="batchbald", **settings
        ),
        progress=False,
    )
    assert again["queried"] == queried  # reproducible from the seed


def test_epistemic_settings_are_checked():
    assert parse_epistemic("dropout") == ("dropout", 1)
    assert parse_epistemic("ensemble") == ("ensemble", 5)
    assert parse_epistemic("ensemble+dropout:3") == ("ensemble+dropout", 3)
    for bad in ("ensemble:1", "ensemble:x", "dropout:3", "laplace"):
        with pytest.raises(DubitoError, match="--epistemic"):
            LoopConfig.flat(epistemic=bad).validate()
    # the default leaves the ledger as it was: older ledgers resume
    assert "epistemic" not in LoopConfig().settings()
    assert LoopConfig.flat(epistemic="ensemble:5").settings()["epistemic"] == "ensemble:5"
    assert LoopConfig.flat(epistemic="ensemble").settings()["epistemic"] == "ensemble:5"  # one spelling


def test_modal_estimator_with_an_ensemble():
    from sklearn.base import clone
    from sklearn.datasets import load_digits

    from dubito.acquisition.modal import TorchEstimator

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    est = TorchEstimator(hidden=(32,), epochs=3, epistemic="ensemble:3", seed=1).fit(x[:200], y[:200])
    assert isinstance(est.model_, Ensemble) and len(est.model_) == 3
    u, probs = est.uncertainty_and_samples(x[200:240])
    assert probs.shape == (3, 40, 10)
    with torch.no_grad():  # the members' mean probabilities, by hand
        by_hand = torch.stack(
            [torch.softmax(m(torch.as_tensor(x[200:240])), 1) for m in est.model_.members]
        ).mean(0)
    torch.testing.assert_close(
        torch.as_tensor(est.predict_proba(x[200:240])).float(), by_hand, rtol=1e-5, atol=1e-6
    )
    assert clone(est).get_params()["epistemic"] == "ensemble:3"
    with pytest.raises(DubitoError, match="epistemic"):
        TorchEstimator(epistemic="ensemble:1").fit(x[:50], y[:50])


def test_calibrated_rounds_score_with_the_temperature_fit_on_validation_scenes(tmp_path, mlflow_uri):
    from dubito.acquisition.loop import CALIBRATION_BATCH
    from dubito.acquisition.pool import Pool, validation_dataset
    from dubito.platform.calibration import fit_calibration

    config = LoopConfig.flat(
        output=str(tmp_path / "cal"), calibrate=True, acquisition="entropy", **{**TINY_LOOP, "rounds": 1}
    )
    results = run_loop(config, progress=False)
    fitted = results["cost"][0]["calibration"]
    assert (
        fitted["temperature"] > 0 and "calibration" not in results["cost"][1]
    )  # the last round scores nothing
    # by hand: the round's model, calibrated on the validation scenes with the loop's seeds, picks the same images
    model, _ = load_model(tmp_path / "cal" / "rounds" / "round-000.pt")
    fit_service = UncertaintyService(
        model, samples=config.samples, device="cpu", seed=batch_seed(0, 0, CALIBRATION_BATCH)
    )
    loader = torch.utils.data.DataLoader(validation_dataset(config.pool()), batch_size=4)
    calibration, _ = fit_calibration(fit_service, loader, seed=0)
    assert calibration.temperature == pytest.approx(fitted["temperature"], rel=1e-9)
    pool = Pool(config.pool().datasets()[1])
    free = pool.unlabelled(results["initial"])
    service = UncertaintyService(model, samples=config.samples, device="cpu", calibration=calibration)
    acquisition, (how, options) = get_acquisition("entropy"), parse_reduction(config.reduction)
    scores = []
    for b, start in enumerate(range(0, len(free), 4)):
        batch = default_collate([pool.data[p] for p in free[start : start + 4]])
        u = service.predict_with_samples(batch["image"], seed=batch_seed(0, 0, b))[0]
        scores.append(reduce_scores(acquisition.score(u).float(), None, how, **options))
    picks = select(torch.cat(scores), config.query, "topk", seed=0)
    assert pool.ids_at(free[p] for p in picks.tolist()) == results["queried"][0]


def test_calibration_needs_a_validation_split(tmp_path):
    with pytest.raises(DubitoError, match="no validation split"):
        LoopConfig.flat(output=str(tmp_path / "d"), dataset="digits", model="mlp", calibrate=True).validate()
    with pytest.raises(DubitoError, match="predicts no variance"):
        LoopConfig.flat(dataset="synthetic-make3d", variant="baseline", calibrate=True).validate()
    with pytest.raises(DubitoError, match="no test-time"):  # refused before round 0 trains its members
        LoopConfig.flat(variant="aleatoric", epistemic="ensemble+dropout:3").validate()


def test_a_grown_calibrated_loop_records_the_calibration_of_its_extra_choice(tmp_path, mlflow_uri):
    settings = {**TINY_LOOP, "rounds": 1}
    run_loop(LoopConfig.flat(output=str(tmp_path / "g"), calibrate=True, **settings), progress=False)
    grown = run_loop(
        LoopConfig.flat(output=str(tmp_path / "g"), calibrate=True, **{**settings, "rounds": 2}),
        progress=False,
    )
    assert grown["cost"][1]["calibration"]["temperature"] > 0 and grown["cost"][1]["score_seconds"] > 0
    assert not (tmp_path / "d").exists()
