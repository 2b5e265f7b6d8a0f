"""Ray Tune sweeps (``dubito sweep label|explore|train``): a grid or a sampled space over any
field of a labeling loop (:class:`~dubito.acquisition.loop.LoopConfig`), an exploration run
(:class:`~dubito.experiments.exploration.ExploreConfig`, one agent × size × seed per trial) or a
training run (:class:`~dubito.platform.training.TrainConfig`).

* Every trial reports to Tune after each round / episode / epoch (``step`` in MLflow is the same)
  and checkpoints its state there (the loop's ledger and last model, the agent's whole state every
  ``--checkpoint-every`` episodes, the trainer's checkpoint); a failed trial is retried up to
  ``--max-failures`` times from its last checkpoint, and ``dubito sweep --resume DIR`` restores
  an interrupted sweep (unfinished and errored trials continue from their checkpoints).
* Trial state lives in ``--output/trials/<trial>/``; Tune's own state in ``--storage``
  (default ``--output/tune``; on a cluster a folder or bucket every node reaches).
* Resources: ``--cpus-per-trial``; ``--gpus-per-trial auto`` is 0 on a cluster without GPUs and
  1 where it has them, a fraction packs several trials on one GPU; GPUs the cluster does not
  have are refused before anything starts.
* FIFO by default (comparisons of acquisitions or agents run every trial to the end); ``--scheduler
  asha`` stops poor trials early (hyperparameter tuning) on ``--metric``.
* MLflow: the experiment ``--experiment``, a parent run per sweep, a child run per trial (tag
  ``mlflow.parentRunId``); the summary table (mean ± std over seeds of every other swept value),
  results.json and the plots are the parent's artifacts.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import re
import shutil
import sqlite3
import tempfile
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dubito import DubitoError
from dubito.experiments import area_under_curve, record_study, seed_std
from dubito.platform.config import flat_fields, from_flat
from dubito.platform.files import (
    check_free,
    check_output,
    copy_file,
    exclusive,
    load_torch,
    read_json,
    write_json,
)
from dubito.platform.registry import install_plugins, plugins
from dubito.platform.tracking import check_tracking, default_tracking_uri, tracked_run

__all__ = ["SweepConfig", "KINDS", "run_sweep", "parse_space", "format_sweep", "FAIL_ONCE_ENV"]

#: test hook: ``field=value,...@step`` makes the first matching trial fail once after that step
FAIL_ONCE_ENV = "DUBITO_SWEEP_FAIL_ONCE"
SWEEP_FILE = "sweep.json"
CONFIG_ERROR = "config_error"  # the metric a trial refused for its settings reports (it is not retried)
_SEED_FIELDS = ("seed", "seeds")
_CORNERS = 1024  # sampled spaces with at most this many corners have each one checked
_ALIASES = {"explore": {"agent": "agents", "size": "sizes", "seed": "seeds"}}
_FORBIDDEN = ("output", "experiment")  # set by the sweep for every trial


def _config_class(kind: str) -> type:
    if kind == "label":
        from dubito.acquisition.config import LoopConfig

        return LoopConfig
    if kind == "explore":
        from dubito.experiments.exploration import ExploreConfig

        return ExploreConfig
    if kind == "train":
        from dubito.platform.training import TrainConfig

        return TrainConfig
    raise DubitoError(f"sweep kind must be one of {', '.join(KINDS)}, got {kind!r}")


KINDS = ("label", "explore", "train")


@dataclass
class SweepConfig:
    """Settings of a sweep (``dubito sweep KIND`` flags); ``base`` holds the trials' shared
    settings (the KIND's own flags)."""

    kind: str = "label"
    output: str = field(
        default="runs/sweep", metadata={"help": "folder: trials/, results.json, tables.md, plots (and tune/)"}
    )
    grid: tuple[str, ...] = field(
        default=(),
        metadata={"help": "FIELD=V1,V2,... a grid axis (repeatable); every combination is a trial"},
    )
    sample: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "FIELD=DIST sampled per trial: uniform:A:B, loguniform:A:B, randint:A:B (B excluded), "
            "choice:V1,V2 (repeatable)"
        },
    )
    num_samples: int = field(
        default=1, metadata={"help": "trials per grid point (draws from the --sample space)"}
    )
    scheduler: str = field(
        default="fifo",
        metadata={"help": "fifo (run every trial to the end) or asha (stop poor trials early)"},
    )
    metric: str = field(
        default="",
        metadata={"help": "what asha (and the summary's best trial) compares; default by kind and dataset"},
    )
    mode: str = field(default="", metadata={"help": "max or min (default: by metric)"})
    max_t: int = field(
        default=0,
        metadata={
            "help": "asha: most rounds / episodes / epochs (default: the trials' budget; they then end by themselves)"
        },
    )
    grace_period: int = field(
        default=1, metadata={"help": "asha: rounds / episodes / epochs before a trial may be stopped"}
    )
    max_failures: int = field(
        default=2, metadata={"help": "retries of a failed trial (from its last checkpoint)"}
    )
    cpus_per_trial: float = field(default=1.0, metadata={"help": "CPUs each trial holds"})
    gpus_per_trial: str = field(
        default="auto",
        metadata={
            "help": "auto (1 where the cluster has GPUs, else 0) or a number (0.25: four trials per GPU)"
        },
    )
    concurrent: int = field(
        default=0, metadata={"help": "most trials at once (0: as many as the resources allow)"}
    )
    checkpoint_every: int = field(
        default=50, metadata={"help": "explore: episodes between checkpoints of a trial"}
    )
    storage: str = field(
        default="",
        metadata={"help": "Tune's storage (default OUTPUT/tune; on a cluster a shared folder or bucket)"},
    )
    experiment: str = field(default="", metadata={"help": "MLflow experiment (default dubito-sweep-KIND)"})
    base: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- checks
    def target(self) -> type:
        return _config_class(self.kind)

    def experiment_name(self) -> str:
        return self.experiment or f"dubito-sweep-{self.kind}"

    def base_config(self) -> Any:
        unknown = set(self.base) - set(flat_fields(self.target()))
        if unknown:
            raise DubitoError(f"unknown {self.kind} settings {sorted(unknown)}")
        return _config(self.kind, self.base)

    def space(self) -> tuple[dict[str, list[Any]], dict[str, tuple[str, list[Any]]]]:
        """(grid axes, sampled fields), values typed as the target's fields."""
        return parse_space(self.kind, self.grid, self.sample)

    def metric_and_mode(self) -> tuple[str, str]:
        base = self.base_config()
        if self.metric:
            metric = self.metric
        elif self.kind == "explore":
            metric = "mean_return"
        else:
            from dubito.platform.data import dataset_info

            dataset = base.train.dataset if self.kind == "label" else base.dataset
            metric = ("test_" if self.kind == "label" else "val_") + dataset_info(dataset).headline
        mode = self.mode or (
            "min"
            if metric.endswith(("rms", "rel", "loss", "log10", "episode", "regret", "fraction"))
            else "max"
        )
        if mode not in ("min", "max"):
            raise DubitoError(f"--mode must be min or max, got {mode!r}")
        return metric, mode

    def trial_configs(self, every: bool = False) -> list[dict[str, Any]]:
        """The settings of every grid point with the sampled fields at every corner of their space
        (every choice, both bounds of a range; each candidate alone where corners are too many), each
        checked; the first candidates' settings per grid point are returned (``every``: all of them)."""
        grid, sampled = self.space()
        points = [{}]
        for name, values in grid.items():
            points = [{**p, name: v} for p in points for v in values]
        out = []
        candidates = {k: _candidates(d) for k, d in sampled.items()}
        first = {k: c[0] for k, c in candidates.items()}
        # every corner of the sampled space: settings interact (--initial and --query against the pool)
        if math.prod(len(c) for c in candidates.values()) <= _CORNERS:
            variants = [dict(zip(candidates, v)) for v in itertools.product(*candidates.values())]
        else:  # too many: each candidate beside the others' first
            variants = [first] + [{**first, k: c} for k, cs in candidates.items() for c in cs[1:]]
        for point in points:
            for n, variant in enumerate(variants):
                values = {
                    **self.base,
                    **variant,
                    **point,
                    "output": "unused",
                    "experiment": self.experiment_name(),
                }
                try:
                    _check(self.kind, _config(self.kind, values))
                except DubitoError as err:
                    which = ", ".join(f"{k}={v}" for k, v in {**point, **variant}.items())
                    raise DubitoError(f"trial {which}: {err}") from None
                if n == 0 or every:
                    out.append(values)
        return out

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise DubitoError(f"sweep kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.scheduler not in ("fifo", "asha"):
            raise DubitoError(f"--scheduler must be fifo or asha, got {self.scheduler!r}")
        for name in ("num_samples", "grace_period", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise DubitoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_failures < -1 or self.concurrent < 0 or self.max_t < 0:
            raise DubitoError(
                "--max-failures must be >= -1 (-1: retry forever); --concurrent and --max-t >= 0"
            )
        if self.cpus_per_trial <= 0:
            raise DubitoError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        if not self.grid and not self.sample:
            raise DubitoError("give at least one --grid FIELD=V1,V2 or --sample FIELD=DIST")
        self.metric_and_mode()
        self.trial_configs()


def _candidates(dist: tuple[str, list[Any]]) -> list[Any]:
    """The values a sampled field can take that are worth checking: every choice, or both ends of a
    range (randint's upper end is excluded, as in Ray Tune)."""
    kind, args = dist
    if kind == "choice":
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [args[0], args[1]]


def _check(kind: str, config: Any) -> None:
    """Refuse a trial's settings before anything starts."""
    if kind == "train" and config.workers:
        raise DubitoError(
            "sweep train runs each trial in its own process (--gpus-per-trial gives it a GPU); "
            "--workers N (data-parallel training) is for `dubito train`"
        )
    if kind == "label" and (config.scorers or config.member_workers):
        raise DubitoError(
            "sweep label trials train and score in their own process: --scorers N / --member-workers N "
            "would start Ray work competing with the trials for the same CPUs / GPUs (run more trials "
            "at once instead)"
        )
    if kind == "label" and config.oracle == "human":
        raise DubitoError("sweep label needs --oracle simulated (a sweep cannot wait for a person)")
    if kind in ("label", "train"):
        config.validate()
        if kind == "label":  # the pool holds the initial set and every round's labels
            config.check_pool(_pool_size(config))
    else:
        settings = config.resolved()
        runs = len(settings["agents"]) * len(settings["sizes"]) * len(settings["seeds"])
        if runs != 1:
            raise DubitoError(
                f"an explore trial is one run (one agent, size and seed); this one has {runs}: sweep them with "
                "--grid agent=...  --grid size=...  --grid seed=..."
            )


@functools.lru_cache(maxsize=64)
def _pool_images(spec: Any) -> int:
    return len(spec.datasets()[1])  # synthetic pools are counted without rendering a scene


def _pool_size(config: Any) -> int:
    """Images in a label trial's pool (one look at a real dataset's folder for every trial)."""
    return _pool_images(config.pool())


def _field_types(kind: str) -> dict[str, Any]:
    return {name: f.type for name, f in flat_fields(_config_class(kind)).items()}


def _config(kind: str, values: dict[str, Any]) -> Any:
    """The kind's config object from a trial's flat settings."""
    return from_flat(_config_class(kind), values)


def _typed(kind: str, name: str, text: str, flag: str) -> Any:
    types = _field_types(kind)
    t = types[name]
    text = text.strip()
    try:
        if t is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if typing.get_origin(t) is tuple:  # a list setting: the trial's config reads the text
            return text
        return t(text)
    except ValueError:
        raise DubitoError(f"{flag} {name}: {text!r} is not a valid {t.__name__}") from None


def _field(kind: str, name: str, flag: str) -> str:
    name = name.strip().replace("-", "_")
    name = _ALIASES.get(kind, {}).get(name, name)
    types = _field_types(kind)
    if name not in types:
        raise DubitoError(f"{flag} {name}: not a {kind} setting (choose from {', '.join(sorted(types))})")
    if name in _FORBIDDEN:
        raise DubitoError(f"{flag} {name}: set by the sweep for each trial; it cannot be swept")
    return name


_DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


def parse_space(kind: str, grid: tuple[str, ...] | list[str], sample: tuple[str, ...] | list[str]):
    """``--grid FIELD=V1,V2`` and ``--sample FIELD=DIST`` as (grid axes, sampled fields) with values
    typed as the fields; names and values are checked (``agent``/``size``/``seed`` are accepted
    for an exploration sweep's ``agents``/``sizes``/``seeds``)."""
    axes: dict[str, list[Any]] = {}
    for item in grid:
        if "=" not in item:
            raise DubitoError(f"--grid {item!r}: expected FIELD=V1,V2,...")
        name, values = item.split("=", 1)
        name = _field(kind, name, "--grid")
        parsed = [_typed(kind, name, v, "--grid") for v in values.split(",") if v.strip()]
        if not parsed or len(set(map(repr, parsed))) != len(parsed):
            raise DubitoError(f"--grid {name}: give distinct values, got {values!r}")
        if name in axes:
            raise DubitoError(f"--grid {name} is given twice")
        axes[name] = parsed
    sampled: dict[str, tuple[str, list[Any]]] = {}
    for item in sample:
        if "=" not in item or ":" not in item:
            raise DubitoError(
                f"--sample {item!r}: expected FIELD=DIST:ARGS, DIST one of {', '.join(_DISTRIBUTIONS)}"
            )
        name, spec = item.split("=", 1)
        name = _field(kind, name, "--sample")
        if name in axes or name in sampled:
            raise DubitoError(f"--sample {name}: already swept")
        dist, args = spec.split(":", 1)
        if dist not in _DISTRIBUTIONS:
            raise DubitoError(
                f"--sample {name}: unknown distribution {dist!r} (choose from {', '.join(_DISTRIBUTIONS)})"
            )
        if dist == "choice":
            values = [_typed(kind, name, v, "--sample") for v in args.split(",") if v.strip()]
            if not values:
                raise DubitoError(f"--sample {name}=choice: give values")
            sampled[name] = (dist, values)
            continue
        bounds = args.split(":")
        try:
            low, high = (float(b) for b in bounds)
        except ValueError:
            raise DubitoError(f"--sample {name}={dist}: expected {dist}:LOW:HIGH, got {spec!r}") from None
        if (
            not low < high
            or (dist == "loguniform" and low <= 0)
            or (dist == "randint" and int(high) - int(low) < 1)
        ):
            raise DubitoError(
                f"--sample {name}={dist}: need LOW < HIGH" + (" and LOW > 0" if dist == "loguniform" else "")
            )
        t = _field_types(kind)[name]
        if dist == "randint" and t is not int or dist != "randint" and t is not float:
            raise DubitoError(f"--sample {name}: {dist} does not fit a {t.__name__} setting")
        sampled[name] = (
            dist,
            [int(low) if dist == "randint" else low, int(high) if dist == "randint" else high],
        )
    return axes, sampled


def _tune_space(grid: dict[str, list[Any]], sampled: dict[str, tuple[str, list[Any]]]) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {name: tune.grid_search(values) for name, values in grid.items()}
    for name, (dist, args) in sampled.items():
        space[name] = (
            {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[dist](*args)
            if dist != "choice"
            else tune.choice(args)
        )
    return space


# ============================================================================ the trials
def _trial_key(params: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ",".join(f"{k}={show(v)}" for k, v in sorted(params.items()))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)[:120]


ROWS = "reported.jsonl"


def _trial_dir(root: Path, trial_id: str, key: str) -> Path:
    return Path(root) / "trials" / _safe(f"{trial_id}-{key}")


def _append_row(folder: Path, row: dict[str, Any]) -> None:
    """Append one reported row to the trial's own record (one write of one line). Tune's result
    files are not a record to trust across a retry: a restarted trial's history is restored from
    the last sync of storage, which can be behind the checkpoint, so rows reported in between are
    lost there. Rows are appended before Tune gets them, and the record travels in every checkpoint
    (a trial restored elsewhere keeps it). A line torn by a kill is ended before the next row is
    written, so only the torn row is lost (it is reported again), and skipped on read."""
    fd = os.open(folder / ROWS, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (("\n" if torn else "") + json.dumps(row, allow_nan=True) + "\n").encode())
    finally:
        os.close(fd)


def _read_rows(folder: Path) -> list[dict[str, Any]] | None:
    """The rows a trial recorded itself, in order (None where it recorded none)."""
    path = folder / ROWS
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


def _step_of(folder: Path) -> int:
    path = folder / "step.json"
    return read_json(path)["step"] if path.exists() else -1


def _restore(folder: Path) -> None:
    """Bring the trial's folder up to its latest Tune checkpoint when the folder is behind (a trial
    restarted on another node, or a folder lost): the checkpoint's files replace the folder's."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as saved:
        saved = Path(saved)
        if _step_of(saved) > _step_of(folder):
            files = sorted((p for p in saved.rglob("*") if p.is_file()), key=lambda p: p.name == "step.json")
            for path in files:  # each file atomically, the step last: a restore cut short is made again
                copy_file(path, folder / path.relative_to(saved))


def _report(metrics: dict[str, Any], step: int, folder: Path, files: list[tuple[Path, str]] | None) -> None:
    """``tune.report`` of a step; with ``files`` (source, name) also a checkpoint holding them
    and the step. SQLite files are copied through SQLite's backup (a consistent copy)."""
    from ray import tune

    clean = {
        k: (
            float(v)
            if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
            else v
        )
        for k, v in metrics.items()
        if v is not None
    }
    _append_row(folder, clean)
    if files is None:
        tune.report(clean)
        return
    with tempfile.TemporaryDirectory(prefix="dubito-checkpoint-") as tmp:
        tmp = Path(tmp)
        write_json(tmp / "step.json", {"step": step})
        for source, name in [*files, (folder / ROWS, ROWS)]:
            if not source.exists():
                continue
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.suffix == ".sqlite":
                with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
                    src.backup(dst)
            else:
                shutil.copy2(source, target)
        tune.report(clean, checkpoint=tune.Checkpoint.from_directory(str(tmp)))
    # only once Tune has the step: a crash before this leaves the step unreported, and a restart reports it
    write_json(folder / "step.json", {"step": step})


class _InjectedFailure(RuntimeError):
    """The failure ``DUBITO_SWEEP_FAIL_ONCE`` asks for (tests of retry and resume)."""


def _maybe_fail(inject: dict[str, Any] | None, params: dict[str, Any], step: int) -> None:
    if not inject or step < inject["step"]:
        return
    if any(str(params.get(k)) != v for k, v in inject["match"].items()):
        return
    marker = Path(inject["marker"])
    try:
        fd = os.open(
            marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY
        )  # once per sweep, whichever trial gets here first
    except FileExistsError:
        return
    os.close(fd)
    raise _InjectedFailure(f"injected failure after step {step} ({FAIL_ONCE_ENV})")


def _trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """One trial (runs in a Ray worker): the kind's run with the trial's settings, reporting and
    checkpointing every step, resumed from the trial's folder or its last checkpoint."""
    import torch
    from ray import tune

    os.environ["MLFLOW_TRACKING_URI"] = context["tracking_uri"]
    install_plugins(context.get("plugins") or {})
    torch.set_num_threads(
        context["threads"]
    )  # --cpus-per-trial threads (CPU results depend on the count at float rounding)
    trial = tune.get_context()
    key = _trial_key(params)
    folder = _trial_dir(context["root"], trial.get_trial_id(), key)
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder):  # one writer per trial folder
        _restore(folder)
        values = {**context["base"], **params, "output": str(folder), "experiment": context["experiment"]}
        if (
            context["gpus"] == 0 and values.get("device") == "auto"
        ):  # Ray leaves the node's GPUs visible to a 0-GPU trial
            values["device"] = "cpu"
        tags = {
            "mlflow.parentRunId": context["parent_run_id"],
            "dubito.sweep": context["root"],
            "dubito.trial": key,
            "dubito.trial_id": trial.get_trial_id(),
        }
        inject = context.get("inject")
        write_json(folder / "trial.json", {"params": params, "key": key, "trial_id": trial.get_trial_id()})
        try:  # every value was checked before Ray started; a config error left is not worth Tune's retries
            _check(context["kind"], _config(context["kind"], values))
        except DubitoError as err:
            write_json(folder / "config_error.json", {"error": str(err)})
            _report(
                {CONFIG_ERROR: str(err), context["metric"]: math.nan}, 0, folder, None
            )  # the metric: schedulers ask for it
            return
        {"label": _label_trial, "explore": _explore_trial, "train": _train_trial}[context["kind"]](
            values, params, folder, tags, inject, context
        )


def _label_trial(values, params, folder, tags, inject, context) -> None:
    from dubito.acquisition.ledger import Ledger
    from dubito.acquisition.loop import LEDGER, run_loop

    config = _config("label", values)

    def on_round(record: dict[str, Any]) -> None:
        r = record["round"]
        model = folder.resolve() / "rounds" / f"round-{r:03d}.pt"
        _report(record, r, folder, [(folder / LEDGER, LEDGER), (model, f"rounds/{model.name}")])
        _maybe_fail(inject, params, r)

    if (folder / LEDGER).exists():  # rounds committed but not reported (killed in between): report them first
        with Ledger(folder / LEDGER) as ledger:
            missed = [r for r in ledger.rounds() if r["round"] > _step_of(folder)]
        for r in missed:
            on_round({"round": r["round"], "labels": r["labels"], **r["metrics"]})

    run_loop(config, progress=False, tags=tags, on_round=on_round, run_name=tags["dubito.trial"])


def _explore_trial(values, params, folder, tags, inject, context) -> None:
    from dubito.experiments.exploration import (
        episode_series,
        log_run,
        run_one,
        run_params,
        run_specs,
        solve_episode,
    )
    from dubito.platform.files import save_torch

    config = _config("explore", values)
    settings, specs = run_specs(config, folder)
    spec = specs[0]
    (folder / "runs").mkdir(exist_ok=True)
    done = Path(spec["path"])
    run_file = (
        folder / "mlflow_run.json"
    )  # the child run, opened at the start so a stopped trial still has its episodes
    known = read_json(run_file) if run_file.exists() else {}
    run_id = (
        known.get("run_id") if known.get("folder", str(folder)) == str(folder) else None
    )  # a copied sweep: a run of its own
    if (
        done.exists()
    ):  # finished before a retry (killed while logging): log what MLflow lacks, run nothing again
        record = read_json(done)
        if not record.get("mlflow_run_id"):
            record["mlflow_run_id"] = run_id
            log_run(
                config,
                settings,
                record,
                context["parent_run_id"],
                done,
                run_name=tags["dubito.trial"],
                tags=tags,
            )
        return
    state_path = folder / "state.pt"
    resume = load_torch(state_path, "trial state") if state_path.exists() else None
    every = context["checkpoint_every"]
    stochastic = spec["env"] == "dubito/DeepSeaStochastic-v0"
    deep_sea = spec["env"].startswith("dubito/DeepSea")
    with tracked_run(
        config.experiment,
        run_name=tags["dubito.trial"],
        params=run_params(config, settings, spec["agent"], spec["size"], spec["seed"]),
        tags=tags,
        run_id=run_id,
    ) as child:
        write_json(run_file, {"run_id": child.run_id, "folder": str(folder)})
        logged = child.last_step(
            "return"
        )  # MLflow's own count: a resumed run replays episodes it may already have

        def flush(log) -> None:
            nonlocal logged
            if log.episodes > logged:
                partial = {
                    "returns": log.returns,
                    "lengths": log.lengths,
                    **({"bad": log.bad} if deep_sea else {"tv_steps": log.tv_steps}),
                }
                child.log_series(
                    {k: v[logged:] for k, v in episode_series(partial).items()}, start=logged + 1
                )
                logged = log.episodes

        def hook(log, state) -> None:
            n = log.episodes
            metrics = {
                "episode": n,
                "return": log.returns[-1],
                "mean_return": float(np.mean(log.returns[-20:])),
            }
            if deep_sea:
                metrics["bad_fraction"] = float(np.mean(log.bad))
                solved = solve_episode(log.bad, stochastic)
                metrics["solve_episode"] = solved
                metrics["solved"] = float(solved is not None)
            else:
                metrics["tv_fraction"] = float(np.sum(log.tv_steps) / max(1, np.sum(log.lengths)))
                metrics["goal_rate"] = float(np.mean(log.terminated))
            last = n >= spec["episodes"] or (spec["stop_when_solved"] and metrics.get("solved"))
            try:
                if (
                    n % every == 0 or last
                ):  # MLflow gets the episodes since the last checkpoint, then the checkpoint is taken
                    flush(log)
                    save_torch(state(), state_path)
                    _report(metrics, n, folder, [(state_path, "state.pt"), (run_file, "mlflow_run.json")])
                else:
                    _report(metrics, n, folder, None)
            except SystemExit:  # Tune stopping the trial (ASHA): its episodes so far still reach MLflow
                flush(log)
                raise
            _maybe_fail(inject, params, n)

        record = run_one({**spec, "progress": False, "threads": context["threads"]}, hook=hook, resume=resume)
        child.log_metrics({k: record[k] for k in ("regret", "tv_fraction", "goal_rate") if k in record})
        record["mlflow_run_id"] = child.run_id
        write_json(done, record)


def _train_trial(values, params, folder, tags, inject, context) -> None:
    from dubito.platform.training import CHECKPOINT, train

    config = _config("train", values)

    def on_epoch(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        epoch = metrics["epoch"]
        _report(
            metrics, epoch, folder, [(folder / CHECKPOINT, CHECKPOINT), (folder / "model.pt", "model.pt")]
        )
        _maybe_fail(inject, params, epoch)

    if (
        folder / CHECKPOINT
    ).exists():  # epochs checkpointed but not reported (killed in between): report them first
        history = load_torch(folder / CHECKPOINT, "training checkpoint")["state"]["history"]
        for entry in [h for h in history if h["epoch"] > _step_of(folder)]:
            on_epoch(dict(entry), folder / CHECKPOINT)

    train(config, progress=False, tags=tags, on_epoch=on_epoch)


# ============================================================================ the sweep
def _inject_from_env(root: Path) -> dict[str, Any] | None:
    text = os.environ.get(FAIL_ONCE_ENV, "").strip()
    if not text:
        return None
    try:
        match, step = text.rsplit("@", 1)
        pairs = dict(p.split("=", 1) for p in match.split(",") if p)
        return {
            "match": {k.strip(): v.strip() for k, v in pairs.items()},
            "step": int(step),
            "marker": str(root / "injected-failure"),
        }
    except ValueError:
        raise DubitoError(f"{FAIL_ONCE_ENV}={text!r}: expected FIELD=VALUE,...@STEP") from None


def run_sweep(
    config: SweepConfig | None = None, *, resume: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run a sweep (or, with ``resume=DIR``, restore the one in DIR); returns results.json's content.

    Connects to Ray (``RAY_ADDRESS`` or a local instance), opens the MLflow parent run, runs the
    trials through Tune, then writes the summary (tables.md, results.json, curves.png) and logs it
    to the parent."""
    # checkpoints every round are the point here, not a bottleneck worth a warning per trial
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if resume is not None:
        root = Path(resume).resolve()
        saved = root / SWEEP_FILE
        if not saved.exists():
            raise DubitoError(f"{root}: no sweep here (no {SWEEP_FILE}); give the --output folder of a sweep")
        state = read_json(
            saved,
            "dubito wrote it: without it the sweep cannot be resumed; start it again into another --output",
        )
        values = state["config"]
        values["grid"], values["sample"] = tuple(values["grid"]), tuple(values["sample"])
        config = SweepConfig(**values)
    elif config is None:
        raise DubitoError("run_sweep needs a SweepConfig or resume=DIR")
    if resume is not None:  # wherever it is resumed from: the folder given, not the one recorded
        config = dataclasses.replace(config, output=str(Path(resume).resolve()))
    config.validate()
    root = Path(config.output).resolve()
    # absolute paths: trials run in Tune's trial folders (RAY_CHDIR_TO_TRIAL_DIR), maybe on other nodes
    config = dataclasses.replace(config, output=str(root), base=_absolute_paths(config.base))
    if resume is None and (root / SWEEP_FILE).exists():
        raise DubitoError(
            f"{root} holds a sweep already: continue it with `dubito sweep --resume {config.output}`, or use another --output"
        )
    check_output(root)
    check_tracking()
    from dubito.platform.cluster import connect, gpu_request

    check_free(root)  # a busy folder is refused before Ray starts
    connect()  # the cluster is asked before anything is written
    gpus = gpu_request(config.gpus_per_trial, "--gpus-per-trial")
    with exclusive(root):  # the sweep's folder; each trial holds its own trial folder
        return _run_sweep(config, root, resume, progress, gpus)


def _run_sweep(
    config: SweepConfig, root: Path, resume: str | None, progress: bool, gpus: float
) -> dict[str, Any]:
    from ray import tune

    if (
        config.storage and "://" not in config.storage
    ):  # a folder given: absolute (the default follows --output)
        config = dataclasses.replace(config, storage=str(Path(config.storage).resolve()))
    storage = config.storage or str(root / "tune")
    metric, mode = config.metric_and_mode()
    grid, sampled = config.space()

    uri = default_tracking_uri()
    state = read_json(root / SWEEP_FILE) if (root / SWEEP_FILE).exists() else {}
    parent_id = (
        state.get("mlflow_parent_run_id") if state.get("folder", str(root)) == str(root) else None
    )  # a copy: a run of its own
    path = os.path.join(storage, "tune")
    if resume is not None and not tune.Tuner.can_restore(path):  # before the parent run is reopened
        raise DubitoError(
            f"{path}: no Tune state to restore (killed before Tune saved any, or --storage moved); "
            f"start the sweep again with another --output"
        )
    started = time.perf_counter()
    params = {k: v for k, v in asdict(config).items() if k != "base"} | {
        f"base.{k}": v for k, v in config.base.items()
    }
    with tracked_run(
        config.experiment_name(),
        run_name=f"sweep-{config.kind}-{root.name}",
        params=params,
        tags={"dubito.command": f"sweep {config.kind}"},
        run_id=parent_id,
    ) as parent:
        write_json(
            root / SWEEP_FILE,
            {
                "config": asdict(config),
                "mlflow_parent_run_id": parent.run_id,
                "storage": storage,
                "folder": str(root),
            },
        )
        context = {
            "kind": config.kind,
            "base": config.base,
            "root": str(root),
            "tracking_uri": uri,
            "parent_run_id": parent.run_id,
            "experiment": config.experiment_name(),
            "checkpoint_every": config.checkpoint_every,
            "inject": _inject_from_env(root),
            "gpus": gpus,
            "threads": max(1, int(config.cpus_per_trial)),
            "metric": metric,
            "plugins": plugins(),  # the acquisitions, reductions, selections users registered here
        }
        trainable = tune.with_resources(
            tune.with_parameters(_trial, context=context), {"cpu": config.cpus_per_trial, "gpu": gpus}
        )
        if resume is not None:
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            scheduler = None
            if config.scheduler == "asha":
                from ray.tune.schedulers import ASHAScheduler

                # one step past the budget by default: a trial that runs to its end finishes by itself
                # (closing its MLflow run, writing its results) instead of being stopped at max_t
                max_t = config.max_t or _budget(config) + 1
                scheduler = ASHAScheduler(
                    time_attr="training_iteration", max_t=max_t, grace_period=config.grace_period
                )
            tuner = tune.Tuner(
                trainable,
                param_space=_tune_space(grid, sampled),
                tune_config=tune.TuneConfig(
                    num_samples=config.num_samples,
                    scheduler=scheduler,
                    max_concurrent_trials=config.concurrent or None,
                    **({"metric": metric, "mode": mode} if scheduler is not None else {}),
                ),
                run_config=tune.RunConfig(
                    name="tune",
                    storage_path=storage,
                    verbose=1 if progress else 0,
                    failure_config=tune.FailureConfig(max_failures=config.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                ),
            )
        grid_results = tuner.fit()
        _end_stopped_runs(parent)
        trials = _collect(grid_results, root)
        results = summarize(config, trials, metric, mode)
        results["seconds"] = time.perf_counter() - started
        results["mlflow_parent_run_id"] = parent.run_id
        results["plots"] = _plots(results, root)
        record_study(
            parent,
            root,
            results,
            format_sweep(results),
            {"trials_finished": results["finished"], "trials_errored": len(results["errors"])},
        )
    return results


def _end_stopped_runs(parent: Any) -> None:
    """Child runs still RUNNING once Tune is done belong to trials it stopped (ASHA ends a trial
    without letting it close its run) or that died: mark them KILLED."""
    client = parent.client
    found = client.search_runs(
        [parent.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'",
        max_results=50_000,
    )
    for run in found:
        client.set_terminated(run.info.run_id, status="KILLED")


def _absolute_paths(base: dict[str, Any]) -> dict[str, Any]:
    """``root`` (a dataset folder) as an absolute path."""
    if base.get("root"):
        return {**base, "root": str(Path(base["root"]).expanduser().resolve())}
    return base


def _budget(config: SweepConfig) -> int:
    """Steps a trial reports at most (rounds + 1, episodes, or epochs), over every grid point."""
    steps = []
    for values in config.trial_configs(every=True):
        trial = _config(config.kind, values)
        steps.append(
            trial.total_rounds() + 1
            if config.kind == "label"
            else trial.epochs
            if config.kind == "train"
            else trial.resolved()["episodes"]
        )
    return max(steps)


def _collect(grid_results, root: Path) -> list[dict[str, Any]]:
    """Each trial's settings, every reported row (from the trial's own record; Tune's where it has
    none), and its error if any; ``key`` names the trial by its settings, with its Tune trial id
    appended where settings repeat (``--num-samples``)."""
    trials = []
    for result in grid_results:
        params = {k: v for k, v in (result.config or {}).items()}
        trial_id = (result.metrics or {}).get("trial_id") or Path(str(result.path)).name
        rows = _read_rows(_trial_dir(root, trial_id, _trial_key(params)))
        if rows is None:
            frame = result.metrics_dataframe
            rows = frame.to_dict("records") if frame is not None else []
        trials.append(
            {
                "params": params,
                "key": _trial_key(params),
                "trial_id": trial_id,
                "rows": rows,
                "error": _error_text(result.error)
                if result.error is not None
                else (
                    f"config error (not retried): {rows[-1][CONFIG_ERROR]}"
                    if rows and isinstance(rows[-1].get(CONFIG_ERROR), str)
                    else None
                ),
                "path": result.path,
            }
        )
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["key"]] = counts.get(t["key"], 0) + 1
    for t in trials:
        if counts[t["key"]] > 1:
            t["key"] = f"{t['key']} [{t['trial_id']}]"
    return trials


def _error_text(error: BaseException) -> str:
    """A trial's error as one line: its last line without terminal colours (Ray wraps the cause
    in a traceback whose last line names it)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


_X = {"label": "labels", "explore": "episode", "train": "epoch"}


def summarize(config: SweepConfig, trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """Per group of trials that differ only in their seed: the curve of ``metric`` (mean ± std),
    its final value and (labeling) area under the learning curve, mean ± std over seeds."""
    grid, sampled = config.space()
    varying = [k for k in [*grid, *sampled] if k not in _SEED_FIELDS]
    x_name = _X[config.kind]
    groups: dict[str, list[dict]] = {}
    for t in trials:
        if t["error"] is None and t["rows"]:
            name = _trial_key({k: t["params"].get(k) for k in varying}) or "all"
            groups.setdefault(name, []).append(t)
    per_trial = {}
    for t in trials:
        # a retried trial reports again the steps after its last checkpoint: keep the last row of each step
        t["rows"] = sorted(
            {r.get(x_name): r for r in t["rows"]}.values(),
            key=lambda r: (r.get(x_name) is None, r.get(x_name) or 0),
        )
    for t in trials:
        rows = [r for r in t["rows"] if r.get(metric) is not None and not _nan(r.get(metric))]
        xs = [r[x_name] for r in rows if x_name in r]
        ys = [r[metric] for r in rows]
        entry = {
            "params": t["params"],
            "error": t["error"],
            "steps": len(t["rows"]),
            "final": ys[-1] if ys else None,
            "best": (max(ys) if mode == "max" else min(ys)) if ys else None,
        }
        if config.kind == "label" and len(xs) == len(ys):
            entry["alc"] = area_under_curve(xs, ys)
        if config.kind == "explore" and t["rows"]:
            last = t["rows"][-1]
            for k in ("solve_episode", "tv_fraction", "goal_rate", "bad_fraction"):
                if k in last and not _nan(last[k]):
                    entry[k] = last[k]
        entry["curve"] = {"x": xs, "y": ys}
        entry["reached"] = t["rows"][-1].get(x_name, 0) if t["rows"] else 0
        per_trial[t["key"]] = entry
    summary = {}
    curves = {}
    for name, members in groups.items():
        entries = [per_trial[t["key"]] for t in members]
        s: dict[str, Any] = {"trials": len(entries), "reached": [e["reached"] for e in entries]}
        for k in ("final", "best", "alc", "tv_fraction", "goal_rate"):
            vals = [e[k] for e in entries if e.get(k) is not None]
            if vals:
                s[f"{k}_mean"], s[f"{k}_std"] = float(np.mean(vals)), float(seed_std(np.array(vals)))
        if config.kind == "explore" and any("bad_fraction" in e for e in entries):
            solved = [e.get("solve_episode") for e in entries if e.get("solve_episode") is not None]
            s["solved"] = len(solved)
            s["median_solve_episode"] = float(np.median(solved)) if solved else None
        summary[name] = s
        length = min(len(e["curve"]["y"]) for e in entries)
        if length:
            ys = np.array([e["curve"]["y"][:length] for e in entries], dtype=float)
            xs = entries[0]["curve"]["x"][:length]
            if config.kind == "explore" and length > 40:  # smooth the per-episode curve
                window = max(1, length // 40)
                ys = np.array([np.convolve(y, np.ones(window) / window, mode="valid") for y in ys])
                xs = xs[window - 1 :]
            curves[name] = {"labels": list(xs), "mean": ys.mean(0).tolist(), "std": seed_std(ys).tolist()}
    ranked = sorted(
        (k for k, s in summary.items() if "final_mean" in s),
        key=lambda k: summary[k]["final_mean"],
        reverse=mode == "max",
    )
    tune_keys = {
        "timestamp",
        "checkpoint_dir_name",
        "done",
        "training_iteration",
        "trial_id",
        "date",
        "pid",
        "hostname",
        "node_ip",
        "logdir",
    }
    reported = sorted(
        {
            k
            for t in trials
            for r in t["rows"]
            for k in r
            if k not in tune_keys and not k.startswith(("config/", "time_", "iterations_"))
        }
    )
    return {
        "config": asdict(config),
        "kind": config.kind,
        "metric": metric,
        "mode": mode,
        "x": x_name,
        "varying": varying,
        "summary": summary,
        "best": ranked[0] if ranked else None,
        "curves": curves,
        "trials": per_trial,
        "finished": sum(t["error"] is None for t in trials),
        "errors": {t["key"]: t["error"] for t in trials if t["error"]},
        "metric_missing": bool(reported)
        and not any(r.get(metric) is not None for t in trials for r in t["rows"]),
        "reported": reported,
    }


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _plots(results: dict[str, Any], root: Path) -> list[str]:
    from dubito.platform.plots import learning_curves_figure

    if not results["curves"]:
        return []
    xlabel = {"labels": "labelled images", "episode": "episode", "epoch": "epoch"}[results["x"]]
    path = learning_curves_figure(
        results["curves"],
        root / "curves.png",
        results["metric"].replace("_", " "),
        xlabel=xlabel,
        title=f"sweep {results['kind']}: {results['metric']} (mean ± std over seeds)",
    )
    return [str(path)]


def format_sweep(results: dict[str, Any]) -> str:
    """The sweep's summary as a markdown table (one row per group of seeds)."""
    metric, kind = results["metric"], results["kind"]
    lines = [
        f"# sweep {kind}: {metric} ({'higher' if results['mode'] == 'max' else 'lower'} is better), "
        f"{results['finished']} trials finished, {len(results['errors'])} errored",
        "",
    ]

    def pm(s: dict, k: str, fmt: str = ".4f") -> str:
        if f"{k}_mean" not in s:
            return "–"
        return f"{s[f'{k}_mean']:{fmt}}" + (f" ± {s[f'{k}_std']:{fmt}}" if s["trials"] > 1 else "")

    head = ["settings", "trials", f"{results['x']} reached", f"final {metric}", f"best {metric}"]
    if kind == "label":
        head.append("area under learning curve")
    if kind == "explore":
        head += ["solved (median episode)", "steps on the TV", "episodes reaching the goal"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in results["summary"].items():
        reached = s["reached"]
        cells = [
            name + (" **(best)**" if name == results["best"] and len(results["summary"]) > 1 else ""),
            str(s["trials"]),
            f"{min(reached):g}" + (f"–{max(reached):g}" if max(reached) != min(reached) else ""),
            pm(s, "final"),
            pm(s, "best"),
        ]
        if kind == "label":
            cells.append(pm(s, "alc"))
        if kind == "explore":
            solved = (
                "–"
                if "solved" not in s
                else f"{s['solved']}/{s['trials']} "
                f"({'–' if s['median_solve_episode'] is None else round(s['median_solve_episode'])})"
            )
            cells += [solved, pm(s, "tv_fraction", ".2f"), pm(s, "goal_rate", ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "± is the sample standard deviation over the trials of each row (its seeds, or its samples); "
        f"'{results['x']} reached' is where the trials ended (ASHA stops poor ones early).",
    ]
    if results.get("metric_missing"):
        lines.append(
            f"- no trial reported {metric!r} (--metric); they reported: {', '.join(results['reported'])}"
        )
    for key, error in results["errors"].items():
        lines.append(f"- errored: {key}: {error.splitlines()[0] if error else ''}")
    return "\n".join(lines) + "\n"
