"""Uncertainty-driven DQN agents. One replay buffer, one update skeleton (double Q-learning
targets), the platform's networks (``MLP`` with its variants, ``EnsembleMLP``), its MC engine,
its UncertaintyService and its decomposition (``regression_uncertainty``). The ``epistemic``,
``total`` and ``bootstrapped`` agents' members (with their randomized priors) are a packed
ensemble that the service scores with its ensemble backend, the path labeling's ensembles take;
``source="dropout"`` and ``thompson`` use its dropout backend.

================ =================================================================================
agent            how it explores
================ =================================================================================
``dqn``          ε-greedy on a plain Q-network (dithering: ~2^N episodes on Deep Sea)
``bootstrapped`` Bootstrapped DQN with randomized prior functions (Osband et al. 2018): K heads,
                 each Q_k = f_k + β·p_k with a fixed random prior p_k; one head acts greedily
                 per episode (Thompson sampling over heads)
``thompson``     MC-dropout Thompson sampling: one dropout mask per episode, greedy under it
``epistemic``    Kendall & Gal Q-network: a heteroscedastic head (the TD target's aleatoric
                 variance, Gaussian NLL) and epistemic samples (K members with randomized priors
                 by default, or MC dropout with ``source="dropout"``), decomposed by
                 ``regression_uncertainty``; acts on argmax_a Q̄(s, a) + κ·σ_epistemic(s, a). Each
                 member bootstraps from its own target, so the spread carries the uncertainty of
                 the states ahead (deep exploration).
``total``        the ablation: the same with κ·sqrt(epistemic + aleatoric variance) — it is drawn
                 to noise (a noisy TV) because aleatoric variance never shrinks with visits
``rnd``          Random Network Distillation (Burda et al. 2019): ε-greedy DQN whose reward adds
                 β·(prediction error of a fixed random network on s′) / its running std
================ =================================================================================

Why the ``epistemic`` agent samples an ensemble by default: MC-dropout spread on these small
Q-networks does not fall with a state's visit count (measured on one-hot states: Spearman's ρ
between dropout std and visits was +0.1 to +0.7, i.e. it rose), so a dropout bonus cannot drive
deep exploration — the ``thompson`` agent and ``source="dropout"`` show it on Deep Sea. Members
with random priors disagree where they have not been trained and agree where they have.

Every agent: ``begin_episode()``, ``act(obs) -> int``, ``observe(obs, action, reward, next_obs,
terminated)`` (stores and learns), ``epistemic(obs_batch) -> (N,)`` (its estimate of what it
does not know about each state; mean over actions; ``None`` for ``dqn``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dubito import DubitoError
from dubito.agents.replay import ReplayBuffer
from dubito.platform.config import check_range, coerce_lists, flag
from dubito.platform.losses import gaussian_nll
from dubito.platform.mc import mc_samples
from dubito.platform.models import MLP, EnsembleMLP
from dubito.platform.service import UncertaintyService
from dubito.platform.uncertainty import RegressionUncertainty

__all__ = ["AGENTS", "PRIOR_SCALE", "AgentConfig", "Agent", "make_agent", "prior_scale"]

#: β, the randomized prior's scale, per agent when ``--prior-scale`` is not given. The UCB-style
#: agents need the stronger prior: with β = 3 the ``epistemic`` agent solved Deep Sea N = 20 in 1 of
#: 3 seeds within 1000 episodes, with β = 10 in 3 of 3; Thompson sampling over heads does with 3.
PRIOR_SCALE: dict[str, float] = {"bootstrapped": 3.0, "epistemic": 10.0, "total": 10.0}


def prior_scale(agent: str, given: float | None) -> float | None:
    """The β ``agent`` runs with: ``given`` (``--prior-scale``), else its :data:`PRIOR_SCALE`;
    None for an agent without a randomized prior."""
    if agent not in PRIOR_SCALE:
        return None
    return PRIOR_SCALE[agent] if given is None else float(given)


@dataclass
class AgentConfig:
    """Hyperparameters of every agent (each is a ``dubito explore`` flag; each agent reads its own)."""

    hidden: tuple[int, ...] = field(
        default=(64, 64), metadata={"help": "hidden layer sizes of every network, comma-separated"}
    )
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    gamma: float = field(default=0.99, metadata={"help": "discount"})
    batch_size: int = field(default=64, metadata={"help": "replay batch per update"})
    buffer_size: int = field(default=10_000, metadata={"help": "replay capacity (transitions)"})
    min_replay: int = field(default=64, metadata={"help": "transitions stored before learning starts"})
    train_every: int = field(default=1, metadata={"help": "environment steps per gradient update"})
    target_every: int = field(default=4, metadata={"help": "updates between target-network copies"})
    epsilon: float = field(default=0.1, metadata={"help": "dqn / rnd: probability of a random action"})
    ensemble: int = field(default=10, metadata={"help": "bootstrapped: K heads"})
    prior_scale: float | None = field(
        default=None,
        metadata={
            "help": "bootstrapped / epistemic / total: β, scale of the random prior "
            "(default: bootstrapped 3, epistemic and total 10)"
        },
    )
    mask_prob: float = field(
        default=1.0, metadata={"help": "bootstrapped: probability a head trains on a transition"}
    )
    dropout: float = field(default=0.1, metadata={"help": "thompson / epistemic / total: dropout p"})
    samples: int = field(
        default=10, metadata={"help": "epistemic / total: MC-dropout samples T per estimate"}
    )
    kappa: float = field(default=3.0, metadata={"help": "epistemic / total: bonus scale κ"})
    source: str = field(
        default="ensemble",
        metadata={
            "help": "epistemic / total: epistemic samples from an 'ensemble' with randomized priors or MC 'dropout'"
        },
    )
    rnd_scale: float = field(default=0.1, metadata={"help": "rnd: scale of the normalised intrinsic reward"})

    def __post_init__(self) -> None:
        coerce_lists(self)
        self.hidden_sizes()
        for name in (
            "batch_size",
            "buffer_size",
            "min_replay",
            "train_every",
            "target_every",
            "ensemble",
            "samples",
        ):
            if int(getattr(self, name)) < 1:
                raise DubitoError(f"{flag(name)} must be >= 1, got {getattr(self, name)!r}")
        check_range("lr", self.lr, 0.0, low_open=True)
        for name in ("kappa", "rnd_scale"):
            check_range(name, getattr(self, name), 0.0)
        if self.prior_scale is not None:
            check_range("prior_scale", self.prior_scale, 0.0)
        if not 0.0 <= self.gamma <= 1.0:
            raise DubitoError(f"--gamma must be in [0, 1], got {self.gamma!r}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise DubitoError(f"--epsilon must be in [0, 1], got {self.epsilon!r}")
        if self.source not in ("ensemble", "dropout"):
            raise DubitoError(f"--source must be 'ensemble' or 'dropout', got {self.source!r}")
        if not 0.0 < self.mask_prob <= 1.0:
            raise DubitoError(f"--mask-prob must be in (0, 1], got {self.mask_prob!r}")
        if self.min_replay > self.buffer_size:
            raise DubitoError(
                f"--min-replay ({self.min_replay}) must not exceed --buffer-size ({self.buffer_size}): learning would never start"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise DubitoError(f"--dropout must be in [0, 1), got {self.dropout!r}")

    def hidden_sizes(self) -> tuple[int, ...]:
        if not self.hidden or min(self.hidden) < 1:
            raise DubitoError(
                f"--hidden must be comma-separated positive layer sizes such as '64,64', got {self.hidden!r}"
            )
        return self.hidden


def _adam(params, lr: float) -> torch.optim.Adam:
    """Adam; fused on the CPU too, where its per-step overhead otherwise dominates these small networks."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # torch without fused CPU Adam (< 2.4)
        return torch.optim.Adam(params, lr=lr)


