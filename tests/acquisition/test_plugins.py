"""Users extend the registries without editing dubito: an acquisition that reads the raw MC
samples, a reduction with an option and a selection that needs features, registered from here
(outside the package), and one more acquisition from an entry point of a real tiny distribution
put on ``sys.path``. Each is checked against an independent computation, then used by a labeling
loop, the modAL strategy, a two-trial sweep (Ray workers that never ran the registrations) and
the ``dubito`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dubito import DubitoError
from dubito.acquisition import (
    ACQUISITIONS,
    REDUCTIONS,
    SELECTIONS,
    get_acquisition,
    parse_reduction,
    reduce_scores,
    register_acquisition,
    register_reduction,
    register_selection,
    select,
)
from dubito.acquisition.config import LEDGER, LoopConfig
from dubito.acquisition.ledger import Ledger
from dubito.acquisition.loop import run_loop
from dubito.platform.registry import plugins
from dubito.platform.uncertainty import classification_uncertainty

TINY = dict(
    dataset="synthetic-camvid",
    height=24,
    width=32,
    pool_images=14,
    test_images=4,
    initial=4,
    query=2,
    rounds=2,
    epochs=1,
    samples=3,
    batch_size=4,
    device="cpu",
)


# ----------------------------------------------------------------------------- the plugins
def mean_std(u, generator, samples):
    """Mean over classes of the std over the T samples of the class probabilities (mean-std)."""
    return samples.probs.std(0, unbiased=False).mean(1)


def quantile(scores, mask, q=0.5):
    """The q-quantile of each image's valid pixel scores."""
    flat = scores.reshape(scores.shape[0], -1).double()
    if mask is not None:
        flat = torch.where(torch.broadcast_to(mask, scores.shape).reshape(flat.shape), flat, torch.nan)
    return torch.nanquantile(flat, q, dim=1).to(scores.dtype)


def farthest(scores, k, *, seed, temperature, features, labeled_features=None):
    """The k pool items farthest from the labelled set in feature space (score breaks no tie: positions do)."""
    centres = labeled_features if labeled_features is not None and len(labeled_features) else features[:1]
    distance = torch.cdist(features.double(), centres.double()).amin(1)
    return torch.sort(distance, descending=True, stable=True).indices[:k]


DISTRIBUTION = '''
    import torch
    from dubito.acquisition import Acquisition

    def _top_two_gap(u, generator):
        """1 - (p1 - p2) of the MC mean probabilities, per element."""
        top = u.mean_probs.topk(2, dim=1).values
        return 1.0 - (top[:, 0] - top[:, 1])

    GAP = Acquisition("top_two_gap", ("classification",), "1 - (p1 - p2) of the mean probabilities", _top_two_gap)
'''


def _install_distribution(folder: Path) -> Path:
    """A real (tiny) installed distribution: a package and its dist-info with an entry point."""
    (folder / "tinyplug").mkdir(parents=True)
    (folder / "tinyplug" / "__init__.py").write_text(textwrap.dedent(DISTRIBUTION))
    info = folder / "tinyplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dubito.acquisitions]\ntop_two_gap = tinyplug:GAP\n")
    return folder


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """The three registered here and the distribution's, removed again after the test."""
    entries = [
        (
            ACQUISITIONS,
            register_acquisition("mean_std", mean_std, kinds=("classification",), needs=("samples",)),
        ),
        (REDUCTIONS, register_reduction("quantile", quantile, option="q", parse=float)),
        (SELECTIONS, register_selection("farthest", farthest, needs=("features",))),
    ]
    monkeypatch.syspath_prepend(str(_install_distribution(tmp_path / "site")))
    ACQUISITIONS.rescan()
    yield tmp_path / "site"
    for registry, entry in entries:
        registry.unregister(entry.name)
    ACQUISITIONS.unregister("top_two_gap")


