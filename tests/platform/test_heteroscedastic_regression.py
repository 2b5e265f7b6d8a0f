"""Behaviour: a dropout MLP trained with gaussian_nll recovers known input-dependent noise,
and its epistemic variance grows away from the training data."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from dubito.platform.losses import gaussian_nll, laplace_nll
from dubito.platform.models import MLP
from dubito.platform.service import UncertaintyService


def true_sigma(x: torch.Tensor) -> torch.Tensor:
    return 0.05 + 0.125 * (x + 1) + 0.1 * torch.sin(2 * x) ** 2


def _data(g: torch.Generator, n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of sin(3x) with noise of std true_sigma(x), x uniform on the training range [-1, 1]."""
    x = torch.rand(n, 1, generator=g) * 2 - 1
    return x, torch.sin(3 * x) + true_sigma(x) * torch.randn(n, 1, generator=g)


def _fit(model, x, y, loss_fn, steps: int, g: torch.Generator) -> None:
    """Adam on minibatches of 128 drawn with ``g``."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-5)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        mean, log_var = model(x[idx])
        loss = loss_fn(mean, log_var, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.slow
@pytest.mark.finding
@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_recovers_aleatoric_noise_and_epistemic_grows_off_data(likelihood, finding):
    torch.manual_seed(finding.seed(0))
    g = torch.Generator().manual_seed(finding.seed(0))
    x, y = _data(g)
    model = MLP(
        1, 1, hidden=(128, 128), task="regression", variant="both", dropout=0.1, likelihood=likelihood
    )
    _fit(model, x, y, gaussian_nll if likelihood == "gaussian" else laplace_nll, 2000, g)

    svc = UncertaintyService(model, samples=100, seed=0, device="cpu")
    held_out = torch.linspace(-0.95, 0.95, 200).unsqueeze(1)  # not the training points
    inside = svc.predict(held_out)
    rho = spearmanr(
        inside.aleatoric_var.sqrt().squeeze().numpy(), true_sigma(held_out).squeeze().numpy()
    ).correlation
    finding.check("Spearman, learned aleatoric std vs true std", rho, ">", 0.8)
    # the predicted noise is in the right range, not just in the right order. For Gaussian
    # noise fitted with a Laplace likelihood the optimum is b = E|ε| = σ √(2/π), so 2b² = (4/π) σ².
    expected = 1.0 if likelihood == "gaussian" else math.sqrt(4 / math.pi)
    ratio = (inside.aleatoric_var.sqrt() / true_sigma(held_out)).median().item() / expected
    finding.check("median learned over true std (expected 1)", ratio, ">", 0.7)
    finding.check("median learned over true std (expected 1)", ratio, "<", 1.4)

    outside = svc.predict(torch.cat([torch.linspace(-3, -2, 50), torch.linspace(2, 3, 50)]).unsqueeze(1))
    finding.check(
        "epistemic variance, off the data over on it",
        (outside.epistemic_var.mean() / inside.epistemic_var.mean()).item(),
        ">",
        3.0,
    )


@pytest.mark.slow
@pytest.mark.finding
def test_ensemble_recovers_aleatoric_noise_and_its_spread_grows_off_data(finding):
    """The same behaviour with the second epistemic source: five heteroscedastic MLPs of
    different initialisations and data orders, scored as an ensemble by the service."""
    x, y = _data(torch.Generator().manual_seed(finding.seed(0)))
    members = []
    for k in range(5):
        torch.manual_seed(finding.seed(100 + k))  # each member its own initialisation ...
        order = torch.Generator().manual_seed(finding.seed(200 + k))  # ... and data order
        model = MLP(1, 1, hidden=(64, 64), task="regression", variant="aleatoric", dropout=0.0)
        _fit(model, x, y, gaussian_nll, 1500, order)
        members.append(model)

    svc = UncertaintyService(members, device="cpu", seed=0)
    assert svc.epistemic == "ensemble"
    held_out = torch.linspace(-0.95, 0.95, 200).unsqueeze(1)
    inside = svc.predict(held_out)
    rho = spearmanr(
        inside.aleatoric_var.sqrt().squeeze().numpy(), true_sigma(held_out).squeeze().numpy()
    ).correlation
    finding.check("ensemble: Spearman, learned aleatoric std vs true std", rho, ">", 0.8)
    ratio = (inside.aleatoric_var.sqrt() / true_sigma(held_out)).median().item()
    finding.check("ensemble: median learned over true std (expected 1)", ratio, ">", 0.7)
    finding.check("ensemble: median learned over true std (expected 1)", ratio, "<", 1.4)
    outside = svc.predict(torch.cat([torch.linspace(-3, -2, 50), torch.linspace(2, 3, 50)]).unsqueeze(1))
    finding.check(
        "ensemble: epistemic variance, off the data over on it",
        (outside.epistemic_var.mean() / inside.epistemic_var.mean()).item(),
        ">",
        3.0,
    )
