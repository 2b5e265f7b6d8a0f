"""The Monte Carlo dropout engine: T stochastic forward passes, replicated in the batch.

One engine serves acquisition, agents and experiments alike (DESIGN.md).

How sampling works
------------------
* Every module is put in eval mode (BatchNorm uses and never updates its running
  statistics); only dropout modules become stochastic. Every module's original
  ``training`` flag is restored afterwards, also when the forward raises.
* Dropout masks are drawn by the engine, not by the global RNG: MC sample ``t`` owns a
  generator seeded from ``(seed, t)``. Sample ``t`` therefore sees the same masks
  whether it runs alone or replicated with others in a chunk, so the result does not
  depend on the chunk size, and the same ``seed`` gives the same samples on a device.
  On a CPU chunked and looped samples are bit-identical; on CUDA they agree to float
  rounding (about 1e-4 for FC-DenseNet103 on an H200), since cuDNN picks its
  convolution kernels by batch size.
* Samples run as chunks: the batch is replicated ``k`` times (``k·N`` rows) per forward
  pass. ``chunk_size="auto"`` picks ``k`` per device and input size: on a CPU, large
  inputs loop (``k = 1``; measured on 2 cores, FC-DenseNet56, 4×96×128, T = 20:
  replicating all samples ran 1.8× slower than looping) while small inputs (vectors,
  RL states) replicate, where per-call overhead dominates; on CUDA the first sample is
  run alone to measure its peak memory and ``k`` is sized to half the free memory.
  The device's capacity is cached per (model, device, input shape, output options) and
  capped by each call's T. On out-of-memory the chunk is halved and retried. Models with
  BatchNorm layers that normalise over the batch even in eval mode (no running
  statistics) always loop, since replicated samples would influence each other.
* Everything runs under :func:`torch.inference_mode`, optionally under autocast
  (bf16 on CUDA); stored samples are float32.
* Classification heads with a log-variance: each dropout sample also yields
  ``p_t = E_ε softmax(f_t + σ_t ε)`` estimated with ``logit_noise_samples`` draws of ε.

Dropout types with engine-drawn masks: ``nn.Dropout``, ``nn.Dropout1d/2d/3d``.
``nn.AlphaDropout`` and ``nn.FeatureAlphaDropout`` are switched to train mode and use
the global RNG (their samples are then not chunk-invariant).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dubito import DubitoError
from dubito.platform.losses import LOG_VAR_MAX, LOG_VAR_MIN

__all__ = [
    "MCSamples",
    "mc_samples",
    "dropout_modules",
    "has_active_dropout",
    "mc_dropout_mode",
    "expected_softmax",
    "CPU_REPLICATION_ELEMENTS",
]

_MASKED_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_NATIVE_DROPOUT = (nn.AlphaDropout, nn.FeatureAlphaDropout)
_CHANNEL_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)

#: On a CPU, replicate the batch when one sample's input has at most this many elements.
CPU_REPLICATION_ELEMENTS = 1 << 15
#: Fraction of free CUDA memory the replicated chunk may use.
CUDA_MEMORY_FRACTION = 0.5
#: Elements of the ε-noise block drawn at once for the expected softmax.
NOISE_BLOCK_ELEMENTS = 1 << 24

_chunk_cache: dict[tuple, int] = {}


class MCSamples(NamedTuple):
    """Stacked Monte Carlo outputs, each with a leading T axis.

    ``mean``: (T, N, ...) the model's first output (mean or logits).
    ``log_var``: (T, N, ...) its log-noise output, or ``None`` for a plain-tensor model.
    ``probs``: (T, N, C, ...) class probabilities p_t, when requested.
    """

    mean: Tensor
    log_var: Tensor | None
    probs: Tensor | None


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The model's dropout modules (the stochastic parts of an MC-dropout model)."""
    return [m for m in model.modules() if isinstance(m, _MASKED_DROPOUT + _NATIVE_DROPOUT)]


def has_active_dropout(model: nn.Module) -> bool:
    """Whether any dropout module has p > 0."""
    return any(m.p > 0 for m in dropout_modules(model))


