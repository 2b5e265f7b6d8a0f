"""The exploration environments: gymnasium's checker, Deep Sea against bsuite (recorded) and against a
reference written here from bsuite's description, the stochastic variant's statistics, the noisy TV."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from scipy import stats

import dubito.agents  # noqa: F401  (registers the environments)
from dubito import DubitoError
from dubito.agents.envs import ENV_IDS, DeepSea, NoisyTV, optimal_return

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env_passes(env_id):
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=False)
    assert env_id in gym.registry


def _reference_deep_sea(
    size: int, mapping: np.ndarray, actions: list[int]
) -> tuple[list[tuple], list[float], bool]:
    """Deep Sea from its description: fall one row per step; the mapped action moves right (cost
    0.01/N), the other left (clipped); right from the last column pays +1; leaving the diagonal by
    moving left makes the episode bad. Returns the cells after each step ((None) at the end)."""
    row = col = 0
    cells, rewards, bad = [], [], False
    for a in actions:
        right = a == mapping[row, col]
        r = 1.0 if (col == size - 1 and right) else 0.0
        if right:
            col = min(col + 1, size - 1)
            r -= 0.01 / size
        else:
            bad |= row == col
            col = max(col - 1, 0)
        row += 1
        cells.append((row, col) if row < size else None)
        rewards.append(r)
    return cells, rewards, bad


@pytest.mark.parametrize("size", [2, 3, 5, 7])
def test_deep_sea_matches_reference_on_random_actions(size):
    rng = np.random.default_rng(size)
    for mapping_seed in range(4):
        env = DeepSea(size, mapping_seed=mapping_seed)
        mapping = np.random.RandomState(mapping_seed).binomial(1, 0.5, [size, size])  # bsuite's draw
        np.testing.assert_array_equal(env.action_mapping, mapping)
        for episode in range(5):
            actions = rng.integers(0, 2, size).tolist()
            obs, info = env.reset(seed=episode)
            assert obs.shape == (size, size) and obs[0, 0] == 1 and obs.sum() == 1
            cells, rewards, bad = _reference_deep_sea(size, mapping, actions)
            for t, a in enumerate(actions):
                obs, reward, terminated, truncated, info = env.step(a)
                assert reward == pytest.approx(rewards[t], abs=1e-12)
                assert terminated == (t == size - 1) and not truncated
                if cells[t] is None:
                    assert obs.sum() == 0  # bsuite's null observation at the end
                else:
                    assert obs[cells[t]] == 1 and obs.sum() == 1
            assert info["bad_episode"] == bad


def test_deep_sea_matches_recorded_bsuite_trajectories():
    """Trajectories recorded from bsuite 0.3.6 itself (data/make_bsuite_deep_sea.py)."""
    records = json.loads((DATA / "bsuite_deep_sea.json").read_text())
    assert len(records) >= 20
    envs: dict[tuple[int, int], tuple[DeepSea, list[bool]]] = {}
    for rec in records:
        key = (rec["size"], rec["mapping_seed"])
        if key not in envs:
            envs[key] = (DeepSea(rec["size"], mapping_seed=rec["mapping_seed"]), [])
        env, bads = envs[key]
        obs, _ = env.reset()
        assert np.argwhere(obs).tolist() == rec["cells"][0]
        for a, cell, reward in zip(rec["actions"], rec["cells"][1:], rec["rewards"]):
            obs, r, terminated, _, info = env.step(a)
            assert np.argwhere(obs).tolist() == cell
            assert r == pytest.approx(reward, abs=1e-12)
        assert terminated
        bads.append(info["bad_episode"])
        assert sum(bads) == rec["bad_total"]  # bsuite's running count of bad episodes


def test_deep_sea_optimal_path_earns_the_optimal_return():
    for size in (4, 10, 20):
        env = DeepSea(size, mapping_seed=1)
        env.reset(seed=0)
        total = 0.0
        for t in range(size):
            _, r, terminated, _, info = env.step(int(env.action_mapping[t, t]))
            total += r
        assert terminated and not info["bad_episode"]
        assert total == pytest.approx(env.optimal_return) == pytest.approx(0.99)


def test_stochastic_deep_sea_statistics():
    size = 5
    env = gym.make("dubito/DeepSeaStochastic-v0", size=size, mapping_seed=0).unwrapped
    moved, tries, corner_rewards = 0, 0, []
    env.reset(seed=0)
    for _ in range(3000):  # always "right": it succeeds with probability 1 - 1/N
        env.reset()
        for t in range(size):
            before = env._column
            env.step(int(env.action_mapping[t, env._column]))
            if before < size - 1:
                tries += 1
                moved += env._column > before
    p = stats.binomtest(moved, tries, 1 - 1 / size).pvalue
    assert p > 1e-4, (moved, tries)
    # bottom-left corner: left all the way, reward = N(0, 1) noise on the last step
    for _ in range(2000):
        env.reset()
        for t in range(size):
            _, r, _, _, _ = env.step(int(1 - env.action_mapping[t, env._column]))
        corner_rewards.append(r)
    corner_rewards = np.asarray(corner_rewards)
    assert abs(corner_rewards.mean()) < 4 / np.sqrt(len(corner_rewards))
    assert corner_rewards.std() == pytest.approx(1.0, rel=0.08)
    assert stats.kstest(corner_rewards, "norm").pvalue > 1e-4
    assert (
        env.optimal_return
        == pytest.approx(optimal_return(size, False))
        == pytest.approx((1 - 1 / size) ** (size - 1) - 0.01)
    )


def test_noisy_tv_screen_reward_and_info():
    env = NoisyTV(size=4, noise_scale=0.5, screen=6)
    obs, info = env.reset(seed=3)
    assert env.start == (0, 1) and env.tv == (0, 0) and not info["watching_tv"]
    assert obs[:16].argmax() == 1 and obs[16:].sum() == 0
    obs, r, terminated, truncated, info = env.step(3)  # left: onto the TV
    assert info["watching_tv"] and info["position"] == (0, 0)
    screens, rewards = [obs[16:].copy()], [r]
    for _ in range(3000):
        obs, r, terminated, truncated, info = env.step(0)  # stay and watch
        if truncated:
            obs, _ = env.reset()
            obs, r, *_ = env.step(3)
        screens.append(obs[16:].copy())
        rewards.append(r)
    screens, rewards = np.asarray(screens), np.asarray(rewards)
    assert not np.allclose(screens[0], screens[1])  # a fresh screen every step
    assert stats.kstest(screens.ravel(), "uniform").pvalue > 1e-4
    assert abs(rewards.mean()) < 4 * 0.5 / np.sqrt(len(rewards))  # zero mean
    assert rewards.std() == pytest.approx(0.5, rel=0.06)
    # off the TV: blank screen, no reward; the goal ends the episode with +1
    env.reset(seed=0)
    for a in (4, 4, 2, 2, 2):
        obs, r, terminated, truncated, info = env.step(a)
        assert obs[16:].sum() == 0 and not info["watching_tv"]
    assert terminated and r == 1.0 and info["position"] == env.goal


def test_noisy_tv_truncates_and_rejects_bad_arguments():
    env = NoisyTV(size=3, max_steps=5)
    env.reset(seed=0)
    for t in range(5):
        _, _, terminated, truncated, _ = env.step(1)  # up: into the wall
    assert truncated and not terminated
    with pytest.raises(DubitoError, match="noise_scale"):
        NoisyTV(noise_scale=-1)
    with pytest.raises(DubitoError, match="tv must be a cell"):
        NoisyTV(size=4, tv=(9, 9))
    with pytest.raises(DubitoError, match="different cells"):
        NoisyTV(size=4, tv=(0, 1))
    with pytest.raises(DubitoError, match="size"):
        DeepSea(size=1)
    with pytest.raises(DubitoError, match="action"):
        DeepSea(3).step(2)
