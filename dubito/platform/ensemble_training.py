"""``dubito train --ensemble K``: a deep ensemble of K members of one training configuration.

Member k is an ordinary training run (:func:`~dubito.platform.training.train`) in
``<output>/member-k`` with its own seed (:func:`~dubito.platform.training.member_config`:
initialisation, batch order and dropout masks differ, the data is the same), its own
``checkpoint.pt`` and its own MLflow run, a child of the ensemble's run. A killed ensemble is
resumed by the same command: finished members return from their checkpoints, an interrupted
one continues from its last epoch. The members run one after the other, or as parallel Ray
tasks with ``--workers N`` (N at once on a local instance) or on a Ray cluster
(``--address`` / ``RAY_ADDRESS``), one CPU (or GPU with ``--gpu``) each.

When every member is done, ``<output>/model.pt`` holds the members' best weights and their
shared spec (``{"spec", "members"}``, readable with ``weights_only``):
:func:`~dubito.platform.training.load_model` gives an
:class:`~dubito.platform.ensemble.Ensemble`, which ``dubito evaluate``, ``label`` and
``reproduce`` score through the uncertainty service. ``results.json`` has each member's best
validation metrics and the ensemble's own (the members' mean prediction), ``training.png``
their curves.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils.data import Dataset

from dubito import DubitoError
from dubito.platform.ensemble import Ensemble
from dubito.platform.files import check_output, exclusive, read_json, write_json
from dubito.platform.models import ModelSpec
from dubito.platform.service import resolve_device
from dubito.platform.tracking import check_tracking, default_tracking_uri, tracked_run
from dubito.platform.training import (
    MODEL,
    TrainConfig,
    _datasets,
    fit,
    load_model,
    member_config,
    save_model,
    train,
    validate,
)

__all__ = ["train_ensemble", "fit_ensemble", "fit_on_ray", "ENSEMBLE_RECORD"]

#: the ensemble's own record in its folder: member count and its MLflow parent run
ENSEMBLE_RECORD = "ensemble.json"


def train_ensemble(
    config: TrainConfig, members: int, *, progress: bool = True, tags: dict[str, str] | None = None
) -> dict[str, Any]:
    """Train (or resume) ``members`` members of ``config`` into ``config.output`` (module
    docstring); returns what ``results.json`` holds."""
    if not isinstance(members, int) or members < 2:
        raise DubitoError(f"--ensemble must be at least 2 members, got {members}")
    config.validate()
    out = check_output(config.output)
    check_tracking()
    _datasets(config)  # a missing or damaged dataset is named before anything is written
    record = out / ENSEMBLE_RECORD
    if (out / "checkpoint.pt").exists():
        raise DubitoError(f"{out} holds a single model's training run; give the ensemble another --output")
    if record.exists():
        earlier = read_json(record, "dubito wrote it: delete it and run again (the members resume)")
        if earlier.get("members", members) > members:
            raise DubitoError(
                f"{out} is an ensemble of {earlier['members']} members; --ensemble {members} would drop some "
                f"(give --ensemble {earlier['members']} or more, or another --output)"
            )
    for member in _member_configs(config, members, out):  # every member's settings, before any work
        member.validate()
    parallel = config.workers > 0 or bool(os.environ.get("RAY_ADDRESS"))
    if parallel:  # the cluster is asked before anything is written
        from dubito.platform.cluster import check_gpu_capacity, connect, gpu_request

        connect(num_cpus=config.workers or None, quiet=not progress)
        if config.gpu:
            gpu_request(1, "--gpu")
            check_gpu_capacity(1, 1, "--ensemble with --gpu")
    with exclusive(out):
        return _train_ensemble(config, members, out, parallel, progress, tags or {})


def _train_ensemble(
    config: TrainConfig, members: int, out: Path, parallel: bool, progress: bool, tags: dict[str, str]
) -> dict[str, Any]:
    from dubito.platform.plots import ensemble_curves

    started = time.perf_counter()
    record_path = out / ENSEMBLE_RECORD
    record = read_json(record_path, "dubito wrote it") if record_path.exists() else {}
    here = str(out.resolve())  # a copied or moved ensemble gets a parent run of its own
    parent_id = record.get("mlflow_parent_run_id") if record.get("folder") == here else None
    configs = _member_configs(config, members, out)
    with tracked_run(
        config.experiment,
        run_name=f"ensemble-{out.name}",
        params={**asdict(config), "ensemble": members},
        tags={"dubito.command": "train", "dubito.ensemble": str(members), **tags},
        run_id=parent_id,
    ) as parent:
        write_json(record_path, {"mlflow_parent_run_id": parent.run_id, "folder": here, "members": members})
        child = {"mlflow.parentRunId": parent.run_id}
        if parallel:
            runs = _on_ray(configs, child, config.gpu)
        else:
            runs = []
            for k, c in enumerate(configs):
                if progress:
                    print(f"[member {k + 1}/{members}] seed {c.seed} -> {c.output}", flush=True)
                runs.append(train(c, progress=progress, tags={**child, "dubito.member": str(k)}))
        loaded = [load_model(r["model"]) for r in runs]
        ensemble, spec = Ensemble([m for m, _ in loaded]), loaded[0][1]
        model_path = save_model(out / MODEL, ensemble, spec)
        device = resolve_device(config.device)
        _, val_set = _datasets(config)
        ensemble_val = validate(ensemble.to(device), val_set, spec, device, config.batch_size)
        results = {
            "config": asdict(config),
            "spec": spec.as_dict(),
            "members": members,
            "model": str(model_path),
            "member_results": [_member_summary(k, c, r) for k, (c, r) in enumerate(zip(configs, runs))],
            "ensemble_validation": ensemble_val,
            "seconds_this_session": time.perf_counter() - started,
            "mlflow_run_id": parent.run_id,
        }
        figure = ensemble_curves([r["history"] for r in runs], ensemble_val, out / "training.png")
        write_json(out / "results.json", results)
        parent.log_metrics(ensemble_val)
        for path in (out / "results.json", figure, model_path):
            parent.log_artifact(path)
    return results


def _member_configs(config: TrainConfig, members: int, out: Path) -> list[TrainConfig]:
    """Member k's settings: its seed and folder, one process (``--workers`` and ``--gpu`` place the
    members' Ray tasks, not a member's training), and absolute paths (Ray tasks run in folders of
    their own; the same either way, so a member resumes however the ensemble is run)."""
    root = str(Path(config.root).expanduser().resolve()) if config.root else ""
    return [
        member_config(config, k, output=str(out.resolve() / f"member-{k}"), workers=0, gpu=False, root=root)
        for k in range(members)
    ]


def _member_summary(k: int, config: TrainConfig, run: dict[str, Any]) -> dict[str, Any]:
    best = next((h for h in run["history"] if h["epoch"] == run["best_epoch"]), {})
    return {
        "member": k,
        "seed": config.seed,
        "output": config.output,
        "epochs_run": run["epochs_run"],
        "best_epoch": run["best_epoch"],
        "best": {key: v for key, v in best.items() if key.startswith("val_")},
        "mlflow_run_id": run["mlflow_run_id"],
    }


def _train_member(config: dict[str, Any], tags: dict[str, str], tracking_uri: str) -> dict[str, Any]:
    """One member, in a Ray task: :func:`train` into its own folder (which it locks)."""
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the driver's store, whatever the worker inherited
    return train(config, progress=False, tags=tags)


def _fit_member(
    config: TrainConfig, train_set: Any, device: str, threads: int, found: dict[str, Any]
) -> tuple[dict, dict, list[float]]:
    """One member of an in-memory ensemble (:func:`fit_on_ray`), in a Ray task: its weights on
    the CPU, its spec and its losses."""
    from dubito.platform.registry import install_plugins

    install_plugins(found)  # datasets and models users registered in the driver
    if threads:
        torch.set_num_threads(threads)
    model, spec, losses = fit(config, train_set, device=torch.device(device))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, spec, losses


def _fail(err: BaseException, refs: list[Any]) -> NoReturn:
    """Tasks failed or were interrupted: cancel ``refs`` (they would hold their CPUs or GPUs on)
    and raise the :class:`DubitoError` behind Ray's wrapping (a bad flag, a missing file, a
    diverged loss: what the user must see), else ``err`` itself."""
    import ray

    from dubito.platform.cluster import dubito_cause

    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref)
    cause = dubito_cause(err) if isinstance(err, Exception) else None
    if cause is not None and cause is not err:
        raise DubitoError(str(cause)) from err
    raise err


def fit_on_ray(
    configs: list[TrainConfig],
    train_set: Any,
    device: torch.device,
    workers: int,
    *,
    progress: bool = False,
    desc: str = "training",
    reserved: dict[str, float] | None = None,
) -> list[tuple[torch.nn.Module, dict[str, Any], list[float]]]:
    """:func:`~dubito.platform.training.fit` of every config as Ray tasks, at most ``workers`` at
    a time (one CPU each, and one GPU each on a CUDA ``device``); ``train_set`` goes to the object
    store once. CPU tasks run with this process's thread count, so each member is the one
    :func:`fit` gives here. Returns (model on ``device`` in eval mode, spec, losses) per config,
    in order. ``reserved``: CPUs / GPUs held for as long as the caller runs (the loop's scoring
    actors); where the cluster's totals leave none for a task, it is refused before any starts
    (the tasks would wait forever)."""
    import ray
    from tqdm import tqdm

    from dubito.platform.cluster import connect
    from dubito.platform.registry import plugins

    if workers < 1:
        raise DubitoError(f"--member-workers must be >= 1 to train members on Ray, got {workers}")
    total = connect()
    gpu = device.type == "cuda"
    held = reserved or {}
    for kind in ("CPU", "GPU") if gpu else ("CPU",):
        left = total.get(kind, 0.0) - held.get(kind, 0.0)
        if left < 1:
            raise DubitoError(
                f"--member-workers {workers}: a member's training task needs a {kind}, but the Ray cluster "
                f"has {total.get(kind, 0.0):g} in all and {held.get(kind, 0.0):g} are held by the --scorers "
                "actors: lower --scorers, or train the members here with --member-workers 0"
            )
    task = ray.remote(_fit_member).options(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=0)
    data, found = ray.put(train_set), plugins()
    threads = 0 if gpu else torch.get_num_threads()
    results: dict[int, tuple] = {}
    pending: dict[Any, int] = {}
    queue = list(enumerate(configs))
    with tqdm(
        total=len(configs),
        desc=f"{desc}: {len(configs)} members on Ray",
        unit="member",
        leave=False,
        disable=not progress,
    ) as bar:
        try:
            while queue or pending:
                while queue and len(pending) < workers:
                    k, c = queue.pop(0)
                    pending[task.remote(c, data, "cuda" if gpu else "cpu", threads, found)] = k
                ready, _ = ray.wait(list(pending), num_returns=1)
                results[pending[ready[0]]] = ray.get(ready[0])
                del pending[ready[0]]
                bar.update(1)
        except BaseException as err:  # a failed member, or Ctrl-C: nothing is left running
            _fail(err, list(pending))
    fitted = []
    with torch.random.fork_rng(
        devices=[]
    ):  # building a model draws initial weights: not from the caller's RNG
        for k in range(len(configs)):
            state, spec, losses = results[k]
            model = ModelSpec.of(spec).build()
            model.load_state_dict(state)
            fitted.append((model.to(device).eval(), spec, losses))
    return fitted


def fit_ensemble(
    config: TrainConfig,
    train_set: Dataset,
    members: int,
    *,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "training",
    workers: int = 0,
    reserved: dict[str, float] | None = None,
) -> tuple[Ensemble, ModelSpec, list[list[float]]]:
    """:func:`fit` of each of ``members`` members (:func:`member_config`) as an
    :class:`~dubito.platform.ensemble.Ensemble`; returns it, the members' spec and each member's
    per-epoch losses. ``workers`` 0: one after the other in this process; N: as Ray tasks, N at
    a time (one CPU, or one GPU on a CUDA ``device``, each), with this process's PyTorch thread
    count, so the members are the ones this process would train, weight for weight (``reserved``:
    the CPUs / GPUs the caller's own Ray actors hold, :func:`fit_on_ray`)."""
    if members < 1:
        raise DubitoError(f"an ensemble needs at least one member, got {members}")
    configs = [member_config(config, k) for k in range(members)]
    if workers:
        device = device or resolve_device(config.device)
        fitted = fit_on_ray(
            configs, train_set, device, workers, progress=progress, desc=desc, reserved=reserved
        )
    else:
        fitted = [
            fit(c, train_set, device=device, progress=progress, desc=f"{desc}, member {k + 1}/{members}")
            for k, c in enumerate(configs)
        ]
    return Ensemble([m for m, _, _ in fitted]), fitted[0][1], [losses for _, _, losses in fitted]


def _on_ray(configs: list[TrainConfig], child: dict[str, str], gpu: bool) -> list[dict[str, Any]]:
    """Every member as a Ray task (one CPU, or one GPU each); their results in member order."""
    import ray

    task = ray.remote(_train_member).options(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=0)
    uri = default_tracking_uri()
    refs = [task.remote(asdict(c), {**child, "dubito.member": str(k)}, uri) for k, c in enumerate(configs)]
    try:
        return ray.get(refs)
    except BaseException as err:  # a member's DubitoError is what the user must see
        _fail(err, refs)
