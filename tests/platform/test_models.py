"""FC-DenseNet and MLP: sizes, shapes, variants, and the forward contract."""

from __future__ import annotations

import pytest
import torch

from dubito import DubitoError
from dubito.platform.losses import LearnedLogVariance
from dubito.platform.models import (
    FC_DENSENET_CONFIGS,
    MLP,
    VARIANTS,
    FCDenseNet,
    build_model,
    count_parameters,
)


def test_fc_densenet103_has_9_4_million_parameters():
    n = count_parameters(FCDenseNet("fc_densenet103", num_classes=11, variant="baseline"))
    assert abs(n - 9.4e6) / 9.4e6 <= 0.02, n
    # with the heteroscedastic head (22 output channels) a reference build counted 9.32 M
    assert count_parameters(FCDenseNet("fc_densenet103", num_classes=11, variant="both")) == pytest.approx(
        9.32e6, rel=0.002
    )


def test_configs_grow_in_size():
    sizes = [
        count_parameters(FCDenseNet(name, variant="baseline"))
        for name in ("tiny", "fc_densenet56", "fc_densenet67", "fc_densenet103")
    ]
    assert sizes == sorted(sizes)
    assert set(FC_DENSENET_CONFIGS) == {"tiny", "fc_densenet56", "fc_densenet67", "fc_densenet103"}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task,channels", [("segmentation", 11), ("depth", 1)])
def test_fc_densenet103_shapes_at_360x480_every_variant(variant, task, channels):
    """Shape propagation through the real module code on the meta device (no arithmetic)."""
    with torch.device("meta"):
        model = FCDenseNet("fc_densenet103", task=task, variant=variant)
        out = model(torch.empty(2, 3, 360, 480))
    if variant in ("baseline", "epistemic"):
        assert isinstance(out, torch.Tensor) and out.shape == (2, channels, 360, 480)
    else:
        mean, log_var = out
        assert mean.shape == log_var.shape == (2, channels, 360, 480)
    assert model.mc_dropout == (variant in ("epistemic", "both"))
    assert model.has_log_var == (variant not in ("baseline", "epistemic"))


def test_fc_densenet103_real_forward_at_360x480():
    model = FCDenseNet("fc_densenet103", variant="both").eval()
    with torch.inference_mode():
        logits, log_var = model(torch.randn(1, 3, 360, 480))
    assert logits.shape == log_var.shape == (1, 11, 360, 480)
    assert torch.isfinite(logits).all() and torch.isfinite(log_var).all()


@pytest.mark.parametrize("size", [(45, 61), (31, 33), (96, 128), (8, 8)])
def test_any_input_size(size):
    model = FCDenseNet("tiny", variant="aleatoric").eval()
    mean, log_var = model(torch.randn(2, 3, *size))
    assert mean.shape == log_var.shape == (2, 11, *size)


def test_homoscedastic_head_is_one_learned_value_per_channel():
    model = FCDenseNet("tiny", variant="homoscedastic", task="depth", likelihood="laplace").eval()
    assert isinstance(model.head.log_var, LearnedLogVariance)
    _, log_var = model(torch.randn(2, 3, 16, 16))
    assert torch.equal(log_var, log_var[:1, :, :1, :1].expand_as(log_var))
    assert log_var.requires_grad  # it is learned
    assert model.likelihood == "laplace"


def test_heteroscedastic_head_varies_with_the_input_after_training_step():
    model = FCDenseNet("tiny", variant="aleatoric")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 16, 16)
    logits, log_var = model(x)
    (log_var * torch.randn_like(log_var)).mean().backward()
    opt.step()
    _, log_var = model.eval()(x)
    assert log_var.std() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_mlp_variants(variant):
    model = MLP(8, 3, hidden=(16, 16), task="regression", variant=variant)
    out = model(torch.randn(5, 8))
    if model.has_log_var:
        assert out[0].shape == out[1].shape == (5, 3)
    else:
        assert out.shape == (5, 3)
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 2


def test_build_model_and_errors():
    assert isinstance(build_model("tiny", variant="baseline"), FCDenseNet)
    assert isinstance(build_model("mlp", in_features=4, out_features=2), MLP)
    with pytest.raises(DubitoError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(DubitoError, match="variant"):
        FCDenseNet("tiny", variant="bayes")
    with pytest.raises(DubitoError, match="dropout"):
        MLP(2, 2, dropout=1.0)
    with pytest.raises(DubitoError, match="task"):
        FCDenseNet("tiny", task="classification")
    with pytest.raises(DubitoError, match=r"expects input \(N, C, H, W\)"):
        FCDenseNet("tiny")(torch.randn(3, 16, 16))
    with pytest.raises(DubitoError, match=r"\(N, 4\)"):
        MLP(4, 2)(torch.randn(3, 5))