class _MaskSource:
    """The per-sample generators of the chunk being run."""

    def __init__(self) -> None:
        self.generators: list[torch.Generator] = []

    def mask(self, module: nn.Module, x: Tensor) -> Tensor:
        k = len(self.generators)
        if k == 0:  # used on its own (no engine-run chunk): torch's global RNG, like nn.Dropout
            return torch.rand(self._shape(module, x, x.shape[0]), device=x.device) < 1.0 - module.p
        if x.shape[0] % k:
            raise DubitoError(
                f"MC engine: a dropout input has batch {x.shape[0]}, not a multiple of the {k} "
                "replicated samples; models must keep the batch axis first through dropout layers"
            )
        shape = self._shape(module, x, x.shape[0] // k)
        keep = 1.0 - module.p
        blocks = [torch.rand(shape, generator=g, device=x.device) < keep for g in self.generators]
        return torch.cat(blocks) if k > 1 else blocks[0]

    @staticmethod
    def _shape(module: nn.Module, x: Tensor, n: int) -> tuple[int, ...]:
        if isinstance(module, _CHANNEL_DROPOUT):
            return (n, x.shape[1]) + (1,) * (x.dim() - 2)
        return (n,) + tuple(x.shape[1:])


@contextlib.contextmanager
def mc_dropout_mode(model: nn.Module, stochastic: bool = True) -> Iterator[_MaskSource]:
    """Eval mode everywhere, dropout stochastic (engine masks) unless ``stochastic`` is false;
    every module's ``training`` flag is restored on exit, also on error."""
    source = _MaskSource()
    flags = [(m, m.training) for m in model.modules()]
    handles = []

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if module.p == 0:
            return output
        x = inputs[0]
        if module.p >= 1:
            return torch.zeros_like(x)
        return x * source.mask(module, x).to(x.dtype) * (1.0 / (1.0 - module.p))

    try:
        model.eval()
        for m in model.modules() if stochastic else ():
            if isinstance(m, _MASKED_DROPOUT):
                handles.append(m.register_forward_hook(hook))
            elif isinstance(m, _NATIVE_DROPOUT):
                m.train()
        yield source
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag


def expected_softmax(
    logits: Tensor, log_var: Tensor | None, noise_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """``E_ε softmax(f + σ ε)`` over the class axis 1, estimated with ``noise_samples`` draws.

    ``log_var`` (log σ², clamped to the losses' range) broadcasts to ``logits`` (N, C, ...).
    With ``log_var=None`` or ``noise_samples=0`` this is the plain softmax.
    """
    logits = logits.float()
    if log_var is None or noise_samples == 0:
        return torch.softmax(logits, dim=1)
    sigma = torch.exp(0.5 * log_var.float().clamp(LOG_VAR_MIN, LOG_VAR_MAX))
    total = torch.zeros_like(logits)
    block = max(1, NOISE_BLOCK_ELEMENTS // max(1, logits.numel()))
    done = 0
    while done < noise_samples:
        b = min(block, noise_samples - done)
        eps = torch.randn((b, *logits.shape), generator=generator, device=logits.device)
        total += torch.softmax(logits + sigma * eps, dim=2).sum(0)
        done += b
    return total / noise_samples


def _sample_seed(seed: int, t: int) -> int:
    return (seed * 1_000_003 + t * 7_919 + 12_345) % (1 << 63)


def _split_output(output, name: str = "model") -> tuple[Tensor, Tensor | None]:
    if isinstance(output, Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and len(output) == 2 and all(isinstance(o, Tensor) for o in output):
        return output[0], output[1]
    raise DubitoError(
        f"{name} forward must return a tensor or a pair (mean_or_logits, log_var) of tensors, "
        f"got {type(output).__name__}"
    )


def _broadcast_log_var(log_var: Tensor, mean: Tensor) -> Tensor:
    try:
        return torch.broadcast_to(log_var, mean.shape)
    except RuntimeError as err:
        raise DubitoError(
            f"model returned log_var of shape {tuple(log_var.shape)}, which does not broadcast to its "
            f"mean/logits of shape {tuple(mean.shape)}"
        ) from err


def _autocast_context(device: torch.device, autocast: bool | torch.dtype | None):
    if not autocast:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if autocast is True else autocast
    return torch.autocast(device_type=device.type, dtype=dtype)


def _mixes_batch(model: nn.Module) -> bool:
    """Whether some layer normalises with batch statistics even in eval mode (replicated samples would mix)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules())


class _ChunkPlan:
    """How many samples each forward pass replicates, and what ``"auto"`` learned about it.

    ``"auto"`` caches, per (model, device, input, output options), the *capacity*: the
    largest chunk that suits this device; each call caps it by its own T.
    """

    def __init__(self, model: nn.Module, x: Tensor, samples: int, chunk_size: int | str, options: tuple) -> None:
        self.auto = chunk_size == "auto"
        self.probe = False
        if not self.auto:
            if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
                raise DubitoError(f"chunk_size must be a positive integer or 'auto', got {chunk_size!r}")
            if chunk_size > 1 and _mixes_batch(model):
                warnings.warn(
                    "a BatchNorm layer without running statistics normalises over the batch, so replicated "
                    "MC samples influence each other; use chunk_size=1 or 'auto' for independent samples",
                    stacklevel=3,
                )
            self.chunk = min(chunk_size, samples)
            return
        size = sum(p.numel() for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter))
        self.key = (type(model).__qualname__, size, str(x.device), tuple(x.shape), x.dtype, options)
        if _mixes_batch(model):
            self.chunk = 1
        elif self.key in _chunk_cache:
            self.chunk = min(_chunk_cache[self.key], samples)
        elif x.device.type == "cuda":
            self.chunk, self.probe = 1, samples > 1
        else:
            self.remember(max(1, CPU_REPLICATION_ELEMENTS // max(1, x.numel())), samples)

    def remember(self, capacity: int, samples: int) -> None:
        if self.auto:
            _chunk_cache[self.key] = capacity
        self.chunk = min(capacity, samples)


def mc_samples(
    model: nn.Module,
    x: Tensor,
    samples: int = 50,
    *,
    chunk_size: int | str = "auto",
    autocast: bool | torch.dtype | None = None,
    probs: bool = False,
    logit_noise_samples: int = 16,
    seed: int | None = None,
    stochastic: bool = True,
) -> MCSamples:
    """Run ``samples`` MC-dropout forward passes of ``model`` on the batch ``x``.

    Args:
        model: any module whose forward returns a tensor or ``(mean_or_logits, log_var)``.
        x: input batch (N, ...), on the model's device.
        samples: T, the number of dropout samples.
        chunk_size: samples per forward pass (the batch replicated), or ``"auto"``.
        autocast: ``True`` for bf16 autocast, or a dtype; ``None``/``False`` for full precision.
        probs: also return class probabilities p_t (softmax over axis 1 of each sample;
            with a log-variance head, the expectation over ``logit_noise_samples`` ε).
        logit_noise_samples: T_a, ε draws per dropout sample (0 = plain softmax).
        seed: base seed of the dropout masks and ε; ``None`` draws one from torch's global RNG.
        stochastic: ``False`` for one deterministic pass (dropout off).
    Returns:
        :class:`MCSamples` with a leading T axis. When dropout is off or the model has no
        dropout with p > 0, a single pass is made and T is 1.
    """
    if not isinstance(samples, int) or samples < 1:
        raise DubitoError(f"samples must be a positive integer, got {samples!r}")
    if seed is None:
        seed = int(torch.randint(0, 1 << 62, (1,)).item())
    active = has_active_dropout(model)
    if stochastic and samples > 1 and not active:
        warnings.warn(
            f"{type(model).__name__} has no dropout module with p > 0, so its {samples} MC samples would be "
            "identical: one deterministic pass is made and epistemic terms are zero (functional dropout "
            "such as F.dropout is not sampled; use nn.Dropout modules)",
            stacklevel=2,
        )
    if not stochastic or not active:
        samples = 1
        stochastic = False
    plan = _ChunkPlan(model, x, samples, chunk_size, (probs, autocast, logit_noise_samples))

    out_mean = out_log_var = out_probs = None
    t = 0
    with torch.inference_mode(), mc_dropout_mode(model, stochastic) as source:
        while t < samples:
            k = min(plan.chunk, samples - t)
            source.generators = [
                torch.Generator(device=x.device).manual_seed(_sample_seed(seed, t + j)) for j in range(k)
            ]
            if plan.probe:
                torch.cuda.synchronize(x.device)
                torch.cuda.reset_peak_memory_stats(x.device)
                before = torch.cuda.memory_allocated(x.device)
            try:
                xr = x.repeat(k, *([1] * (x.dim() - 1))) if k > 1 else x
                with _autocast_context(x.device, autocast):
                    mean, log_var = _split_output(model(xr))
                mean = mean.float()
                if log_var is not None:
                    log_var = _broadcast_log_var(log_var.float(), mean).reshape(k, x.shape[0], *mean.shape[1:])
                mean = mean.reshape(k, x.shape[0], *mean.shape[1:])
                p = None
                if probs:
                    p = torch.stack(
                        [
                            expected_softmax(mean[j], None if log_var is None else log_var[j], logit_noise_samples, g)
                            for j, g in enumerate(source.generators)
                        ]
                    )
            except torch.OutOfMemoryError:
                if k == 1:
                    raise
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
                plan.remember(max(1, k // 2), samples)
                continue
            if plan.probe:
                per_sample = max(1, torch.cuda.max_memory_allocated(x.device) - before)
                free, _ = torch.cuda.mem_get_info(x.device)
                plan.remember(max(1, int(CUDA_MEMORY_FRACTION * free // per_sample)), samples)
                plan.probe = False
            if out_mean is None:
                with torch.inference_mode(False):  # ordinary tensors: callers may edit them in place
                    out_mean = torch.empty((samples, *mean.shape[1:]), device=x.device)
                    out_log_var = None if log_var is None else torch.empty_like(out_mean)
                    out_probs = None if p is None else torch.empty((samples, *p.shape[1:]), device=x.device)
            out_mean[t : t + k] = mean
            if log_var is not None:
                out_log_var[t : t + k] = log_var
            if p is not None:
                out_probs[t : t + k] = p
            t += k
    return MCSamples(out_mean, out_log_var, out_probs)
