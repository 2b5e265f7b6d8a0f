"""The paper's losses (Kendall & Gal 2017; docs/formulas.md, "Losses"), as pure tensor functions.

All losses take the network's *log* noise parameter and are averaged over the valid
elements (``mask`` true / target not ``ignore_index``). No ``log 2π`` constant is added.

Numerical range: log-variances are clamped to ``[LOG_VAR_MIN, LOG_VAR_MAX]`` = [-20, 20]
(σ² from 2e-9 to 4.9e8) and Laplace log-scales to ``[LOG_SCALE_MIN, LOG_SCALE_MAX]`` =
[-10, 10] (the same range for the variance 2b²); the decomposition applies the same
range. The clamp lets gradients through towards the range: a head that drifts outside
is pulled back instead of being stuck with a zero gradient, and is never pushed further
out. Inside the range the losses are exactly the paper's forms.

Homoscedastic models use the same losses with a learned parameter in place of a
per-pixel prediction: see :class:`LearnedLogVariance`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dubito import DubitoError

LOG_VAR_MIN = -20.0
LOG_VAR_MAX = 20.0
LOG_SCALE_MIN = LOG_VAR_MIN / 2
LOG_SCALE_MAX = LOG_VAR_MAX / 2

__all__ = [
    "LOG_VAR_MIN",
    "LOG_VAR_MAX",
    "LOG_SCALE_MIN",
    "LOG_SCALE_MAX",
    "clamp_pull_back",
    "gaussian_nll",
    "laplace_nll",
    "sampled_softmax_cross_entropy",
    "LearnedLogVariance",
]


class _PullBackClamp(torch.autograd.Function):
    """Clamp whose gradient passes inside the range, and outside it only towards the range."""

    @staticmethod
    def forward(ctx, x: Tensor, low: float, high: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.low, ctx.high = low, high
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        # gradient descent moves x by −grad: keep the gradient where that leads back into range
        keep = (
            ((x >= ctx.low) & (x <= ctx.high)) | ((x > ctx.high) & (grad > 0)) | ((x < ctx.low) & (grad < 0))
        )
        return torch.where(keep, grad, torch.zeros_like(grad)), None, None


def clamp_pull_back(x: Tensor, low: float, high: float) -> Tensor:
    """``x`` clamped to ``[low, high]`` in value.

    Inside the range the gradient is the identity. Outside it, the gradient is passed
    only when a descent step would move ``x`` back towards the range, so a head that
    left the range is pulled back and is never pushed further out.
    """
    return _PullBackClamp.apply(x, low, high)


def _match_target(pred: Tensor, target: Tensor, name: str) -> Tensor:
    """Accept a target of the prediction's shape, or (N, ...) for a (N, 1, ...) prediction."""
    if target.shape == pred.shape:
        return target
    if pred.dim() >= 2 and pred.shape[1] == 1 and target.shape == pred.shape[:1] + pred.shape[2:]:
        return target.unsqueeze(1)
    raise DubitoError(
        f"{name}: target has shape {tuple(target.shape)} but the prediction has shape "
        f"{tuple(pred.shape)}; they must match (or be (N, ...) for a (N, 1, ...) prediction)"
    )


def _masked_mean(per_element: Tensor, mask: Tensor | None, name: str) -> Tensor:
    """Mean of ``per_element`` over the elements where ``mask`` is true (0 if there are none)."""
    if mask is None:
        return per_element.mean()
    if per_element.dim() >= 2 and mask.shape == per_element.shape[:1] + per_element.shape[2:]:
        mask = mask.unsqueeze(1)  # a per-pixel (N, H, W) mask applies to every channel
    try:
        mask = torch.broadcast_to(mask.to(torch.bool), per_element.shape)
    except RuntimeError as err:
        raise DubitoError(
            f"{name}: mask of shape {tuple(mask.shape)} does not broadcast to the "
            f"loss shape {tuple(per_element.shape)}"
        ) from err
    valid = mask.sum()
    total = torch.where(mask, per_element, torch.zeros_like(per_element)).sum()
    return total / valid.clamp_min(1).to(per_element.dtype)


def _broadcast_noise(noise_param: Tensor, pred: Tensor, name: str, arg: str) -> Tensor:
    try:
        ok = torch.broadcast_shapes(noise_param.shape, pred.shape) == pred.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise DubitoError(
            f"{name}: {arg} of shape {tuple(noise_param.shape)} does not broadcast to the "
            f"prediction shape {tuple(pred.shape)}"
        )
    return noise_param


