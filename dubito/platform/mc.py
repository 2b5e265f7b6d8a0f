"""The Monte Carlo dropout engine: T stochastic forward passes, replicated in the batch.

One engine serves acquisition, agents and experiments alike (docs/architecture.md, "Conventions").

How sampling works
------------------
* Every module is put in eval mode (BatchNorm uses and never updates its running
  statistics); only dropout modules become stochastic. Every module's original
  ``training`` flag is restored afterwards, also when the forward raises.
* Dropout masks are drawn by the engine, not by the global RNG: MC sample ``t`` owns a
  generator seeded from ``(seed, t)``. Sample ``t`` therefore sees the same masks
  whether it runs alone or replicated with others in a chunk, so the result does not
  depend on the chunk size, and the same ``seed`` gives the same samples on a device.
  On a CPU chunked and looped samples are usually bit-identical (on 2 threads here), but
  the kernels may depend on the batch size and thread count (with one thread a chunk of 6
  differed from looping by 4e-7); on CUDA they agree to float rounding (about 1e-4 for
  FC-DenseNet103 on an H200), since cuDNN picks its convolution kernels by batch size.
* Samples run as chunks: the batch is replicated ``k`` times (``k·N`` rows) per forward
  pass. ``chunk_size="auto"`` picks ``k`` per device and input size. On a CPU, small
  inputs (vectors, RL states: at most ``CPU_REPLICATION_ELEMENTS`` per batch) replicate
  all samples, since per-call overhead dominates them; for larger inputs ``k`` is found
  by measurement on the call's own samples: one untimed warm-up sample, then chunks of
  1, 2, 4, ... while the time per sample drops by at least 5 % (on 2 cores, FC-DenseNet56,
  4×96×128, replication is slower than looping, so this settles on 1). On CUDA the first
  sample is run alone to measure its peak memory and ``k`` is sized to half the free
  memory. The capacity found is cached per (model, device, input shape, output options)
  and capped by each call's T. On out-of-memory the chunk is halved and retried. Models
  with BatchNorm layers that normalise over the batch even in eval mode (no running
  statistics) always loop, since replicated samples would influence each other.
* Deterministic-prefix caching: a model with ``mc_stages()`` (FC-DenseNet) lists its
  forward as consecutive stages; the stages before the first one with an active dropout
  layer (p > 0) run once per call and only the rest is replicated per chunk. With dropout
  only before the 1×1 head (``FCDenseNet(dropout_at="head")``) T samples cost little
  more than one pass. The masks are the same, so the samples are too (to float rounding;
  bit-identical for the same chunk size on a CPU). A model whose class overrides the
  forward its stages describe, or with hooks on the model itself, runs whole.
* Image batches run in channels-last memory format by default (``channels_last``), which
  oneDNN and cuDNN convolutions prefer; the samples then agree with contiguous ones to
  float rounding (about 1e-6).
* Everything runs under :func:`torch.inference_mode`, optionally under autocast
  (bf16 on CUDA) and ``torch.compile`` (compiled once per model and process); stored
  samples are float32.
* Classification heads with a log-variance: each dropout sample also yields
  ``p_t = E_ε softmax(f_t + σ_t ε)`` estimated with ``logit_noise_samples`` draws of ε.

Dropout types with engine-drawn masks: ``nn.Dropout``, ``nn.Dropout1d/2d/3d``.
``nn.AlphaDropout`` and ``nn.FeatureAlphaDropout`` are switched to train mode and use
the global RNG (their samples are then not chunk-invariant).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

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
#: On a CPU, a larger chunk is kept only if it cuts the time per sample by at least this fraction.
CPU_REPLICATION_GAIN = 0.05
#: Fraction of free CUDA memory the replicated chunk may use.
CUDA_MEMORY_FRACTION = 0.5
#: Elements of the ε-noise block drawn at once for the expected softmax.
NOISE_BLOCK_ELEMENTS = 1 << 24

_chunk_cache: dict[tuple, int] = {}
_clock = time.perf_counter  # what chunk measurement times with


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
        """The keep mask (1.0 kept, 0.0 dropped; float32) of this chunk's samples for ``x``."""
        k = len(self.generators)
        keep = 1.0 - module.p
        if k == 0:  # used on its own (no engine-run chunk): torch's global RNG, like nn.Dropout
            blocks = [torch.rand(self._shape(module, x, x.shape[0]), device=x.device)]
        else:
            if x.shape[0] % k:
                raise DubitoError(
                    f"MC engine: a dropout input has batch {x.shape[0]}, not a multiple of the {k} "
                    "replicated samples; models must keep the batch axis first through dropout layers"
                )
            shape = self._shape(module, x, x.shape[0] // k)
            blocks = [torch.rand(shape, generator=g, device=x.device) for g in self.generators]
        mask = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        return mask.lt_(keep)  # in place: uniform -> 1.0 where kept, 0.0 where dropped

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
        mask, scale = source.mask(module, x), 1.0 / (1.0 - module.p)
        if mask.dtype != x.dtype:  # autocast: x · m, then the scale in x's dtype's arithmetic
            return (x * mask.to(x.dtype)).mul_(scale)
        mask.mul_(scale)  # x · (m · s) is x · s or 0, the same number as (x · m) · s
        if mask.shape == x.shape and x.is_contiguous():
            return mask.mul_(x)  # in the mask's own memory
        return x * mask  # keeps x's memory format (channels-last)

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
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules()
    )


