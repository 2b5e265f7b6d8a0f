"""The MC engine's speed-ups give the same samples: preallocated dense blocks, dropout
placements with deterministic-prefix caching, channels-last, measured chunk sizes, compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dubito import DubitoError
from dubito.platform import mc
from dubito.platform.files import save_torch
from dubito.platform.mc import _chunk_cache, dropout_modules, mc_samples
from dubito.platform.models import DROPOUT_PLACEMENTS, FCDenseNet, _DenseBlock
from dubito.platform.service import UncertaintyService
from dubito.platform.training import TrainConfig, build_for, load_model, make_datasets, save_model

EXACT = {"chunk_size": 1, "channels_last": False, "prefix_cache": False}


def tiny(placement: str = "all", variant: str = "both", seed: int = 0) -> FCDenseNet:
    torch.manual_seed(seed)
    return FCDenseNet("tiny", variant=variant, dropout=0.3, dropout_at=placement).eval()


def active_dropout(model: nn.Module) -> list[str]:
    return [
        name for name, m in model.named_modules() if isinstance(m, (nn.Dropout, nn.Dropout2d)) and m.p > 0
    ]


def test_placements_activate_dropout_only_from_their_point_on():
    names = {p: active_dropout(tiny(p)) for p in DROPOUT_PLACEMENTS}
    assert names["head"] == ["head_dropout"]
    assert set(names["last_block"]) == {"head_dropout"} | {
        n for n in names["all"] if n.startswith("up_blocks.2.")
    }
    assert names["decoder"] == [n for n in names["all"] if n.startswith(("bottleneck.", "up_blocks."))]
    assert "head_dropout" not in names["all"] and any(n.startswith("transitions_down.") for n in names["all"])
    # every dropout layer of a placement is one of the model's; the weights are the same architecture
    states = [tiny(p).state_dict() for p in DROPOUT_PLACEMENTS]
    assert all(
        s.keys() == states[0].keys() and all(torch.equal(s[k], states[0][k]) for k in s) for s in states
    )
    with pytest.raises(DubitoError, match="dropout_at must be one of"):
        FCDenseNet("tiny", dropout_at="encoder")


@pytest.mark.parametrize("placement", DROPOUT_PLACEMENTS)
def test_stages_compose_to_forward_and_buffered_blocks_are_exact(placement):
    model = tiny(placement)
    x = torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        buffered = model(x)
        state = x
        for _, run in model.mc_stages():
            state = run(state)
        _DenseBlock.preallocate = False
        try:
            plain = model(x)
        finally:
            _DenseBlock.preallocate = True
    for a, b, c in zip(buffered, plain, state):
        assert torch.equal(a, b) and torch.equal(a, c)
    cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(cl)[0], plain[0], atol=1e-5, rtol=1e-5)


def test_training_still_concatenates_and_gets_gradients():
    model = tiny("all").train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    logits, log_var = model(x)
    (logits.sum() + log_var.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("placement", DROPOUT_PLACEMENTS)
def test_prefix_cache_gives_the_samples_of_the_full_forward(placement):
    model = tiny(placement)
    x = torch.randn(3, 3, 20, 28)
    full = mc_samples(model, x, 6, seed=3, probs=True, logit_noise_samples=4, **EXACT)
    for chunk in (1, 4, "auto"):
        cached = mc_samples(
            model, x, 6, seed=3, probs=True, logit_noise_samples=4, chunk_size=chunk, channels_last=False
        )
        if chunk == "auto":  # all 6 samples in one pass: with one thread its kernels differ at 4e-7
            for got, want in zip(
                (cached.mean, cached.log_var, cached.probs), (full.mean, full.log_var, full.probs)
            ):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            continue
        assert torch.equal(cached.mean, full.mean) and torch.equal(cached.log_var, full.log_var)
        assert torch.equal(cached.probs, full.probs)
    # the samples do differ (dropout is active) and differ between placements
    assert not torch.equal(full.mean[0], full.mean[1])


def _counter(module: nn.Module) -> list[int]:
    hits: list[int] = []
    module.register_forward_hook(lambda *a: hits.append(1))
    return hits


@pytest.mark.parametrize(
    "placement, prefix_cache, stochastic, expected",
    [
        ("head", True, True, (1, 1, 5)),  # only the head's dropout is sampled
        ("all", True, True, (1, 5, 5)),  # the first conv has no dropout: cached even with dropout everywhere
        ("head", False, True, (5, 5, 5)),
        ("head", True, False, (1, 1, 1)),  # one deterministic pass
    ],
)
def test_the_deterministic_prefix_runs_once_per_call(placement, prefix_cache, stochastic, expected):
    model = tiny(placement)
    counts = [_counter(model.first), _counter(model.down_blocks[0]), _counter(model.head)]
    mc_samples(
        model,
        torch.randn(2, 3, 16, 16),
        5,
        seed=0,
        chunk_size=1,
        prefix_cache=prefix_cache,
        stochastic=stochastic,
    )
    assert tuple(len(c) for c in counts) == expected


def test_channels_last_agrees_to_float_rounding_and_leaves_the_model_alone():
    model = tiny("all")
    x = torch.randn(2, 3, 20, 28)
    exact = mc_samples(model, x, 4, seed=1, **EXACT)
    fast = mc_samples(model, x, 4, seed=1)
    torch.testing.assert_close(fast.mean, exact.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.log_var, exact.log_var, atol=1e-5, rtol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())  # weights untouched
    with pytest.raises(DubitoError, match="channels_last"):
        mc_samples(model, x, 2, channels_last="yes")
    with pytest.raises(DubitoError, match="compile"):
        mc_samples(model, x, 2, compile=1)


class Costly(nn.Module):
    """A conv net whose every forward advances a fake clock by ``cost(batch)``."""

    def __init__(self, cost, clock: list[float]):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.drop = nn.Dropout(0.5)
        self.cost, self.clock, self.batches = cost, clock, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        self.clock[0] += self.cost(x.shape[0] // 2)
        return self.drop(self.conv(x))


@pytest.mark.parametrize(
    "cost, first_batches, capacity",
    [
        # per-call overhead, then memory traffic: each size runs untimed, then timed; 8 is worse than 4
        (lambda k: 1.0 + 0.1 * k + 0.05 * k * k, [2, 2, 4, 4, 8, 8, 16, 16, 8, 8, 4], 4),
        (lambda k: k**1.2, [2, 2, 4, 4, 2, 2], 1),  # replication costs more per sample: loop
    ],
)
def test_cpu_chunk_size_is_found_by_measurement(monkeypatch, cost, first_batches, capacity):
    clock = [0.0]
    monkeypatch.setattr(mc, "_clock", lambda: clock[0])
    _chunk_cache.clear()
    model = Costly(cost, clock)
    x = torch.randn(2, 3, 64, 128)  # above CPU_REPLICATION_ELEMENTS: measured
    ref = mc_samples(model, x, 40, seed=0, chunk_size=1).mean
    model.batches.clear()
    _chunk_cache.clear()
    out = mc_samples(model, x, 40, seed=0).mean
    assert model.batches[: len(first_batches)] == first_batches
    assert sum(model.batches) == 2 * 40 and torch.equal(out, ref)
    assert list(_chunk_cache.values()) == [capacity]
    model.batches.clear()
    mc_samples(model, x, 40, seed=0)  # the next call uses what was measured
    assert set(model.batches[:-1]) == {2 * capacity}
    _chunk_cache.clear()
    mc_samples(model, x, 4, seed=0)  # too few samples to decide: nothing is cached for later calls
    assert _chunk_cache == {}


def test_compile_gives_the_same_samples():
    torch._dynamo.reset()
    model = tiny("last_block")
    x = torch.randn(2, 3, 16, 16)
    ref = mc_samples(model, x, 4, seed=0, **EXACT)
    for _ in range(2):  # compiled once per model, reused
        out = mc_samples(model, x, 4, seed=0, compile="eager", channels_last=False)
        assert torch.equal(out.mean, ref.mean) and torch.equal(out.log_var, ref.log_var)
    assert len(model._dubito_compiled) == 1


def test_service_and_training_carry_the_options(tmp_path):
    model = tiny("head")
    service = UncertaintyService(
        model, samples=4, device="cpu", seed=0, channels_last=False, prefix_cache=False, progress=False
    )
    x = torch.randn(2, 3, 16, 16)
    _, samples = service.predict_with_samples(x, seed=5)
    ref = mc_samples(model, x, 4, seed=5, probs=True, **EXACT)
    assert torch.equal(samples.probs, ref.probs)
    config = TrainConfig(
        output=str(tmp_path), dropout_at="head", height=16, width=16, train_images=4, val_images=2
    )
    train_set, _ = make_datasets(config)
    built, spec = build_for(config, train_set)
    assert spec.dropout_at == "head" and active_dropout(built) == ["head_dropout"]
    save_model(tmp_path / "model.pt", built, spec)
    loaded, _ = load_model(tmp_path / "model.pt")
    assert loaded.dropout_at == "head"
    old = spec.as_dict()
    del old["dropout_at"]  # a model saved before placements existed: dropout everywhere
    save_torch({"spec": old, "state_dict": tiny("all").state_dict()}, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt")[0].dropout_at == "all"
    with pytest.raises(DubitoError, match="--dropout-at must be one of"):
        TrainConfig(dropout_at="middle").validate()
    with pytest.raises(DubitoError, match="FC-DenseNet option"):
        TrainConfig(dataset="digits", model="mlp", dropout_at="head").validate()
    assert dropout_modules(loaded)[-1] is loaded.head_dropout


def test_models_whose_forward_is_not_their_stages_run_whole():
    class Shifted(FCDenseNet):
        def forward(self, x):
            return super().forward(x + 1.0)

    torch.manual_seed(0)
    model = Shifted("tiny", variant="epistemic", dropout=0.3, dropout_at="head").eval()
    x = torch.randn(2, 3, 16, 16)
    out = mc_samples(model, x, 3, seed=0, **{**EXACT, "prefix_cache": True})
    ref = mc_samples(model, x, 3, seed=0, **EXACT)
    assert torch.equal(out.mean, ref.mean)
    with torch.no_grad():  # and it is the subclass's forward that ran: dropout-free check on the input shift
        plain = FCDenseNet("tiny", variant="epistemic", dropout=0.3, dropout_at="head").eval()
        plain.load_state_dict(model.state_dict())
    assert not torch.equal(out.mean, mc_samples(plain, x, 3, seed=0, **EXACT).mean)
    hooked = tiny("head")
    seen = []
    hooked.register_forward_hook(lambda m, inp, out: seen.append(1))
    mc_samples(hooked, x, 3, seed=0, chunk_size=1)
    assert seen == [1, 1, 1]  # a hook on the model itself is not bypassed


def test_cpu_allocation_failure_halves_the_chunk():
    class Tight(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            if x.shape[0] > 6:
                raise RuntimeError(
                    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
                )
            return self.drop(x)

    x = torch.randn(3, 4)
    out = mc_samples(Tight(), x, 8, chunk_size=8, seed=0)
    assert torch.equal(out.mean, mc_samples(Tight(), x, 8, chunk_size=1, seed=0).mean)


def test_training_checkpoints_from_before_placements_still_resume():
    from dataclasses import asdict

    from dubito.platform.training import _comparable

    old = asdict(TrainConfig())
    del old["dropout_at"]
    assert _comparable(old) == _comparable(asdict(TrainConfig()))
    assert _comparable(old) != _comparable(asdict(TrainConfig(dropout_at="head")))
