"""Deep ensembles as an epistemic source beside MC dropout (Lakshminarayanan et al., 2017).

An :class:`Ensemble` holds K members that each follow the forward contract of
``docs/architecture.md`` (a tensor, or ``(mean_or_logits, log_var)``): heteroscedastic heads
included. :func:`ensemble_samples` runs them on one batch and stacks their outputs on the
leading axis exactly as :func:`~dubito.platform.mc.mc_samples` stacks dropout samples, so the
decomposition (:func:`~dubito.platform.uncertainty.classification_uncertainty`,
:func:`~dubito.platform.uncertainty.regression_uncertainty`) gives the ensemble's epistemic
part (the spread of the members' outputs) and aleatoric part (the members' mean noise) with no
change: the members are the samples.

Two ways to run the members, with the same outputs to float rounding:

- ``batched``: members of one architecture run as one forward. FC-DenseNets become one network of
  grouped convolutions (:class:`GroupedFCDenseNet`: the members' channels side by side, K groups
  per convolution, the engine's preallocated dense blocks and fused BatchNorm kept); models
  without convolutions (MLPs) run through ``torch.func.stack_module_state`` + ``vmap`` (1.2-1.4x
  the loop on 2 CPU cores). ``"auto"`` batches the MLPs only: on a CPU the grouped FC-DenseNet ran
  at 0.6-0.9x the loop (its regrouping copies and strided BatchNorm cost more than the wider
  convolutions save; ``vmap`` was 0.67-0.76x), so ``batched=True`` asks for it (a GPU figure is
  still to be measured: ``python -m benchmarks.ensemble --device cuda --large``);
- a loop over the members, each through :func:`~dubito.platform.mc.mc_samples` with one
  deterministic pass.

With ``samples > 1`` (ensemble + dropout) each member contributes T dropout samples through
the MC engine (member-major: rows ``k*T .. k*T+T-1`` are member k's).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dubito import DubitoError
from dubito.platform.mc import (
    MCSamples,
    _autocast_context,
    _check_temperature,
    _memory_format,
    _sample_seed,
    _split_output,
    mc_samples,
    scaled_softmax,
)

__all__ = ["Ensemble", "ensemble_samples", "packed_members", "ensemble_size"]


def packed_members(model: nn.Module) -> int | None:
    """K for a *packed* ensemble: one module whose forward runs K members at once and stacks
    their outputs on a leading axis, (K, N, ...) (or a ``(mean, log_var)`` pair of such), and
    says so with an integer ``packed_members`` attribute (e.g.
    :class:`~dubito.platform.models.EnsembleMLP`, the agents' Q-ensembles with randomized
    priors). ``None`` for any other module."""
    k = getattr(model, "packed_members", None)
    return k if isinstance(k, int) and not isinstance(model, Ensemble) else None


def ensemble_size(model: nn.Module) -> int | None:
    """K of an :class:`Ensemble` or of a packed ensemble; ``None`` for one model."""
    return len(model) if isinstance(model, Ensemble) else packed_members(model)


class Ensemble(nn.Module):
    """K members of one forward contract. ``task``, ``likelihood`` and ``variant`` are the
    members' (they must agree), so the service reads them as it does a single model's."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise DubitoError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        for name in ("task", "likelihood", "variant"):
            values = {getattr(m, name, None) for m in members}
            if len(values) > 1:
                raise DubitoError(f"ensemble members disagree on {name}: {sorted(map(str, values))}")
            if values != {None}:
                setattr(self, name, values.pop())

    def __len__(self) -> int:
        return len(self.members)

    def same_architecture(self) -> bool:
        """Whether every member has the first one's class and parameter / buffer shapes (then
        they can run as one batched forward)."""

        def shapes(m: nn.Module) -> tuple:
            return (
                type(m),
                tuple((n, p.shape) for n, p in m.named_parameters()),
                tuple((n, b.shape if b is not None else None) for n, b in m.named_buffers()),
            )

        first = shapes(self.members[0])
        return all(shapes(m) == first for m in self.members[1:])

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The ensemble's deterministic prediction (members in eval mode, dropout off): the
        members' mean class probabilities (N, C, ...) for classification tasks, their mean
        first output otherwise. What validation reads (its argmax, or the depth)."""
        classes = getattr(self, "task", None) in ("segmentation", "classification")
        total = None
        for member in self.members:
            was = member.training
            out, _ = _split_output(member.eval()(x), "ensemble member")
            member.train(was)
            out = torch.softmax(out.float(), 1) if classes else out.float()
            total = out if total is None else total + out
        return total / len(self.members)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """The members' features (each member's ``features``), side by side on axis 1."""
        return torch.cat([m.features(x) for m in self.members], 1)

    def forward(self, x: Tensor):
        raise DubitoError(
            "an Ensemble has no single forward: score it with ensemble_samples (or the uncertainty service)"
        )


def ensemble_samples(
    ensemble: Ensemble,
    x: Tensor,
    samples: int = 1,
    *,
    probs: bool = False,
    logit_noise_samples: int = 16,
    seed: int | None = None,
    batched: bool | str = "auto",
    temperature: float = 1.0,
    **mc_options,
) -> MCSamples:
    """The members' outputs on the batch ``x``, stacked on a leading axis of K·T rows.

    ``samples``: T, dropout samples per member (1: each member's deterministic pass, the plain
    ensemble). ``batched``: run members of one architecture as one forward (``"auto"``: when they
    share it, T = 1 and they have no convolutions (vmap); ``True`` also batches FC-DenseNets as
    grouped convolutions: see the module docstring). ``probs`` / ``logit_noise_samples``: as in
    :func:`~dubito.platform.mc.mc_samples`; member k draws its ε from the seed ``(seed, k)``
    either way. ``temperature``: as in :func:`~dubito.platform.mc.mc_samples` (post-hoc
    temperature scaling of the probabilities). ``mc_options`` go to the MC engine (chunk size, channels-last, ...).
    """
    k = ensemble_size(ensemble)
    if k is None:
        raise DubitoError(
            f"ensemble_samples needs an Ensemble or a packed ensemble, got {type(ensemble).__name__}"
        )
    if not isinstance(samples, int) or samples < 1:
        raise DubitoError(f"samples must be a positive integer, got {samples!r}")
    _check_temperature(temperature)
    if seed is None:
        seed = int(torch.randint(0, 1 << 62, (1,)).item())
    seeds = [_sample_seed(seed, j) for j in range(k)]
    if packed_members(ensemble) is not None:  # its own forward stacks the members
        if samples != 1:
            raise DubitoError("a packed ensemble runs its members once: use samples=1")
        with torch.inference_mode():
            out = ensemble(x)
        return _stacked(out, k, probs, logit_noise_samples, seeds, temperature, x.device)
    kind = _batched_kind(ensemble)
    if batched == "auto":  # batched FC-DenseNets ran at 0.6-0.9x the loop on a CPU (benchmarks/README.md)
        batched = samples == 1 and len(ensemble) > 1 and kind == "vmap"
    if batched:
        if samples != 1:
            raise DubitoError("batched members run without dropout: use samples=1 (or batched=False)")
        if not ensemble.same_architecture():
            raise DubitoError("batched members need one architecture (the same parameters and buffers)")
        if kind == "grouped":
            with torch.inference_mode(), _autocast_context(x.device, mc_options.get("autocast")):
                out = _grouped(ensemble)(
                    _memory_format(ensemble.members[0], x, mc_options.get("channels_last", "auto"))
                )
            return _stacked(out, len(ensemble), probs, logit_noise_samples, seeds, temperature, x.device)
        return _batched(ensemble, x, probs, logit_noise_samples, seeds, temperature)
    parts = [
        mc_samples(
            member,
            x,
            samples,
            probs=probs,
            logit_noise_samples=logit_noise_samples,
            seed=member_seed,
            stochastic=samples > 1 and getattr(member, "mc_dropout", True),
            temperature=temperature,
            **mc_options,
        )
        for member, member_seed in zip(ensemble.members, seeds)
    ]
    return MCSamples(
        mean=torch.cat([p.mean for p in parts]),
        log_var=None if parts[0].log_var is None else torch.cat([p.log_var for p in parts]),
        probs=None if parts[0].probs is None else torch.cat([p.probs for p in parts]),
    )


def _batched(
    ensemble: Ensemble, x: Tensor, probs: bool, logit_noise_samples: int, seeds: list[int], temperature: float
) -> MCSamples:
    """Every member in one vmapped forward (eval mode, no dropout)."""
    from torch.func import functional_call, stack_module_state, vmap

    params, buffers = stack_module_state(list(ensemble.members))
    params = {k: v.detach() for k, v in params.items()}
    base = ensemble.__dict__.get("_meta_base")
    if base is None:  # the architecture without weights, in eval mode (kept out of the state dict)
        base = ensemble.__dict__["_meta_base"] = copy.deepcopy(ensemble.members[0]).to("meta").eval()

    def one(p, b, inputs):
        return functional_call(base, (p, b), (inputs,))

    # grad mode on (no tensor requires grad, so no graph is built): models' in-place inference
    # paths (preallocated buffers) are for plain tensors, not for vmap's batched ones
    with torch.enable_grad():
        out = vmap(one, in_dims=(0, 0, None))(params, buffers, x)
    return _stacked(out, len(ensemble), probs, logit_noise_samples, seeds, temperature, x.device)


def _batched_kind(ensemble: Ensemble) -> str | None:
    """How members of one architecture run as one forward: ``grouped`` (FC-DenseNets: grouped
    convolutions), ``vmap`` (models without convolutions), else ``None`` (a loop)."""
    from dubito.platform.models import FCDenseNet

    if not ensemble.same_architecture():
        return None
    first = ensemble.members[0]
    if type(first) is FCDenseNet and all(
        b.running_var is not None for b in first.modules() if isinstance(b, nn.BatchNorm2d)
    ):
        return "grouped"
    if not any(isinstance(m, nn.Conv2d) for m in first.modules()):
        return "vmap"
    return None


def _grouped(ensemble: Ensemble) -> GroupedFCDenseNet:
    """The ensemble's :class:`GroupedFCDenseNet` (a second copy of the weights, kept on the
    ensemble), rebuilt when a member's weights changed."""
    version = _version(ensemble.members)
    cached = ensemble.__dict__.get("_grouped")
    if cached is None or cached[0] != version:
        cached = ensemble.__dict__["_grouped"] = (version, GroupedFCDenseNet(ensemble.members))
    return cached[1]


