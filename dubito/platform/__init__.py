"""The shared uncertainty service: models, heads, losses, the MC engine, the decomposition,
tracking and plots. ``platform`` never imports the other parts of dubito.

The main names are re-exported here::

    from dubito.platform import FCDenseNet, MLP, UncertaintyService, mc_samples
"""

from dubito.platform.losses import (
    LearnedLogVariance,
    gaussian_nll,
    laplace_nll,
    sampled_softmax_cross_entropy,
)
from dubito.platform.mc import MCSamples, mc_samples
from dubito.platform.models import MLP, VARIANTS, FCDenseNet, build_model
from dubito.platform.service import UncertaintyService
from dubito.platform.uncertainty import (
    ClassificationUncertainty,
    RegressionUncertainty,
    classification_uncertainty,
    regression_uncertainty,
)

__all__ = [
    "LearnedLogVariance",
    "gaussian_nll",
    "laplace_nll",
    "sampled_softmax_cross_entropy",
    "MCSamples",
    "mc_samples",
    "MLP",
    "VARIANTS",
    "FCDenseNet",
    "build_model",
    "UncertaintyService",
    "ClassificationUncertainty",
    "RegressionUncertainty",
    "classification_uncertainty",
    "regression_uncertainty",
]
