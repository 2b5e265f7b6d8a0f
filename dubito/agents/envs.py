"""Exploration environments (gymnasium 1.x), registered as ``dubito/...`` on import of ``dubito.agents``.

* ``dubito/DeepSea-v0`` — bsuite's Deep Sea (Osband et al. 2019): an N×N grid, the agent starts
  top-left and falls one row per step; in each cell one action moves it right (paying
  0.01/N) and the other left; which one is drawn per cell from ``mapping_seed`` exactly as
  bsuite draws it (``np.random.RandomState(mapping_seed).binomial(1, 0.5, (N, N))``), so the
  same mapping seed and actions give bsuite's observations and rewards. Moving right from the
  last column pays +1; the episode ends after N steps with an all-zero observation. Dithering
  (ε-greedy) needs about 2^N episodes to find the reward.
* ``dubito/DeepSeaStochastic-v0`` — bsuite's ``deep_sea_stochastic``: "right" succeeds with
  probability 1 − 1/N and the two bottom corners add N(0, 1) reward noise. Its randomness
  comes from gymnasium's ``np_random`` (seeded by ``reset(seed=...)``), so trajectories equal
  bsuite's in distribution, not draw for draw.
* ``dubito/NoisyTV-v0`` — a sparse-reward grid with a television: +1 waits in the bottom-right
  corner (the episode ends there); the TV sits in the dead-end corner one step left of the start.
  On the TV the screen part of the observation is fresh uniform noise every step (forever novel
  to a prediction-error curiosity such as RND) and the reward is N(0, noise_scale²) (pure
  aleatoric noise a heteroscedastic head learns as variance). ``info["watching_tv"]`` says when
  the agent is on the TV.

Every step's ``info`` carries ``position`` (row, column) — the state that visit counts and
visitation heatmaps are made of — and Deep Sea's ``bad_episode`` flag (the agent left the
diagonal, the optimal path, by moving left; bsuite's measure).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from dubito import DubitoError

__all__ = ["DeepSea", "NoisyTV", "register_envs", "ENV_IDS", "optimal_return"]

ENV_IDS = ("dubito/DeepSea-v0", "dubito/DeepSeaStochastic-v0", "dubito/NoisyTV-v0")


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise DubitoError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class DeepSea(gym.Env):
    """bsuite's Deep Sea.

    Args:
        size: N, the grid is N×N and an episode lasts N steps.
        deterministic: ``False`` for the stochastic variant.
        mapping_seed: seed of the per-cell action mapping (bsuite's ``mapping_seed``; bsuite's
            sweep uses 42). ``None`` draws the mapping from OS entropy, as bsuite does.
        unscaled_move_cost: the cost of N "right" moves (bsuite: 0.01, optimal return 0.99).
        randomize_actions: ``False``: action 1 is "right" everywhere (bsuite's debug mode).

    Observation: float32 (N, N), one-hot at (row, column); all zeros after the last step.
    Actions: Discrete(2).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        size: int = 10,
        deterministic: bool = True,
        mapping_seed: int | None = 42,
        unscaled_move_cost: float = 0.01,
        randomize_actions: bool = True,
        render_mode: str | None = None,
    ) -> None:
        self.size = _check_int("size", size, 2)
        self.deterministic = bool(deterministic)
        self.unscaled_move_cost = float(unscaled_move_cost)
        if randomize_actions:
            self.action_mapping = np.random.RandomState(mapping_seed).binomial(1, 0.5, [self.size, self.size])
        else:
            self.action_mapping = np.ones([self.size, self.size], dtype=np.int64)
        self.mapping_seed = mapping_seed
        self.observation_space = spaces.Box(0.0, 1.0, (self.size, self.size), dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self.render_mode = render_mode
        self.optimal_return = optimal_return(self.size, self.deterministic, self.unscaled_move_cost)
        self._row = self._column = 0
        self._bad = False

    def observation_for(
        self, position: tuple[int, int], rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """The observation of cell ``position`` (row, column); ``rng`` is unused (Deep Sea's are fixed)."""
        obs = np.zeros((self.size, self.size), dtype=np.float32)
        obs[position[0], position[1]] = 1.0
        return obs

    def states(self) -> list[tuple[int, int]]:
        """The cells an agent can act in: column <= row."""
        return [(r, c) for r in range(self.size) for c in range(r + 1)]

    def _observation(self) -> np.ndarray:
        if self._row >= self.size:
            return np.zeros((self.size, self.size), dtype=np.float32)
        return self.observation_for((self._row, self._column))

    def _info(self) -> dict:
        return {"position": (self._row, self._column), "bad_episode": self._bad}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._row = self._column = 0
        self._bad = False
        return self._observation(), self._info()

    def step(self, action):
        if self._row >= self.size:
            raise DubitoError("DeepSea.step called after the episode ended; call reset()")
        if not self.action_space.contains(action):
            raise DubitoError(f"DeepSea: action must be 0 or 1, got {action!r}")
        n = self.size
        reward = 0.0
        right = int(action) == self.action_mapping[self._row, self._column]
        if self._column == n - 1 and right:
            reward += 1.0
        if not self.deterministic and self._row == n - 1 and self._column in (0, n - 1):
            reward += float(self.np_random.standard_normal())
        if right:
            if self.deterministic or self.np_random.random() > 1.0 / n:
                self._column = min(self._column + 1, n - 1)
            reward -= self.unscaled_move_cost / n
        else:
            if self._row == self._column:
                self._bad = True
            self._column = max(self._column - 1, 0)
        self._row += 1
        terminated = self._row == n
        return self._observation(), reward, terminated, False, self._info()

    def render(self):
        if self.render_mode != "ansi":
            return None
        grid = np.full((self.size, self.size), ".")
        if self._row < self.size:
            grid[self._row, self._column] = "@"
        return "\n".join("".join(r) for r in grid)


def optimal_return(size: int, deterministic: bool = True, unscaled_move_cost: float = 0.01) -> float:
    """bsuite's optimal expected return of Deep Sea (noise excluded)."""
    reach = 1.0 if deterministic else (1.0 - 1.0 / size) ** (size - 1)
    return reach - unscaled_move_cost


class NoisyTV(gym.Env):
    """A sparse-reward grid with a noisy television in a dead end beside the start.

    Args:
        size: the grid is size×size; the goal (size−1, size−1) pays +1 and ends the episode.
        noise_scale: std of the TV's zero-mean Gaussian reward (0 = a silent TV).
        screen: number of screen features in the observation (uniform noise on the TV, else 0).
        max_steps: episode length limit (truncation); default 4·size.
        start, tv: cells (row, column); defaults (0, 1) and (0, 0): the TV is one step from the
            start and on no shortest path to the goal, so every step spent there is a detour.

    Actions: Discrete(5): stay, up, down, left, right (a move into a wall stays). Every step that
    ends on the TV cell shows a fresh random screen and pays N(0, noise_scale²).
    Observation: float32 (size² + screen,): one-hot cell, then the screen.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}
    MOVES = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))

    def __init__(
        self,
        size: int = 5,
        noise_scale: float = 0.3,
        screen: int = 8,
        max_steps: int | None = None,
        start: tuple[int, int] = (0, 1),
        tv: tuple[int, int] = (0, 0),
        render_mode: str | None = None,
    ) -> None:
        self.size = _check_int("size", size, 3)
        self.screen = _check_int("screen", screen, 1)
        self.max_steps = _check_int("max_steps", max_steps if max_steps is not None else 4 * self.size, 1)
        if not np.isfinite(noise_scale) or noise_scale < 0:
            raise DubitoError(f"noise_scale must be a finite number >= 0, got {noise_scale!r}")
        self.noise_scale = float(noise_scale)
        self.goal = (self.size - 1, self.size - 1)
        self.start = self._cell("start", start)
        self.tv = self._cell("tv", tv)
        if len({self.start, self.tv, self.goal}) < 3:
            raise DubitoError(
                f"start {self.start}, tv {self.tv} and goal {self.goal} must be three different cells"
            )
        self.observation_space = spaces.Box(0.0, 1.0, (self.size**2 + self.screen,), dtype=np.float32)
        self.action_space = spaces.Discrete(5)
        self.render_mode = render_mode
        self._pos = self.start
        self._t = 0

    def _cell(self, name: str, value) -> tuple[int, int]:
        try:
            cell = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            cell = ()
        if len(cell) != 2 or not all(0 <= v < self.size for v in cell):
            raise DubitoError(
                f"{name} must be a cell (row, column) inside the {self.size}x{self.size} grid, got {value!r}"
            )
        return cell

    def observation_for(
        self, position: tuple[int, int], rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """The observation of ``position`` (with a fresh random screen on the TV, drawn from ``rng``;
        by default the environment's own ``np_random``: pass another to look without changing the run)."""
        obs = np.zeros(self.observation_space.shape, dtype=np.float32)
        obs[position[0] * self.size + position[1]] = 1.0
        if tuple(position) == self.tv:
            obs[self.size**2 :] = (rng or self.np_random).random(self.screen, dtype=np.float32)
        return obs

    def states(self) -> list[tuple[int, int]]:
        """The cells an agent can act in (all but the goal)."""
        return [(r, c) for r in range(self.size) for c in range(self.size) if (r, c) != self.goal]

    def _info(self) -> dict:
        return {"position": self._pos, "watching_tv": self._pos == self.tv}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._pos = self.start
        self._t = 0
        return self.observation_for(self._pos), self._info()

    def step(self, action):
        if not self.action_space.contains(action):
            raise DubitoError(f"NoisyTV: action must be an integer in [0, 5), got {action!r}")
        dr, dc = self.MOVES[int(action)]
        self._pos = (
            min(max(self._pos[0] + dr, 0), self.size - 1),
            min(max(self._pos[1] + dc, 0), self.size - 1),
        )
        self._t += 1
        terminated = self._pos == self.goal
        reward = 1.0 if terminated else 0.0
        if self._pos == self.tv:
            reward += self.noise_scale * float(self.np_random.standard_normal())
        truncated = not terminated and self._t >= self.max_steps
        return self.observation_for(self._pos), reward, terminated, truncated, self._info()

    def render(self):
        if self.render_mode != "ansi":
            return None
        grid = np.full((self.size, self.size), ".")
        grid[self.goal] = "G"
        grid[self.tv] = "T"
        grid[self._pos] = "@"
        return "\n".join("".join(r) for r in grid)


def _stochastic_deep_sea(**kwargs) -> DeepSea:
    kwargs.setdefault("deterministic", False)
    return DeepSea(**kwargs)


def register_envs() -> None:
    """Register the ``dubito/`` environments with gymnasium (idempotent)."""
    entries = {
        "dubito/DeepSea-v0": f"{__name__}:DeepSea",
        "dubito/DeepSeaStochastic-v0": f"{__name__}:_stochastic_deep_sea",
        "dubito/NoisyTV-v0": f"{__name__}:NoisyTV",
    }
    for env_id, entry in entries.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry)
