"""The MC engine: stochasticity, BatchNorm safety, mode restoration, chunk invariance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dubito import DubitoError
from dubito.platform.mc import dropout_modules, mc_dropout_mode, mc_samples
from dubito.platform.models import MLP, FCDenseNet


def small_net(p: float = 0.3, dropout=nn.Dropout) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        dropout(p),
        nn.Conv2d(8, 4, 1),
    )


class Picky(nn.Module):
    """Runs out of memory for batches of more than two replicated samples of 3 items."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        if x.shape[0] > 2 * 3:
            raise torch.OutOfMemoryError("simulated")
        return self.lin(self.drop(x))


def test_samples_differ_with_dropout():
    x = torch.randn(2, 3, 6, 6)
    out = mc_samples(small_net(0.3), x, 8, seed=0)
    assert out.mean.shape == (8, 2, 4, 6, 6)
    assert out.log_var is None and out.probs is None
    for a in range(8):
        for b in range(a + 1, 8):
            assert not torch.equal(out.mean[a], out.mean[b])


def test_p_zero_gives_identical_samples_equal_to_eval_forward():
    model = small_net(0.0)
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="no dropout module with p > 0"):
        out = mc_samples(model, x, 8, seed=0, channels_last=False)
    assert out.mean.shape[0] == 1  # no active dropout: one deterministic pass stands for all samples
    assert torch.equal(out.mean[0], model.eval()(x))
    # the stochastic mode itself (hooks installed) is also the identity at p = 0
    with torch.no_grad(), mc_dropout_mode(model) as source:
        source.generators = [torch.Generator().manual_seed(s) for s in (1,)]
        first = model(x)
        source.generators = [torch.Generator().manual_seed(s) for s in (2,)]
        second = model(x)
    assert torch.equal(first, second)


