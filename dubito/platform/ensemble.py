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

- ``batched``: members of one architecture (the same parameter and buffer names and shapes)
  run as one forward through ``torch.func.stack_module_state`` + ``vmap``. ``"auto"`` does so
  for non-convolutional members (MLPs: 1.2-1.4x the loop on 2 CPU cores); for FC-DenseNets the
  vmapped forward loses the engine's fast paths (preallocated dense blocks, channels-last) and
  ran at 0.67-0.76x the loop (``python -m benchmarks.ensemble``), so they loop;
- a loop over the members, each through :func:`~dubito.platform.mc.mc_samples` with one
  deterministic pass.

With ``samples > 1`` (ensemble + dropout) each member contributes T dropout samples through
the MC engine (member-major: rows ``k*T .. k*T+T-1`` are member k's).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dubito import DubitoError
from dubito.platform.mc import (
    MCSamples,
    _check_temperature,
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
    ensemble). ``batched``: run members of one architecture as one vmapped forward (``"auto"``:
    when they share it, T = 1 and they have no convolutions: see the module docstring). ``probs`` / ``logit_noise_samples``: as in
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
    if batched == "auto":  # vmap loses the engine's convolution paths: 0.67-0.76x the loop on 2 CPU cores
        convolutional = any(isinstance(m, nn.Conv2d) for m in ensemble.members[0].modules())
        batched = samples == 1 and len(ensemble) > 1 and not convolutional and ensemble.same_architecture()
    if batched:
        if samples != 1:
            raise DubitoError("batched members run without dropout: use samples=1 (or batched=False)")
        if not ensemble.same_architecture():
            raise DubitoError("batched members need one architecture (the same parameters and buffers)")
        return _batched(ensemble, x, probs, logit_noise_samples, seeds, temperature)
    parts = [
        mc_samples(
            member,
            x,
            samples,
            probs=probs,
            logit_noise_samples=logit_noise_samples,
            seed=member_seed,
            stochastic=samples > 1,
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