class _ChunkPlan:
    """How many samples each forward pass replicates, and what ``"auto"`` learned about it.

    ``"auto"`` caches, per (model, device, input, output options), the *capacity*: the
    largest chunk that suits this device; each call caps it by its own T. On a CPU it is
    found by measurement (:meth:`timed`), on CUDA from the first sample's peak memory.
    """

    def __init__(
        self, model: nn.Module, x: Tensor, samples: int, chunk_size: int | str, options: tuple
    ) -> None:
        self.auto = chunk_size == "auto"
        self.probe = False
        self.measuring = False
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
        size = sum(
            p.numel() for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter)
        )
        self.key = (type(model).__qualname__, size, str(x.device), tuple(x.shape), x.dtype, options)
        if _mixes_batch(model):
            self.chunk = 1
        elif self.key in _chunk_cache:
            self.chunk = min(_chunk_cache[self.key], samples)
        elif x.device.type == "cuda":
            self.chunk, self.probe = 1, samples > 1
        elif x.numel() <= CPU_REPLICATION_ELEMENTS:
            # per-call overhead dominates small inputs: replicate up to the element budget
            self.remember(max(1, CPU_REPLICATION_ELEMENTS // max(1, x.numel())), samples)
        else:
            # measure: one untimed warm-up sample, then chunks of 1, 2, 4, ... while the time per
            # sample drops by at least CPU_REPLICATION_GAIN; each new size runs once untimed first
            # (new shapes pay one-time setup), and its second run is timed
            self.chunk, self.measuring, self.fresh, self.trial, self.best = 1, True, True, 1, None

    def next_chunk(self, remaining: int) -> int:
        return min(self.trial if self.measuring else self.chunk, remaining)

    def timed(self, k: int, seconds: float, remaining: int) -> None:
        """Record that a chunk of ``k`` samples took ``seconds`` (``remaining`` samples are left)."""
        if k < self.trial:  # the call's last, shorter chunk: not a measurement
            return
        if self.fresh:  # the first run of this size
            self.fresh = False
            if k > remaining:  # no room for its timed run: use the best size so far, decide later
                self.trial = self.best[1] if self.best else 1
                self.measuring = False
                self.chunk = self.trial
            return
        per_sample = seconds / k
        if self.best is not None and per_sample > self.best[0] * (1.0 - CPU_REPLICATION_GAIN):
            self._settle(self.best[1])  # a larger chunk does not pay: that is the answer, cached
            return
        self.best = (per_sample, k)
        self.trial, self.fresh = 2 * k, True
        if (
            2 * k > remaining
        ):  # no room to try a larger chunk: not cached, a call with more samples measures again
            self.measuring, self.chunk = False, k

    def _settle(self, capacity: int) -> None:
        self.measuring = False
        _chunk_cache[self.key] = capacity
        self.chunk = capacity

    def remember(self, capacity: int, samples: int) -> None:
        if self.auto:
            _chunk_cache[self.key] = capacity
        self.measuring = False
        self.chunk = min(capacity, samples)


def _out_of_memory(err: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU allocator's failure (a plain RuntimeError)."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def _nbytes(state: Any) -> int:
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    return sum(_nbytes(s) for s in state) if isinstance(state, tuple) else 0


def _replicate(state: Any, k: int) -> Any:
    """Each tensor of ``state`` (a tensor or nested tuples) stacked ``k`` times along the batch
    axis (sample-major rows, keeping the memory format)."""
    if isinstance(state, Tensor):
        return torch.cat([state] * k) if k > 1 else state
    if isinstance(state, tuple):
        return tuple(_replicate(s, k) for s in state)
    raise DubitoError(f"mc_stages state must be tensors or tuples of tensors, got {type(state).__name__}")


class _Forward:
    """The model's forward, split into a deterministic prefix (run once per call) and the
    stochastic rest (run per chunk of samples), optionally compiled."""

    def __init__(self, model: nn.Module, split: bool, compile: bool | str) -> None:
        stages = model.mc_stages() if split and _stages_are_forward(model) else None
        self.first = 0
        if stages:
            active = [any(m.p > 0 for module in mods for m in dropout_modules(module)) for mods, _ in stages]
            listed = {id(m) for mods, _ in stages for module in mods for m in dropout_modules(module)}
            if any(active) and all(id(m) in listed for m in dropout_modules(model) if m.p > 0):
                self.first = active.index(True)
        if self.first == 0:
            self.prefix, rest = (), [model]
        else:
            self.prefix, rest = [fn for _, fn in stages[: self.first]], [fn for _, fn in stages[self.first :]]

        def suffix(state):
            for fn in rest:
                state = fn(state)
            return state

        self.suffix = _compiled(model, self.first, suffix, compile) if compile else suffix

    def start(self, x: Tensor) -> Any:
        state = x
        for fn in self.prefix:
            state = fn(state)
        return state


def _stages_are_forward(model: nn.Module) -> bool:
    """Whether ``model.mc_stages()`` can stand for its forward: the class that defines the stages
    also defines the forward in use, and no hook on the model itself would be bypassed."""
    owner = next((c for c in type(model).__mro__ if "mc_stages" in c.__dict__), None)
    return (
        owner is not None
        and type(model).forward is owner.__dict__.get("forward")
        and not (model._forward_hooks or model._forward_pre_hooks)
    )


def _compiled(model: nn.Module, first: int, fn: Callable, backend: bool | str) -> Callable:
    """``torch.compile(fn)``, kept on the model (a plain attribute: it goes when the model goes)."""
    backend = "inductor" if backend is True else backend
    cache = model.__dict__.setdefault("_dubito_compiled", {})
    if (first, backend) not in cache:
        cache[first, backend] = torch.compile(fn, backend=backend)
    return cache[first, backend]


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
    channels_last: bool | str = "auto",
    prefix_cache: bool = True,
    compile: bool | str = False,
    temperature: float = 1.0,
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
        channels_last: run image batches (N, C, H, W) in channels-last memory format;
            ``"auto"`` does for 4-D inputs of models with ``nn.Conv2d`` layers (the model's
            weights are left as they are).
        prefix_cache: for models with ``mc_stages()`` (FC-DenseNet), run the stages before
            the first active dropout layer once and replicate only the rest.
        compile: run the (stochastic part of the) forward through ``torch.compile``, compiled
            once per model and process (the first call pays the compilation); ``True`` for
            the inductor backend, or a backend name.
        temperature: the class probabilities are those of logits / ``temperature`` (with a
            log-variance head, of noise σ / ``temperature`` too): post-hoc temperature scaling
            (:mod:`dubito.platform.calibration`). ``mean`` keeps the model's own logits.
    Returns:
        :class:`MCSamples` with a leading T axis. When dropout is off or the model has no
        dropout with p > 0, a single pass is made and T is 1.
    """
    _check_arguments(samples, compile, channels_last)
    _check_temperature(temperature)
    if seed is None:
        seed = int(torch.randint(0, 1 << 62, (1,)).item())
    samples, stochastic = _effective_samples(model, samples, stochastic)
    x = _memory_format(model, x, channels_last)
    forward = _Forward(model, prefix_cache and stochastic, compile)
    layout = x.dim() == 4 and not x.is_contiguous()
    plan = _ChunkPlan(
        model, x, samples, chunk_size, (probs, autocast, logit_noise_samples, forward.first, compile, layout)
    )
    outputs = _Outputs(samples)
    with torch.inference_mode(), mc_dropout_mode(model, stochastic) as source:
        with _autocast_context(x.device, autocast):
            state = forward.start(x)
        while outputs.filled < samples:
            t = outputs.filled
            k = plan.next_chunk(samples - t)
            source.generators = [
                torch.Generator(device=x.device).manual_seed(_sample_seed(seed, t + j)) for j in range(k)
            ]
            before = _start_probe(plan, x.device)
            started = _clock()
            try:
                chunk = _run_chunk(
                    forward, state, k, x, autocast, probs, logit_noise_samples, source.generators, temperature
                )
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if k == 1 or not _out_of_memory(err):
                    raise
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
                plan.remember(max(1, k // 2), samples)  # half the chunk, and try again
                continue
            if plan.probe:
                _end_probe(plan, x.device, before, state, samples)
            outputs.add(*chunk)
            if plan.measuring:
                plan.timed(k, _clock() - started, samples - outputs.filled)
    return outputs.result()


def _check_arguments(samples: int, compile: bool | str, channels_last: bool | str) -> None:
    if not isinstance(samples, int) or samples < 1:
        raise DubitoError(f"samples must be a positive integer, got {samples!r}")
    if not isinstance(compile, (bool, str)):
        raise DubitoError(f"compile must be True, False or a torch.compile backend name, got {compile!r}")
    if channels_last not in (True, False, "auto"):
        raise DubitoError(f"channels_last must be True, False or 'auto', got {channels_last!r}")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise DubitoError(f"temperature must be a positive number, got {temperature!r}")


def scaled_softmax(
    logits: Tensor,
    log_var: Tensor | None,
    noise_samples: int,
    generator: torch.Generator | None,
    temperature: float = 1.0,
) -> Tensor:
    """:func:`expected_softmax` of ``logits / temperature`` (noise σ / temperature)."""
    if temperature != 1.0:
        logits = logits.float() / temperature
        log_var = None if log_var is None else log_var.float() - 2.0 * math.log(temperature)
    return expected_softmax(logits, log_var, noise_samples, generator)


def _effective_samples(model: nn.Module, samples: int, stochastic: bool) -> tuple[int, bool]:
    """(T, stochastic) as run: one deterministic pass when dropout is off or the model has none
    (with a warning where samples were asked of a model without dropout)."""
    active = has_active_dropout(model)
    if stochastic and samples > 1 and not active:
        warnings.warn(
            f"{type(model).__name__} has no dropout module with p > 0, so its {samples} MC samples would be "
            "identical: one deterministic pass is made and epistemic terms are zero (functional dropout "
            "such as F.dropout is not sampled; use nn.Dropout modules)",
            stacklevel=3,
        )
    if not stochastic or not active:
        return 1, False
    return samples, stochastic


def _memory_format(model: nn.Module, x: Tensor, channels_last: bool | str) -> Tensor:
    """``x`` in channels-last memory format where asked (``"auto"``: image batches of conv models)."""
    if (
        x.dim() == 4
        and channels_last
        and (channels_last is True or any(isinstance(m, nn.Conv2d) for m in model.modules()))
    ):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _run_chunk(
    forward: _Forward,
    state: Any,
    k: int,
    x: Tensor,
    autocast: bool | torch.dtype | None,
    probs: bool,
    logit_noise_samples: int,
    generators: list[torch.Generator],
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``k`` samples in one pass of the replicated state: means and log-variances (k, N, ...), float32,
    and the class probabilities of each sample when asked."""
    with _autocast_context(x.device, autocast):
        mean, log_var = _split_output(forward.suffix(_replicate(state, k)))
    mean = mean.float()
    if log_var is not None:
        log_var = _broadcast_log_var(log_var.float(), mean).reshape(k, x.shape[0], *mean.shape[1:])
    mean = mean.reshape(k, x.shape[0], *mean.shape[1:])
    p = None
    if probs:
        p = torch.stack(
            [
                scaled_softmax(
                    mean[j], None if log_var is None else log_var[j], logit_noise_samples, g, temperature
                )
                for j, g in enumerate(generators)
            ]
        )
    return mean, log_var, p


def _start_probe(plan: _ChunkPlan, device: torch.device) -> int | None:
    """On a chunk that probes memory (CUDA): reset the peak counter; the bytes allocated before."""
    if not plan.probe:
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _end_probe(plan: _ChunkPlan, device: torch.device, before: int | None, state: Any, samples: int) -> None:
    """The chunk size that fits ``CUDA_MEMORY_FRACTION`` of the free memory, from one sample's peak."""
    # a replicated chunk also holds its copy of the cached prefix state
    per_sample = max(1, torch.cuda.max_memory_allocated(device) - (before or 0)) + _nbytes(state)
    free, _ = torch.cuda.mem_get_info(device)
    plan.remember(max(1, int(CUDA_MEMORY_FRACTION * free // per_sample)), samples)
    plan.probe = False


class _Outputs:
    """The T samples' outputs, filled chunk by chunk (allocated at the first chunk's shapes)."""

    def __init__(self, samples: int) -> None:
        self.samples, self.filled = samples, 0
        self.mean: Tensor | None = None
        self.log_var: Tensor | None = None
        self.probs: Tensor | None = None

    def add(self, mean: Tensor, log_var: Tensor | None, p: Tensor | None) -> None:
        if self.mean is None:
            with torch.inference_mode(False):  # ordinary tensors: callers may edit them in place
                self.mean = torch.empty((self.samples, *mean.shape[1:]), device=mean.device)
                self.log_var = None if log_var is None else torch.empty_like(self.mean)
                self.probs = (
                    None if p is None else torch.empty((self.samples, *p.shape[1:]), device=mean.device)
                )
        t, k = self.filled, mean.shape[0]
        self.mean[t : t + k] = mean
        if log_var is not None:
            self.log_var[t : t + k] = log_var
        if p is not None:
            self.probs[t : t + k] = p
        self.filled += k

    def result(self) -> MCSamples:
        return MCSamples(self.mean, self.log_var, self.probs)
