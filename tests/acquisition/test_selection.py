"""Batch selection: determinism per seed, sampling frequencies, diversity of k-center and BatchBALD."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dubito import DubitoError
from dubito.acquisition import selection
from dubito.acquisition.selection import SELECTIONS, joint_mutual_information, select
from dubito.platform.uncertainty import classification_uncertainty


def test_topk_is_stable_argsort():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(np.float64)  # many ties
    got = select(torch.from_numpy(scores), 12)
    assert got.dtype == torch.long
    np.testing.assert_array_equal(got.numpy(), np.argsort(-scores, kind="stable")[:12])


@pytest.mark.parametrize("method", ["power", "softmax"])
def test_stochastic_methods_are_seeded(method):
    scores = torch.from_numpy(np.random.default_rng(1).random(50))
    a = select(scores, 10, method, seed=3)
    assert torch.equal(a, select(scores, 10, method, seed=3))
    assert not torch.equal(a, select(scores, 10, method, seed=4))
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 50
    full = select(scores, 50, method, seed=5)
    assert sorted(full.tolist()) == list(range(50))


@pytest.mark.parametrize("method", ["power", "softmax"])
def test_low_temperature_is_topk(method):
    scores = torch.from_numpy(np.random.default_rng(2).permutation(np.linspace(0.1, 1.0, 20)))
    for seed in range(5):
        assert torch.equal(select(scores, 8, method, seed=seed, temperature=1e-5), select(scores, 8))


@pytest.mark.parametrize(
    "method, scores",
    [("power", [1.0, 2.0, 3.0, 4.0]), ("softmax", list(np.log([1.0, 2.0, 3.0, 4.0])))],
)
def test_first_pick_frequency_is_proportional(method, scores):
    s = torch.tensor(scores, dtype=torch.float64)
    draws = 2000
    firsts = np.array([int(select(s, 1, method, seed=seed)[0]) for seed in range(draws)])
    freq = np.bincount(firsts, minlength=4) / draws
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.035)
    # temperature 0.5 squares the weights (power) / doubles the logits (softmax): ∝ 1, 4, 9, 16
    firsts = np.array([int(select(s, 1, method, seed=seed, temperature=0.5)[0]) for seed in range(draws)])
    np.testing.assert_allclose(
        np.bincount(firsts, minlength=4) / draws, np.array([1, 4, 9, 16]) / 30, atol=0.035
    )


def test_power_handles_zero_scores():
    picks = select(torch.tensor([0.0, 0.0, 5.0, 0.0]), 4, "power", seed=0)
    assert int(picks[0]) == 2 and sorted(picks.tolist()) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def clusters():
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    features = np.concatenate([c + rng.normal(0, 0.3, (10, 2)) for c in centres])
    scores = np.concatenate([rng.uniform(5, 6, 10), rng.uniform(0, 1, 30)])  # cluster 0 scores best
    return torch.from_numpy(features), torch.from_numpy(scores), centres


def test_kcenter_spreads_over_clusters(clusters):
    features, scores, centres = clusters
    cluster_of = lambda idx: sorted(int(i) // 10 for i in idx)  # noqa: E731
    assert cluster_of(select(scores, 4)) == [0, 0, 0, 0]
    picks = select(scores, 4, "kcenter", features=features)
    assert int(picks[0]) == int(scores.argmax())  # no labelled set: start from the best score
    assert cluster_of(picks) == [0, 1, 2, 3]
    # the labelled set covers clusters 0 and 1: the picks go to 2 and 3
    picks = select(scores, 2, "kcenter", features=features, labeled_features=torch.tensor(centres[:2]))
    assert cluster_of(picks) == [2, 3]
    # greedy farthest point: each pick maximises its distance to the centres so far
    chosen = [int(scores.argmax())]
    f = features.numpy()
    for _ in range(5):
        d = np.min(np.linalg.norm(f[:, None] - f[chosen][None], axis=2), axis=1)
        chosen.append(int(np.argmax(d)))
    assert select(scores, 6, "kcenter", features=features).tolist() == chosen


def test_kcenter_with_duplicates_stays_distinct():
    features = torch.zeros(5, 3)
    picks = select(torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2]), 5, "kcenter", features=features)
    assert picks.tolist() == [3, 1, 2, 4, 0]  # all at distance 0: by score


def duplicate_pool() -> torch.Tensor:
    """(T=4, P=5, C=2): 0 and 1 identical with BALD log 2; 2 independent, slightly lower BALD; 3, 4 certain-ish."""
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    b = torch.tensor([[0.97, 0.03], [0.03, 0.97], [0.97, 0.03], [0.03, 0.97]])
    low = torch.tensor([[0.6, 0.4], [0.55, 0.45], [0.6, 0.4], [0.5, 0.5]])
    return torch.stack([a, a, b, low, low.flip(1)], dim=1).double()


def test_batchbald_avoids_duplicates():
    probs = duplicate_pool()
    bald = classification_uncertainty(probs).mutual_information
    assert bald[0] == bald[1] > bald[2] > bald[3]
    assert sorted(select(bald, 2).tolist()) == [0, 1]
    assert select(bald, 2, "batchbald", prob_samples=probs).tolist() == [0, 2]
    assert select(bald, 5, "batchbald", prob_samples=probs)[:2].tolist() == [0, 2]


def brute_joint_mi(probs: np.ndarray, idx: list[int]) -> float:
    T, _, C = probs.shape
    joint = 0.0
    for labels in itertools.product(range(C), repeat=len(idx)):
        p = np.prod([probs[:, i, c] for i, c in zip(idx, labels)], axis=0).mean()
        joint -= p * np.log(p) if p > 0 else 0.0
    cond = sum(-(probs[:, i] * np.log(probs[:, i])).sum(1).mean() for i in idx)
    return joint - cond


def test_joint_mutual_information():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, (8, 6, 3))
    probs = np.exp(logits) / np.exp(logits).sum(2, keepdims=True)
    p = torch.from_numpy(probs)
    bald = classification_uncertainty(p).mutual_information
    for i in range(6):
        assert float(joint_mutual_information(p, [i])) == pytest.approx(float(bald[i]), abs=1e-12)
    for idx in ([0, 1], [1, 3, 5], [0, 2, 4, 5]):
        exact = float(joint_mutual_information(p, idx))
        assert exact == pytest.approx(brute_joint_mi(probs, idx), abs=1e-10)
        # the Monte-Carlo estimate (every set sampled) is seeded and close to the exact value
        mc = joint_mutual_information(p, idx, max_exact=1, mc_configs=20000, seed=1)
        assert mc == joint_mutual_information(p, idx, max_exact=1, mc_configs=20000, seed=1)
        assert float(mc) == pytest.approx(exact, abs=0.03)
    # greedy BatchBALD: each pick maximises the exact joint MI with the earlier picks
    picks = select(bald, 4, "batchbald", prob_samples=p).tolist()
    for n in range(1, 4):
        gains = [brute_joint_mi(probs, picks[:n] + [j]) if j not in picks[:n] else -np.inf for j in range(6)]
        assert picks[n] == int(np.argmax(gains))


def test_batchbald_monte_carlo_path(monkeypatch):
    probs = duplicate_pool()
    bald = classification_uncertainty(probs).mutual_information
    monkeypatch.setattr(selection, "MAX_EXACT_CONFIGS", 1)  # Monte Carlo from the second pick on
    monkeypatch.setattr(selection, "MC_CONFIGS", 2000)
    a = select(bald, 4, "batchbald", prob_samples=probs, seed=7)
    assert torch.equal(a, select(bald, 4, "batchbald", prob_samples=probs, seed=7))
    assert a[:2].tolist() == [0, 2] and len(set(a.tolist())) == 4


def test_selection_errors():
    s = torch.rand(5)
    assert set(SELECTIONS) == {"topk", "power", "softmax", "kcenter", "batchbald"}
    with pytest.raises(DubitoError, match="larger than the pool"):
        select(s, 6)
    for k in (0, -1):
        with pytest.raises(DubitoError, match="k must be"):
            select(s, k)
    with pytest.raises(DubitoError, match="unknown selection method 'greedy'"):
        select(s, 2, "greedy")
    with pytest.raises(DubitoError, match="features"):
        select(s, 2, "kcenter")
    with pytest.raises(DubitoError, match=r"features must be \(P=5"):
        select(s, 2, "kcenter", features=torch.rand(4, 2))
    with pytest.raises(DubitoError, match="labeled_features"):
        select(s, 2, "kcenter", features=torch.rand(5, 2), labeled_features=torch.rand(3, 3))
    with pytest.raises(DubitoError, match="prob_samples"):
        select(s, 2, "batchbald")
    with pytest.raises(DubitoError, match="prob_samples"):
        select(s, 2, "batchbald", prob_samples=torch.rand(3, 4, 2))
    with pytest.raises(DubitoError, match="temperature"):
        select(s, 2, "power", temperature=0.0)
    with pytest.raises(DubitoError, match="scores"):
        select(torch.rand(5, 2), 2)
    for method in ("topk", "power", "kcenter"):  # named by position, whatever the method
        with pytest.raises(DubitoError, match=r"NaN at pool positions 1, 3 \(2 of 4\)"):
            select(torch.tensor([0.1, float("nan"), 0.2, float("nan")]), 1, method, features=torch.rand(4, 2))
