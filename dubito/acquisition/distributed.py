"""Pool scoring spread over Ray actors (``dubito label --scorers N``).

Each actor builds the loop's pool itself (synthetic scenes are regenerated from their seed; real
datasets are read from ``--root``, which must then be visible to every node) and holds a model
replica. Once per round the driver puts the new weights in Ray's object store once and every
actor loads them; then each actor scores a contiguous shard of the round's batches with
:func:`dubito.acquisition.scoring.score_batches`. A batch's MC masks and random draws are seeded by
its index (:func:`~dubito.acquisition.scoring.batch_seed`), so the scores are exactly the ones local
scoring gives. Actors get a GPU each where the cluster has GPUs (and the loop's ``--device`` is
not ``cpu``), else one CPU each. On a CPU an actor runs with the driver's intra-op thread
count: PyTorch's CPU sums depend on it at float rounding, and the same count makes the scores
bit-identical.

Actors are given two small picklable specs — the pool's (:class:`~dubito.acquisition.pool.PoolSpec`)
and the scoring's (:class:`~dubito.acquisition.scoring.ScoringSpec`) — and the acquisitions,
reductions and selections users registered in this process (:func:`dubito.platform.registry.plugins`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dubito import DubitoError
from dubito.acquisition.pool import PoolSpec
from dubito.acquisition.scoring import Scored, ScoringSpec, score_batches
from dubito.platform.cluster import check_gpu_capacity, connect, gpu_request
from dubito.platform.models import ModelSpec
from dubito.platform.registry import install_plugins, plugins
from dubito.platform.service import resolve_device

__all__ = ["RayPoolScorer", "shards"]


def shards(batches: list, parts: int) -> list[list]:
    """``batches`` cut into at most ``parts`` contiguous, near-equal shards (none empty)."""
    parts = max(1, min(parts, len(batches)))
    size, extra = divmod(len(batches), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (k < extra)
        out.append(batches[start:end])
        start = end
    return out


class _Scorer:
    """The actor: a model replica and the loop's pool."""

    def __init__(
        self,
        pool: PoolSpec,
        scoring: ScoringSpec,
        spec: ModelSpec,
        device: str,
        threads: int,
        found: dict[str, Any],
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        install_plugins(found)  # what users registered in the driver
        self.scoring, self.spec = scoring, spec
        self.device = resolve_device(device)
        self.pool = pool.datasets()[1]
        self.model = scoring.build(spec).to(self.device).eval()

    def set_weights(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)
        self.model.eval()

    def score(
        self, batches: list[tuple[int, list[int]]], round: int, scoring: ScoringSpec | None = None
    ) -> list[Scored]:
        return score_batches(
            self.model, self.spec, self.pool, batches, scoring or self.scoring, round, self.device
        )

    def where(self) -> str:
        return str(self.device)


class RayPoolScorer:
    """``actors`` Ray actors scoring a labeling loop's pool (``pool``) as ``scoring`` says, with
    models of ``spec``; use as a context manager (the actors are killed on exit). ``device``: the
    loop's; ``gpus``: per actor, ``auto`` (1 where the cluster has GPUs and ``device`` is not
    ``cpu``) or a number; ``cpus``: per actor; ``threads``: PyTorch threads per CPU actor
    (default: this process's count, which makes the scores bit-identical)."""

    def __init__(
        self,
        pool: PoolSpec,
        scoring: ScoringSpec,
        spec: ModelSpec | dict[str, Any],
        actors: int,
        *,
        device: str = "auto",
        gpus: str | float = "auto",
        cpus: float = 1.0,
        threads: int | None = None,
    ) -> None:
        import ray

        if actors < 1:
            raise DubitoError(f"--scorers must be >= 1 to score with Ray actors, got {actors}")
        connect()
        want = 0.0 if device == "cpu" else gpu_request(gpus, "--scorer-gpus")
        check_gpu_capacity(want, actors, f"--scorers {actors} with --scorer-gpus {want:g}")
        if want == 0 and device == "auto":  # Ray leaves a node's GPUs visible to a task granted none
            device = "cpu"
        if pool.root:  # actors may run on other nodes, in other folders
            pool = dataclasses.replace(pool, root=str(Path(pool.root).expanduser().resolve()))
        remote = ray.remote(num_cpus=cpus, num_gpus=want)(_Scorer)
        # on a CPU, PyTorch's sums depend on its intra-op thread count at float rounding: the
        # actors use this process's count, so their scores are bit-identical to local scoring
        # (``threads`` overrides it: faster where actors share cores, equal only to float rounding)
        threads = (threads or torch.get_num_threads()) if want == 0 else 0
        found, spec = plugins(), ModelSpec.of(spec)
        self.actors = [remote.remote(pool, scoring, spec, device, threads, found) for _ in range(actors)]
        self.gpus = want

    def __enter__(self) -> RayPoolScorer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def devices(self) -> list[str]:
        import ray

        return ray.get([a.where.remote() for a in self.actors])

    def set_weights(self, model: nn.Module) -> None:
        """Send ``model``'s weights to every actor: one copy in the object store, read by all."""
        import ray

        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        ref = ray.put(state)
        ray.get([a.set_weights.remote(ref) for a in self.actors])

    def score(
        self,
        model: nn.Module,
        batches: list[tuple[int, list[int]]],
        round: int,
        progress: bool = False,
        spec: ScoringSpec | None = None,
    ) -> list[Scored]:
        """The per-batch results of :func:`~dubito.acquisition.scoring.score_batches`, in ``batches``'
        order; ``spec``: this round's scoring (its calibration), else the one the actors were given."""
        import ray

        if not self.actors:
            raise DubitoError("this RayPoolScorer is closed")
        self.set_weights(model)  # once per round: a round scores once with its own model
        parts = shards(batches, len(self.actors))
        pending = {self.actors[k].score.remote(part, round, spec): k for k, part in enumerate(parts)}
        done: dict[int, list] = {}
        total = sum(len(p) for _, p in batches)
        with tqdm(
            total=len(batches),
            desc=f"round {round}: scoring {total} pool images on {len(parts)} Ray actors",
            unit="batch",
            leave=False,
            disable=not progress,
        ) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                k = pending.pop(ready[0])
                done[k] = ray.get(ready[0])
                bar.update(len(parts[k]))
        return [r for k in range(len(parts)) for r in done[k]]
