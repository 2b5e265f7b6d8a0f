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

Every model follows DESIGN.md's forward contract: it returns a tensor, or a pair
``(mean_or_logits, log_var)``. For regression with ``likelihood="laplace"`` the second
output is ``log b`` instead of ``log σ²``. Models carry ``variant``, ``task``,
``likelihood`` and ``mc_dropout`` attributes which the UncertaintyService reads; a
user's own module without them works too (the service then takes its arguments).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dubito import DubitoError
from dubito.platform.losses import LearnedLogVariance
from dubito.platform.uncertainty import LIKELIHOODS

__all__ = [
    "VARIANTS",
    "FCDenseNetConfig",
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
_CLASSIFICATION_TASKS = ("segmentation", "classification")
_REGRESSION_TASKS = ("depth", "regression")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise DubitoError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _check_probability(p: float, name: str = "dropout") -> None:
    if not 0.0 <= p < 1.0:
        raise DubitoError(f"{name} must be in [0, 1), got {p!r}")


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
        layer = (lambda: nn.Conv2d(in_features, out_channels, 1)) if spatial else (lambda: nn.Linear(in_features, out_channels))
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
            raise DubitoError(f"task must be one of {_CLASSIFICATION_TASKS + _REGRESSION_TASKS}, got {task!r}")
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
    """BN → ReLU → 3×3 conv → Dropout."""

    def __init__(self, in_channels: int, growth: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, growth, 3, padding=1),
            nn.Dropout(dropout),
        )


class _DenseBlock(nn.Module):
    """Layers each reading the concatenation of all earlier outputs.

    Returns the input concatenated with the new features (``keep_input``), or the new
    features only (bottleneck and up path, as in Jégou et al.).
    """

    def __init__(self, in_channels: int, growth: int, layers: int, dropout: float, keep_input: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_DenseLayer(in_channels + i * growth, growth, dropout) for i in range(layers))
        self.keep_input = keep_input

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features if self.keep_input else features[1:], 1)


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
        dropout: p of every dropout layer (paper: 0.2).
        in_channels: input channels (3 for RGB).
        likelihood: for depth, ``"gaussian"`` (log σ² output) or ``"laplace"`` (log b output).

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
    ) -> None:
        super().__init__()
        if isinstance(config, str):
            if config not in FC_DENSENET_CONFIGS:
                raise DubitoError(f"unknown FC-DenseNet config {config!r}; choose from {sorted(FC_DENSENET_CONFIGS)}")
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
        growth = config.growth_rate

        self.first = nn.Conv2d(in_channels, config.first_filters, 3, padding=1)
        channels = config.first_filters
        self.down_blocks = nn.ModuleList()
        self.transitions_down = nn.ModuleList()
        skip_channels = []
        for layers in config.down_blocks:
            self.down_blocks.append(_DenseBlock(channels, growth, layers, dropout, keep_input=True))
            channels += growth * layers
            skip_channels.append(channels)
            self.transitions_down.append(_TransitionDown(channels, dropout))
        self.bottleneck = _DenseBlock(channels, growth, config.bottleneck, dropout, keep_input=False)
        new = growth * config.bottleneck
        self.transitions_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, layers in enumerate(config.up_blocks):
            self.transitions_up.append(_TransitionUp(new))
            block_in = new + skip_channels[-1 - i]
            last = i == len(config.up_blocks) - 1
            self.up_blocks.append(_DenseBlock(block_in, growth, layers, dropout, keep_input=last))
            new = growth * layers
            channels = block_in + new if last else new
        self.head = UncertaintyHead(channels, num_classes, variant, spatial=True)

    def features(self, x: Tensor) -> Tensor:
        """The full-resolution features the head reads, (N, F, H, W)."""
        if x.dim() != 4:
            raise DubitoError(f"FCDenseNet expects input (N, C, H, W), got shape {tuple(x.shape)}")
        h = self.first(x)
        skips = []
        for block, down in zip(self.down_blocks, self.transitions_down):
            h = block(h)
            skips.append(h)
            h = down(h)
        h = self.bottleneck(h)
        for up, block, skip in zip(self.transitions_up, self.up_blocks, reversed(skips)):
            h = block(up(h, skip))
        return h

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.head(self.features(x))


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

    def __init__(self, in_features: int, out_features: int, members: int, hidden: tuple[int, ...] = (50, 50)) -> None:
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

    def forward(self, x: Tensor) -> Tensor:
        params = self._parameters
        w0 = params["w0"]
        if x.dim() == 2 and x.shape[1] == self.in_features:
            h = (x @ w0.reshape(self.in_features, -1)).reshape(x.shape[0], self.members, -1).transpose(0, 1) + params["b0"]
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
    if name in FC_DENSENET_CONFIGS:
        return FCDenseNet(name, **kwargs)
    if name == "mlp":
        return MLP(**kwargs)
    raise DubitoError(f"unknown model {name!r}; choose from {sorted(FC_DENSENET_CONFIGS) + ['mlp']}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


