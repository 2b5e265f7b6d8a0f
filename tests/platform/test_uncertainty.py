"""Decomposition against numpy, and its identities under hypothesis-generated inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dubito import DubitoError
from dubito.platform.uncertainty import classification_uncertainty, regression_uncertainty

finite = st.floats(-30, 30, allow_nan=False, width=32)


@st.composite
def logit_samples(draw):
    T = draw(st.integers(1, 6))
    N = draw(st.integers(1, 3))
    C = draw(st.integers(2, 5))
    spatial = draw(st.sampled_from([(), (2,), (2, 3)]))
    return draw(arrays(np.float64, (T, N, C) + spatial, elements=finite))


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_entropy(p, axis):
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=axis)


@settings(max_examples=150, deadline=None)
@given(logit_samples())
def test_classification_identities_and_numpy(logits):
    probs = np_softmax(logits, axis=2)
    u = classification_uncertainty(torch.from_numpy(probs), torch.from_numpy(logits))
    pe, ae, mi = u.predictive_entropy.numpy(), u.aleatoric_entropy.numpy(), u.mutual_information.numpy()
    assert (mi >= 0).all()
    np.testing.assert_allclose(pe, ae + mi, atol=1e-9)
    np.testing.assert_allclose(pe, np_entropy(probs.mean(0), axis=1), atol=1e-9)
    np.testing.assert_allclose(ae, np_entropy(probs, axis=2).mean(0), atol=1e-9)
    assert (pe <= np.log(probs.shape[2]) + 1e-9).all()
    np.testing.assert_allclose(
        u.epistemic_logit_variance.numpy(), logits.var(axis=0).mean(axis=1), rtol=1e-9, atol=1e-9
    )
    # variation ratio: 1 − (count of the modal argmax)/T
    T = probs.shape[0]
    votes = probs.argmax(axis=2)
    counts = np.stack([(votes == c).sum(0) for c in range(probs.shape[2])], axis=1)
    np.testing.assert_allclose(u.variation_ratio.numpy(), 1 - counts.max(axis=1) / T)
    assert u.mean_probs.shape == probs.shape[1:]


def test_single_sample_has_no_epistemic_part():
    probs = torch.softmax(torch.randn(1, 4, 3, 5, 5), dim=2)
    u = classification_uncertainty(probs)
    assert torch.equal(u.mutual_information, torch.zeros(4, 5, 5))
    assert torch.equal(u.variation_ratio, torch.zeros(4, 5, 5))
    assert u.epistemic_logit_variance is None


def test_disagreeing_confident_samples_are_epistemic():
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (T=2, N=1, C=2)
    u = classification_uncertainty(probs)
    assert u.aleatoric_entropy.item() == 0.0
    assert u.mutual_information.item() == pytest.approx(np.log(2))
    assert u.variation_ratio.item() == 0.5


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 6),
    st.sampled_from([(3,), (2, 1, 3, 4), (2, 2)]),
    st.sampled_from(["gaussian", "laplace"]),
    st.data(),
)
def test_regression_identities_and_numpy(T, shape, likelihood, data):
    means = data.draw(arrays(np.float64, (T,) + shape, elements=st.floats(-1e3, 1e3)))
    log_noise = data.draw(arrays(np.float64, (T,) + shape, elements=st.floats(-8, 8)))
    u = regression_uncertainty(torch.from_numpy(means), torch.from_numpy(log_noise), likelihood)
    aleatoric = np.exp(log_noise) if likelihood == "gaussian" else 2 * np.exp(log_noise) ** 2
    np.testing.assert_allclose(u.mean.numpy(), means.mean(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(u.epistemic_var.numpy(), means.var(0), rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(u.aleatoric_var.numpy(), aleatoric.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        u.total_var.numpy(), u.aleatoric_var.numpy() + u.epistemic_var.numpy(), rtol=1e-12
    )
    assert (u.epistemic_var.numpy() >= 0).all()
    # The paper's form (docs/formulas.md): Var[y] = 1/T Σ ŷ² − (1/T Σ ŷ)² + 1/T Σ σ̂²
    paper = (means**2).mean(0) - means.mean(0) ** 2 + aleatoric.mean(0)
    np.testing.assert_allclose(u.total_var.numpy(), paper, rtol=1e-6, atol=1e-3)


def test_regression_without_noise_head_and_broadcast_noise():
    means = torch.randn(5, 2, 1, 3, 4)
    u = regression_uncertainty(means)
    assert torch.equal(u.aleatoric_var, torch.zeros(2, 1, 3, 4))
    shared = regression_uncertainty(means, torch.tensor(np.log(0.25)))  # homoscedastic scalar
    assert torch.allclose(shared.aleatoric_var, torch.full((2, 1, 3, 4), 0.25))
    laplace = regression_uncertainty(means, torch.tensor(np.log(0.5)), likelihood="laplace")
    assert torch.allclose(laplace.aleatoric_var, torch.full((2, 1, 3, 4), 2 * 0.25))


def test_per_item_reduction_respects_mask():
    probs = torch.softmax(torch.randn(4, 2, 3, 5, 6), dim=2)
    mask = torch.rand(2, 5, 6) > 0.5
    mask[1] = False  # an image with no valid pixel reduces to 0, not nan
    u = classification_uncertainty(probs)
    per = u.per_item(mask)
    assert "mean_probs" not in per
    for name, value in per.items():
        field = getattr(u, name).numpy()
        assert value.shape == (2,)
        assert value[0].item() == pytest.approx(field[0][mask[0].numpy()].mean(), rel=1e-6)
        assert value[1].item() == 0.0
    peak = u.per_item(mask, reduce="max")["predictive_entropy"]
    assert peak[0].item() == pytest.approx(u.predictive_entropy[0][mask[0]].max().item())
    depth = regression_uncertainty(torch.randn(3, 2, 1, 5, 6), torch.randn(3, 2, 1, 5, 6))
    d = depth.per_item(mask)
    assert d["total_var"][0].item() == pytest.approx(depth.total_var[0, 0][mask[0]].mean().item(), rel=1e-6)
    with pytest.raises(DubitoError, match="reduce"):
        u.per_item(reduce="median")


def test_bad_input_errors():
    with pytest.raises(DubitoError, match="prob_samples"):
        classification_uncertainty(torch.rand(3, 4))
    with pytest.raises(DubitoError, match="likelihood"):
        regression_uncertainty(torch.rand(3, 4), likelihood="cauchy")
    with pytest.raises(DubitoError, match="logit_samples"):
        classification_uncertainty(torch.rand(3, 4, 2), torch.rand(3, 4, 3))
    with pytest.raises(DubitoError, match="log_var_samples"):
        regression_uncertainty(torch.rand(3, 4), torch.rand(5))
    with pytest.raises(DubitoError, match="mask of shape"):
        classification_uncertainty(torch.rand(2, 3, 4, 5, 5)).per_item(torch.ones(3, 7, 7, dtype=torch.bool))


def test_aleatoric_variance_uses_the_losses_range():
    """A head output beyond the clamp means the same in the decomposition as in training."""
    from dubito.platform.losses import LOG_SCALE_MAX, LOG_VAR_MAX

    means = torch.zeros(2, 3)
    assert regression_uncertainty(means, torch.full((2, 3), 30.0)).aleatoric_var[0].item() == pytest.approx(
        np.exp(LOG_VAR_MAX), rel=1e-5
    )
    laplace = regression_uncertainty(means, torch.full((2, 3), 30.0), likelihood="laplace")
    assert laplace.aleatoric_var[0].item() == pytest.approx(2 * np.exp(2 * LOG_SCALE_MAX), rel=1e-5)