# ----------------------------------------------------------------------------- each against an independent computation
def test_each_plugin_computes_what_it_says(registered):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 6, 3, 4, 4))  # T, N, C, H, W
    probs = np.exp(logits) / np.exp(logits).sum(2, keepdims=True)
    from dubito.platform.mc import MCSamples

    samples = MCSamples(torch.tensor(logits), None, torch.tensor(probs))
    u = classification_uncertainty(samples.probs, samples.mean)
    acquisition = get_acquisition("mean_std")
    assert acquisition.needs == ("samples",)
    np.testing.assert_allclose(acquisition.score(u, samples=samples).numpy(), probs.std(0).mean(1), rtol=1e-6)
    with pytest.raises(DubitoError, match="needs the MC samples"):
        acquisition.score(u)

    scores = torch.tensor(rng.random((6, 4, 4)))
    mask = torch.tensor(rng.random((6, 4, 4)) > 0.3)
    how, options = parse_reduction("quantile:0.75")
    assert (how, options) == ("quantile", {"q": 0.75})
    want = [np.quantile(scores[i][mask[i]].numpy(), 0.75) for i in range(6)]
    np.testing.assert_allclose(reduce_scores(scores, mask, how, **options).numpy(), want, rtol=1e-9)
    with pytest.raises(DubitoError, match="quantile"):
        parse_reduction("quantile:high")

    features = torch.tensor(rng.normal(size=(9, 3)))
    labeled = torch.tensor(rng.normal(size=(2, 3)))
    picked = select(torch.rand(9), 3, "farthest", features=features, labeled_features=labeled)
    distance = np.min(np.linalg.norm(features.numpy()[:, None] - labeled.numpy()[None], axis=2), axis=1)
    assert picked.tolist() == np.argsort(-distance, kind="stable")[:3].tolist()
    with pytest.raises(DubitoError, match="needs features"):
        select(torch.rand(9), 3, "farthest")

    gap = get_acquisition("top_two_gap")  # from the distribution's entry point
    mean = probs.mean(0)
    top = np.sort(mean, axis=1)[:, ::-1]
    np.testing.assert_allclose(gap.score(u).numpy(), 1 - (top[:, 0] - top[:, 1]), rtol=1e-6)


def test_registration_is_checked(registered):
    with pytest.raises(DubitoError, match="one of dubito's own"):
        register_acquisition("bald", mean_std)
    with pytest.raises(DubitoError, match="already registered"):
        register_selection("farthest", farthest)
    with pytest.raises(DubitoError, match="needs must be among"):
        register_selection("odd", farthest, needs=("labels",))
    with pytest.raises(DubitoError, match="without spaces, commas or colons"):
        register_reduction("a:b", quantile)
    with pytest.raises(DubitoError, match="must be an instance of Acquisition"):
        ACQUISITIONS.register(object())
    with pytest.raises(DubitoError, match="cannot be removed"):
        SELECTIONS.unregister("topk")
    assert set(plugins()["dubito.acquisitions"]["entries"]) == {"mean_std", "top_two_gap"}
    assert "bald" not in plugins()["dubito.acquisitions"]["entries"]


def test_a_selection_returning_bad_positions_is_refused(registered):
    register_selection("broken", lambda scores, k, **_: [0] * k)
    try:
        with pytest.raises(DubitoError, match="not 3 distinct positions"):
            select(torch.rand(9), 3, "broken")
    finally:
        SELECTIONS.unregister("broken")


# ---------------------------------------------- used by the loop, the modAL strategy, a sweep, the command
@pytest.mark.slow
def test_a_labeling_loop_runs_with_the_plugins(registered, tmp_path, ray_session, mlflow_uri):
    settings = dict(acquisition="mean_std", reduction="quantile:0.9", selection="farthest", **TINY)
    results = run_loop(LoopConfig.flat(output=str(tmp_path / "loop"), **settings), progress=False)
    assert results["finished"] and len(results["queried"]) == 2
    with Ledger(tmp_path / "loop" / LEDGER) as ledger:
        bought = [q["id"] for r in (0, 1) for q in ledger.queries(r)]
    assert len(set(bought)) == len(bought) == 4 and not set(bought) & set(results["initial"])
    # scored on two Ray actors, which never ran the registrations: they get them from this process
    remote = run_loop(LoopConfig.flat(output=str(tmp_path / "actors"), scorers=2, **settings), progress=False)
    assert remote["queried"] == results["queried"] and remote["curve"] == results["curve"]


def test_the_modal_strategy_uses_the_plugins(registered):
    from dubito.acquisition.modal import TorchEstimator, strategy
    from dubito.platform.data import Digits

    pool_data = Digits("train", seed=0)
    X = np.stack([pool_data[p]["image"].numpy() for p in range(60)])
    y = np.array([int(pool_data[p]["target"]) for p in range(60)])
    est = TorchEstimator(epochs=3, samples=4, seed=0, hidden=(16,)).fit(X[:20], y[:20])
    pool = X[20:]
    picked, scores = strategy("mean_std")(est, pool, n_instances=4)
    _, mc = est.uncertainty_with_samples(pool)
    want = mc.probs.std(0, unbiased=False).mean(1)
    assert picked.tolist() == torch.sort(want, descending=True, stable=True).indices[:4].tolist()
    np.testing.assert_allclose(scores, want[picked].double().numpy(), rtol=1e-6)

    picked, _ = strategy("top_two_gap", selection="farthest")(est, pool, n_instances=3)
    distance = torch.cdist(est.features(pool).double(), est.features(pool[:1]).double()).amin(
        1
    )  # a bare estimator: no labelled set
    assert picked.tolist() == torch.sort(distance, descending=True, stable=True).indices[:3].tolist()


