"""Agents, replay buffer and the ensemble network, against direct computations."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import dubito.agents  # noqa: F401
from dubito import DubitoError
from dubito.agents import AGENTS, AgentConfig, ReplayBuffer, make_agent, run_episodes
from dubito.agents.agents import PRIOR_SCALE, _double_q
from dubito.platform.models import EnsembleMLP

pytestmark = pytest.mark.usefixtures("one_thread")


def test_replay_buffer_ring_and_masks():
    buf = ReplayBuffer(5, 3, masks=4, mask_prob=0.5, seed=0)
    for i in range(8):
        buf.add(np.full(3, i), i % 2, float(i), np.full(3, i + 1), i == 7)
    assert len(buf) == 5
    assert sorted(buf.reward.tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0]  # the oldest three were overwritten
    batch = buf.sample(64)
    assert batch["obs"].shape == (64, 3) and batch["mask"].shape == (64, 4)
    np.testing.assert_array_equal(batch["next_obs"].numpy(), batch["obs"].numpy() + 1)
    np.testing.assert_array_equal(
        batch["terminated"].numpy(), (batch["reward"].numpy() == 7).astype(np.float32)
    )
    many = ReplayBuffer(4000, 1, masks=10, mask_prob=0.3, seed=1)
    for i in range(4000):
        many.add(np.zeros(1), 0, 0.0, np.zeros(1), False)
    assert many.mask.mean() == pytest.approx(0.3, abs=0.01)
    with pytest.raises(DubitoError, match="empty"):
        ReplayBuffer(3, 1).sample(2)


def test_ensemble_mlp_equals_separate_members():
    torch.manual_seed(0)
    net = EnsembleMLP(7, 3, members=4, hidden=(5, 6))
    x = torch.randn(9, 7)
    out = net(x)
    assert out.shape == (4, 9, 3)
    for k in range(4):
        h = torch.relu(x @ net.w0[:, k] + net.b0[k])
        h = torch.relu(h @ net.w1[k] + net.b1[k])
        np.testing.assert_allclose(out[k].detach(), (h @ net.w2[k] + net.b2[k]).detach(), atol=1e-5)
    xs = torch.randn(4, 9, 7)  # a different batch per member
    per_member = net(xs)
    for k in range(4):
        np.testing.assert_allclose(per_member[k].detach(), net(xs[k])[k].detach(), atol=1e-5)
    with pytest.raises(DubitoError, match="EnsembleMLP expects"):
        net(torch.randn(9, 6))


def test_double_q_uses_the_online_argmax():
    online = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    target = torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    np.testing.assert_array_equal(_double_q(online, target).numpy(), [20.0, 40.0])
    per_member = _double_q(online[None].repeat(2, 1, 1), target[None].repeat(2, 1, 1))
    assert per_member.shape == (2, 2)


def test_bonus_agent_decomposes_the_members_and_adds_kappa_sigma():
    config = AgentConfig(ensemble=6, kappa=2.0)
    for kind in ("epistemic", "total"):
        agent = make_agent(kind, 5, 3, config, seed=1)
        x = torch.eye(5)
        with torch.no_grad():
            mean, log_var = agent._heads(agent.online, x)  # (K, N, A) each
        m, v = mean.numpy(), np.exp(log_var.numpy())
        unc = agent.uncertainty(x)
        np.testing.assert_allclose(unc.mean.numpy(), m.mean(0), atol=1e-6)
        np.testing.assert_allclose(unc.epistemic_var.numpy(), m.var(0), rtol=1e-4, atol=1e-7)  # ddof 0
        np.testing.assert_allclose(unc.aleatoric_var.numpy(), v.mean(0), rtol=1e-4)
        np.testing.assert_allclose(
            unc.total_var.numpy(), unc.epistemic_var.numpy() + unc.aleatoric_var.numpy(), rtol=1e-5
        )
        sigma = np.sqrt(m.var(0) if kind == "epistemic" else m.var(0) + v.mean(0))
        np.testing.assert_allclose(
            agent.action_values(x[:1]), (m.mean(0) + 2.0 * sigma)[0], rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(agent.epistemic(x.numpy()), np.sqrt(m.var(0)).mean(1), rtol=1e-4)


def test_thompson_keeps_one_dropout_mask_per_episode():
    agent = make_agent("thompson", 6, 4, AgentConfig(dropout=0.5, hidden="32"), seed=0)
    x = torch.eye(6)[:1]
    agent.begin_episode()
    first = agent.action_values(x)
    np.testing.assert_array_equal(agent.action_values(x), first)  # same mask within the episode
    others = []
    for _ in range(5):
        agent.begin_episode()
        others.append(agent.action_values(x))
    assert any(not np.allclose(o, first) for o in others)  # a new mask per episode
    with torch.no_grad():
        agent.online.eval()
        mean = agent.online(x)[0].numpy()
    assert not np.allclose(first, mean)  # a sample, not the dropout-off mean


@pytest.mark.slow
@pytest.mark.finding
def test_rnd_error_falls_on_a_trained_state_and_stays_on_new_ones(finding):
    agent = make_agent("rnd", 10, 2, AgentConfig(min_replay=8, batch_size=8), seed=finding.seed(0))
    seen, new = np.eye(10, dtype=np.float32)[0], np.eye(10, dtype=np.float32)[1:]
    before = agent.epistemic(np.stack([seen]))[0]
    for _ in range(300):
        agent.observe(seen, 0, 0.0, seen, False)
    after = agent.epistemic(np.stack([seen]))[0]
    finding.check("RND error on the trained state, after over before", after / before, "<", 0.1)
    finding.check(
        "RND error, new states over the trained state", agent.epistemic(new).mean() / after, ">", 5.0
    )


@pytest.mark.parametrize("name", AGENTS)
def test_every_agent_runs_and_is_reproducible(name):
    def run():
        env = gym.make("dubito/NoisyTV-v0", size=3, max_steps=8)
        agent = make_agent(
            name,
            env.observation_space.shape[0],
            5,
            AgentConfig(min_replay=16, batch_size=16, hidden="16"),
            seed=3,
        )
        log = run_episodes(env, agent, 6, seed=3, progress=False)
        return agent, log

    agent, log = run()
    assert log.episodes == 6 and all(1 <= n <= 8 for n in log.lengths)
    assert log.visits.sum() == sum(log.lengths)  # one visit per action taken
    assert agent.updates > 0 and np.isfinite(agent.last_loss)
    assert run()[1].returns == log.returns  # same seed, same run
    est = agent.epistemic(np.eye(9 + 8, dtype=np.float32)[:9])
    assert (est is None) == (name == "dqn")
    if est is not None:
        assert est.shape == (9,) and np.all(est >= 0)


@pytest.mark.slow
@pytest.mark.finding
def test_dropout_source_uses_the_service_and_learns_the_noise(finding):
    """source="dropout": MC-dropout samples through the UncertaintyService; its heteroscedastic head
    learns a noisy action's reward variance as aleatoric, not epistemic."""
    config = AgentConfig(
        source="dropout", dropout=0.2, hidden="32", min_replay=32, batch_size=32, gamma=0.0, samples=20
    )
    agent = make_agent("total", 2, 2, config, seed=finding.seed(0))
    rng = np.random.default_rng(finding.seed(0))
    s = np.array([1.0, 0.0], dtype=np.float32)
    for _ in range(1500):
        a = int(rng.integers(2))
        agent.observe(s, a, float(rng.normal(0, 2.0)) if a == 1 else 0.5, s, True)  # action 1: pure noise
    unc = agent.uncertainty(torch.as_tensor(s[None]))
    alea = unc.aleatoric_var.sqrt()[0].numpy()
    finding.check(
        "learned aleatoric std of the noisy action (true 2), relative error",
        abs(alea[1] / 2.0 - 1),
        "<",
        0.25,
    )
    finding.check("learned aleatoric std of the constant action (true 0)", alea[0], "<", 0.3)
    finding.check(
        "Q of the constant action (true 0.5), absolute error", abs(unc.mean[0, 0].item() - 0.5), "<", 0.1
    )
    finding.check(
        "noisy action: epistemic over aleatoric variance",
        (unc.epistemic_var[0, 1] / unc.aleatoric_var[0, 1]).item(),
        "<",
        0.25,
    )