def _double_q(online_q: Tensor, target_q: Tensor) -> Tensor:
    """Double Q-learning (van Hasselt et al. 2016): the target network's value of the online
    network's greedy action, over the last axis — it removes the upward bias a max over noisy
    estimates has (a noisy TV's rewards would otherwise look worth watching to every agent)."""
    return target_q.gather(-1, online_q.argmax(dim=-1, keepdim=True)).squeeze(-1)


#: what an agent's checkpoint saves through its own ``state_dict`` (a service: its seed stream)
_STATEFUL = (nn.Module, torch.optim.Optimizer, ReplayBuffer, UncertaintyService)


class Agent:
    """The shared skeleton: replay, a counter of steps and updates, target copies, tie-broken argmax."""

    name = "agent"

    def __init__(
        self, obs_dim: int, n_actions: int, config: AgentConfig, seed: int = 0, masks: int = 0
    ) -> None:
        self.obs_dim = int(obs_dim)
        self.n_actions = int(n_actions)
        self.config = config
        self.seed = seed
        self.rng = np.random.default_rng([seed, 1])
        self.replay = ReplayBuffer(
            config.buffer_size, obs_dim, masks=masks, mask_prob=config.mask_prob, seed=seed
        )
        self.steps = 0
        self.updates = 0
        self.episodes = 0
        self.last_loss = float("nan")

    # ---- acting ---------------------------------------------------------------------------
    def begin_episode(self) -> None:
        self.episodes += 1

    def act(self, obs: np.ndarray) -> int:
        return self._argmax(self.action_values(self._tensor(obs)))

    def action_values(self, x: Tensor) -> np.ndarray:
        """Scores of the actions in state ``x`` (1, D) that the agent maximises."""
        raise NotImplementedError

    def _argmax(self, values: np.ndarray) -> int:
        if not np.all(np.isfinite(values)):
            raise DubitoError(
                f"{self.name}: action values are not finite ({values}) after {self.updates} updates: training "
                "diverged; lower --lr or --kappa, or raise --target-every"
            )
        best = np.flatnonzero(values == values.max())
        return int(best[0]) if best.size == 1 else int(self.rng.choice(best))

    def _epsilon_greedy(self, obs: np.ndarray) -> int:
        if self.rng.random() < self.config.epsilon:
            return int(self.rng.integers(self.n_actions))
        return self._argmax(self.action_values(self._tensor(obs)))

    @staticmethod
    def _tensor(obs: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(obs, dtype=np.float32).reshape(1, -1))

    # ---- learning -------------------------------------------------------------------------
    def observe(
        self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, terminated: bool
    ) -> None:
        self.replay.add(obs, action, reward, next_obs, terminated)
        self.steps += 1
        c = self.config
        if len(self.replay) >= c.min_replay and self.steps % c.train_every == 0:
            self.last_loss = self.update(self.replay.sample(c.batch_size))
            self.updates += 1
            if self.updates % c.target_every == 0:
                self.sync_target()

    def update(self, batch: dict[str, Tensor]) -> float:
        raise NotImplementedError

    def sync_target(self) -> None:
        self.target.load_state_dict(self.online.state_dict())

    def _step(self, optimizer: torch.optim.Optimizer, loss: Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def _bootstrap(self, batch: dict[str, Tensor], next_max: Tensor) -> Tensor:
        """r + γ (1 − terminated) max_a′ Q_target(s′, a′)."""
        return batch["reward"] + self.config.gamma * (1.0 - batch["terminated"]) * next_max

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that makes the agent what it is after its last step — networks, optimisers,
        replay, random streams, counters — as tensors, numbers and strings (readable with
        ``torch.load(weights_only=True)``). An agent built with the same arguments and given this
        state acts and learns exactly as the saved one would have."""
        state: dict[str, Any] = {}
        for name, value in self._checkpointed():
            if isinstance(value, _STATEFUL):
                state[name] = value.state_dict()
            elif isinstance(value, np.random.Generator):
                state[name] = value.bit_generator.state
            else:
                state[name] = value
        return state

    @property
    def prior_scale(self) -> float | None:
        """β, the scale of this agent's randomized prior (None without one): from the config, never
        from a checkpoint, so the networks and the service always agree on it."""
        return prior_scale(self.name, self.config.prior_scale)

    def _checkpointed(self) -> list[tuple[str, Any]]:
        """(name, value) of every attribute a checkpoint holds (the config is rebuilt, not saved)."""
        out = []
        for name, value in vars(self).items():
            if isinstance(value, AgentConfig):
                continue
            if isinstance(value, UncertaintyService) and value.state_dict()["rng"] is None:
                continue  # no seed stream: nothing to restore (its model is the agent's own networks)
            if not isinstance(value, (*_STATEFUL, np.random.Generator, bool, int, float, str, type(None))):
                raise DubitoError(
                    f"{type(self).__name__}.{name} ({type(value).__name__}) cannot be checkpointed"
                )
            out.append((name, value))
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into an agent built with the same arguments."""
        mine = dict(self._checkpointed())
        missing = set(mine) ^ set(state)
        if missing:
            raise DubitoError(
                f"{type(self).__name__}: checkpoint does not match this agent (differs in {sorted(missing)})"
            )
        for name, saved in state.items():
            value = mine[name]
            if isinstance(value, _STATEFUL):
                value.load_state_dict(saved)
            elif isinstance(value, np.random.Generator):
                value.bit_generator.state = saved
            else:
                setattr(self, name, saved)

    # ---- what the agent does not know -----------------------------------------------------
    def epistemic(self, obs: np.ndarray) -> np.ndarray | None:
        """The agent's epistemic estimate for each state of ``obs`` (N, D): (N,), mean over actions."""
        return None


class _QNetworkAgent(Agent):
    """A single MLP Q-network (one output per action) and its target copy."""

    variant = "baseline"
    dropout = 0.0

    def __init__(self, obs_dim: int, n_actions: int, config: AgentConfig, seed: int = 0) -> None:
        super().__init__(obs_dim, n_actions, config, seed)
        self.online = MLP(
            obs_dim,
            n_actions,
            config.hidden_sizes(),
            task="regression",
            variant=self.variant,
            dropout=self.dropout,
        )
        self.target = copy.deepcopy(self.online).eval()
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.optimizer = _adam(self.online.parameters(), config.lr)

    def _q(self, net: nn.Module, x: Tensor) -> Tensor:
        out = net(x)
        return out[0] if isinstance(out, tuple) else out

    def action_values(self, x: Tensor) -> np.ndarray:
        with torch.no_grad():
            self.online.eval()
            return self._q(self.online, x)[0].numpy()

    def _td_loss(self, batch: dict[str, Tensor], extra_reward: Tensor | None = None) -> float:
        with torch.no_grad():
            y = self._bootstrap(
                batch,
                _double_q(
                    self._q(self.online.eval(), batch["next_obs"]), self._q(self.target, batch["next_obs"])
                ),
            )
            if extra_reward is not None:
                y = y + extra_reward
        self.online.train()
        q = self._q(self.online, batch["obs"]).gather(1, batch["action"][:, None])[:, 0]
        return self._step(self.optimizer, (q - y).square().mean())


class DQNAgent(_QNetworkAgent):
    """DQN with ε-greedy exploration."""

    name = "dqn"

    def act(self, obs: np.ndarray) -> int:
        return self._epsilon_greedy(obs)

    def update(self, batch: dict[str, Tensor]) -> float:
        return self._td_loss(batch)


class ThompsonDropoutAgent(_QNetworkAgent):
    """MC-dropout Thompson sampling: one dropout mask per episode, greedy under it. Trains with
    dropout on; the target network is the dropout-off mean."""

    name = "thompson"
    variant = "epistemic"

    def __init__(self, obs_dim: int, n_actions: int, config: AgentConfig, seed: int = 0) -> None:
        self.dropout = config.dropout
        super().__init__(obs_dim, n_actions, config, seed)
        self.service = UncertaintyService(
            self.online, "regression", config.samples, device="cpu", seed=seed, progress=False
        )
        self._mask_seed = 0

    def begin_episode(self) -> None:
        super().begin_episode()
        self._mask_seed = int(self.rng.integers(1 << 62))

    def action_values(self, x: Tensor) -> np.ndarray:
        # one MC sample with the episode's seed: the engine draws the same mask for every step
        return mc_samples(self.online, x, 1, seed=self._mask_seed).mean[0, 0].numpy()

    def update(self, batch: dict[str, Tensor]) -> float:
        return self._td_loss(batch)

    def epistemic(self, obs: np.ndarray) -> np.ndarray:
        unc = self.service.predict(torch.as_tensor(obs, dtype=torch.float32))
        return unc.epistemic_var.sqrt().mean(dim=1).numpy()


class _PriorEnsemble(nn.Module):
    """The K members with their randomized priors as one packed ensemble, for the uncertainty
    service (``epistemic="ensemble"``): ``forward(x)`` gives Q_k(x) = f_k(x) + β·p_k(x), (K, N, A),
    or with a noise head the pair (Q_k, log σ²_k). It holds the agent's own networks."""

    def __init__(
        self, online: EnsembleMLP, prior: EnsembleMLP, scale: float, n_actions: int, noise: bool
    ) -> None:
        super().__init__()
        self.online, self.prior = online, prior
        self.scale, self.n_actions, self.noise = scale, n_actions, noise
        self.packed_members = online.members

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        out, prior = self.online(x), self.scale * self.prior(x)
        if self.noise:
            return out[..., : self.n_actions] + prior, out[..., self.n_actions :]
        return out + prior


def _ensemble_service(
    online: EnsembleMLP, prior: EnsembleMLP, prior_scale: float, n_actions: int, noise: bool
) -> UncertaintyService:
    """The platform's ensemble backend over the agent's members (the path labeling scores with)."""
    members = _PriorEnsemble(online, prior, prior_scale, n_actions, noise)
    return UncertaintyService(members, "regression", epistemic="ensemble", device="cpu", progress=False)


class UncertaintyBonusAgent(Agent):
    """Kendall & Gal Q-network: a heteroscedastic head (aleatoric variance of the TD target, Gaussian
    NLL) and an epistemic sampler; acts on argmax Q̄ + κ·σ, with σ² the epistemic variance
    (``epistemic``) or epistemic + aleatoric (``total``). The TD target carries no bonus.

    ``source="ensemble"`` (default): the samples are K members with randomized priors (mean_k =
    f_k + β·p_k, log σ²_k = g_k), scored by the UncertaintyService's ensemble backend; the
    members' spread is the epistemic part — it falls as a state is visited.
    ``source="dropout"``: one MC-dropout network through the service's dropout backend. Both are
    decomposed by the same ``regression_uncertainty``.
    """

    def __init__(
        self, obs_dim: int, n_actions: int, config: AgentConfig, seed: int = 0, kind: str = "epistemic"
    ) -> None:
        if kind not in ("epistemic", "total"):
            raise DubitoError(f"bonus kind must be 'epistemic' or 'total', got {kind!r}")
        super().__init__(obs_dim, n_actions, config, seed)
        self.name = kind
        self.kind = kind
        self.source = config.source
        hidden = config.hidden_sizes()
        if self.source == "ensemble":
            self.online = EnsembleMLP(obs_dim, 2 * n_actions, config.ensemble, hidden)
            self.prior = EnsembleMLP(obs_dim, n_actions, config.ensemble, hidden).requires_grad_(False)
            self.service = _ensemble_service(self.online, self.prior, self.prior_scale, n_actions, noise=True)
        else:
            self.online = MLP(
                obs_dim, n_actions, hidden, task="regression", variant="both", dropout=config.dropout
            )
            self.service = UncertaintyService(
                self.online, "regression", config.samples, device="cpu", seed=seed, progress=False
            )
            # a second seed stream for measuring (epistemic(), aleatoric()), so looking never changes how the agent acts
            self.probe = UncertaintyService(
                self.online, "regression", config.samples, device="cpu", seed=seed + 1, progress=False
            )
        self.target = copy.deepcopy(self.online).requires_grad_(False).eval()
        self.optimizer = _adam(self.online.parameters(), config.lr)

    def _heads(self, net: nn.Module, x: Tensor, prior: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Ensemble: per-member (mean, log σ²), each (K, N, A); ``prior``: β·p(x) when already computed."""
        out = net(x)
        a = self.n_actions
        return out[..., :a] + (self._prior(x) if prior is None else prior), out[..., a:]

    def _prior(self, x: Tensor) -> Tensor:
        return self.prior_scale * self.prior(x)

    def uncertainty(self, x: Tensor, probe: bool = False) -> RegressionUncertainty:
        """The decomposed uncertainty of Q(x, ·): fields (N, A). ``probe``: MC masks from the
        measuring seed stream (dropout source), not the acting one."""
        if self.source == "dropout":
            return (self.probe if probe else self.service).predict(x)
        return self.service.predict(x)  # no randomness: acting and measuring see the same members

    def _bonus_std(self, unc: RegressionUncertainty) -> Tensor:
        return (unc.epistemic_var if self.kind == "epistemic" else unc.total_var).sqrt()

    def action_values(self, x: Tensor) -> np.ndarray:
        unc = self.uncertainty(x)
        return (unc.mean + self.config.kappa * self._bonus_std(unc))[0].numpy()

    def update(self, batch: dict[str, Tensor]) -> float:
        a = batch["action"]
        with torch.no_grad():
            if self.source == "ensemble":
                # (K, B): each member bootstraps from its own estimate
                nxt = batch["next_obs"]
                prior = self._prior(nxt)  # fixed: shared by the online and the target members
                next_q = _double_q(
                    self._heads(self.online, nxt, prior)[0], self._heads(self.target, nxt, prior)[0]
                )
            else:
                next_q = _double_q(
                    self.online.eval()(batch["next_obs"])[0], self.target(batch["next_obs"])[0]
                )
            y = self._bootstrap(batch, next_q)
        self.online.train()
        if self.source == "ensemble":
            mean, log_var = self._heads(self.online, batch["obs"])
            idx = a[None, :, None].expand(mean.shape[0], -1, 1)
            loss = gaussian_nll(mean.gather(2, idx)[..., 0], log_var.gather(2, idx)[..., 0], y)
        else:
            mean, log_var = self.online(batch["obs"])
            loss = gaussian_nll(mean.gather(1, a[:, None])[:, 0], log_var.gather(1, a[:, None])[:, 0], y)
        return self._step(self.optimizer, loss)

    def epistemic(self, obs: np.ndarray) -> np.ndarray:
        return (
            self.uncertainty(torch.as_tensor(obs, dtype=torch.float32), probe=True)
            .epistemic_var.sqrt()
            .mean(dim=1)
            .numpy()
        )

    def aleatoric(self, obs: np.ndarray) -> np.ndarray:
        """Aleatoric std of each state (N,), mean over actions."""
        return (
            self.uncertainty(torch.as_tensor(obs, dtype=torch.float32), probe=True)
            .aleatoric_var.sqrt()
            .mean(dim=1)
            .numpy()
        )


class BootstrappedPriorAgent(Agent):
    """Bootstrapped DQN with randomized prior functions: K heads Q_k = f_k + β·p_k (p_k fixed)."""

    name = "bootstrapped"

    def __init__(self, obs_dim: int, n_actions: int, config: AgentConfig, seed: int = 0) -> None:
        super().__init__(obs_dim, n_actions, config, seed, masks=config.ensemble)
        hidden = config.hidden_sizes()
        self.online = EnsembleMLP(obs_dim, n_actions, config.ensemble, hidden)
        self.prior = EnsembleMLP(obs_dim, n_actions, config.ensemble, hidden).requires_grad_(False)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.optimizer = _adam(self.online.parameters(), config.lr)
        self.service = _ensemble_service(self.online, self.prior, self.prior_scale, n_actions, noise=False)
        self.head = 0

    def _q(self, net: nn.Module, x: Tensor, prior: Tensor | None = None) -> Tensor:
        """Q_k = f_k + β·p_k, (K, N, A); ``prior``: β·p(x) when already computed."""
        return net(x) + (self.prior_scale * self.prior(x) if prior is None else prior)

    def begin_episode(self) -> None:
        super().begin_episode()
        self.head = int(self.rng.integers(self.config.ensemble))

    def action_values(self, x: Tensor) -> np.ndarray:
        with torch.no_grad():
            return self._q(self.online, x)[self.head, 0].numpy()

    def update(self, batch: dict[str, Tensor]) -> float:
        k = self.config.ensemble
        with torch.no_grad():
            nxt = batch["next_obs"]
            prior = self.prior_scale * self.prior(nxt)  # fixed: shared by the online and the target heads
            y = self._bootstrap(
                batch, _double_q(self._q(self.online, nxt, prior), self._q(self.target, nxt, prior))
            )
        a = batch["action"][None, :, None].expand(k, -1, 1)
        q = self._q(self.online, batch["obs"]).gather(2, a)[..., 0]  # (K, B)
        mask = batch["mask"].T  # (K, B)
        loss = (mask * (q - y).square()).sum() / mask.sum().clamp_min(1.0)
        return self._step(self.optimizer, loss)

    def epistemic(self, obs: np.ndarray) -> np.ndarray:
        u = self.service.predict(torch.as_tensor(obs, dtype=torch.float32))  # the K heads as samples
        return u.epistemic_var.sqrt().mean(dim=1).numpy()


class RNDAgent(_QNetworkAgent):
    """ε-greedy DQN plus Random Network Distillation's curiosity reward on the next state."""

    name = "rnd"
    embedding = 16

    def __init__(self, obs_dim: int, n_actions: int, config: AgentConfig, seed: int = 0) -> None:
        super().__init__(obs_dim, n_actions, config, seed)
        hidden = config.hidden_sizes()
        self.rnd_target = MLP(
            obs_dim, self.embedding, hidden, task="regression", variant="baseline", dropout=0.0
        )
        self.rnd_target.requires_grad_(False).eval()
        self.predictor = MLP(
            obs_dim, self.embedding, hidden, task="regression", variant="baseline", dropout=0.0
        )
        self.rnd_optimizer = _adam(self.predictor.parameters(), config.lr)
        self._count, self._mean, self._m2 = 0, 0.0, 0.0  # running moments of the raw errors (Welford)

    def act(self, obs: np.ndarray) -> int:
        return self._epsilon_greedy(obs)

    def _error(self, x: Tensor) -> Tensor:
        return (self.predictor(x) - self.rnd_target(x)).square().mean(dim=1)

    def _normalise(self, err: Tensor) -> Tensor:
        for v in err.tolist():
            self._count += 1
            delta = v - self._mean
            self._mean += delta / self._count
            self._m2 += delta * (v - self._mean)
        std = (self._m2 / self._count) ** 0.5 if self._count > 1 else 1.0
        return err / max(std, 1e-8)

    def update(self, batch: dict[str, Tensor]) -> float:
        err = self._error(batch["next_obs"])
        self._step(self.rnd_optimizer, err.mean())
        intrinsic = self.config.rnd_scale * self._normalise(err.detach())
        return self._td_loss(batch, extra_reward=intrinsic)

    def epistemic(self, obs: np.ndarray) -> np.ndarray:
        """Root of the prediction error: like the other agents' estimates, a standard deviation."""
        with torch.no_grad():
            return self._error(torch.as_tensor(obs, dtype=torch.float32)).sqrt().numpy()


AGENTS = ("dqn", "bootstrapped", "thompson", "epistemic", "total", "rnd")


def make_agent(
    name: str, obs_dim: int, n_actions: int, config: AgentConfig | None = None, seed: int = 0
) -> Agent:
    """An agent by name (:data:`AGENTS`), its networks initialised from ``seed``."""
    config = config or AgentConfig()
    classes = {
        "dqn": DQNAgent,
        "bootstrapped": BootstrappedPriorAgent,
        "thompson": ThompsonDropoutAgent,
        "epistemic": lambda *a: UncertaintyBonusAgent(*a, kind="epistemic"),
        "total": lambda *a: UncertaintyBonusAgent(*a, kind="total"),
        "rnd": RNDAgent,
    }
    if name not in classes:
        raise DubitoError(f"unknown agent {name!r}; choose from {', '.join(AGENTS)}")
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed, global RNG untouched
        torch.manual_seed(seed)
        return classes[name](obs_dim, n_actions, config, seed)