@pytest.mark.slow
def test_a_two_trial_sweep_runs_the_plugins_in_ray_workers(registered, tmp_path, ray_session, mlflow_uri):
    from dubito.experiments.sweep import SweepConfig, run_sweep

    base = dict(TINY, reduction="quantile:0.5", selection="farthest")
    config = SweepConfig(
        kind="label", output=str(tmp_path / "sweep"), grid=("acquisition=mean_std,top_two_gap",), base=base
    )
    results = run_sweep(config, progress=False)
    assert results["finished"] == 2 and not results["errors"], results["errors"]
    # each trial bought what the same loop buys in this process
    for acquisition in ("mean_std", "top_two_gap"):
        (folder,) = [
            p
            for p in (tmp_path / "sweep" / "trials").iterdir()
            if json.loads((p / "trial.json").read_text())["params"]["acquisition"] == acquisition
        ]
        trial = json.loads((folder / "results.json").read_text())
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # a 1-CPU trial's count (CPU sums depend on it at float rounding)
        try:
            direct = run_loop(
                LoopConfig.flat(
                    output=str(tmp_path / f"direct-{acquisition}"), acquisition=acquisition, **base
                ),
                progress=False,
            )
        finally:
            torch.set_num_threads(before)
        assert {int(k): v for k, v in trial["queried"].items()} == direct["queried"] and len(
            direct["queried"]
        ) == 2


@pytest.mark.slow
def test_an_installed_distributions_acquisition_appears_in_the_command(registered, tmp_path, mlflow_uri):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(registered), os.environ.get("PYTHONPATH", "")])}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "rounds": 1}.items()]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dubito",
            "label",
            f"--output={tmp_path / 'cli'}",
            "--acquisition=top_two_gap",
            *flags,
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (
        json.loads((tmp_path / "cli" / "results.json").read_text())["config"]["acquisition"] == "top_two_gap"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dubito",
            "label",
            f"--output={tmp_path / 'cli2'}",
            "--acquisition=mean_std",
            *flags,
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert (
        done.returncode == 2
        and "unknown acquisition 'mean_std'" in done.stderr
        and "top_two_gap" in done.stderr
    )
    assert not (tmp_path / "cli2").exists()


def test_shipped_plugins_install_over_a_workers_own_entry_points(registered, tmp_path):
    """A Ray worker that sees the same installed distribution reads its entry points too: the
    driver's copies replace them instead of conflicting (every trial would fail otherwise)."""
    import pickle

    (tmp_path / "plugins.pkl").write_bytes(pickle.dumps(plugins()))  # by value, as Ray ships them
    code = (
        "import pickle, sys\n"
        "from dubito.platform.registry import install_plugins\n"
        "from dubito.acquisition import ACQUISITIONS, get_acquisition, parse_reduction\n"
        "install_plugins(pickle.loads(open(sys.argv[1], 'rb').read()))\n"
        "get_acquisition('bald'); parse_reduction('quantile:0.5')\n"
        "print(sorted(ACQUISITIONS.user_entries()))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(registered), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "plugins.pkl")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['mean_std', 'top_two_gap']"


def test_a_broken_entry_point_is_named_on_every_read(tmp_path, mlflow_uri):
    site = tmp_path / "site"
    (site / "brokenplug").mkdir(parents=True)
    (site / "brokenplug" / "__init__.py").write_text("raise ImportError('a dependency is missing')\n")
    info = site / "brokenplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dubito.selections]\noops = brokenplug:OOPS\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "rounds": 1}.items()]
    command = [
        sys.executable,
        "-m",
        "dubito",
        "label",
        f"--output={tmp_path / 'out'}",
        "--acquisition=bald",
        *flags,
    ]
    for _ in range(2):  # not half-loaded after the first failure
        done = subprocess.run(command + ["--no-progress"], env=env, capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "entry point 'oops' of dubito.selections (brokenplug:OOPS) failed to load" in done.stderr
        assert "a dependency is missing" in done.stderr
    assert not (tmp_path / "out").exists()
