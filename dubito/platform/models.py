"""Models: FC-DenseNet ("Tiramisu", Jégou et al. 2017) and a small MLP, with the five variants.

Variants (Kendall & Gal):

============== ===================================== ===========================
variant        head                                  MC dropout at test time
============== ===================================== ===========================
baseline       mean / logits                         no
homoscedastic  + one learned log-variance per channel no
aleatoric      + per-input log-variance (heteroscedastic)  no
epistemic      mean / logits                         yes
both           + per-input log-variance              yes
============== ===================================== ===========================

Every model follows the forward contract (docs/architecture.md): it returns a tensor, or a pair
``(mean_or_logits, log_var)``. For regression with ``likelihood="laplace"`` the second
output is ``log b`` instead of ``log σ²``. Models carry ``variant``, ``task``,
``likelihood`` and ``mc_dropout`` attributes which the UncertaintyService reads; a
user's own module without them works too (the service then takes its arguments).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dubito import DubitoError
from dubito.platform.losses import LearnedLogVariance
from dubito.platform.uncertainty import LIKELIHOODS

__all__ = [
    "VARIANTS",
    "DROPOUT_PLACEMENTS",
    "FCDenseNetConfig",
    "ModelSpec",
    "FC_DENSENET_CONFIGS",
    "FCDenseNet",
    "MLP",
    "EnsembleMLP",
    "UncertaintyHead",
    "build_model",
    "count_parameters",
]

VARIANTS = ("baseline", "homoscedastic", "aleatoric", "epistemic", "both")
# variant -> (noise head, MC dropout at test time)
_VARIANT_SPEC = {
    "baseline": (None, False),
    "homoscedastic": ("homoscedastic", False),
    "aleatoric": ("heteroscedastic", False),
    "epistemic": (None, True),
    "both": ("heteroscedastic", True),
}
#: Where an FC-DenseNet's dropout layers are active (the others get p = 0); see :class:`FCDenseNet`.
DROPOUT_PLACEMENTS = ("all", "decoder", "last_block", "head")
_CLASSIFICATION_TASKS = ("segmentation", "classification")
_REGRESSION_TASKS = ("depth", "regression")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise DubitoError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _check_probability(p: float, name: str = "dropout") -> None:
    if not 0.0 <= p < 1.0:
        raise DubitoError(f"{name} must be in [0, 1), got {p!r}")


def variant_spec(variant: str) -> tuple[str | None, bool]:
    """(noise head: ``heteroscedastic``, ``homoscedastic`` or None; MC dropout at test time) of a variant."""
    _check_variant(variant)
    return _VARIANT_SPEC[variant]


class UncertaintyHead(nn.Module):
    """The output layer of a variant: mean/logits, plus a log-noise output where the variant has one.

    Args:
        in_features: channels of the features it reads.
        out_channels: classes (classification) or outputs (regression).
        variant: one of :data:`VARIANTS`.
        spatial: 1×1 convolutions over (N, F, H, W) when true, linear layers over (N, F) otherwise.
    """

    def __init__(self, in_features: int, out_channels: int, variant: str, spatial: bool) -> None:
        super().__init__()
        _check_variant(variant)
        layer = (
            (lambda: nn.Conv2d(in_features, out_channels, 1))
            if spatial
            else (lambda: nn.Linear(in_features, out_channels))
        )
        self.out = layer()
        noise, _ = _VARIANT_SPEC[variant]
        self.log_var: nn.Module | None = None
        if noise == "heteroscedastic":
            self.log_var = layer()
            nn.init.zeros_(self.log_var.weight)
            nn.init.zeros_(self.log_var.bias)
        elif noise == "homoscedastic":
            self.log_var = LearnedLogVariance(out_channels)

    def forward(self, h: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        mean = self.out(h)
        if self.log_var is None:
            return mean
        if isinstance(self.log_var, LearnedLogVariance):
            return mean, self.log_var(mean)
        return mean, self.log_var(h)


class _VariantModel(nn.Module):
    """Records what the service needs to know about a dubito model."""

    def _describe(self, variant: str, task: str, likelihood: str) -> None:
        _check_variant(variant)
        if task not in _CLASSIFICATION_TASKS + _REGRESSION_TASKS:
            raise DubitoError(
                f"task must be one of {_CLASSIFICATION_TASKS + _REGRESSION_TASKS}, got {task!r}"
            )
        if likelihood not in LIKELIHOODS:
            raise DubitoError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.variant = variant
        self.task = task
        self.likelihood = likelihood
        self.mc_dropout = _VARIANT_SPEC[variant][1]
        self.has_log_var = _VARIANT_SPEC[variant][0] is not None


# ----------------------------------------------------------------------------- FC-DenseNet


@dataclass(frozen=True)
class FCDenseNetConfig:
    """Architecture of an FC-DenseNet: first conv filters, growth rate, layers per block."""

    first_filters: int
    growth_rate: int
    down_blocks: tuple[int, ...]
    bottleneck: int
    up_blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.down_blocks) != len(self.up_blocks):
            raise DubitoError("FCDenseNetConfig: down_blocks and up_blocks must have the same length")


FC_DENSENET_CONFIGS: dict[str, FCDenseNetConfig] = {
    # Jégou et al. 2017, Table 2; FC-DenseNet103 is the model of Kendall & Gal.
    "fc_densenet103": FCDenseNetConfig(48, 16, (4, 5, 7, 10, 12), 15, (12, 10, 7, 5, 4)),
    "fc_densenet67": FCDenseNetConfig(48, 16, (5, 5, 5, 5, 5), 5, (5, 5, 5, 5, 5)),
    "fc_densenet56": FCDenseNetConfig(48, 12, (4, 4, 4, 4, 4), 4, (4, 4, 4, 4, 4)),
    # For CPU tests and demos: three resolutions, about 73 k parameters.
    "tiny": FCDenseNetConfig(16, 8, (2, 2, 2), 2, (2, 2, 2)),
}


class _DenseLayer(nn.Sequential):
    """BN → ReLU → 3×3 conv → Dropout.

    In inference (no autograd, BatchNorm on its running statistics) the normalisation is
    one fused multiply-add with the per-channel scale and shift BatchNorm itself applies,
    which reads the dense block's buffer view (a strided slice) much faster than
    BatchNorm's kernel does; the result is the same.
    """

    def __init__(self, in_channels: int, growth: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, growth, 3, padding=1),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        norm, relu, conv, dropout = self
        if (
            norm.training
            or norm.running_var is None
            or torch.is_grad_enabled()
            or not _DenseBlock.preallocate
            or x.dtype != norm.running_var.dtype
        ):  # autocast: BatchNorm's own mixed precision
            return super().forward(x)
        scale = norm.running_var.add(norm.eps).rsqrt_()
        if norm.weight is not None:
            scale.mul_(norm.weight)
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift.add_(norm.bias)
        h = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1)).relu_()
        return dropout(conv(h))


class _DenseBlock(nn.Module):
    """Layers each reading the concatenation of all earlier outputs.

    Returns the input concatenated with the new features (``keep_input``), or the new
    features only (bottleneck and up path, as in Jégou et al.).

    Without autograd (inference, MC scoring) the block writes its input and each layer's
    output into one preallocated buffer and every layer reads a view of its prefix, instead
    of re-concatenating the growing input at every layer (quadratic copying). The result is
    the same; ``preallocate = False`` turns this and the dense layers' fused normalisation
    off (benchmarks compare both).
    """

    preallocate = True

    def __init__(self, in_channels: int, growth: int, layers: int, dropout: float, keep_input: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _DenseLayer(in_channels + i * growth, growth, dropout) for i in range(layers)
        )
        self.keep_input = keep_input
        self.growth = growth

    def forward(self, x: Tensor) -> Tensor:
        if self.preallocate and not torch.is_grad_enabled() and x.dim() == 4:
            return self._forward_buffered(x)
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features if self.keep_input else features[1:], 1)

    def _forward_buffered(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        buffer = torch.empty(
            (n, c + self.growth * len(self.layers), h, w), dtype=x.dtype, device=x.device, memory_format=fmt
        )
        buffer[:, :c] = x
        start = c
        for layer in self.layers:
            buffer[:, start : start + self.growth] = layer(buffer[:, :start])
            start += self.growth
        return buffer if self.keep_input else buffer[:, c:]


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class _TransitionDown(nn.Sequential):
    """BN → ReLU → 1×1 conv → Dropout → 2×2 max-pool."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1),
            nn.Dropout(dropout),
            nn.MaxPool2d(2),
        )


