"""Post-hoc calibration: the fitted scalars recover a known miscalibration, agree with a direct
numerical minimisation of the NLL, and the service applies them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import softmax

from dubito import DubitoError
from dubito.platform.calibration import (
    Calibration,
    classification_nll,
    fit_calibration,
    fit_temperature,
    fit_variance_scale,
    regression_nll,
)
from dubito.platform.models import MLP
from dubito.platform.service import UncertaintyService

pytestmark = pytest.mark.usefixtures("one_thread")


def _overconfident(n: int, factor: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z), and the logits factor·z of a model that many times too sure."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(z, axis=1)])
    return torch.tensor(factor * z, dtype=torch.float32), torch.tensor(labels)


def test_temperature_recovers_a_known_overconfidence():
    logits, labels = _overconfident(20_000, factor=3.0)
    t = fit_temperature(logits.unsqueeze(0), labels)
    assert t == pytest.approx(3.0, rel=0.06)  # the labels' own sampling noise, n = 20,000
    # and it is the minimiser of the NLL, found independently with numpy
    z = logits.double().numpy()

    def nll(temp: float) -> float:
        p = softmax(z / temp, axis=1)
        return -np.log(p[np.arange(len(labels)), labels.numpy()]).mean()

    direct = minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-6}).x
    assert t == pytest.approx(direct, rel=1e-3)
    assert nll(t) < nll(1.0)


def test_temperature_of_mc_samples_scales_each_sample_before_the_average():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3000, 4, generator=g) * 1.5  # T = 6 samples
    labels = torch.multinomial(torch.softmax(z, -1).mean(0), 1, generator=g).squeeze(1)
    logits = 3 * z  # three times too sure, in every sample
    t = fit_temperature(logits, labels)
    assert 2.4 < t < 3.6

    def nll(temp: float) -> float:
        return float(classification_nll(torch.softmax(logits.double() / temp, -1).mean(0), labels).mean())

    for other in (t * 0.98, t * 1.02):  # a minimum: both neighbours are worse
        assert nll(t) < nll(other)


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_variance_scale_is_the_nll_minimiser_and_recovers_a_known_factor(likelihood):
    g = torch.Generator().manual_seed(1)
    n = 40_000
    mean = torch.randn(n, generator=g)
    var = 0.1 + torch.rand(n, generator=g)  # the model's variance, 4x too small
    true_var = 4 * var
    if likelihood == "gaussian":
        y = mean + true_var.sqrt() * torch.randn(n, generator=g)
    else:  # Laplace with variance 2b²
        b = (true_var / 2).sqrt()
        y = mean + torch.distributions.Laplace(0.0, b).sample()
    s = fit_variance_scale(mean, var, y, likelihood)
    assert s == pytest.approx(4.0, rel=0.05)
    found = minimize_scalar(
        lambda c: float(regression_nll(mean, var * c, y, likelihood).mean()),
        bounds=(0.01, 100),
        method="bounded",
        options={"xatol": 1e-7},
    ).x
    assert s == pytest.approx(found, rel=1e-3)


def test_nll_matches_scipy():
    from scipy.stats import laplace, norm

    mean, var, y = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0])
    expected = -norm.logpdf(y.numpy(), mean.numpy(), np.sqrt(var.numpy()))
    np.testing.assert_allclose(regression_nll(mean, var, y).numpy(), expected, rtol=1e-6)
    expected = -laplace.logpdf(y.numpy(), mean.numpy(), np.sqrt(var.numpy() / 2))
    np.testing.assert_allclose(regression_nll(mean, var, y, "laplace").numpy(), expected, rtol=1e-6)


def test_service_applies_the_calibration():
    torch.manual_seed(0)
    model = MLP(3, 4, (8,), task="classification", variant="epistemic", dropout=0.3)
    x = torch.randn(10, 3)
    plain = UncertaintyService(model, samples=7, device="cpu", seed=3)
    cooled = UncertaintyService(model, samples=7, device="cpu", seed=3, calibration={"temperature": 2.5})
    u, out = plain.predict_with_samples(x)
    v, out_v = cooled.predict_with_samples(x)
    torch.testing.assert_close(out_v.mean, out.mean)  # the same masks: the logits are the model's
    expected = torch.softmax(out.mean / 2.5, dim=2).mean(0)
    torch.testing.assert_close(v.mean_probs, expected, rtol=1e-5, atol=1e-6)
    assert v.predictive_entropy.mean() > u.predictive_entropy.mean()  # τ > 1 flattens

    reg = MLP(3, 1, (8,), task="regression", variant="both", dropout=0.3)
    a = UncertaintyService(reg, samples=5, device="cpu", seed=3).predict(x)
    b = UncertaintyService(
        reg, samples=5, device="cpu", seed=3, calibration=Calibration(variance_scale=3.0)
    ).predict(x)
    torch.testing.assert_close(b.mean, a.mean)
    for name in ("aleatoric_var", "epistemic_var", "total_var"):
        torch.testing.assert_close(getattr(b, name), 3.0 * getattr(a, name))


def test_calibration_files_and_bad_values(tmp_path):
    path = Calibration(temperature=1.7).save(tmp_path / "calibration.json", fit={"points": 10})
    assert Calibration.of(path) == Calibration(temperature=1.7)
    assert Calibration.of(None) is None
    with pytest.raises(DubitoError, match="temperature must be a positive number"):
        Calibration(temperature=0.0)
    with pytest.raises(DubitoError, match="unknown calibration keys"):
        Calibration.of({"temp": 2})
    with pytest.raises(DubitoError, match="temperature must be a positive number"):
        UncertaintyService(MLP(3, 2, (4,), task="classification"), calibration={"temperature": -1})


def test_fit_calibration_streams_held_out_batches():
    torch.manual_seed(0)
    model = MLP(3, 4, (8,), task="classification", variant="epistemic", dropout=0.2)
    with torch.no_grad():
        for p in model.head.parameters():
            p.mul_(8)  # an over-confident head
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        x = torch.randn(50, 3, generator=g)
        batches.append(
            {
                "image": x,
                "target": torch.randint(0, 4, (50,), generator=g),
                "mask": torch.ones(50, dtype=torch.bool),
            }
        )
    service = UncertaintyService(model, samples=4, device="cpu", seed=0)
    calibration, fit = fit_calibration(service, batches, max_points=120)
    assert fit["points"] == 120  # 30 points of each of the 4 batches
    assert calibration.temperature > 1 and fit["nll_after"] < fit["nll_before"]
    with pytest.raises(DubitoError, match="uncalibrated"):
        fit_calibration(UncertaintyService(model, calibration=calibration), batches)
    assert math.isfinite(fit["nll_after"])


@pytest.mark.slow
@pytest.mark.finding
def test_temperature_scaling_lowers_the_ece_of_an_overconfident_segmentation_model(finding):
    """A tiny FC-DenseNet trained to be over-confident: its cross-entropy saw logits / 4, so the
    logits it outputs are about four times too sharp. Temperature scaling fit on the validation
    scenes must bring the ECE of unseen test scenes down."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from dubito.platform.evaluation import EvalConfig, evaluation_dataset
    from dubito.platform.metrics import CalibrationHistogram
    from dubito.platform.training import TrainConfig, build_for, make_datasets

    config = TrainConfig(
        train_images=24, val_images=12, height=32, width=40, flip=False, data_seed=finding.seed(0)
    )
    train_set, val_set = make_datasets(config)
    torch.manual_seed(finding.seed(0))
    model, spec = build_for(TrainConfig(**{**config.__dict__, "variant": "baseline"}), train_set)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    loader = DataLoader(
        train_set, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(finding.seed(0))
    )
    for _ in range(25):
        for batch in loader:
            logits = model(batch["image"])
            target = torch.where(batch["mask"], batch["target"], -100)
            loss = F.cross_entropy(logits / 4, target, ignore_index=-100)  # trained to be 4x too sure
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    service = UncertaintyService(model, device="cpu", seed=0, progress=False)
    calibration, fit = fit_calibration(service, DataLoader(val_set, batch_size=6))
    test = evaluation_dataset(
        "synthetic-camvid", "test", "", spec, EvalConfig(images=12, data_seed=finding.seed(0))
    )
    ece = {}
    for name, c in (("before", None), ("after", calibration)):
        hist = CalibrationHistogram(15)
        scorer = UncertaintyService(model, device="cpu", seed=0, calibration=c, progress=False)
        for batch in DataLoader(test, batch_size=6):
            hist.update(scorer.predict(batch["image"]).mean_probs, batch["target"], mask=batch["mask"])
        ece[name] = hist.ece()
    finding.check("over-confident model: fitted temperature", calibration.temperature, ">", 2.0)
    finding.check("over-confident model: ECE before", ece["before"], ">", 0.1)
    finding.check("over-confident model: ECE after over before", ece["after"] / ece["before"], "<", 0.5)
    assert fit["nll_after"] < fit["nll_before"]


