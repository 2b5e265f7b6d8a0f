"""Deep ensembles as an epistemic source: the members are the samples of the decomposition,
batched members give the loop's outputs, and the variances have closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dubito import DubitoError
from dubito.acquisition.selection import select
from dubito.platform.ensemble import Ensemble, ensemble_samples
from dubito.platform.mc import _sample_seed, mc_samples
from dubito.platform.models import MLP, FCDenseNet
from dubito.platform.service import UncertaintyService
from dubito.platform.uncertainty import classification_uncertainty, regression_uncertainty

pytestmark = pytest.mark.usefixtures("one_thread")


def _regressors(k: int, seed: int = 0) -> Ensemble:
    torch.manual_seed(seed)
    return Ensemble([MLP(3, 1, (16,), task="regression", variant="both", dropout=0.2) for _ in range(k)])


def test_members_are_the_samples_of_the_decomposition():
    ens, x = _regressors(4), torch.randn(7, 3)
    out = ensemble_samples(ens, x, batched=False, seed=1)
    assert out.mean.shape == (4, 7, 1) and out.log_var.shape == (4, 7, 1)
    with torch.no_grad():  # each member's deterministic forward, by hand
        means = np.stack([m.eval()(x)[0].numpy() for m in ens.members])
        log_vars = np.stack([m.eval()(x)[1].numpy() for m in ens.members])
    np.testing.assert_allclose(out.mean.numpy(), means, rtol=1e-6, atol=1e-6)
    u = regression_uncertainty(out.mean, out.log_var)
    np.testing.assert_allclose(u.epistemic_var.numpy(), means.var(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(u.aleatoric_var.numpy(), np.exp(log_vars).mean(0), rtol=1e-5)
    # identical members: no epistemic spread, whatever their noise
    same = Ensemble([ens.members[0]] * 3)
    assert torch.count_nonzero(regression_uncertainty(*ensemble_samples(same, x)[:2]).epistemic_var) == 0


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_batched_members_give_the_loops_outputs(task):
    torch.manual_seed(3)
    members = [MLP(5, 4, (12, 12), task=task, variant="both", dropout=0.3) for _ in range(5)]
    ens, x = Ensemble(members), torch.randn(6, 5)
    loop = ensemble_samples(
        ens, x, probs=task == "classification", logit_noise_samples=8, seed=2, batched=False
    )
    batched = ensemble_samples(
        ens, x, probs=task == "classification", logit_noise_samples=8, seed=2, batched=True
    )
    torch.testing.assert_close(batched.mean, loop.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.log_var, loop.log_var, rtol=1e-5, atol=1e-6)
    if task == "classification":  # the same ε per member: probabilities agree too
        torch.testing.assert_close(batched.probs, loop.probs, rtol=1e-5, atol=1e-6)
        u = classification_uncertainty(batched.probs, batched.mean)
        assert torch.all(u.mutual_information >= -1e-6)
    assert all(m.training for m in members)  # the members' modes are left as they were


@pytest.mark.parametrize(
    "task, variant, channels_last",
    [
        ("segmentation", "both", "auto"),
        ("segmentation", "baseline", False),
        ("depth", "aleatoric", "auto"),
        ("depth", "homoscedastic", False),
    ],
)
def test_grouped_fc_densenet_members_give_the_loops_outputs(task, variant, channels_last):
    torch.manual_seed(0)
    classes = 5 if task == "segmentation" else 1
    members = [
        FCDenseNet("tiny", task=task, num_classes=classes, variant=variant, dropout=0.2).eval()
        for _ in range(3)
    ]
    for m in members:  # running statistics and noise parameters other than the initial ones
        for b in (*m.buffers(), *(p for n, p in m.named_parameters() if "log_var" in n)):
            if b.dtype.is_floating_point:
                b.data.add_(torch.rand_like(b) * 0.1)
    ens, x = Ensemble(members), torch.randn(2, 3, 15, 23)  # odd sizes: the up path crops
    options = dict(probs=task == "segmentation", logit_noise_samples=4, seed=5, channels_last=channels_last)
    loop = ensemble_samples(ens, x, batched=False, **options)
    grouped = ensemble_samples(ens, x, batched=True, **options)
    assert grouped.mean.shape == (3, 2, classes, 15, 23)
    torch.testing.assert_close(grouped.mean, loop.mean, rtol=1e-4, atol=1e-4)
    if loop.log_var is not None:
        torch.testing.assert_close(grouped.log_var, loop.log_var, rtol=1e-4, atol=1e-4)
    if options["probs"]:
        torch.testing.assert_close(grouped.probs, loop.probs, rtol=1e-4, atol=1e-4)
    # "auto" loops over FC-DenseNets (faster on a CPU); a member's new weights are seen at once
    assert torch.equal(ensemble_samples(ens, x, **options).mean, loop.mean)
    with torch.no_grad():
        members[1].first.weight.mul_(2)
    again = ensemble_samples(ens, x, batched=True, **options)
    torch.testing.assert_close(
        again.mean, ensemble_samples(ens, x, batched=False, **options).mean, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(again.mean[0], grouped.mean[0])


def test_grouped_members_built_under_inference_mode():
    with torch.inference_mode():  # inference tensors keep no version counter
        members = [FCDenseNet("tiny", num_classes=3, variant="epistemic").eval() for _ in range(2)]
        x = torch.randn(1, 3, 16, 16)
    ens = Ensemble(members)
    torch.testing.assert_close(
        ensemble_samples(ens, x, batched=True).mean,
        ensemble_samples(ens, x, batched=False).mean,
        rtol=1e-4,
        atol=1e-4,
    )


def test_ensemble_plus_dropout_stacks_each_members_dropout_samples():
    ens, x = _regressors(3, seed=4), torch.randn(5, 3)
    out = ensemble_samples(ens, x, 4, seed=9)
    assert out.mean.shape == (12, 5, 1)
    for k, member in enumerate(ens.members):  # member-major rows, member k's own seed
        alone = mc_samples(member, x, 4, seed=_sample_seed(9, k))
        assert torch.equal(out.mean[4 * k : 4 * k + 4], alone.mean)
    assert not torch.equal(out.mean[0], out.mean[1])  # dropout is active within a member


def test_bad_ensembles_are_refused():
    with pytest.raises(DubitoError, match="at least one member"):
        Ensemble([])
    with pytest.raises(DubitoError, match="disagree on task"):
        Ensemble([MLP(3, 2, task="classification"), MLP(3, 1, task="regression")])
    mixed = Ensemble([MLP(3, 1, (8,), task="regression"), MLP(3, 1, (16,), task="regression")])
    assert not mixed.same_architecture()
    with pytest.raises(DubitoError, match="one architecture"):
        ensemble_samples(mixed, torch.randn(2, 3), batched=True)
    assert ensemble_samples(mixed, torch.randn(2, 3)).mean.shape == (2, 2, 1)  # auto: a loop
    with pytest.raises(DubitoError, match="no single forward"):
        mixed(torch.randn(2, 3))
    with pytest.raises(DubitoError, match="samples must be"):
        ensemble_samples(mixed, torch.randn(2, 3), 0)


# --- the ensemble behind the uncertainty service -------------------------------------------


def test_service_ensemble_source_is_the_members_decomposition():
    ens, x = _regressors(4, seed=5), torch.randn(9, 3)
    svc = UncertaintyService(ens, device="cpu", seed=0)
    assert (svc.epistemic, svc.samples, svc.draws) == ("ensemble", 1, 4)
    u = svc.predict(x)
    with torch.no_grad():
        means = np.stack([m.eval()(x)[0].numpy() for m in ens.members])
        variances = np.stack([np.exp(m.eval()(x)[1].numpy()) for m in ens.members])
    np.testing.assert_allclose(u.mean.numpy(), means.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u.epistemic_var.numpy(), means.var(0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(u.aleatoric_var.numpy(), variances.mean(0), rtol=1e-5)
    # a plain list of members is an ensemble too, and gives the same answer
    listed = UncertaintyService(list(ens.members), device="cpu", seed=0).predict(x)
    torch.testing.assert_close(listed.epistemic_var, u.epistemic_var)


def test_service_ensemble_plus_dropout_feeds_batchbald_and_streams():
    torch.manual_seed(0)
    members = [MLP(4, 3, (16,), task="classification", variant="epistemic", dropout=0.3) for _ in range(3)]
    svc = UncertaintyService(members, epistemic="ensemble+dropout", samples=5, device="cpu", seed=1)
    x = torch.randn(12, 4)
    u, out = svc.predict_with_samples(x)
    assert out.probs.shape == (15, 12, 3) and svc.draws == 15 and "K=3" in svc.describe()
    # the mutual information is that of the K·T stacked probabilities, by hand
    p = out.probs.double()
    mean = p.mean(0)
    mi = -(mean * mean.log()).sum(-1) + (p * p.log()).sum(-1).mean(0)
    torch.testing.assert_close(u.mutual_information.double(), mi.clamp_min(0), rtol=1e-4, atol=1e-6)
    picked = select(u.mutual_information, 4, "batchbald", prob_samples=out.probs, seed=0)
    assert len(set(picked.tolist())) == 4
    data = [{"image": x[:6], "id": torch.arange(6)}, {"image": x[6:], "id": torch.arange(6, 12)}]
    ids, values = zip(*svc.stream(data, progress=False))
    assert torch.cat(ids).tolist() == list(range(12)) and "mutual_information" in values[0]


def test_service_refuses_a_source_that_does_not_fit_the_model():
    ens = _regressors(2)
    with pytest.raises(DubitoError, match="does not fit the ensemble Ensemble"):
        UncertaintyService(ens, epistemic="dropout")
    with pytest.raises(DubitoError, match="does not fit one MLP"):
        UncertaintyService(ens.members[0], epistemic="ensemble")
    with pytest.raises(DubitoError, match="ensemble\\+dropout"):
        UncertaintyService(ens, epistemic="ensemble", samples=10)
    with pytest.raises(DubitoError, match="epistemic must be one of"):
        UncertaintyService(ens, epistemic="laplace")
    plain = Ensemble([MLP(3, 1, (8,), task="regression", variant="aleatoric", dropout=0.2) for _ in range(2)])
    with pytest.raises(DubitoError, match="no MC dropout"):  # dropout layers, but not sampled at test time
        UncertaintyService(plain, epistemic="ensemble+dropout")


def test_a_packed_ensemble_is_scored_as_its_stacked_members():
    from dubito.platform.models import EnsembleMLP

    torch.manual_seed(0)
    packed, x = EnsembleMLP(3, 2, members=6, hidden=(8,)), torch.randn(5, 3)
    svc = UncertaintyService(packed, "regression", device="cpu")
    assert (svc.epistemic, svc.draws) == ("ensemble", 6)
    with torch.no_grad():
        q = packed(x).numpy()  # (K, N, A)
    u = svc.predict(x)
    np.testing.assert_allclose(u.mean.numpy(), q.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(u.epistemic_var.numpy(), q.var(0), rtol=1e-5, atol=1e-8)
    assert torch.count_nonzero(u.aleatoric_var) == 0  # no noise head
    with pytest.raises(DubitoError, match="packed ensemble"):
        UncertaintyService(packed, "regression", epistemic="ensemble+dropout")


def test_the_agents_members_are_scored_by_the_service():
    from dubito.agents.agents import AgentConfig, make_agent

    obs = np.eye(6, dtype=np.float32)
    agent = make_agent("epistemic", 6, 3, AgentConfig(ensemble=4), seed=0)
    assert agent.service.epistemic == "ensemble" and agent.service.draws == 4
    with torch.no_grad():  # the members with their priors, by hand
        out = agent.online(torch.as_tensor(obs))
        mean = out[..., :3] + agent.prior_scale * agent.prior(torch.as_tensor(obs))
        var = torch.exp(out[..., 3:])
    np.testing.assert_allclose(
        agent.epistemic(obs), mean.var(0, unbiased=False).sqrt().mean(1).numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(agent.aleatoric(obs), var.mean(0).sqrt().mean(1).numpy(), rtol=1e-5)
    assert "service" not in agent.state_dict()  # no seed stream: checkpoints are as before
    before = torch.get_rng_state()
    agent.act(obs[0])
    agent.epistemic(obs)
    assert torch.equal(torch.get_rng_state(), before)  # nothing random: torch's global RNG is left alone
    boot = make_agent("bootstrapped", 6, 3, AgentConfig(ensemble=4), seed=0)
    with torch.no_grad():
        q = boot.online(torch.as_tensor(obs)) + boot.prior_scale * boot.prior(torch.as_tensor(obs))
    np.testing.assert_allclose(
        boot.epistemic(obs), q.var(0, unbiased=False).sqrt().mean(1).numpy(), rtol=1e-5
    )