def _stacked(
    out,
    k: int,
    probs: bool,
    logit_noise_samples: int,
    seeds: list[int],
    temperature: float,
    device: torch.device,
) -> MCSamples:
    """MC samples from the members' outputs stacked on a leading axis of ``k``."""
    mean, log_var = _split_output(out, "ensemble")
    if mean.shape[0] != k:
        raise DubitoError(
            f"the ensemble's output has {mean.shape[0]} rows on its leading axis, not its {k} members"
        )
    mean = mean.float()
    log_var = None if log_var is None else torch.broadcast_to(log_var.float(), mean.shape)
    p = None
    if probs:
        generators = [torch.Generator(device=device).manual_seed(_sample_seed(s, 0)) for s in seeds]
        p = torch.stack(
            [
                scaled_softmax(
                    mean[j], None if log_var is None else log_var[j], logit_noise_samples, g, temperature
                )
                for j, g in enumerate(generators)
            ]
        )
    return MCSamples(mean=mean, log_var=log_var, probs=p)


# ----------------------------------------------------------------------------- grouped FC-DenseNets


class GroupedFCDenseNet(nn.Module):
    """K FC-DenseNets of one configuration as one network of grouped convolutions, for inference.

    Every feature map holds the members' channels side by side, member-major (member k's ``c``
    channels are ``[k·c, (k+1)·c)``); every convolution after the first (which reads the shared
    image) has K groups, so one forward pass runs all K members with K times wider, K times fewer
    operations. Dense blocks write into one preallocated buffer and BatchNorm is applied as the
    members' fused per-channel scale and shift (as :class:`~dubito.platform.models.FCDenseNet`
    does in inference), reading and writing per-member views of the buffer; feature maps are
    copied only where the single model copies too (into the blocks' buffers, skip joins). Dropout is off
    (the plain ensemble). A packed ensemble: ``forward(x)`` returns the members' outputs stacked,
    (K, N, C, H, W) [+ log-variance]. Built from the members' current weights; rebuild after they
    change (:func:`ensemble_samples` does, by their version counters).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        from dubito.platform.models import FCDenseNet

        members = list(members)
        if not members or not all(type(m) is FCDenseNet for m in members):
            raise DubitoError("GroupedFCDenseNet needs FCDenseNet members")
        first = members[0]
        if any(
            m.config != first.config or m.num_classes != first.num_classes or m.variant != first.variant
            for m in members
        ):
            raise DubitoError("GroupedFCDenseNet needs members of one configuration, classes and variant")
        self.k = len(members)
        self.packed_members = self.k
        self.growth = first.config.growth_rate
        self.num_classes = first.num_classes

        def cat(get) -> Tensor:
            return torch.cat([get(m).detach() for m in members])

        self.first = (cat(lambda m: m.first.weight), cat(lambda m: m.first.bias))
        self.down = [
            self._block(members, lambda m, i=i: m.down_blocks[i]) for i in range(len(first.down_blocks))
        ]
        self.transitions = [
            (
                *self._norm([m.transitions_down[i][0] for m in members]),
                cat(lambda m, i=i: m.transitions_down[i][2].weight),
                cat(lambda m, i=i: m.transitions_down[i][2].bias),
            )
            for i in range(len(first.transitions_down))
        ]
        self.bottleneck = self._block(members, lambda m: m.bottleneck)
        self.ups = [
            (
                cat(lambda m, i=i: m.transitions_up[i].up.weight),
                cat(lambda m, i=i: m.transitions_up[i].up.bias),
            )
            for i in range(len(first.transitions_up))
        ]
        self.up = [self._block(members, lambda m, i=i: m.up_blocks[i]) for i in range(len(first.up_blocks))]
        self.keep_input = [b.keep_input for b in first.up_blocks]
        head = [m.head for m in members]
        self.out = (cat(lambda m: m.head.out.weight), cat(lambda m: m.head.out.bias))
        self.log_var = None
        self.homoscedastic = None
        if first.head.log_var is not None:
            if isinstance(first.head.log_var, nn.Conv2d):
                self.log_var = (
                    torch.cat([h.log_var.weight.detach() for h in head]),
                    torch.cat([h.log_var.bias.detach() for h in head]),
                )
            else:  # a learned log-variance per member (and channel)
                self.homoscedastic = torch.stack([h.log_var.log_var.detach() for h in head])

    def _norm(self, norms: list[nn.Module]) -> tuple[Tensor, Tensor]:
        """The members' BatchNorms (running statistics) as one per-channel (scale, shift)."""
        scales, shifts = [], []
        for norm in norms:
            if norm.running_var is None:
                raise DubitoError("GroupedFCDenseNet needs BatchNorm running statistics")
            scale = (norm.running_var + norm.eps).rsqrt()
            if norm.weight is not None:
                scale = scale * norm.weight.detach()
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias.detach()
            scales.append(scale)
            shifts.append(shift)
        return torch.cat(scales), torch.cat(shifts)

    def _block(self, members: list[nn.Module], get) -> list[tuple[Tensor, ...]]:
        """Per dense layer: fused norm (scale, shift) and grouped conv (weight, bias)."""
        blocks = [get(m) for m in members]
        return [
            (
                *self._norm([b.layers[i][0] for b in blocks]),
                torch.cat([b.layers[i][2].weight.detach() for b in blocks]),
                torch.cat([b.layers[i][2].bias.detach() for b in blocks]),
            )
            for i in range(len(blocks[0].layers))
        ]

    def _normed(self, x5: Tensor, scale: Tensor, shift: Tensor, fmt: torch.memory_format) -> Tensor:
        """relu(BN(x)) of a per-member view ``x5`` (N, K, c, H, W), as a new (N, K·c, H, W) map."""
        n, k, c, h, w = x5.shape
        out = torch.empty((n, k * c, h, w), dtype=x5.dtype, device=x5.device, memory_format=fmt)
        view = out.view(n, k, c, h, w)
        torch.addcmul(shift.view(1, k, c, 1, 1), x5, scale.view(1, k, c, 1, 1), out=view)
        return out.relu_()

    def _dense(self, layers: list[tuple[Tensor, ...]], x: Tensor, keep_input: bool, fmt) -> Tensor:
        n, kc, h, w = x.shape
        k, c, g = self.k, kc // self.k, self.growth
        total = c + g * len(layers)
        buffer = torch.empty((n, k * total, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        view = buffer.view(n, k, total, h, w)
        view[:, :, :c] = x.view(n, k, c, h, w)
        start = c
        for scale, shift, weight, bias in layers:
            normed = self._normed(view[:, :, :start], scale, shift, fmt)
            view[:, :, start : start + g] = F.conv2d(normed, weight, bias, padding=1, groups=k).view(
                n, k, g, h, w
            )
            start += g
        if keep_input:
            return buffer
        out = torch.empty((n, k * (total - c), h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        out.view(n, k, total - c, h, w).copy_(view[:, :, c:])  # the new features only, one copy
        return out

    def _join(self, a: Tensor, b: Tensor, fmt) -> Tensor:
        """Each member's channels of ``a`` then of ``b``: (N, K·(ca + cb), H, W)."""
        n, _, h, w = a.shape
        k = self.k
        ca, cb = a.shape[1] // k, b.shape[1] // k
        out = torch.empty((n, k * (ca + cb), h, w), dtype=a.dtype, device=a.device, memory_format=fmt)
        view = out.view(n, k, ca + cb, h, w)
        view[:, :, :ca] = a.reshape(n, k, ca, h, w)
        view[:, :, ca:] = b.view(n, k, cb, h, w)
        return out

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if x.dim() != 4:
            raise DubitoError(f"GroupedFCDenseNet expects input (N, C, H, W), got shape {tuple(x.shape)}")
        fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
        k = self.k
        h = F.conv2d(x, *self.first, padding=1).contiguous(memory_format=fmt)
        skips = []
        for layers, (scale, shift, weight, bias) in zip(self.down, self.transitions):
            h = self._dense(layers, h, True, fmt)
            skips.append(h)
            n, kc, hh, ww = h.shape
            normed = self._normed(h.view(n, k, kc // k, hh, ww), scale, shift, fmt)
            h = F.max_pool2d(F.conv2d(normed, weight, bias, groups=k), 2)
        h = self._dense(self.bottleneck, h, False, fmt)
        for (weight, bias), layers, keep in zip(self.ups, self.up, self.keep_input):
            skip = skips.pop()
            up = F.conv_transpose2d(h, weight, bias, stride=2, groups=k)[
                ..., : skip.shape[2], : skip.shape[3]
            ]
            h = self._dense(layers, self._join(up, skip, fmt), keep, fmt)
        n, _, hh, ww = h.shape
        mean = F.conv2d(h, *self.out, groups=k).view(n, k, self.num_classes, hh, ww).transpose(0, 1)
        if self.log_var is not None:
            log_var = (
                F.conv2d(h, *self.log_var, groups=k).view(n, k, self.num_classes, hh, ww).transpose(0, 1)
            )
            return mean, log_var
        if self.homoscedastic is not None:
            value = (
                self.homoscedastic.view(k, 1, -1, 1, 1)
                if self.homoscedastic.dim() == 2
                else self.homoscedastic.view(k, 1, 1, 1, 1)
            )
            return mean, value.expand_as(mean)
        return mean


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _version(members: Sequence[nn.Module]) -> tuple:
    """Changes whenever a member's weights or statistics change (in place, replaced, or moved)."""
    return tuple(
        (id(t), t.data_ptr(), -1 if t.is_inference() else t._version)  # inference tensors keep no counter
        for m in members
        for t in (*m.parameters(), *m.buffers())
    )
