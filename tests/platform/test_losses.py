"""Losses against independent numpy computations and the paper's stated behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dubito import DubitoError
from dubito.platform.losses import (
    LOG_VAR_MAX,
    LOG_VAR_MIN,
    LearnedLogVariance,
    gaussian_nll,
    laplace_nll,
    sampled_softmax_cross_entropy,
)
from dubito.platform.mc import expected_softmax

rng = np.random.default_rng(0)


def t(a):
    return torch.tensor(a, dtype=torch.float64)


def np_gaussian(mean, s, y, mask=None):
    per = 0.5 * np.exp(-s) * (y - mean) ** 2 + 0.5 * s
    per = np.broadcast_to(per, mean.shape)
    if mask is None:
        return per.mean()
    mask = np.broadcast_to(mask, per.shape)
    return per[mask].mean()


def np_laplace(mean, s, y, mask=None):
    per = np.broadcast_to(np.exp(-s) * np.abs(y - mean) + s, mean.shape)
    if mask is None:
        return per.mean()
    return per[np.broadcast_to(mask, per.shape)].mean()


def np_log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_sampled_ce(logits, s, target, noise, ignore_index=None, weight=None):
    """Straight transcription of the paper's form (docs/formulas.md): −[logsumexp_t(x̂_tc − logsumexp_c' x̂_tc') − log T]."""
    sigma = np.exp(0.5 * s)
    xhat = logits[None] + sigma[None] * noise  # (T, N, C, ...)
    logp = np_log_softmax(xhat, axis=2)
    T = noise.shape[0]
    valid = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    safe = np.where(valid, target, 0)
    picked = np.take_along_axis(logp, safe[None, :, None], axis=2)[:, :, 0]  # (T, N, ...)
    m = picked.max(0)
    lse = m + np.log(np.exp(picked - m).sum(0))
    per = -(lse - math.log(T))
    w = valid.astype(float) if weight is None else weight[safe] * valid
    return (per * w).sum() / w.sum()


@pytest.mark.parametrize("shape", [(7, 3), (2, 1, 5, 6)])
@pytest.mark.parametrize("noise_shape", ["full", "channel", "scalar"])
def test_gaussian_nll_matches_numpy(shape, noise_shape):
    mean, y = rng.normal(size=shape), rng.normal(size=shape)
    s = {
        "full": rng.normal(size=shape),
        "channel": rng.normal(size=(shape[1],) + (1,) * (len(shape) - 2)),
        "scalar": np.array(0.3),
    }[noise_shape]
    mask = rng.random(shape) > 0.3
    got = gaussian_nll(t(mean), t(s), t(y))
    assert got.item() == pytest.approx(np_gaussian(mean, s, y), rel=1e-10)
    got_masked = gaussian_nll(t(mean), t(s), t(y), mask=torch.tensor(mask))
    assert got_masked.item() == pytest.approx(np_gaussian(mean, s, y, mask), rel=1e-10)


@pytest.mark.parametrize("shape", [(7, 3), (2, 1, 5, 6)])
def test_laplace_nll_matches_numpy(shape):
    mean, y, s = rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape)
    mask = rng.random(shape) > 0.5
    assert laplace_nll(t(mean), t(s), t(y)).item() == pytest.approx(np_laplace(mean, s, y), rel=1e-10)
    assert laplace_nll(t(mean), t(s), t(y), torch.tensor(mask)).item() == pytest.approx(
        np_laplace(mean, s, y, mask), rel=1e-10
    )


def test_depth_target_without_channel_axis_and_mask():
    mean, s, y = rng.normal(size=(2, 1, 4, 5)), rng.normal(size=(2, 1, 4, 5)), rng.normal(size=(2, 4, 5))
    mask = rng.random((2, 4, 5)) > 0.4
    got = gaussian_nll(t(mean), t(s), t(y), torch.tensor(mask))
    assert got.item() == pytest.approx(np_gaussian(mean, s, y[:, None], mask[:, None]), rel=1e-10)


