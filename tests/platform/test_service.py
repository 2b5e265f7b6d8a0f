"""UncertaintyService: predict wiring, variants, streaming with bounded memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dubito import DubitoError
from dubito.platform.mc import mc_samples
from dubito.platform.models import MLP, FCDenseNet
from dubito.platform.service import UncertaintyService
from dubito.platform.uncertainty import classification_uncertainty


class Pool(Dataset):
    """Dict items like dubito's datasets, counting reads."""

    def __init__(self, n=10, size=(12, 16), ids_offset=100):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, *size, generator=g)
        self.masks = torch.rand(n, *size, generator=g) > 0.3
        self.offset = ids_offset
        self.reads = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.reads += 1
        return {"image": self.images[i], "mask": self.masks[i], "id": i + self.offset}


def test_predict_is_the_engine_plus_the_decomposition():
    model = FCDenseNet("tiny", variant="both")
    x = torch.randn(2, 3, 12, 16)
    svc = UncertaintyService(model, samples=6, seed=7, device="cpu", logit_noise_samples=3)
    got = svc.predict(x)
    seed = int(torch.randint(0, 1 << 62, (1,), generator=torch.Generator().manual_seed(7)).item())
    raw = mc_samples(model, x, 6, probs=True, logit_noise_samples=3, seed=seed)
    ref = classification_uncertainty(raw.probs, raw.mean)
    for name, value in ref.to_dict().items():
        torch.testing.assert_close(getattr(got, name), value)
    assert (got.mutual_information > 0).any()
    # same seed, new service: same answer; consecutive calls draw fresh masks
    again = UncertaintyService(model, samples=6, seed=7, device="cpu", logit_noise_samples=3).predict(x)
    torch.testing.assert_close(again.mean_probs, got.mean_probs)
    assert not torch.equal(svc.predict(x).mean_probs, got.mean_probs)


def test_variant_decides_test_time_dropout():
    x = torch.randn(4, 6)
    aleatoric = MLP(6, 3, variant="aleatoric")
    u = UncertaintyService(aleatoric, samples=20, device="cpu").predict(x)
    assert torch.equal(u.mutual_information, torch.zeros(4))
    assert (u.aleatoric_entropy > 0).all()
    forced = UncertaintyService(aleatoric, samples=20, device="cpu", mc_dropout=True, seed=0).predict(x)
    assert (forced.mutual_information > 0).all()
    depth = FCDenseNet("tiny", task="depth", variant="both", likelihood="laplace")
    r = UncertaintyService(depth, samples=4, device="cpu", seed=0).predict(torch.randn(1, 3, 8, 8))
    torch.testing.assert_close(r.total_var, r.aleatoric_var + r.epistemic_var)
    # log b = 0 at initialisation of the zero-initialised head: variance 2 b² = 2
    torch.testing.assert_close(r.aleatoric_var, torch.full_like(r.aleatoric_var, 2.0))


def test_users_own_module_works_with_task_given():
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    u = UncertaintyService(model, task="regression", samples=10, device="cpu", seed=0).predict(
        torch.randn(5, 3)
    )
    assert u.mean.shape == (5, 1) and (u.epistemic_var > 0).all()
    with pytest.raises(DubitoError, match="task"):
        UncertaintyService(model)


def test_stream_yields_ids_and_masked_per_image_means():
    model = FCDenseNet("tiny", variant="epistemic")
    pool = Pool(n=10)
    svc = UncertaintyService(model, samples=4, device="cpu", seed=1, batch_size=4, progress=False)
    ids, values = [], []
    for batch_ids, batch_values in svc.stream(pool):
        ids.append(batch_ids)
        values.append(batch_values)
    ids = torch.cat(ids)
    assert ids.tolist() == list(range(100, 110))
    assert [v["mutual_information"].shape[0] for v in values] == [4, 4, 2]
    # the same numbers as predicting the batches by hand (same seed sequence) and reducing with the mask
    ref_svc = UncertaintyService(model, samples=4, device="cpu", seed=1)
    for k, start in enumerate(range(0, 10, 4)):
        u = ref_svc.predict(pool.images[start : start + 4])
        mask = pool.masks[start : start + 4]
        for j in range(u.predictive_entropy.shape[0]):
            expected = u.mutual_information[j][mask[j]].mean()
            assert values[k]["mutual_information"][j].item() == pytest.approx(expected.item(), rel=1e-5)


def test_stream_is_lazy_and_accepts_dataloaders():
    pool = Pool(n=12)
    svc = UncertaintyService(FCDenseNet("tiny", variant="both"), samples=2, device="cpu", progress=False)
    stream = svc.stream(DataLoader(pool, batch_size=3), fields=["predictive_entropy"])
    ids, values = next(stream)
    assert pool.reads == 3  # only the first batch was read: memory bounded by the batch
    assert set(values) == {"predictive_entropy"} and ids.tolist() == [100, 101, 102]
    assert sum(1 for _ in stream) == 3


def test_stream_bad_batches_have_clear_errors():
    svc = UncertaintyService(MLP(2, 2), device="cpu", progress=False)
    with pytest.raises(DubitoError, match="batch 0 is a list"):
        next(svc.stream([[torch.zeros(2, 2)]]))
    with pytest.raises(DubitoError, match="no 'id'"):
        next(svc.stream([{"image": torch.zeros(2, 2)}]))
    with pytest.raises(DubitoError, match="2 images but 3 ids"):
        next(svc.stream([{"image": torch.zeros(2, 2), "id": torch.arange(3)}]))
    with pytest.raises(DubitoError, match="unknown fields"):
        next(svc.stream([{"image": torch.zeros(2, 2), "id": torch.arange(2)}], fields=["bald"]))
    with pytest.raises(DubitoError, match="samples"):
        UncertaintyService(MLP(2, 2), samples=0)
    with pytest.raises(DubitoError, match="likelihood"):
        UncertaintyService(MLP(2, 2), likelihood="student")


def test_predict_with_samples_returns_the_draws_it_decomposed():
    from dubito.platform.models import MLP
    from dubito.platform.uncertainty import classification_uncertainty

    model = MLP(6, 4, hidden=(16,), variant="both", dropout=0.3)
    x = torch.randn(5, 6)
    u, samples = UncertaintyService(
        model, samples=7, seed=3, progress=False, device="cpu"
    ).predict_with_samples(x)
    assert samples.probs.shape == (7, 5, 4)
    again = classification_uncertainty(samples.probs, samples.mean)
    torch.testing.assert_close(u.mutual_information, again.mutual_information)
    plain = UncertaintyService(model, samples=7, seed=3, progress=False, device="cpu").predict(x)
    torch.testing.assert_close(plain.mean_probs, u.mean_probs)  # the same seeded draws as predict


def test_service_state_restores_its_seed_stream():
    """A service given another's state draws the same dropout masks next (agents checkpoint it)."""
    model = MLP(4, 2, hidden=(16,), variant="epistemic", dropout=0.5)
    x = torch.randn(3, 4)
    a = UncertaintyService(model, "regression", 4, device="cpu", seed=1, progress=False)
    a.predict(x)
    saved = a.state_dict()
    expected = a.predict(x).mean
    b = UncertaintyService(model, "regression", 4, device="cpu", seed=99, progress=False)
    b.load_state_dict(saved)
    assert torch.equal(b.predict(x).mean, expected)
    with pytest.raises(DubitoError, match="seeded"):
        UncertaintyService(model, "regression", 4, device="cpu", progress=False).load_state_dict(saved)
