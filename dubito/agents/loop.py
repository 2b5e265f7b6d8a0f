"""The one training loop every agent runs in, and what it records per episode."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from dubito import DubitoError
from dubito.agents.agents import Agent

__all__ = ["EpisodeLog", "run_episodes", "run_state", "grid_shape"]


@dataclass
class EpisodeLog:
    """Per-episode records of one run, and the state visit counts."""

    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    terminated: list[bool] = field(default_factory=list)  # ended in a terminal state (noisy TV: the goal)
    bad: list[bool] = field(default_factory=list)  # Deep Sea: left the optimal path (bsuite's measure)
    tv_steps: list[int] = field(default_factory=list)  # noisy TV: steps spent watching
    visits: np.ndarray | None = None  # (rows, columns): times the agent acted in each cell

    @property
    def episodes(self) -> int:
        return len(self.returns)


def grid_shape(env: gym.Env) -> tuple[int, int]:
    """(rows, columns) of a dubito environment's cells, from ``env.unwrapped.size``."""
    size = getattr(env.unwrapped, "size", None)
    if size is None:
        raise DubitoError(f"{env.unwrapped!r} has no 'size': visit counts need a dubito grid environment")
    return (int(size), int(size))


_LOG_FIELDS = ("returns", "lengths", "terminated", "bad", "tv_steps")


def run_state(env: gym.Env, agent: Agent, log: EpisodeLog) -> dict[str, Any]:
    """Everything needed to continue a run after the episode just finished — the agent's state,
    the environment's and torch's random streams, the log — as tensors, numbers and lists
    (``torch.save`` it; ``torch.load(weights_only=True)`` reads it). Pass it back as
    ``run_episodes(..., resume=state)``: the run goes on exactly as if never stopped."""
    return {
        "agent": agent.state_dict(),
        "env_rng": env.unwrapped.np_random.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "log": {
            **{k: list(getattr(log, k)) for k in _LOG_FIELDS},
            "visits": torch.from_numpy(log.visits.copy()),
        },
    }


def run_episodes(
    env: gym.Env,
    agent: Agent,
    episodes: int,
    *,
    seed: int = 0,
    progress: bool = True,
    desc: str = "episodes",
    stop: Callable[[EpisodeLog], bool] | None = None,
    on_episode: Callable[[EpisodeLog], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> EpisodeLog:
    """Run ``agent`` in ``env`` for ``episodes`` episodes (or until ``stop(log)`` is true);
    ``on_episode(log)`` is called after every episode (``log.visits`` is up to date).

    Seeds torch's global RNG (network initialisation and training dropout) and the environment
    from ``seed``; the same seed on the CPU gives the same run. Every transition is stored and
    learned from by ``agent.observe`` before the next action; the reset observation of a new
    episode is never stored as a transition. ``resume``: a :func:`run_state` of this run (the
    same environment, agent settings and seed), continued from the episode after it.
    """
    if episodes < 1:
        raise DubitoError(f"episodes must be >= 1, got {episodes}")
    torch.manual_seed(seed)
    log = EpisodeLog()
    rows, cols = grid_shape(env)
    visits = log.visits = np.zeros((rows, cols), dtype=np.int64)
    obs, info = env.reset(seed=seed)
    start = 0
    if resume is not None:
        agent.load_state_dict(resume["agent"])
        env.unwrapped.np_random.bit_generator.state = resume["env_rng"]
        torch.set_rng_state(resume["torch_rng"])
        for k in _LOG_FIELDS:
            setattr(log, k, list(resume["log"][k]))
        visits[:] = resume["log"]["visits"].numpy()
        start = log.episodes
        if stop is not None and stop(log):  # saved at the episode that ended the run
            return log
    bar = tqdm(
        range(start, episodes),
        desc=desc,
        unit="ep",
        disable=not progress,
        leave=False,
        initial=start,
        total=episodes,
    )
    for episode in bar:
        if episode:
            obs, info = env.reset()
        agent.begin_episode()
        total, steps, tv = 0.0, 0, 0
        done = False
        while not done:
            r, c = info["position"]
            visits[r, c] += 1
            action = agent.act(obs)
            next_obs, reward, terminated, truncated, info = env.step(action)
            agent.observe(obs, action, reward, next_obs, terminated)
            total += float(reward)
            steps += 1
            tv += bool(info.get("watching_tv", False))
            obs = next_obs
            done = terminated or truncated
        log.returns.append(total)
        log.lengths.append(steps)
        log.terminated.append(bool(terminated))
        log.bad.append(bool(info.get("bad_episode", False)))
        log.tv_steps.append(tv)
        if episode % 10 == 0:
            bar.set_postfix(ret=f"{np.mean(log.returns[-50:]):.2f}")
        if on_episode is not None:
            on_episode(log)
        if stop is not None and stop(log):
            break
    return log