def test_per_pixel_mask_applies_to_every_channel_even_when_batch_equals_channels():
    """A (N, H, W) mask for a (N, C, H, W) prediction must not be aligned with the C axis."""
    n = c = 3
    mean, s, y = rng.normal(size=(n, c, 4, 5)), rng.normal(size=(n, c, 4, 5)), rng.normal(size=(n, c, 4, 5))
    mask = np.zeros((n, 4, 5), bool)
    mask[0] = True  # only image 0 counts
    got = gaussian_nll(t(mean), t(s), t(y), torch.tensor(mask))
    assert got.item() == pytest.approx(np_gaussian(mean[:1], s[:1], y[:1]), rel=1e-10)


def test_empty_mask_gives_zero_not_nan():
    x = torch.randn(3, 2, requires_grad=True)
    loss = gaussian_nll(x, torch.zeros(3, 2), torch.zeros(3, 2), mask=torch.zeros(3, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_sampled_softmax_ce_matches_numpy(spatial, shared):
    shape = (3, 4, 5, 6) if spatial else (9, 4)
    logits = rng.normal(size=shape) * 2
    s_shape = (shape[0], 1) + shape[2:] if shared else shape
    s = rng.normal(size=s_shape)
    target = rng.integers(0, 5, size=(shape[0],) + shape[2:])  # 4 = ignored below
    target[target == 4] = 255
    noise = rng.normal(size=(10,) + shape)
    weight = rng.random(4) + 0.1
    for ii, w in [(255, None), (255, weight)]:
        got = sampled_softmax_cross_entropy(
            t(logits),
            t(s),
            torch.tensor(target),
            ignore_index=ii,
            weight=None if w is None else t(w),
            noise=t(noise),
        )
        assert got.item() == pytest.approx(np_sampled_ce(logits, s, target, noise, ii, w), rel=1e-9)


def test_sampled_softmax_ce_tends_to_cross_entropy_as_sigma_vanishes():
    logits = torch.randn(4, 11, 6, 7, dtype=torch.float64) * 3
    target = torch.randint(0, 12, (4, 6, 7))  # 11 = void
    weight = torch.rand(11, dtype=torch.float64) + 0.1
    ce = F.cross_entropy(logits, target, weight=weight, ignore_index=11)
    tiny = torch.full((4, 11, 6, 7), LOG_VAR_MIN, dtype=torch.float64)  # σ = e^-10
    got = sampled_softmax_cross_entropy(logits, tiny, target, samples=20, ignore_index=11, weight=weight)
    assert got.item() == pytest.approx(ce.item(), abs=1e-3)
    # a log-variance below the documented range means the same as the bound itself
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    at_bound = sampled_softmax_cross_entropy(
        logits, tiny, target, samples=20, ignore_index=11, weight=weight, generator=g1
    )
    below = sampled_softmax_cross_entropy(
        logits, tiny - 50, target, samples=20, ignore_index=11, weight=weight, generator=g2
    )
    assert below.item() == at_bound.item()


def test_learned_attenuation_confident_wrong_prediction():
    """The talk's point: a wrong, confident prediction costs less when σ is larger."""
    logits = torch.tensor([[0.0, 5.0]])
    target = torch.tensor([0])
    ce = F.cross_entropy(logits, target).item()
    g = torch.Generator().manual_seed(0)
    losses = [
        sampled_softmax_cross_entropy(
            logits, torch.tensor([[math.log(v), math.log(v)]]), target, samples=4000, generator=g
        ).item()
        for v in (0.01, 1.0, 9.0)
    ]
    assert losses[0] == pytest.approx(ce, rel=0.01)
    assert losses[2] < losses[1] < ce
    # and for a correct confident prediction, large σ costs more (no free lunch)
    right = torch.tensor([1])
    base = F.cross_entropy(logits, right).item()
    noisy = sampled_softmax_cross_entropy(
        logits, torch.full((1, 2), math.log(9.0)), right, samples=4000, generator=g
    ).item()
    assert noisy > base


def test_talk_example_expected_softmax():
    """Logits (1, 2): softmax (27%, 73%); with noise variance 0.5 the expectation is about (30%, 70%)."""
    logits = torch.tensor([[1.0, 2.0]])
    plain = expected_softmax(logits, None, 0)
    assert plain[0, 0].item() == pytest.approx(0.269, abs=1e-3)
    g = torch.Generator().manual_seed(1)
    noisy = expected_softmax(logits, torch.full((1, 2), math.log(0.5)), 200_000, g)
    assert noisy[0, 0].item() == pytest.approx(0.30, abs=0.01)
    assert noisy.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_extreme_inputs_stay_finite_and_gradients_reach_log_var():
    mean = torch.tensor([0.0, 1e6, -1e6, 3.0], requires_grad=True)
    target = torch.tensor([1e6, -1e6, 0.0, 3.0])
    for log_noise_fn in (gaussian_nll, laplace_nll):
        s = torch.tensor([-1e4, 1e4, 50.0, 1e4], requires_grad=True)
        loss = log_noise_fn(mean, s, target)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(s.grad).all() and torch.isfinite(mean.grad).all()
        # clamped entries get a gradient only when it pulls them back into range
        assert s.grad[0] < 0  # far below the range with a huge residual: the loss wants s larger
        assert s.grad[3] > 0  # far above the range with no residual: the loss wants s smaller
        assert s.grad[1] == 0 and s.grad[2] == 0  # above the range, wanting larger: never pushed further out
        mean.grad = None
    logits = torch.tensor([[1e4, -1e4]], requires_grad=True)
    s = torch.tensor([[1e4, -1e4]], requires_grad=True)
    loss = sampled_softmax_cross_entropy(logits, s, torch.tensor([1]), samples=16)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and torch.isfinite(s.grad).all()


def test_gradient_of_log_var_matches_closed_form():
    """∂/∂s [½ e^{-s} r² + ½ s] = ½ (1 − e^{-s} r²), averaged over D elements."""
    r = torch.tensor([0.5, 2.0, 0.0])
    s = torch.tensor([0.1, -0.3, 1.0], requires_grad=True)
    gaussian_nll(torch.zeros(3), s, r).backward()
    expected = 0.5 * (1 - torch.exp(-s.detach()) * r**2) / 3
    assert torch.allclose(s.grad, expected, atol=1e-7)
    assert LOG_VAR_MIN < s.detach().min() and s.detach().max() < LOG_VAR_MAX


def test_homoscedastic_parameter_reaches_closed_form_optimum():
    """With a fixed mean, the optimal shared log σ² per channel is log(mean squared residual)."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(256, 2, 4, 4, generator=g) * torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)
    mean = torch.zeros_like(target)
    noise = LearnedLogVariance(channels=2)
    opt = torch.optim.Adam(noise.parameters(), lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        gaussian_nll(mean, noise(mean), target).backward()
        opt.step()
    optimum = np.log((target.numpy() ** 2).mean(axis=(0, 2, 3)))
    assert np.allclose(noise.log_var.detach().numpy(), optimum, atol=0.02)
    shared = LearnedLogVariance()
    assert shared(mean).shape == mean.shape and shared.log_var.shape == ()


def test_bad_shapes_name_the_function_and_argument():
    with pytest.raises(DubitoError, match="gaussian_nll: target"):
        gaussian_nll(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(DubitoError, match="laplace_nll: log_scale"):
        laplace_nll(torch.zeros(2, 3), torch.zeros(4), torch.zeros(2, 3))
    with pytest.raises(DubitoError, match="mask"):
        gaussian_nll(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(5, dtype=torch.bool)
        )
    with pytest.raises(DubitoError, match="outside 0..2"):
        sampled_softmax_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 7]))
    with pytest.raises(DubitoError, match="weight"):
        sampled_softmax_cross_entropy(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), weight=torch.ones(4)
        )
    with pytest.raises(DubitoError, match="integer"):
        sampled_softmax_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
