"""Pool scoring on Ray actors gives exactly the scores local scoring gives, for every selection's
extras (k-center features, BatchBALD samples), and a whole labeling loop run with two scoring
actors buys the same labels as one that scores locally."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

from dubito import DubitoError
from dubito.acquisition.config import LoopConfig
from dubito.acquisition.distributed import RayPoolScorer, shards
from dubito.acquisition.loop import run_loop
from dubito.acquisition.pool import pool_datasets
from dubito.acquisition.scoring import pool_batches, score_pool
from dubito.platform.training import fit
from tests.fixtures import TINY_LOOP

CPU = torch.device("cpu")


def test_shards_cover_every_batch_once_in_order():
    batches = list(range(11))
    for parts in (1, 2, 3, 4, 11, 20):
        cut = shards(batches, parts)
        assert [b for s in cut for b in s] == batches
        assert len(cut) == min(parts, 11) and all(cut)
        assert max(map(len, cut)) - min(map(len, cut)) <= 1
    assert pool_batches([5, 6, 7, 8, 9], 2) == [(0, [5, 6]), (1, [7, 8]), (2, [9])]


@pytest.mark.parametrize(
    ("settings", "selection"),
    [
        (
            dict(dataset="synthetic-camvid", height=24, width=32, pool_images=22, acquisition="bald"),
            "kcenter",
        ),
        (
            dict(dataset="synthetic-make3d", height=24, width=32, pool_images=14, acquisition="epistemic"),
            "topk",
        ),
        (
            dict(dataset="digits", model="mlp", variant="epistemic", dropout=0.5, acquisition="random"),
            "batchbald",
        ),
    ],
)
@pytest.mark.slow
def test_two_actors_score_exactly_as_local_scoring(settings, selection, ray_session):
    config = LoopConfig.flat(**settings, selection=selection, epochs=1, samples=3, batch_size=4, device="cpu")
    train_set, pool, _ = pool_datasets(config)
    model, spec, _ = fit(config.train_config(0), Subset(train_set, list(range(8))), device=CPU)
    positions = list(range(8, min(len(pool), 60)))
    local = score_pool(model, spec, pool, positions, config.scoring(), 3, CPU, progress=False)
    with RayPoolScorer(config.pool(), config.scoring(), spec, 2, device=config.train.device) as scorer:
        assert scorer.devices() == ["cpu", "cpu"]
        remote = score_pool(
            model, spec, pool, positions, config.scoring(), 3, CPU, progress=False, scorer=scorer
        )
    assert len(local.scores) == len(positions)
    for key in ("scores", "features", "prob_samples"):
        mine, theirs = getattr(local, key), getattr(remote, key)
        assert (mine is None) == (theirs is None) and (mine is None or torch.equal(mine, theirs)), key
    # only what the selection declared is computed
    assert (local.features is not None) == (selection == "kcenter")
    assert (local.prob_samples is not None) == (selection == "batchbald")
    if selection == "batchbald":
        assert local.prob_samples.shape[:2] == (3, len(positions))
    # a different round draws different MC masks: the scores are not constant
    other = score_pool(model, spec, pool, positions, config.scoring(), 4, CPU, progress=False)
    assert not torch.equal(other.scores, local.scores)


@pytest.mark.slow
def test_loop_with_scoring_actors_buys_the_same_labels(tmp_path, ray_session, mlflow_uri):
    settings = dict(TINY_LOOP, acquisition="bald")
    local = run_loop(LoopConfig.flat(output=str(tmp_path / "local"), **settings), progress=False)
    remote = run_loop(LoopConfig.flat(output=str(tmp_path / "ray"), scorers=2, **settings), progress=False)
    assert remote["queried"] == local["queried"] and remote["curve"] == local["curve"]
    # --scorers may change when a loop resumes (it changes where scoring runs, not what it gives): the
    # rounds added locally are the ones a loop scored on actors throughout would have made
    longer = {**settings, "rounds": 3}
    resumed = run_loop(LoopConfig.flat(output=str(tmp_path / "ray"), scorers=0, **longer), progress=False)
    remote_all = run_loop(
        LoopConfig.flat(output=str(tmp_path / "ray-all"), scorers=2, **longer), progress=False
    )
    assert resumed["queried"] == remote_all["queried"] and len(resumed["queried"]) == 3
    assert resumed["curve"] == remote_all["curve"]


def test_ensemble_members_trained_as_ray_tasks_are_the_local_members(tmp_path, ray_session, mlflow_uri):
    settings = dict(TINY_LOOP, acquisition="bald", epistemic="ensemble:3", rounds=1)
    local = run_loop(LoopConfig.flat(output=str(tmp_path / "local"), **settings), progress=False)
    remote = run_loop(
        LoopConfig.flat(output=str(tmp_path / "ray"), member_workers=2, **settings), progress=False
    )
    assert remote["queried"] == local["queried"] and remote["curve"] == local["curve"]
    assert [c["models"] for c in remote["cost"]] == [3, 3]
    for r in (0, 1):  # weight for weight: the tasks ran each member's seed with this process's threads
        here, there = (
            torch.load(tmp_path / run / "rounds" / f"round-{r:03d}.pt", weights_only=True)["members"]
            for run in ("local", "ray")
        )
        assert len(here) == len(there) == 3
        for a, b in zip(here, there):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(here[0][k], here[1][k]) for k in here[0])  # members differ
    with pytest.raises(DubitoError, match="--member-workers must be >= 0"):
        LoopConfig.flat(member_workers=-1).validate()


def test_a_members_error_reaches_the_user_and_a_full_cluster_is_refused(ray_session):
    import dataclasses

    import ray

    from dubito.platform.ensemble_training import fit_on_ray
    from dubito.platform.training import member_config

    config = LoopConfig.flat(**TINY_LOOP)
    data = Subset(config.pool().datasets()[0], range(8))
    diverging = dataclasses.replace(config.train_config(0), lr=1e38, epochs=2)
    configs = [member_config(diverging, k) for k in range(3)]
    with pytest.raises(
        DubitoError, match=r"^training, epoch 1: the loss became (nan|inf) \(try a lower --lr\)$"
    ):
        fit_on_ray(configs, data, CPU, 2)  # the task's DubitoError itself, not Ray's traceback around it
    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(
        DubitoError, match=f"needs a CPU, but the Ray cluster has {cpus:g} in all and {cpus:g} are held"
    ):
        fit_on_ray(configs, data, CPU, 2, reserved={"CPU": cpus})  # e.g. by --scorers actors on every CPU


def test_scorer_refuses_gpus_the_cluster_lacks(ray_session):
    config = LoopConfig.flat(device="auto", scorer_gpus="1")
    with pytest.raises(DubitoError, match="no GPU"):
        RayPoolScorer(
            config.pool(), config.scoring(), {}, 1, device=config.train.device, gpus=config.scorer_gpus
        )
    with pytest.raises(DubitoError, match="--scorers and --scorer-threads must be >= 0"):
        LoopConfig.flat(scorers=-1).validate()
