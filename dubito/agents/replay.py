"""The replay buffer every agent shares: a fixed-size ring of transitions in numpy arrays."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dubito import DubitoError

__all__ = ["ReplayBuffer"]


class ReplayBuffer:
    """Transitions ``(obs, action, reward, next_obs, terminated)``, oldest overwritten first.

    Args:
        capacity: most transitions kept.
        obs_dim: length of a (flattened) observation.
        masks: per-transition bootstrap masks of this many ensemble members (0 for none),
            drawn Bernoulli(``mask_prob``) when the transition is added.
        mask_prob: probability a member trains on a transition (1 = every member sees all).
        seed: seeds the batch sampling and the masks.

    Only ``terminated`` cuts the bootstrap; a truncated episode's last transition keeps it
    (the state was not terminal). The reset observation of a new episode is never stored
    as a transition.
    """

    def __init__(
        self, capacity: int, obs_dim: int, *, masks: int = 0, mask_prob: float = 1.0, seed: int = 0
    ) -> None:
        if capacity < 1:
            raise DubitoError(f"replay capacity must be >= 1, got {capacity}")
        if not 0.0 < mask_prob <= 1.0:
            raise DubitoError(f"mask_prob must be in (0, 1], got {mask_prob}")
        self.capacity = int(capacity)
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.action = np.zeros(capacity, dtype=np.int64)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.mask = np.ones((capacity, masks), dtype=np.float32) if masks else None
        self.mask_prob = mask_prob
        self.rng = np.random.default_rng(seed)
        self.size = 0
        self._next = 0

    def __len__(self) -> int:
        return self.size

    def add(
        self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, terminated: bool
    ) -> None:
        i = self._next
        self.obs[i] = np.ravel(obs)
        self.next_obs[i] = np.ravel(next_obs)
        self.action[i] = action
        self.reward[i] = reward
        self.terminated[i] = float(terminated)
        if self.mask is not None:
            self.mask[i] = self.rng.random(self.mask.shape[1]) < self.mask_prob
        self._next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        """A uniform batch (with replacement) as CPU tensors: obs, action, reward, next_obs,
        terminated (float 0/1) and, with masks, mask (B, K)."""
        if self.size == 0:
            raise DubitoError("cannot sample from an empty replay buffer")
        idx = self.rng.integers(0, self.size, batch_size)
        batch = {
            "obs": torch.from_numpy(self.obs[idx]),
            "action": torch.from_numpy(self.action[idx]),
            "reward": torch.from_numpy(self.reward[idx]),
            "next_obs": torch.from_numpy(self.next_obs[idx]),
            "terminated": torch.from_numpy(self.terminated[idx]),
        }
        if self.mask is not None:
            batch["mask"] = torch.from_numpy(self.mask[idx])
        return batch

    def state_dict(self) -> dict:
        """Everything the buffer holds, as tensors and numbers (``torch.load(weights_only=True)`` reads it)."""
        arrays = {
            k: torch.from_numpy(getattr(self, k)[: self.size].copy())
            for k in ("obs", "next_obs", "action", "reward", "terminated")
        }
        if self.mask is not None:
            arrays["mask"] = torch.from_numpy(self.mask[: self.size].copy())
        return {"arrays": arrays, "size": self.size, "next": self._next, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        size = int(state["size"])
        if size > self.capacity or state["arrays"]["obs"].shape[1:] != self.obs.shape[1:]:
            raise DubitoError(
                f"replay state of {size} transitions of {tuple(state['arrays']['obs'].shape[1:])} does not fit this buffer"
            )
        for k, v in state["arrays"].items():
            getattr(self, k)[:size] = v.numpy()
        self.size, self._next = size, int(state["next"])
        self.rng.bit_generator.state = state["rng"]