def test_bad_agent_settings_are_named():
    with pytest.raises(DubitoError, match="unknown agent 'ucb'"):
        make_agent("ucb", 4, 2)
    with pytest.raises(DubitoError, match="hidden"):
        AgentConfig(hidden="64,x")
    with pytest.raises(DubitoError, match="source"):
        AgentConfig(source="bootstrap")
    with pytest.raises(DubitoError, match="gamma"):
        AgentConfig(gamma=1.5)
    with pytest.raises(DubitoError, match="--mask-prob"):
        AgentConfig(mask_prob=0.0)
    agent = make_agent("dqn", 3, 2)
    with pytest.raises(DubitoError, match="diverged"):
        agent._argmax(np.array([0.1, np.nan]))


@pytest.mark.parametrize("name", AGENTS)
@pytest.mark.parametrize("env_id", ["dubito/DeepSea-v0", "dubito/NoisyTV-v0"])
def test_a_run_saved_mid_way_resumes_exactly(name, env_id, one_thread):
    """run_state after episode 5, written and read back with weights_only=True, continues the run
    as if it had never stopped: the same returns, visits and final weights."""
    import io

    from dubito.agents.loop import run_state

    options = {"size": 5, "mapping_seed": 1} if "DeepSea" in env_id else {"size": 4}
    config = AgentConfig(min_replay=16, batch_size=16)

    def make():
        env = gym.make(env_id, **options)
        return env, make_agent(
            name, int(np.prod(env.observation_space.shape)), int(env.action_space.n), config, seed=5
        )

    env, agent = make()
    whole = run_episodes(env, agent, 12, seed=5, progress=False)
    saved = {}

    env2, agent2 = make()

    def keep(log):
        if log.episodes == 5:
            buffer = io.BytesIO()
            torch.save(run_state(env2, agent2, log), buffer)
            saved["state"] = buffer.getvalue()

    run_episodes(env2, agent2, 5, seed=5, progress=False, on_episode=keep)
    env3, agent3 = make()
    state = torch.load(io.BytesIO(saved["state"]), weights_only=True)
    resumed = run_episodes(env3, agent3, 12, seed=5, progress=False, resume=state)
    assert resumed.returns == whole.returns and resumed.lengths == whole.lengths
    assert np.array_equal(resumed.visits, whole.visits)
    for key, value in agent.state_dict().items():
        if (
            isinstance(value, dict)
            and "state" not in value
            and all(isinstance(v, torch.Tensor) for v in value.values())
        ):
            other = agent3.state_dict()[key]
            assert all(torch.equal(value[k], other[k]) for k in value), key
    assert agent3.steps == agent.steps and agent3.updates == agent.updates and agent.updates > 0


