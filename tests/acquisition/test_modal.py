"""The modAL interface: TorchEstimator (a scikit-learn classifier around a dubito MC-dropout MLP)
and dubito acquisition functions as modAL query strategies, driven through modAL's ActiveLearner
on scikit-learn's digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from modAL.models import ActiveLearner
from sklearn.base import clone, is_classifier
from sklearn.exceptions import NotFittedError
from sklearn.metrics import accuracy_score

from dubito import DubitoError
from dubito.acquisition.functions import ACQUISITIONS, get_acquisition
from dubito.acquisition.modal import Strategy, TorchEstimator, strategy
from dubito.platform.data import Digits
from dubito.platform.service import UncertaintyService

# modAL 0.4.2's teach passes check_X_y(force_all_finite=...), renamed in scikit-learn 1.6 (docs/architecture.md, "Dependencies")
pytestmark = [
    pytest.mark.filterwarnings("ignore:'force_all_finite' was renamed:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),  # tiny models: intra-op threads only add overhead
]

EPOCHS = 60  # enough for ~0.85 test accuracy from 100 labels; fit takes ~0.1 s on one thread
SAMPLES = 10
CLASSIFICATION = [name for name, a in ACQUISITIONS.items() if "classification" in a.kinds]


@pytest.fixture(scope="module")
def digits():
    """All 1797 images (positions = ids), the train ids as the pool and the test ids for evaluation."""
    full = Digits("all", seed=0)
    pool_ids = np.asarray(Digits("train", seed=0).ids)
    test_ids = np.asarray(Digits("test", seed=0).ids)
    return full, pool_ids, test_ids


def _start(pool_ids: np.ndarray, n: int = 20, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(pool_ids, n, replace=False))


def _learner(full, labeled: np.ndarray, query, seed: int = 0, **params) -> ActiveLearner:
    est = TorchEstimator(data=full, epochs=EPOCHS, samples=SAMPLES, seed=seed, **params)
    return ActiveLearner(
        estimator=est,
        query_strategy=query,
        X_training=labeled.reshape(-1, 1),
        y_training=full.targets[labeled].numpy(),
    )


def _run(full, pool_ids, query, rounds: int, k: int, seed: int = 0) -> tuple[ActiveLearner, list[np.ndarray]]:
    start = _start(pool_ids)
    learner = _learner(full, start, query, seed=seed)
    unlabeled = np.setdiff1d(pool_ids, start).reshape(-1, 1)
    picked = []
    for _ in range(rounds):
        positions, rows = learner.query(unlabeled, n_instances=k)
        assert np.array_equal(rows, unlabeled[positions])
        learner.teach(rows, full.targets[rows[:, 0]].numpy())
        picked.append(rows[:, 0].copy())
        unlabeled = np.delete(unlabeled, positions, axis=0)
    return learner, picked


@pytest.fixture(scope="module")
def fitted(digits):
    """A learner fitted on 30 labels, and the rest of the pool as (n, 1) positions."""
    full, pool_ids, _ = digits
    start = _start(pool_ids, 30, seed=1)
    learner = _learner(full, start, strategy("bald"))
    return learner, np.setdiff1d(pool_ids, start).reshape(-1, 1)


@pytest.mark.slow
@pytest.mark.finding
def test_active_learning_with_bald_on_digits(digits, finding):
    full, pool_ids, test_ids = digits
    k, rounds = 20, 4
    learner, picked = _run(
        full, pool_ids, strategy("bald", seed=finding.seed(0)), rounds, k, seed=finding.seed(0)
    )
    queried = np.concatenate(picked)
    start = _start(pool_ids)
    assert len(np.unique(queried)) == k * rounds  # distinct across rounds
    assert not set(queried) & set(start)  # never a labelled image
    assert set(queried) <= set(pool_ids)  # never a test image
    assert learner.X_training.shape == (len(start) + k * rounds, 1)
    assert len(learner.y_training) == len(start) + k * rounds
    np.testing.assert_array_equal(learner.X_training[len(start) :, 0], queried)
    # 100 labels: measured 0.86 (seed 0); chance is 0.1
    accuracy = learner.score(test_ids.reshape(-1, 1), full.targets[test_ids].numpy())
    finding.check("digits test accuracy after 4 BALD rounds (100 labels)", accuracy, ">", 0.7)


def test_labelled_set_grows_by_n_instances_each_round_with_1d_positions(digits):
    full, pool_ids, _ = digits
    start = _start(pool_ids, 10)
    est = TorchEstimator(data=full, epochs=5, samples=4)
    query = strategy("entropy")
    learner = ActiveLearner(
        estimator=est, query_strategy=query, X_training=start, y_training=full.targets[start].numpy()
    )
    unlabeled = np.setdiff1d(pool_ids, start)  # (n,) positions work too
    sizes = [len(learner.X_training)]
    for k in (3, 5, 7):
        positions, rows = learner.query(unlabeled, n_instances=k)
        assert positions.shape == (k,) and rows.shape == (k,)
        learner.teach(rows, full.targets[rows].numpy())
        unlabeled = np.delete(unlabeled, positions)
        sizes.append(len(learner.X_training))
    assert sizes == [10, 13, 18, 25]
    assert query.calls == 3  # modAL unpacked (positions, scores) at once: no second call
    assert len(np.unique(learner.X_training)) == 25


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_every_acquisition_is_a_strategy(fitted, name):
    learner, unlabeled = fitted
    query = strategy(name)
    positions, metrics = query(learner, unlabeled, n_instances=5)
    assert positions.dtype == np.int64 and positions.shape == (5,) and len(set(positions)) == 5
    assert metrics.shape == (5,) and np.isfinite(metrics).all()
    assert positions.min() >= 0 and positions.max() < len(unlabeled)
    if name != "random":  # topk: the 5 best of the scores computed directly from the service's uncertainty
        u = learner.estimator.uncertainty(unlabeled)
        scores = get_acquisition(name).score(u).double().numpy()
        np.testing.assert_allclose(metrics, scores[positions], rtol=1e-6)
        assert metrics.min() >= np.sort(scores)[-5] - 1e-9
    # through modAL's query, with its metrics
    idx, rows, reported = learner.query(unlabeled, n_instances=5, return_metrics=True)
    assert np.array_equal(rows, unlabeled[idx]) and reported.shape == (5,)


def test_strategy_options_and_selections(fitted):
    learner, unlabeled = fitted
    positions, _ = strategy("epistemic", logit_variance=True)(learner, unlabeled, n_instances=3)
    u = learner.estimator.uncertainty(unlabeled)
    best = torch.sort(u.epistemic_logit_variance, descending=True, stable=True).indices[:3].numpy()
    np.testing.assert_array_equal(positions, best)
    for selection in ("power", "softmax", "kcenter", "batchbald"):
        positions, metrics = strategy("bald", selection=selection, seed=3)(learner, unlabeled, n_instances=4)
        assert len(set(positions)) == 4 and np.isfinite(metrics).all(), selection
    # kcenter starts from the labelled set: its first pick is the pool row farthest from it
    positions, _ = strategy("bald", selection="kcenter")(learner, unlabeled, n_instances=1)
    features = learner.estimator.features(unlabeled)
    labeled = learner.estimator.features(learner.X_training)
    assert positions[0] == int(torch.cdist(features.double(), labeled.double()).amin(1).argmax())
    # batchbald: the samples are those the uncertainty comes from
    u2, probs = learner.estimator.uncertainty_and_samples(unlabeled)
    assert probs.shape == (SAMPLES, len(unlabeled), 10)
    torch.testing.assert_close(probs.mean(0), u2.mean_probs)
    torch.testing.assert_close(u2.mutual_information, u.mutual_information)


def test_regression_only_acquisition_and_bad_arguments(fitted):
    learner, unlabeled = fitted
    with pytest.raises(DubitoError, match="total_variance.*classification"):
        strategy("total_variance")(learner, unlabeled, n_instances=1)
    with pytest.raises(DubitoError, match="unknown acquisition"):
        strategy("nope")
    with pytest.raises(DubitoError, match="selection"):
        strategy("bald", selection="best")
    with pytest.raises(DubitoError, match="takes no options"):
        strategy("bald", logit_variance=True)
    with pytest.raises(DubitoError, match="n_instances"):
        strategy("bald")(learner, unlabeled[:3], n_instances=4)
    with pytest.raises(DubitoError, match="TorchEstimator"):
        strategy("bald")(object(), unlabeled, n_instances=1)
    with pytest.raises(DubitoError, match="unexpected query argument"):
        strategy("bald")(learner, unlabeled, n_instances=1, random_tie_break=True)
    with pytest.raises(NotFittedError):
        strategy("bald")(TorchEstimator(), np.zeros((3, 64)), n_instances=1)
    est = learner.estimator
    with pytest.raises(DubitoError, match="integer positions"):
        est.predict(np.zeros((2, 1)))
    with pytest.raises(DubitoError, match="outside the data"):
        est.predict(np.array([[5000]]))
    with pytest.raises(DubitoError, match=r"\(n,\) or \(n, 1\)"):
        est.predict(np.zeros((2, 64), dtype=np.int64))


def test_same_seed_same_queries(digits):
    full, pool_ids, _ = digits
    _, first = _run(full, pool_ids, strategy("bald"), rounds=2, k=5)
    _, again = _run(full, pool_ids, strategy("bald"), rounds=2, k=5)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # random: the seed and the call count decide the draws
    query = strategy("random", seed=1)
    learner = _learner(full, _start(pool_ids), query)
    pool = np.setdiff1d(pool_ids, _start(pool_ids)).reshape(-1, 1)
    one, two = query(learner, pool, n_instances=8)[0], query(learner, pool, n_instances=8)[0]
    assert not np.array_equal(one, two)
    query.reset()
    np.testing.assert_array_equal(query(learner, pool, n_instances=8)[0], one)
    np.testing.assert_array_equal(strategy("random", seed=1)(learner, pool, n_instances=8)[0], one)
    assert not np.array_equal(strategy("random", seed=2)(learner, pool, n_instances=8)[0], one)
    assert isinstance(query, Strategy) and query.calls == 1


@pytest.mark.slow
@pytest.mark.finding
def test_estimator_on_feature_arrays_against_direct_computation(digits, finding):
    full, pool_ids, test_ids = digits
    chosen = _start(pool_ids, 200, seed=finding.seed(2))
    X, y = full.images[chosen].numpy(), full.targets[chosen].numpy()
    X_test, y_test = full.images[test_ids].numpy(), full.targets[test_ids].numpy()
    est = TorchEstimator(epochs=20, samples=8, seed=finding.seed(5), hidden=(64,), dropout=0.2)
    assert is_classifier(est)
    assert est.fit(X, y + 10) is est  # arbitrary labels: classes_ maps them
    np.testing.assert_array_equal(est.classes_, np.arange(10, 20))
    proba = est.predict_proba(X_test)
    assert proba.shape == (len(X_test), 10) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    service = UncertaintyService(
        est.model_, task="classification", samples=8, device="cpu", seed=finding.seed(5), progress=False
    )
    direct = service.predict(torch.from_numpy(X_test)).mean_probs.double().numpy()
    np.testing.assert_allclose(proba, direct, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(est.predict(X_test), np.arange(10, 20)[direct.argmax(1)])
    assert est.score(X_test, y_test + 10) == pytest.approx(accuracy_score(y_test + 10, est.predict(X_test)))
    finding.check(
        "digits test accuracy, 200 random labels, 20 epochs", est.score(X_test, y_test + 10), ">", 0.75
    )
    np.testing.assert_array_equal(est.predict_proba(X_test), proba)  # reproducible predictions
    u = est.uncertainty(X_test[:7])
    assert u.mean_probs.shape == (7, 10) and u.mutual_information.shape == (7,)
    assert est.features(X_test[:7]).shape == (7, 64)

    # same seed + same data → same weights; another seed → other weights
    same = TorchEstimator(epochs=20, samples=8, seed=finding.seed(5), hidden=(64,), dropout=0.2).fit(
        X, y + 10
    )
    other = TorchEstimator(epochs=20, samples=8, seed=finding.seed(5) + 1, hidden=(64,), dropout=0.2).fit(
        X, y + 10
    )
    for key, value in est.model_.state_dict().items():
        assert torch.equal(value, same.model_.state_dict()[key]), key
    assert not torch.equal(est.model_.head.out.weight, other.model_.head.out.weight)
    # positions into data train exactly like the features they point at (y read from data)
    by_index = TorchEstimator(
        epochs=20, samples=8, seed=5, hidden=(64,), dropout=0.2, data=full, classes=range(10)
    )
    by_index.fit(chosen.reshape(-1, 1))
    plain = TorchEstimator(epochs=20, samples=8, seed=5, hidden=(64,), dropout=0.2).fit(X, y)
    assert torch.equal(by_index.model_.head.out.weight, plain.model_.head.out.weight)
    np.testing.assert_array_equal(
        by_index.predict_proba(test_ids.reshape(-1, 1)), plain.predict_proba(X_test)
    )
    assert by_index.score(test_ids.reshape(-1, 1)) == plain.score(X_test, y_test)
    with pytest.raises(DubitoError, match="2-D"):
        est.predict(X_test[0])
    with pytest.raises(DubitoError, match="features"):
        est.predict(X_test[:, :10])
    with pytest.raises(DubitoError, match="not among the classes"):
        TorchEstimator(epochs=1, classes=[0, 1]).fit(X, y)
    with pytest.raises(DubitoError, match="variant"):
        TorchEstimator(variant="bayes").fit(X, y)
    with pytest.raises(DubitoError, match="optimizer"):
        TorchEstimator(optimizer="sgd").fit(X, y)


def test_both_variant_and_rmsprop(digits):
    full, pool_ids, _ = digits
    est = TorchEstimator(
        variant="both", optimizer="rmsprop", epochs=3, samples=4, logit_noise_samples=4, data=full
    )
    est.fit(pool_ids[:64].reshape(-1, 1))
    assert est.model_.has_log_var and est.model_.mc_dropout
    np.testing.assert_allclose(est.predict_proba(pool_ids[64:80].reshape(-1, 1)).sum(1), 1.0, atol=1e-5)
    positions, _ = strategy("aleatoric")(est, pool_ids[64:200].reshape(-1, 1), n_instances=2)
    assert len(set(positions)) == 2


def test_sklearn_clone(digits):
    full, pool_ids, _ = digits
    est = TorchEstimator(hidden=(32,), epochs=2, seed=9, data=full, samples=3)
    est.fit(pool_ids[:40].reshape(-1, 1))
    copy = clone(est)
    assert not hasattr(copy, "model_")
    params, copied = est.get_params(), copy.get_params()
    assert params.keys() == copied.keys()
    assert all(params[k] == copied[k] for k in params if k != "data")
    assert copied["data"].ids == full.ids  # scikit-learn deep-copies non-estimator parameters
    copy.fit(pool_ids[:40].reshape(-1, 1))
    assert torch.equal(copy.model_.head.out.weight, est.model_.head.out.weight)
    assert "TorchEstimator" in repr(est)


def test_pool_is_scored_in_blocks(fitted, monkeypatch):
    import dubito.acquisition.modal as modal

    learner, unlabeled = fitted
    est = learner.estimator
    whole_features, whole = est.features(unlabeled), est.uncertainty(unlabeled)
    monkeypatch.setattr(modal, "PREDICT_ROWS", 100)
    torch.testing.assert_close(est.features(unlabeled), whole_features)
    u, probs = est.uncertainty_and_samples(unlabeled)
    assert u.mean_probs.shape == whole.mean_probs.shape and probs.shape == (SAMPLES, len(unlabeled), 10)
    torch.testing.assert_close(probs.mean(0), u.mean_probs)
    positions, _ = strategy("bald", selection="batchbald")(learner, unlabeled, n_instances=2)
    assert len(set(positions)) == 2
