"""The one training loop every agent runs in, and what it records per episode."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from dubito import DubitoError
from dubito.agents.agents import Agent

__all__ = ["EpisodeLog", "run_episodes", "grid_shape"]


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
) -> EpisodeLog:
    """Run ``agent`` in ``env`` for ``episodes`` episodes (or until ``stop(log)`` is true);
    ``on_episode(log)`` is called after every episode (``log.visits`` is up to date).

    Seeds torch's global RNG (network initialisation and training dropout) and the environment
    from ``seed``; the same seed on the CPU gives the same run. Every transition is stored and
    learned from by ``agent.observe`` before the next action; the reset observation of a new
    episode is never stored as a transition.
    """
    if episodes < 1:
        raise DubitoError(f"episodes must be >= 1, got {episodes}")
    torch.manual_seed(seed)
    log = EpisodeLog()
    rows, cols = grid_shape(env)
    visits = log.visits = np.zeros((rows, cols), dtype=np.int64)
    bar = tqdm(range(episodes), desc=desc, unit="ep", disable=not progress, leave=False)
    obs, info = env.reset(seed=seed)
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
