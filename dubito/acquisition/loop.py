"""The pool-based labeling loop: an initial random set, then rounds of

    train (from scratch, seeded) → test → score the unlabelled pool through the
    UncertaintyService → reduce pixel scores per image → select a batch → label → record

for a budget of rounds or labels. Every round is one transaction in the :class:`Ledger`
(``--output/ledger.sqlite``) and its model is saved atomically first, so a run killed at any
point and started again with the same command continues after its last recorded round, never
labels an id twice, and (on a CPU) ends with the same results as an uninterrupted run: each
round's training, MC sampling and selection are seeded by (seed, round).

Oracles: ``simulated`` reads the dataset's ground truth; ``human`` stops after each query,
writes the queried images to ``--output/queries/round-R`` (``dubito label export``), and
continues once ``dubito label import`` has stored the returned label files.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dubito import DubitoError
from dubito.acquisition.config import LEDGER, LoopConfig, loop_config
from dubito.acquisition.distributed import RayPoolScorer
from dubito.acquisition.human import HumanLabels, export_queries
from dubito.acquisition.ledger import INITIAL, Ledger, LedgerError
from dubito.acquisition.pool import Pool, pool_datasets, validation_dataset
from dubito.acquisition.scoring import batch_seed, choose, labeled_features, score_pool
from dubito.platform.calibration import Calibration, fit_calibration
from dubito.platform.config import to_flat
from dubito.platform.data import HEADLINE
from dubito.platform.ensemble_training import fit_ensemble
from dubito.platform.files import check_output, exclusive, read_json, write_json
from dubito.platform.models import ModelSpec
from dubito.platform.service import UncertaintyService, parse_epistemic, resolve_device, source_options
from dubito.platform.tracking import check_tracking, tracked_run
from dubito.platform.training import fit, load_model, save_model, validate

#: the batch index of a round's calibration seeds (pool batches count from 0)
CALIBRATION_BATCH = 1 << 30

__all__ = [
    "LEDGER",
    "LoopConfig",
    "run_loop",
    "check_resume",
    "headline_metric",
    "load_results",
    "loop_config",
    "pool_datasets",
]


class _Scoring:
    """The loop's Ray scorer (``--scorers N``), started at the first query (it needs the model's
    spec) and stopped when the loop ends; ``get`` gives None when scoring stays local."""

    def __init__(self, config: LoopConfig) -> None:
        self.config = config
        self.scorer: RayPoolScorer | None = None

    def get(self, spec: ModelSpec) -> RayPoolScorer | None:
        if self.config.scorers == 0:
            return None
        if self.scorer is None:
            c = self.config
            self.scorer = RayPoolScorer(
                c.pool(),
                c.scoring(),
                spec,
                c.scorers,
                device=c.train.device,
                gpus=c.scorer_gpus,
                threads=c.scorer_threads or None,
            )
        return self.scorer

    def __enter__(self) -> _Scoring:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.scorer is not None:
            self.scorer.close()


@dataclass
class _Loop:
    """What every round of one loop shares."""

    config: LoopConfig
    out: Path
    ledger: Ledger
    pool: Pool  # the plain pool (scoring, ids); training reads ``pool_train``, aligned with it
    pool_train: Dataset
    test: Dataset
    device: torch.device
    progress: bool
    scoring: _Scoring
    validation: Dataset | None = None  # held-out labelled data the rounds calibrate on (--calibrate)

    def training_set(self, labeled: list[int]) -> Dataset:
        """The labelled items, with a person's labels in place of the targets (human oracle)."""
        data = (
            HumanLabels(self.pool_train, self.pool.data, self.ledger.label_files())
            if self.config.oracle == "human"
            else self.pool_train
        )
        return self.pool.subset(data, labeled)

    def calibration(self, model: torch.nn.Module, round: int) -> Calibration | None:
        """``--calibrate``: round ``round``'s calibration of ``model``, fit on the validation data
        with its own seeds (the same for a rerun)."""
        if self.validation is None:
            return None
        c = self.config
        source = parse_epistemic(c.epistemic)[0]
        service = UncertaintyService(
            model,
            **source_options(model, source, c.samples),
            device=self.device,
            seed=batch_seed(c.seed, round, CALIBRATION_BATCH),
            progress=False,
        )
        loader = DataLoader(self.validation, batch_size=c.train.batch_size)
        return fit_calibration(service, loader, seed=c.seed)[0]

    def query(
        self,
        model: torch.nn.Module,
        spec: ModelSpec,
        labeled: list[int],
        round: int,
        calibration: Calibration | None = None,
    ) -> tuple[list[int], list[float], list[dict]]:
        """Round ``round``'s choice: score the unlabelled pool with its model (``calibration``
        applied), reduce per image, select a batch; returns (ids, their scores, their flags)."""
        c = self.config
        free = self.pool.unlabelled(labeled)
        scored = score_pool(
            model,
            spec,
            self.pool.data,
            free,
            dataclasses.replace(c.scoring(), calibration=calibration),
            round,
            self.device,
            self.progress,
            scorer=self.scoring.get(spec),
        )
        known = (
            labeled_features(
                model, self.pool.data, self.pool.positions(labeled), c.train.batch_size, self.device
            )
            if scored.features is not None
            else None
        )
        picks = choose(
            scored,
            _batch_size(c, len(labeled), len(free)),
            c.selection,
            seed=c.seed * 1000 + round,
            temperature=c.temperature,
            labeled=known,
        ).tolist()
        queried = self.pool.ids_at(free[p] for p in picks)
        return queried, [float(scored.scores[p]) for p in picks], self.pool.flags(queried)

    def export(self, round: int, ids: list[int]) -> None:
        """Human oracle: write round ``round``'s queried images for a person to label."""
        export_queries(
            self.config, self.out / "queries" / ("initial" if round == INITIAL else f"round-{round:03d}"), ids
        )