def gaussian_nll(mean: Tensor, log_var: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Heteroscedastic (or homoscedastic) Gaussian loss, the paper's form.

    ``L = 1/D Σ_i [½ exp(−s_i) (y_i − ŷ_i)² + ½ s_i]`` with ``s = log σ²``.

    Args:
        mean: predictions ŷ, (N, K, ...) or any shape.
        log_var: s, broadcastable to ``mean`` (per element, per channel ``(K, 1, 1)``, or scalar).
        target: y, the shape of ``mean`` (or (N, ...) for a (N, 1, ...) ``mean``).
        mask: valid elements (true = counts), broadcastable to ``mean``.
    Returns:
        scalar loss averaged over valid elements.
    """
    target = _match_target(mean, target, "gaussian_nll")
    s = clamp_pull_back(_broadcast_noise(log_var, mean, "gaussian_nll", "log_var"), LOG_VAR_MIN, LOG_VAR_MAX)
    residual = target - mean
    per_element = 0.5 * torch.exp(-s) * residual.square() + 0.5 * s
    return _masked_mean(per_element.expand_as(mean), mask, "gaussian_nll")


def laplace_nll(mean: Tensor, log_scale: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Laplace loss (the paper's L1 form for depth), with ``s = log b``.

    ``L = 1/D Σ_i [exp(−s_i) |y_i − ŷ_i| + s_i]``; the noise variance is ``2 b²``.
    Shapes as in :func:`gaussian_nll`.
    """
    target = _match_target(mean, target, "laplace_nll")
    s = clamp_pull_back(
        _broadcast_noise(log_scale, mean, "laplace_nll", "log_scale"), LOG_SCALE_MIN, LOG_SCALE_MAX
    )
    per_element = torch.exp(-s) * (target - mean).abs() + s
    return _masked_mean(per_element.expand_as(mean), mask, "laplace_nll")


def sampled_softmax_cross_entropy(
    logits: Tensor,
    log_var: Tensor,
    target: Tensor,
    samples: int = 50,
    ignore_index: int | None = None,
    weight: Tensor | None = None,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Classification with learned logit noise (Monte Carlo integration over ε).

    ``x̂_t = f + σ ε_t``, ``ε_t ~ N(0, I)``, ``σ = exp(½ s)``;
    per element ``l_i = −[logsumexp_t (x̂_{i,t,c_i} − logsumexp_c' x̂_{i,t,c'}) − log T_a]``.

    Args:
        logits: f, (N, C) or (N, C, H, W) (any trailing dims).
        log_var: s = log σ², broadcastable to ``logits``: per class (N, C, ...), shared
            (N, 1, ...), per channel (C, 1, 1) or scalar (homoscedastic).
        target: class indices, (N,) or (N, H, W), long.
        samples: T_a, the number of ε samples (ignored when ``noise`` is given).
        ignore_index: target value whose elements do not count (e.g. CamVid's void = 11).
        weight: per-class weights (C,); the result is then Σ w_{c_i} l_i / Σ w_{c_i}
            over valid elements, as :func:`torch.nn.functional.cross_entropy` does.
        noise: optional ε of shape (T_a, *logits.shape), for exact reproduction.
        generator: random generator for ε when ``noise`` is not given.
    Returns:
        scalar loss.
    """
    name = "sampled_softmax_cross_entropy"
    if logits.dim() < 2:
        raise DubitoError(f"{name}: logits must be (N, C, ...), got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise DubitoError(
            f"{name}: target shape {tuple(target.shape)} does not match logits "
            f"{tuple(logits.shape)} (expected {tuple(logits.shape[:1] + logits.shape[2:])})"
        )
    if target.is_floating_point():
        raise DubitoError(f"{name}: target must hold integer class indices, got dtype {target.dtype}")
    s = clamp_pull_back(_broadcast_noise(log_var, logits, name, "log_var"), LOG_VAR_MIN, LOG_VAR_MAX)
    sigma = torch.exp(0.5 * s)
    if noise is None:
        if samples < 1:
            raise DubitoError(f"{name}: samples must be >= 1, got {samples}")
        noise = torch.randn(
            (samples, *logits.shape), generator=generator, device=logits.device, dtype=logits.dtype
        )
    elif noise.shape[1:] != logits.shape:
        raise DubitoError(f"{name}: noise must have shape (T_a, *logits.shape), got {tuple(noise.shape)}")
    t_a = noise.shape[0]

    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    if bool(((safe_target < 0) | (safe_target >= num_classes)).any()):
        bad = safe_target[(safe_target < 0) | (safe_target >= num_classes)][0].item()
        raise DubitoError(
            f"{name}: target holds class {bad}, outside 0..{num_classes - 1} (and not ignore_index)"
        )

    corrupted = logits.unsqueeze(0) + sigma.unsqueeze(0) * noise  # (T_a, N, C, ...)
    log_probs = torch.log_softmax(corrupted, dim=2)
    index = (
        safe_target.unsqueeze(0).unsqueeze(2).expand(t_a, *safe_target.shape[:1], 1, *safe_target.shape[1:])
    )
    true_log_probs = log_probs.gather(2, index).squeeze(2)  # (T_a, N, ...)
    per_element = -(torch.logsumexp(true_log_probs, dim=0) - math.log(t_a))

    if weight is None:
        w = valid.to(per_element.dtype)
    else:
        if weight.shape != (num_classes,):
            raise DubitoError(f"{name}: weight must have shape ({num_classes},), got {tuple(weight.shape)}")
        w = weight.to(per_element.dtype)[safe_target] * valid
    return (per_element * w).sum() / w.sum().clamp_min(torch.finfo(per_element.dtype).tiny)


class LearnedLogVariance(nn.Module):
    """A homoscedastic noise parameter: one learned ``log σ²`` (or ``log b``) per task or channel.

    ``forward(pred)`` returns the parameter broadcast (as a view, no copy) to ``pred``'s
    shape, so a homoscedastic model still returns ``(mean_or_logits, log_var)`` and every
    loss and decomposition applies unchanged.

    Args:
        channels: ``None`` or 1 for one shared scalar, else one value per output channel
            (dimension 1 of the prediction).
        init: initial value of the parameter.
    """

    def __init__(self, channels: int | None = None, init: float = 0.0) -> None:
        super().__init__()
        shape = () if channels in (None, 1) else (channels,)
        self.channels = channels
        self.log_var = nn.Parameter(torch.full(shape, float(init)))

    def forward(self, pred: Tensor) -> Tensor:
        value = self.log_var
        if value.dim() == 1:
            if pred.dim() < 2 or pred.shape[1] != value.shape[0]:
                raise DubitoError(
                    f"LearnedLogVariance: {value.shape[0]} channels but the prediction has shape {tuple(pred.shape)}"
                )
            value = value.view(1, -1, *([1] * (pred.dim() - 2)))
        return value.to(pred.dtype).expand_as(pred)