class _TransitionUp(nn.Module):
    """3×3 transposed conv, stride 2 ('valid'), cropped to the skip connection, then concatenated."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = self.up(x)  # 2·in + 1 ≥ skip size for any input size
        h, w = skip.shape[-2:]
        return torch.cat([up[..., :h, :w], skip], 1)


class FCDenseNet(_VariantModel):
    """Fully convolutional DenseNet for segmentation (C logits) or depth (1 mean), any input size.

    Args:
        config: a name from :data:`FC_DENSENET_CONFIGS` or an :class:`FCDenseNetConfig`.
        task: ``"segmentation"`` or ``"depth"``.
        num_classes: classes for segmentation (CamVid: 11); output channels for depth (1).
        variant: one of :data:`VARIANTS`.
        dropout: p of the active dropout layers (paper: 0.2).
        in_channels: input channels (3 for RGB).
        likelihood: for depth, ``"gaussian"`` (log σ² output) or ``"laplace"`` (log b output).
        dropout_at: where dropout is active, in training and in MC sampling (one of
            :data:`DROPOUT_PLACEMENTS`); the dropout layers elsewhere get p = 0:

            - ``"all"`` (the paper's): every dense layer and transition down;
            - ``"decoder"``: the bottleneck and the up path;
            - ``"last_block"``: the full-resolution up block, plus channel dropout
              (``nn.Dropout2d``) on the features the 1×1 head reads;
            - ``"head"``: only channel dropout on the features the 1×1 head reads: each sample
              drops whole feature channels of an image, i.e. samples the classifier's input
              weights, shared by all pixels as the weights are.

            MC sampling then runs the deterministic part once and replicates only the
            stochastic rest (:meth:`mc_stages`). FLOPs of FC-DenseNet103 at 360×480: first
            conv + down path 44 G, bottleneck 0.5 G, up path 94 G (last up block 48 G), head
            2 G; so ``decoder`` saves at most about 1.5× over ``all``, and with ``head`` T = 50
            samples cost about as much as 1.7 passes.

    Input (N, in_channels, H, W) → logits or mean (N, C, H, W) [+ log-noise (N, C, H, W)].
    """

    def __init__(
        self,
        config: str | FCDenseNetConfig = "fc_densenet103",
        task: str = "segmentation",
        num_classes: int | None = None,
        variant: str = "both",
        dropout: float = 0.2,
        in_channels: int = 3,
        likelihood: str = "gaussian",
        dropout_at: str = "all",
    ) -> None:
        super().__init__()
        if dropout_at not in DROPOUT_PLACEMENTS:
            raise DubitoError(f"dropout_at must be one of {DROPOUT_PLACEMENTS}, got {dropout_at!r}")
        if isinstance(config, str):
            if config not in FC_DENSENET_CONFIGS:
                raise DubitoError(
                    f"unknown FC-DenseNet config {config!r}; choose from {sorted(FC_DENSENET_CONFIGS)}"
                )
            self.config_name = config
            config = FC_DENSENET_CONFIGS[config]
        else:
            self.config_name = "custom"
        _check_probability(dropout)
        self._describe(variant, task, likelihood)
        if task not in ("segmentation", "depth"):
            raise DubitoError(f"FCDenseNet task must be 'segmentation' or 'depth', got {task!r}")
        if num_classes is None:
            num_classes = 11 if task == "segmentation" else 1
        self.config = config
        self.num_classes = num_classes
        self.dropout = dropout
        self.dropout_at = dropout_at
        growth = config.growth_rate
        p_down = dropout if dropout_at == "all" else 0.0
        p_up = dropout if dropout_at in ("all", "decoder") else 0.0
        p_last = dropout if dropout_at in ("all", "decoder", "last_block") else 0.0
        p_head = dropout if dropout_at in ("last_block", "head") else 0.0

        self.first = nn.Conv2d(in_channels, config.first_filters, 3, padding=1)
        channels = config.first_filters
        self.down_blocks = nn.ModuleList()
        self.transitions_down = nn.ModuleList()
        skip_channels = []
        for layers in config.down_blocks:
            self.down_blocks.append(_DenseBlock(channels, growth, layers, p_down, keep_input=True))
            channels += growth * layers
            skip_channels.append(channels)
            self.transitions_down.append(_TransitionDown(channels, p_down))
        self.bottleneck = _DenseBlock(channels, growth, config.bottleneck, p_up, keep_input=False)
        new = growth * config.bottleneck
        self.transitions_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, layers in enumerate(config.up_blocks):
            self.transitions_up.append(_TransitionUp(new))
            block_in = new + skip_channels[-1 - i]
            last = i == len(config.up_blocks) - 1
            self.up_blocks.append(
                _DenseBlock(block_in, growth, layers, p_last if last else p_up, keep_input=last)
            )
            new = growth * layers
            channels = block_in + new if last else new
        # channel dropout: one keep/drop per feature channel and image, i.e. a sampled set of the 1×1
        # classifier's input weights shared by every pixel (and far cheaper to sample than per-pixel masks)
        self.head_dropout = nn.Dropout2d(p_head)
        self.head = UncertaintyHead(channels, num_classes, variant, spatial=True)

    def mc_stages(self) -> list[tuple[tuple[nn.Module, ...], Callable]]:
        """The forward pass as consecutive stages ``(modules, fn)`` over a state: the input
        image, then ``(h, skips)``, then the output. ``forward`` is their composition. The MC
        engine runs the stages before the first one with active dropout once and replicates
        only the rest (deterministic-prefix caching)."""

        def first(x: Tensor):
            if x.dim() != 4:
                raise DubitoError(f"FCDenseNet expects input (N, C, H, W), got shape {tuple(x.shape)}")
            return self.first(x), ()

        def down(block: nn.Module, transition: nn.Module) -> Callable:
            def run(state):
                h = block(state[0])
                return transition(h), state[1] + (h,)

            return run

        def upsample(transition: nn.Module) -> Callable:  # joins the deepest remaining skip
            return lambda state: (transition(state[0], state[1][-1]), state[1][:-1])

        def dense(block: nn.Module) -> Callable:
            return lambda state: (block(state[0]), state[1])

        stages: list[tuple[tuple[nn.Module, ...], Callable]] = [((self.first,), first)]
        for block, transition in zip(self.down_blocks, self.transitions_down):
            stages.append(((block, transition), down(block, transition)))
        stages.append(((self.bottleneck,), dense(self.bottleneck)))
        for transition, block in zip(self.transitions_up, self.up_blocks):
            stages += [((transition,), upsample(transition)), ((block,), dense(block))]
        stages.append(((self.head_dropout, self.head), lambda state: self.head(self.head_dropout(state[0]))))
        return stages

    def features(self, x: Tensor) -> Tensor:
        """The full-resolution features the head reads, (N, F, H, W) (before the head's dropout)."""
        state: Any = x
        for _, run in self.mc_stages()[:-1]:
            state = run(state)
        return state[0]

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.head(self.head_dropout(self.features(x)))


# ----------------------------------------------------------------------------- MLP


class MLP(_VariantModel):
    """A dropout MLP with the same heads and variants, for vector inputs (digits, RL states).

    Args:
        in_features: input size.
        out_features: classes (classification) or outputs (regression, e.g. one Q-value per action).
        hidden: sizes of the hidden layers.
        task: ``"classification"`` or ``"regression"``.
        variant, dropout, likelihood: as in :class:`FCDenseNet`.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.

    Each hidden layer is Linear → activation → Dropout(p).
    """

    _ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: tuple[int, ...] = (128, 128),
        task: str = "classification",
        variant: str = "both",
        dropout: float = 0.2,
        likelihood: str = "gaussian",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        _check_probability(dropout)
        self._describe(variant, task, likelihood)
        if task not in ("classification", "regression"):
            raise DubitoError(f"MLP task must be 'classification' or 'regression', got {task!r}")
        if activation not in self._ACTIVATIONS:
            raise DubitoError(f"activation must be one of {sorted(self._ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), self._ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = UncertaintyHead(width, out_features, variant, spatial=False)
        self.in_features = in_features
        self.out_features = out_features
        self.dropout = dropout

    def features(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise DubitoError(f"MLP expects input (N, {self.in_features}), got shape {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.head(self.features(x))


class EnsembleMLP(nn.Module):
    """K independent MLPs (Linear → ReLU per hidden layer) run as one batched matmul per layer.

    The ensemble counterpart of MC dropout (bootstrapped DQN heads, randomized priors): its K
    members play the part of the T dropout samples, so ``regression_uncertainty(model(x))``
    decomposes its spread with the same code.

    Args:
        in_features, out_features: sizes of an input row and of each member's output.
        members: K.
        hidden: hidden layer sizes (shared shape, separate weights).

    ``forward(x)`` takes (N, in_features), the same rows for every member, or
    (K, N, in_features), different rows per member, and returns (K, N, out_features).
    Each member is initialised like ``nn.Linear``.
    """

    def __init__(
        self, in_features: int, out_features: int, members: int, hidden: tuple[int, ...] = (50, 50)
    ) -> None:
        super().__init__()
        if members < 1:
            raise DubitoError(f"members must be >= 1, got {members}")
        sizes = (in_features, *hidden, out_features)
        self.layers = len(sizes) - 1
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            bound = 1.0 / fan_in**0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W and b
            # plain attributes (w0, b0, ...): indexing an nn.ParameterList costs more than the matmul here
            # the first layer is stored (in, K, out) so that shared rows are one (N, in) @ (in, K·out) matmul
            shape = (fan_in, members, fan_out) if i == 0 else (members, fan_in, fan_out)
            setattr(self, f"w{i}", nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))
            setattr(self, f"b{i}", nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound)))
        self.in_features = in_features
        self.out_features = out_features
        self.members = members

    @property
    def packed_members(self) -> int:
        """K: a packed ensemble (its forward stacks the members), which the uncertainty service
        scores as ``epistemic="ensemble"``."""
        return self.members

    def forward(self, x: Tensor) -> Tensor:
        params = self._parameters
        w0 = params["w0"]
        if x.dim() == 2 and x.shape[1] == self.in_features:
            h = (x @ w0.reshape(self.in_features, -1)).reshape(x.shape[0], self.members, -1).transpose(
                0, 1
            ) + params["b0"]
        elif x.dim() == 3 and x.shape[0] == self.members and x.shape[2] == self.in_features:
            h = torch.baddbmm(params["b0"], x, w0.transpose(0, 1))
        else:
            raise DubitoError(
                f"EnsembleMLP expects input (N, {self.in_features}) or ({self.members}, N, {self.in_features}), "
                f"got shape {tuple(x.shape)}"
            )
        for i in range(1, self.layers):
            h = torch.baddbmm(params[f"b{i}"], torch.relu(h), params[f"w{i}"])
        return h


# ----------------------------------------------------------------------------- helpers


def build_model(name: str, **kwargs) -> nn.Module:
    """A model by name: an FC-DenseNet config (``fc_densenet103``, ``fc_densenet67``,
    ``fc_densenet56``, ``tiny``) or ``mlp``; keyword arguments go to the class."""
    if name == "mlp" and kwargs.get("dropout_at", "all") != "all":
        raise DubitoError(
            f"dropout_at={kwargs['dropout_at']!r} is an FC-DenseNet option; an MLP has dropout in every layer"
        )
    if name == "mlp":
        kwargs.pop("dropout_at", None)
    if name in FC_DENSENET_CONFIGS:
        return FCDenseNet(name, **kwargs)
    if name == "mlp":
        return MLP(**kwargs)
    raise DubitoError(f"unknown model {name!r}; choose from {sorted(FC_DENSENET_CONFIGS) + ['mlp']}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class ModelSpec:
    """What a trained model is: enough to rebuild it for its weights (:meth:`build`) and to test
    it as it was trained (task, classes, resolution, depth cap, digits split). Model files and
    checkpoints hold it as a plain dict (:meth:`as_dict`), so ``torch.load(weights_only=True)``
    reads them; :meth:`of` reads those dicts back, older ones included."""

    model: str  # an FC-DenseNet configuration (``tiny``, ``fc_densenet103``, ...) or ``mlp``
    task: str  # segmentation, depth or classification
    variant: str
    dropout: float
    likelihood: str = "laplace"  # regression heads: laplace (the paper's L1) or gaussian
    dropout_at: str = "all"  # FC-DenseNet placement; files written before placements: everywhere
    num_classes: int | None = None  # classes (segmentation, classification)
    ignore_index: int | None = None  # the void label of the dataset's targets
    dataset: str = ""  # the dataset it was trained on
    height: int | None = None  # the item size it was trained at
    width: int | None = None
    max_depth: float | None = None  # depth: larger depth was masked out of training (m)
    in_features: int | None = None  # the MLP's input size (vector data)
    data_seed: int | None = None  # bundled data (digits): the seed of the split it was trained on

    @classmethod
    def of(cls, spec: ModelSpec | dict[str, Any], where: str = "model spec") -> ModelSpec:
        """A spec from a saved dict (unknown keys of later versions ignored)."""
        if isinstance(spec, ModelSpec):
            return spec
        if not isinstance(spec, dict):
            raise DubitoError(f"{where}: expected a model spec, got {type(spec).__name__}")
        known = {k: v for k, v in spec.items() if k in cls.__dataclass_fields__}
        missing = [k for k in ("model", "task", "variant", "dropout") if k not in known]
        if missing:
            raise DubitoError(f"{where}: the model spec lacks {', '.join(missing)}")
        return cls(**known)

    def as_dict(self) -> dict[str, Any]:
        """The dict model files hold (the fields a model of its kind does not have left out)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for optional in ("in_features", "data_seed"):
            if out[optional] is None:
                del out[optional]
        return out

    def build(self) -> nn.Module:
        """A fresh (untrained) model of this spec."""
        kwargs: dict[str, Any] = {"task": self.task, "variant": self.variant, "dropout": self.dropout}
        if self.dropout_at != "all":
            kwargs["dropout_at"] = self.dropout_at
        if self.model == "mlp":
            kwargs.update(in_features=self.in_features, out_features=self.num_classes or 1)
            if self.task != "classification":
                kwargs["likelihood"] = self.likelihood
        elif self.task == "segmentation":
            kwargs["num_classes"] = self.num_classes
        else:
            kwargs["likelihood"] = self.likelihood
        return build_model(self.model, **kwargs)