def test_held_out_fraction_is_the_one_training_held_out(tmp_path):
    """Make3D has no validation split: --calibrate fits on the fraction of train the training run held
    out (its data seed and fraction from results.json), never on an image it trained on."""
    from dubito.platform.evaluation import EvalConfig, calibration_dataset
    from dubito.platform.files import write_json
    from dubito.platform.models import ModelSpec
    from dubito.platform.training import TrainConfig, make_datasets
    from tests.fixtures import make_make3d

    make_make3d(tmp_path / "m3d", counts=(10, 2))
    spec = ModelSpec(
        model="tiny", task="depth", variant="both", dropout=0.2, dataset="make3d", height=16, width=12
    )
    model = tmp_path / "run" / "model.pt"
    model.parent.mkdir()
    config = EvalConfig(model=str(model), root=str(tmp_path / "m3d"))
    with pytest.raises(DubitoError, match="does not\\s+say which images training held out"):
        calibration_dataset("make3d", str(tmp_path / "m3d"), spec, config)
    trained = TrainConfig(
        dataset="make3d", root=str(tmp_path / "m3d"), height=16, width=12, data_seed=7, val_fraction=0.3
    )
    write_json(model.parent / "results.json", {"config": trained.__dict__})
    held = calibration_dataset("make3d", str(tmp_path / "m3d"), spec, config)
    train_set, val_set = make_datasets(trained)
    assert held.indices == val_set.indices and len(held) == 3
    assert not set(held.indices) & set(train_set.indices)  # not one image it trained on


def test_zero_predictive_variance_has_no_likelihood_and_is_not_scaled():
    torch.manual_seed(0)
    baseline = MLP(3, 1, (8,), task="regression", variant="baseline", dropout=0.0)
    service = UncertaintyService(baseline, device="cpu", seed=0)
    batches = [
        {"image": torch.randn(6, 3), "target": torch.randn(6), "mask": torch.ones(6, dtype=torch.bool)}
    ]
    with pytest.raises(DubitoError, match="zero variance"):
        fit_calibration(service, batches)