def test_mc_mean_converges_to_the_deterministic_forward_for_a_linear_model():
    """Inverted dropout is unbiased: for a linear map, E_mask[f(x)] = f_eval(x)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 3))
    x = torch.randn(4, 16)
    out = mc_samples(model, x, 4000, seed=0)
    with torch.no_grad():
        assert torch.allclose(out.mean.mean(0), model.eval()(x), atol=0.1)
    # and the dropout rate is as asked
    masks = mc_samples(nn.Dropout(0.3), torch.ones(64, 64), 10, seed=1).mean
    assert (masks == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert masks[masks != 0].unique().tolist() == pytest.approx([1 / 0.7])


def test_batchnorm_statistics_unchanged_and_modes_restored():
    model = small_net(0.3)
    model.train()
    model[3].eval()  # an odd mix of flags that must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    mc_samples(model, torch.randn(3, 3, 6, 6) * 5 + 2, 6, seed=0)
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [m.training for m in model.modules()] == flags


def test_modes_restored_on_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            self.bn(self.drop(x))
            raise ValueError("boom")

    for first in (True, False):
        model = Broken().train(first)
        model.bn.train(not first)  # mixed flags: a blanket model.train()/eval() on exit would be caught
        flags = [m.training for m in model.modules()]
        with pytest.raises(ValueError, match="boom"):
            mc_samples(model, torch.randn(4, 3), 3, seed=0)
        assert [m.training for m in model.modules()] == flags
        assert not model.drop._forward_hooks  # engine hooks removed


@pytest.mark.parametrize("chunk", [2, 3, 7, "auto"])
def test_chunked_equals_unchunked_for_the_same_seed(chunk):
    model = FCDenseNet("tiny", variant="both", dropout=0.2)
    x = torch.randn(2, 3, 20, 28)
    ref = mc_samples(model, x, 7, chunk_size=1, seed=11, probs=True, logit_noise_samples=4)
    got = mc_samples(model, x, 7, chunk_size=chunk, seed=11, probs=True, logit_noise_samples=4)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ref.probs.shape == (7, 2, 11, 20, 28)
    torch.testing.assert_close(ref.probs.sum(2), torch.ones(7, 2, 20, 28))


def test_seed_reproducibility_and_global_rng():
    model = MLP(5, 3, variant="epistemic")
    x = torch.randn(6, 5)
    a = mc_samples(model, x, 5, seed=3).mean
    assert torch.equal(a, mc_samples(model, x, 5, seed=3).mean)
    assert not torch.equal(a, mc_samples(model, x, 5, seed=4).mean)
    torch.manual_seed(9)
    b = mc_samples(model, x, 5).mean
    torch.manual_seed(9)
    assert torch.equal(b, mc_samples(model, x, 5).mean)


def test_channel_dropout_masks_whole_channels():
    model = nn.Dropout2d(0.5)
    x = torch.ones(3, 16, 4, 5)
    out = mc_samples(model, x, 4, seed=0).mean
    flat = out.reshape(4, 3, 16, -1)
    assert torch.equal(flat.amin(-1), flat.amax(-1))  # constant within each channel
    assert (flat == 0).any() and (flat != 0).any()


def test_halves_chunk_on_out_of_memory():
    model = Picky()
    x = torch.randn(3, 4)
    ref = mc_samples(model, x, 9, chunk_size=1, seed=5).mean
    got = mc_samples(model, x, 9, chunk_size=8, seed=5).mean
    torch.testing.assert_close(ref, got)


def test_log_var_outputs_and_regression_model():
    model = MLP(3, 2, task="regression", variant="both")
    out = mc_samples(model, torch.randn(4, 3), 6, seed=0)
    assert out.mean.shape == out.log_var.shape == (6, 4, 2)
    homo = MLP(3, 2, task="regression", variant="homoscedastic")
    out = mc_samples(homo, torch.randn(4, 3), 6, seed=0)
    assert out.log_var.shape == (6, 4, 2)
    assert torch.equal(out.log_var, out.log_var[:1, :1].expand(6, 4, 2))  # one learned value per channel
    single = mc_samples(homo, torch.randn(4, 3), 6, seed=0, stochastic=False)
    assert single.mean.shape == (1, 4, 2)  # dropout off: one deterministic pass


def test_native_alpha_dropout_is_switched_and_restored():
    model = nn.Sequential(nn.Linear(4, 4), nn.AlphaDropout(0.5)).eval()
    out = mc_samples(model, torch.randn(2, 4), 5, seed=0).mean
    assert not torch.equal(out[0], out[1])
    assert not model[1].training
    assert len(dropout_modules(model)) == 1


def test_bad_arguments_and_outputs():
    with pytest.raises(DubitoError, match="samples"):
        mc_samples(small_net(), torch.randn(1, 3, 4, 4), 0)
    with pytest.raises(DubitoError, match="chunk_size"):
        mc_samples(small_net(), torch.randn(1, 3, 4, 4), 2, chunk_size=0)

    class Triple(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return x, x, self.drop(x)

    with pytest.raises(DubitoError, match="forward must return"):
        mc_samples(Triple(), torch.randn(2, 2), 2)


def _batch_sizes(model: nn.Module) -> tuple[list[int], object]:
    sizes: list[int] = []
    return sizes, model.register_forward_pre_hook(lambda m, inp: sizes.append(inp[0].shape[0]))


def test_auto_chunk_capacity_is_not_capped_by_an_earlier_small_t():
    model = MLP(4, 2, hidden=(8,), variant="epistemic")
    x = torch.randn(5, 4)
    sizes, hook = _batch_sizes(model)
    mc_samples(model, x, 2, seed=0)
    sizes.clear()
    mc_samples(model, x, 40, seed=0)
    hook.remove()
    assert sizes == [5 * 40]  # small CPU inputs replicate all samples at once


def test_explicit_chunk_after_oom_does_not_change_auto():
    model = Picky()
    x = torch.randn(3, 4)
    sizes, hook = _batch_sizes(model)
    mc_samples(model, x, 8, chunk_size=8, seed=0)
    assert sizes[0] == 24 and sizes[-1] == 6  # 8 -> 4 -> 2 samples per pass
    sizes.clear()
    ref = mc_samples(model, x, 8, chunk_size=1, seed=0).mean
    sizes.clear()
    auto = mc_samples(model, x, 8, seed=0).mean  # auto starts from its own capacity, learns 2 again on OOM
    hook.remove()
    assert sizes[0] == 24 and sizes[-1] == 6
    torch.testing.assert_close(auto, ref)


def test_outputs_are_ordinary_tensors_callers_can_edit():
    out = mc_samples(MLP(3, 2, variant="both"), torch.randn(4, 3), 5, seed=0, probs=True)
    for tensor in out:
        assert not tensor.is_inference()
        tensor[0] = 0.0  # would raise for an inference tensor


def test_batch_statistics_normalisation_loops_instead_of_mixing_samples():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 2)
    )
    x = torch.randn(6, 4)
    ref = mc_samples(model, x, 6, chunk_size=1, seed=0).mean
    torch.testing.assert_close(mc_samples(model, x, 6, seed=0).mean, ref)  # auto loops
    with pytest.warns(UserWarning, match="influence each other"):
        mixed = mc_samples(model, x, 6, chunk_size=3, seed=0).mean
    assert not torch.allclose(mixed, ref)  # what auto avoids


def test_lazy_modules_and_standalone_dropout_mode():
    lazy = nn.Sequential(nn.LazyLinear(4), nn.Dropout(0.5))
    out = mc_samples(lazy, torch.randn(3, 5), 4, seed=0)
    assert out.mean.shape == (4, 3, 4)
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3)).eval()
    with torch.no_grad(), mc_dropout_mode(model):  # used on its own: global RNG, like nn.Dropout
        a, b = model(torch.ones(64, 3)), model(torch.ones(64, 3))
    assert not torch.equal(a, b)
    assert not model[0].training


def test_bf16_autocast_on_cpu_stays_close_to_fp32():
    model = FCDenseNet("tiny", variant="both")
    x = torch.randn(2, 3, 16, 16)
    full = mc_samples(model, x, 3, seed=0, probs=True, logit_noise_samples=2)
    half = mc_samples(model, x, 3, seed=0, probs=True, logit_noise_samples=2, autocast=True)
    assert half.mean.dtype == torch.float32  # stored samples are float32 whatever the compute dtype
    torch.testing.assert_close(half.probs, full.probs, atol=0.05, rtol=0.05)