def run_loop(
    config: LoopConfig,
    *,
    progress: bool = True,
    tags: dict[str, str] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    run_name: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the loop of ``config``; returns what ``--output/results.json`` holds.

    ``--rounds`` / ``--budget`` may grow on resume (a finished loop continues as if it had been
    started with the larger budget); they cannot shrink. ``on_round(record)`` is called after
    each round is committed to the ledger, with ``round``, ``labels`` and the round's test
    metrics (a Ray Tune trial reports and checkpoints there)."""
    config.validate()
    out = check_output(config.output)
    check_tracking()
    device = resolve_device(config.train.device)
    pool_train, plain, test = pool_datasets(config)
    validation = validation_dataset(config.pool()) if config.calibrate else None
    pool = Pool(plain)
    config.check_pool(len(pool))
    with exclusive(out), Ledger(out / LEDGER, config.settings()) as ledger:
        _check_resumable(ledger, config)
        loop = _Loop(
            config, out, ledger, pool, pool_train, test, device, progress, _Scoring(config), validation
        )
        if not ledger.labeled_ids():
            _start(loop)
        # the MLflow run of this folder: a copied or moved loop gets a run of its own, never the original's
        here = str(out.resolve())
        run_id = (
            ledger.get_meta("mlflow_run_id") if ledger.get_meta("mlflow_folder") in (None, here) else None
        )
        with (
            loop.scoring,
            tracked_run(
                config.experiment,
                run_name=run_name or f"{config.acquisition}-seed{config.seed}",
                params=config,
                tags={"dubito.command": "label", **(tags or {})},
                run_id=run_id,
            ) as run,
        ):
            ledger.set_meta("mlflow_run_id", run.run_id)
            ledger.set_meta("mlflow_folder", here)
            total = config.total_rounds()
            _extend(loop, total)
            bar = tqdm(
                range(ledger.next_round(), total + 1),
                desc=f"labeling ({config.acquisition}, seed {config.seed})",
                unit="round",
                initial=ledger.next_round(),
                total=total + 1,
                disable=not progress,
            )
            waiting: list[int] = []
            for r in bar:
                waiting = _waiting(loop)
                if waiting:  # a person has not labelled the last query yet
                    break
                record, queried = _round(loop, r, total, run)
                bar.set_postfix(
                    labels=record["labels"], **{k: f"{v:.3f}" for k, v in record.items() if k in _HEADLINE}
                )
                if on_round is not None:
                    on_round(record)
                if config.oracle == "human" and queried:
                    loop.export(r, queried)
                    waiting = queried
                    break
            results = _results(config, ledger, waiting)
            write_json(out / "results.json", results)
            run.log_artifact(out / "results.json")
    return results


def _start(loop: _Loop) -> None:
    """The initial set: ``initial`` ids drawn with the loop's seed (a person labels them too)."""
    c = loop.config
    order = torch.randperm(len(loop.pool), generator=torch.Generator().manual_seed(c.seed)).tolist()
    first = loop.pool.ids_at(order[: c.initial])
    loop.ledger.record_initial(first, loop.pool.flags(first))
    if c.oracle == "human":
        loop.export(INITIAL, first)


def _waiting(loop: _Loop) -> list[int]:
    """Human oracle: the ids of the last query still waiting for labels (their export written
    again if a kill came between recording and exporting); else nothing."""
    if loop.config.oracle != "human":
        return []
    ledger = loop.ledger
    waiting = ledger.pending(ledger.labeled_ids())
    if waiting:
        last = ledger.next_round() - 1  # INITIAL when the initial set waits
        folder = loop.out / "queries" / ("initial" if last == INITIAL else f"round-{last:03d}")
        if not (folder / "queries.json").exists():
            loop.export(last, [q["id"] for q in ledger.queries(last)])
    return waiting


def _round(loop: _Loop, r: int, total: int, run: Any) -> tuple[dict[str, Any], list[int]]:
    """Round ``r``: train (from scratch, seeded; K members for an ensemble) → test → score →
    reduce → select → record. Returns the round's record (for ``on_round``) and the ids it
    queried. The round's cost (training and scoring seconds) is recorded beside it."""
    c, ledger, started = loop.config, loop.ledger, time.perf_counter()
    labeled = ledger.labeled_ids()
    members = c.scoring().members()
    model, spec = _fit_round(loop, r, labeled, members)
    trained = time.perf_counter()
    metrics = {
        f"test_{k[4:]}": v
        for k, v in validate(model, loop.test, spec, loop.device, c.train.batch_size).items()
    }
    checkpoint = save_model(loop.out / "rounds" / f"round-{r:03d}.pt", model, spec)
    scoring = time.perf_counter()
    calibration = loop.calibration(model, r) if r < total else None
    queried, scores, flags = (
        loop.query(model, spec, labeled, r, calibration) if r < total else ([], None, None)
    )
    cost = {
        "train_seconds": trained - started,
        "score_seconds": time.perf_counter() - scoring if r < total else 0.0,
        "models": members,
        "samples": c.samples if parse_epistemic(c.epistemic)[0] != "ensemble" else 1,
        **({"calibration": calibration.as_dict()} if calibration is not None else {}),
    }
    # synthetic pools know which images carry TV static: the share of bought labels on them
    static = {"static_fraction": _static_fraction(ledger)} if loop.pool.has_flags else {}
    # MLflow first: a kill between the two repeats this round (same values, same step)
    # rather than leaving a recorded round without its metrics; the cost too (rewritten then)
    run.log_metrics({**metrics, "labels": len(labeled), **static, **_cost_metrics(cost)}, step=r)
    ledger.set_meta(f"cost/{r}", cost)
    ledger.record_round(
        r,
        metrics={**metrics, **static},
        checkpoint=str(checkpoint),
        seconds=time.perf_counter() - started,
        queried=queried,
        scores=scores,
        flags=flags,
    )
    return {"round": r, "labels": len(labeled), **metrics, **static}, queried


def _fit_round(loop: _Loop, r: int, labeled: list[int], members: int) -> tuple[torch.nn.Module, ModelSpec]:
    """Round ``r``'s model, or its ensemble of ``members`` members (member seeds as ``dubito
    train --ensemble``; as Ray tasks with ``--member-workers N``)."""
    c = loop.config
    desc = f"round {r}: training on {len(labeled)} labels"
    data = loop.training_set(labeled)
    if members == 1:
        model, spec, _ = fit(c.train_config(r), data, device=loop.device, progress=loop.progress, desc=desc)
    else:
        model, spec, _ = fit_ensemble(
            c.train_config(r),
            data,
            members,
            device=loop.device,
            progress=loop.progress,
            desc=desc,
            workers=c.member_workers,
            reserved=_scorers_hold(c) if c.member_workers else None,
        )
    return model, spec


def _scorers_hold(c: LoopConfig) -> dict[str, float]:
    """The CPUs and GPUs the loop's scoring actors (``--scorers``) hold while it runs (as
    :class:`RayPoolScorer` asks for them: one CPU each, and its ``--scorer-gpus`` share)."""
    if not c.scorers:
        return {}
    from dubito.platform.cluster import connect, gpu_request

    connect()
    gpus = 0.0 if c.train.device == "cpu" else gpu_request(c.scorer_gpus, "--scorer-gpus")
    return {"CPU": float(c.scorers), "GPU": c.scorers * gpus}


def _cost_metrics(cost: dict[str, Any]) -> dict[str, float]:
    return {"train_seconds": cost["train_seconds"], "score_seconds": cost["score_seconds"]}


def _extend(loop: _Loop, total: int) -> None:
    """A finished loop given a larger budget: its last round's model (from its checkpoint) makes
    the choice that round would have made in a longer run."""
    ledger = loop.ledger
    rounds = ledger.rounds()
    if not rounds or rounds[-1]["queried"] or rounds[-1]["round"] >= total:
        return
    last = rounds[-1]
    model, spec = load_model(last["checkpoint"], loop.device)
    started = time.perf_counter()
    calibration = loop.calibration(model, last["round"])
    queried, scores, flags = loop.query(model, spec, ledger.labeled_ids(), last["round"], calibration)
    cost = dict(ledger.get_meta(f"cost/{last['round']}") or {}, score_seconds=time.perf_counter() - started)
    if calibration is not None:
        cost["calibration"] = calibration.as_dict()
    ledger.set_meta(f"cost/{last['round']}", cost)  # before the queries: a kill repeats both
    ledger.add_queries(last["round"], queried, scores, flags)
    if loop.config.oracle == "human":
        loop.export(last["round"], queried)


def check_resume(config: LoopConfig) -> None:
    """A loop folder that holds a ledger can go on with ``config`` (the ledger sound, the same
    settings, the budget not shrunk), checked writing nothing, before any MLflow run is opened."""
    path = Path(config.output) / LEDGER
    if not path.is_file() or (
        path.stat().st_size == 0 and not any((path.parent / "rounds").glob("round-*.pt"))
    ):
        return  # a new loop (or one killed before its first word): nothing to check
    with Ledger(path, config.settings(), create=False) as ledger:
        _check_resumable(ledger, config)


def _check_resumable(ledger: Ledger, config: LoopConfig) -> None:
    total = config.total_rounds()
    if ledger.next_round() > total + 1:
        raise DubitoError(
            f"{ledger.folder}: this loop already has {ledger.next_round()} rounds ({len(ledger.labeled_ids())} labels); "
            f"--rounds / --budget ({total} query rounds) cannot shrink it: use another --output"
        )
    _check_last_checkpoint(ledger)


def _check_last_checkpoint(ledger: Ledger) -> None:
    """The model of the last recorded round is there and loads (a resumed or extended loop needs it)."""
    rounds = ledger.rounds()
    if not rounds or rounds[-1]["checkpoint"] is None:
        return
    try:
        load_model(rounds[-1]["checkpoint"])
    except DubitoError as err:
        raise LedgerError(
            f"{ledger.path}: round {rounds[-1]['round']} is recorded, but its model is not usable ({err}); restore "
            "the file, or move the folder aside and run again into a new --output"
        ) from None


_HEADLINE = tuple(f"test_{name}" for name, _ in HEADLINE.values())


def headline_metric(metrics: dict[str, float]) -> tuple[str, float, bool]:
    """(name, value, higher_is_better) of a round's main test metric (its task's headline)."""
    for name, higher in HEADLINE.values():
        if f"test_{name}" in metrics:
            return f"test_{name}", metrics[f"test_{name}"], higher
    raise DubitoError(f"no test metric among {sorted(metrics)}")


def _batch_size(config: LoopConfig, labeled: int, free: int) -> int:
    """Labels to query this round: ``query``, but never past ``budget`` or the pool."""
    left = config.budget - labeled if config.budget else config.query
    return max(1, min(config.query, free, left))


def _static_fraction(ledger: Ledger) -> float:
    """Fraction of the labels bought so far (initial set excluded) on images with TV static."""
    rows = [q for r in range(ledger.next_round()) for q in ledger.queries(r)]
    flagged = [q["flags"] for q in rows if q["flags"]]
    return sum(bool(f.get("has_static")) for f in flagged) / len(flagged) if flagged else 0.0


def _results(config: LoopConfig, ledger: Ledger, waiting: list[int]) -> dict[str, Any]:
    rounds = ledger.rounds()
    bought = [q for r in rounds for q in ledger.queries(r["round"])]
    static = [bool(q["flags"].get("has_static")) for q in bought if q["flags"] and "has_static" in q["flags"]]
    return {
        "config": to_flat(config, text=True),
        "curve": [{"round": r["round"], "labels": r["labels"], **r["metrics"]} for r in rounds],
        "initial": [q["id"] for q in ledger.queries(INITIAL)],
        "queried": {r["round"]: r["queried"] for r in rounds if r["queried"]},
        "static_fraction": sum(static) / len(static) if static else None,
        "finished": len(rounds) == config.total_rounds() + 1,
        "waiting_for_labels": waiting,
        "seconds": sum(r["seconds"] or 0.0 for r in rounds),
        "cost": [{"round": r["round"], **(ledger.get_meta(f"cost/{r['round']}") or {})} for r in rounds],
    }


def load_results(output: str | Path) -> dict[str, Any]:
    path = Path(output) / "results.json"
    if not path.exists():
        raise DubitoError(f"{path}: not found")
    return read_json(path, "dubito wrote it: run the same dubito label command again to write it anew")