def test_a_checkpoint_of_another_agent_is_refused():
    env = gym.make("dubito/DeepSea-v0", size=4)
    dqn = make_agent("dqn", 16, 2, AgentConfig(), seed=0)
    rnd = make_agent("rnd", 16, 2, AgentConfig(), seed=0)
    with pytest.raises(DubitoError, match="does not match"):
        rnd.load_state_dict(dqn.state_dict())
    env.close()


def test_prior_scale_defaults_per_agent_and_the_flag_overrides_it():
    obs = torch.eye(6)
    defaults = {
        name: make_agent(name, 6, 3, AgentConfig(ensemble=4), seed=0).prior_scale for name in PRIOR_SCALE
    }
    assert defaults == {"bootstrapped": 3.0, "epistemic": 10.0, "total": 10.0}
    # β multiplies the fixed prior in the members the service scores: β = 0 leaves the trained nets alone
    for beta in (0.0, 2.5):
        agent = make_agent("epistemic", 6, 3, AgentConfig(ensemble=4, prior_scale=beta), seed=0)
        with torch.no_grad():
            mean = agent.online(obs)[..., :3] + beta * agent.prior(obs)
        np.testing.assert_allclose(
            agent.epistemic(obs.numpy()), mean.var(0, unbiased=False).sqrt().mean(1).numpy(), rtol=1e-5
        )
    with pytest.raises(DubitoError, match="--prior-scale"):
        AgentConfig(prior_scale=-1.0)
    # β comes from the config, never from a checkpoint: older checkpoints load, and the agent's
    # networks and its service keep one β
    for name in PRIOR_SCALE:
        saved = make_agent(name, 6, 3, AgentConfig(ensemble=4, prior_scale=10.0), seed=0).state_dict()
        assert "prior_scale" not in saved
        agent = make_agent(name, 6, 3, AgentConfig(ensemble=4, prior_scale=1.0), seed=1)
        agent.load_state_dict(saved)
        assert agent.prior_scale == 1.0 == agent.service.model.scale
