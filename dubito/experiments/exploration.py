"""Exploration studies (``dubito explore``): agents × sizes × seeds in a dubito environment.

* ``deep-sea`` (``deep-sea-bsuite`` at bsuite's scale, and ``deep-sea-stochastic``): bsuite's
  measures — the episode at which the running fraction of "bad" episodes (the agent left the
  optimal diagonal) drops below 0.9 (0.8 after episode 100 for the stochastic variant), and the
  score: the fraction of runs solved within 2^N + 100 episodes, the time dithering needs. Plot:
  episodes-to-solve against N on log axes with the 2^N line; runs stop once solved
  (``--stop-when-solved``) unless told otherwise.
* ``noisy-tv``: the fraction of steps each agent spends on the TV, and how often it reaches the
  goal — total-variance and curiosity (RND) bonuses are drawn to the noise, the epistemic bonus
  is not.

Every run also records each agent's epistemic estimate of every state against the state's visit
count (the log-log slope and Spearman's ρ: an estimate worth exploring with falls as a state is
visited), per-episode returns, regret and visitation heatmaps. results.json, tables.md and PNG
plots in ``--output``; MLflow: a parent run per study, a child per run with step = episode.
Each finished run is kept in ``--output/runs/``: rerunning the command resumes the study.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from dubito import DubitoError
from dubito.agents.agents import AGENTS, AgentConfig, prior_scale
from dubito.experiments import int_list, record_study
from dubito.platform.config import Nested, coerce_lists, nested, parse_list, to_flat
from dubito.platform.files import check_output, exclusive, file_errors, read_json, write_json
from dubito.platform.tracking import check_tracking, tracked_run

__all__ = [
    "ExploreConfig",
    "STUDIES",
    "run_exploration",
    "run_one",
    "run_specs",
    "run_params",
    "log_run",
    "episode_series",
    "solve_episode",
    "format_exploration",
]

#: what each study runs unless a flag says otherwise
STUDIES: dict[str, dict[str, Any]] = {
    "deep-sea": {
        "env": "dubito/DeepSea-v0",
        "agents": ("dqn", "bootstrapped", "thompson", "epistemic"),
        "sizes": (5, 8, 11, 14, 17, 20),
        "episodes": 1000,
        "gamma": 0.99,
        "stop_when_solved": True,
    },
    # bsuite's scale: its 10,000-episode budget and sizes up to 50 (bsuite runs N = 10, 12, ..., 50
    # with one seed each; these are every fifth of them, with seeds)
    "deep-sea-bsuite": {
        "env": "dubito/DeepSea-v0",
        "agents": ("bootstrapped", "epistemic"),
        "sizes": (10, 20, 30, 40, 50),
        "episodes": 10_000,
        "gamma": 0.99,
        "stop_when_solved": True,
    },
    "deep-sea-stochastic": {
        "env": "dubito/DeepSeaStochastic-v0",
        "agents": ("dqn", "bootstrapped", "epistemic", "total"),
        "sizes": (5, 8, 11, 14),
        "episodes": 1000,
        "gamma": 0.99,
        "stop_when_solved": True,
    },
    "noisy-tv": {
        "env": "dubito/NoisyTV-v0",
        "agents": ("epistemic", "total", "rnd", "dqn"),
        "sizes": (5,),
        "episodes": 300,
        "gamma": 0.9,
        "stop_when_solved": False,
    },
}


@dataclass
class ExploreConfig(Nested):
    """Settings of an exploration study (each is a ``dubito explore`` flag). Fields left at None
    take the study's value from :data:`STUDIES`."""

    study: str = field(default="deep-sea", metadata={"help": f"one of {', '.join(STUDIES)}"})
    output: str = field(
        default="runs/explore", metadata={"help": "folder: runs/, results.json, tables.md, plots"}
    )
    agents: tuple[str, ...] | None = field(
        default=None, metadata={"help": f"agents, comma-separated, from {', '.join(AGENTS)}"}
    )
    sizes: tuple[int, ...] | None = field(
        default=None, metadata={"help": "environment sizes N, comma-separated"}
    )
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "comma-separated seeds"})
    episodes: int | None = field(default=None, metadata={"help": "episode budget per run"})
    stop_when_solved: bool | None = field(
        default=None, metadata={"help": "Deep Sea: end a run once bsuite's solved criterion holds"}
    )
    mapping_seed: int | None = field(
        default=None, metadata={"help": "Deep Sea: action-mapping seed (default: the run's seed)"}
    )
    noise_scale: float = field(default=0.3, metadata={"help": "noisy TV: std of the TV's zero-mean reward"})
    screen: int = field(default=8, metadata={"help": "noisy TV: random screen features on the TV"})
    gamma: float | None = field(default=None, metadata={"help": "discount (deep-sea 0.99, noisy-tv 0.9)"})
    agent: AgentConfig = nested(AgentConfig, omit=("gamma",))  # every agent's hyperparameters
    workers: int = field(
        default=0, metadata={"help": "parallel processes (0: one per CPU core, at most the number of runs)"}
    )
    experiment: str = field(default="dubito-explore", metadata={"help": "MLflow experiment"})

    def __post_init__(self) -> None:
        coerce_lists(self)

    def resolved(self) -> dict[str, Any]:
        """The study's settings with every None filled in, validated."""
        if self.study not in STUDIES:
            raise DubitoError(f"--study must be one of {', '.join(STUDIES)}, got {self.study!r}")
        preset = STUDIES[self.study]
        agents = list(self.agents or preset["agents"])
        unknown = [a for a in agents if a not in AGENTS]
        if not agents or unknown or len(set(agents)) != len(agents):
            raise DubitoError(
                f"--agents must name distinct agents from {', '.join(AGENTS)}, got {','.join(agents)!r}"
            )
        sizes = int_list("--sizes", self.sizes or preset["sizes"], low=3 if self.study == "noisy-tv" else 2)
        seeds = int_list("--seeds", self.seeds, low=0)
        episodes = self.episodes if self.episodes is not None else preset["episodes"]
        if episodes < 1:
            raise DubitoError(f"--episodes must be >= 1, got {episodes}")
        if self.workers < 0:
            raise DubitoError(f"--workers must be >= 0, got {self.workers}")
        if self.mapping_seed is not None and not 0 <= self.mapping_seed < 2**32:
            raise DubitoError(f"--mapping-seed must be in [0, 2^32), got {self.mapping_seed}")
        if max(seeds) >= 2**32:
            raise DubitoError(f"--seeds must be below 2^32, got {max(seeds)}")
        if not np.isfinite(self.noise_scale) or self.noise_scale < 0:
            raise DubitoError(f"--noise-scale must be a finite number >= 0, got {self.noise_scale}")
        if self.screen < 1:
            raise DubitoError(f"--screen must be >= 1, got {self.screen}")
        agent = self.agent_config()  # validates the agent settings
        return {
            "env": preset["env"],
            "agents": agents,
            "sizes": sizes,
            "seeds": seeds,
            "episodes": int(episodes),
            "stop_when_solved": preset["stop_when_solved"]
            if self.stop_when_solved is None
            else self.stop_when_solved,
            "agent": to_flat(agent, text=True),  # as run records written before lists were tuples hold it
        }

    def agent_config(self) -> AgentConfig:
        """The agents' settings, with the study's discount unless ``gamma`` is given."""
        gamma = (
            self.gamma if self.gamma is not None else STUDIES.get(self.study, STUDIES["deep-sea"])["gamma"]
        )
        return dataclasses.replace(self.agent, gamma=gamma)


def solve_episode(bad: list[bool], stochastic: bool = False) -> int | None:
    """bsuite's Deep Sea criterion: the first episode (1-based) at which the running fraction of
    bad episodes is below 0.9 — below 0.8 and from episode 100 on for the stochastic variant.
    Checked after every episode; bsuite checks at its logarithmically spaced logging episodes
    (1-10, 12, 14, 17, 20, 25, 30, 40, ...), so its episode is never earlier than this one."""
    if not bad:
        return None
    episode = np.arange(1, len(bad) + 1)
    fraction = np.cumsum(bad) / episode
    ok = (fraction < 0.8) & (episode >= 100) if stochastic else fraction < 0.9
    hits = np.flatnonzero(ok)
    return int(hits[0] + 1) if hits.size else None


def _fit(visits: np.ndarray, estimate: np.ndarray) -> dict[str, Any]:
    """Least-squares slope of log(estimate) on log(1 + visits), and Spearman's ρ."""
    from scipy.stats import spearmanr

    ok = np.isfinite(estimate) & (estimate > 0)
    if ok.sum() < 3 or np.ptp(visits[ok]) == 0:
        return {"slope": None, "spearman": None}
    x, y = np.log1p(visits[ok]), np.log(estimate[ok])
    slope = float(np.polyfit(x, y, 1)[0])
    rho = float(spearmanr(visits[ok], estimate[ok])[0])
    return {"slope": slope, "spearman": rho if np.isfinite(rho) else None}


def _checkpoints(episodes: int) -> list[int]:
    """Episodes after which every state's epistemic estimate is recorded (log-spaced)."""
    return sorted({max(1, round(episodes * f)) for f in (0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)})


def _within_state_slope(
    snapshots: list[tuple[int, np.ndarray, np.ndarray]], remove_trend: bool = False
) -> float | None:
    """How a state's epistemic estimate changes as ITS visit count grows: the slope β of
    log(estimate[s, t]) = a_s + β·log(1 + visits[s, t]) over the snapshots t, a_s absorbing what
    makes states differ (such as nearness to the reward). With ``remove_trend`` also + b_t (two-way
    fixed effects): what changes for every state alike as training goes on does not count, only
    visits beyond the common trend do."""
    if len(snapshots) < 2:
        return None
    visits = np.stack([v for _, v, _ in snapshots])  # (snapshots, states)
    estimate = np.stack([e for _, _, e in snapshots])
    ok = np.all(np.isfinite(estimate) & (estimate > 0), axis=0)
    x, y = np.log1p(visits[:, ok]), np.log(estimate[:, ok])

    def demean(a: np.ndarray) -> np.ndarray:
        a = a - a.mean(0, keepdims=True)
        return a - a.mean(1, keepdims=True) if remove_trend else a

    x, y = demean(x), demean(y)
    denominator = float((x * x).sum())
    return float((x * y).sum() / denominator) if denominator > 1e-12 else None


def run_one(
    spec: dict[str, Any],
    *,
    hook: Callable[[Any, Callable[[], dict[str, Any]]], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One run: ``spec`` holds env, size, agent, seed, episodes, stop_when_solved, agent config
    (a dict), mapping_seed, noise_scale, screen, progress and path. Writes ``path`` (JSON)
    atomically and returns the record. Safe to call in a worker process.

    ``hook(log, state)`` is called after every episode; ``state()`` returns everything needed to
    continue the run from there (tensors, numbers, lists: ``torch.save`` it), which ``resume``
    takes back — a Ray Tune trial reports and checkpoints through it."""
    import gymnasium as gym
    import torch

    import dubito.agents  # noqa: F401  (registers the environments)
    from dubito.agents.agents import make_agent
    from dubito.agents.loop import run_episodes, run_state

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    started = time.perf_counter()
    size, seed = spec["size"], spec["seed"]
    if spec["env"].startswith("dubito/DeepSea"):
        mapping = spec.get("mapping_seed") if spec.get("mapping_seed") is not None else seed
        env = gym.make(spec["env"], size=size, mapping_seed=mapping)
    else:
        env = gym.make(spec["env"], size=size, noise_scale=spec["noise_scale"], screen=spec["screen"])
    base = env.unwrapped
    obs_dim = int(np.prod(env.observation_space.shape))
    agent = make_agent(
        spec["agent"], obs_dim, int(env.action_space.n), AgentConfig(**spec["agent_config"]), seed
    )
    stochastic = spec["env"] == "dubito/DeepSeaStochastic-v0"
    deep_sea = spec["env"].startswith("dubito/DeepSea")

    states = base.states()
    snapshots: list[tuple[int, np.ndarray, np.ndarray]] = []  # (episode, visits, estimate) per state
    look = np.random.default_rng([seed, 7])  # screens for measuring: the run's own random stream is untouched

    def snapshot(log) -> None:
        obs = np.stack([np.ravel(base.observation_for(s, look)) for s in states]).astype(np.float32)
        estimate = agent.epistemic(obs)
        if estimate is not None:
            visits = np.array([log.visits[s] for s in states], dtype=float)
            snapshots.append((log.episodes, visits, np.asarray(estimate, dtype=float)))

    checkpoints = set(_checkpoints(spec["episodes"]))

    if resume is not None:
        look.bit_generator.state = resume["look_rng"]
        snapshots[:] = [(e, v.numpy(), m.numpy()) for e, v, m in resume["snapshots"]]

    def on_episode(log) -> None:
        if log.episodes in checkpoints:
            snapshot(log)
        if hook is not None:
            hook(
                log,
                lambda: {
                    "run": run_state(env, agent, log),
                    "look_rng": look.bit_generator.state,
                    "snapshots": [(e, torch.from_numpy(v), torch.from_numpy(m)) for e, v, m in snapshots],
                },
            )

    def stop(log) -> bool:
        return bool(spec["stop_when_solved"] and deep_sea and solve_episode(log.bad, stochastic) is not None)

    log = run_episodes(
        env,
        agent,
        spec["episodes"],
        seed=seed,
        progress=spec.get("progress", False),
        desc=f"{spec['agent']} N={size} seed {seed}",
        stop=stop,
        on_episode=on_episode,
        resume=resume["run"] if resume is not None else None,
    )
    if not snapshots or snapshots[-1][0] != log.episodes:
        snapshot(log)
    obs = np.stack([np.ravel(base.observation_for(s, look)) for s in states]).astype(np.float32)
    estimate = snapshots[-1][2] if snapshots else None
    visits = np.array([log.visits[s] for s in states], dtype=float)
    record: dict[str, Any] = {
        "agent": spec["agent"],
        "size": size,
        "seed": seed,
        "env": spec["env"],
        "episodes": log.episodes,
        "returns": log.returns,
        "lengths": log.lengths,
        "terminated": log.terminated,
        "visits": log.visits.tolist(),
        "steps": int(sum(log.lengths)),
        "settings": spec["settings"],
    }
    if estimate is not None:
        record["epistemic"] = {
            "states": [list(s) for s in states],
            "visits": visits.tolist(),
            "estimate": estimate.tolist(),
            **_fit(visits, estimate),
            "within_state_slope": _within_state_slope(snapshots),
            "visit_effect_slope": _within_state_slope(snapshots, remove_trend=True),
            "snapshots": [
                {"episode": e, "visits": v.tolist(), "estimate": m.tolist()} for e, v, m in snapshots
            ],
        }
    if deep_sea:
        record["bad"] = log.bad
        record["solve_episode"] = solve_episode(log.bad, stochastic)
        record["regret"] = float(
            np.sum(base.optimal_return - np.asarray(log.returns))
        )  # over the episodes run
    else:
        record["tv_steps"] = log.tv_steps
        record["tv_fraction"] = float(np.sum(log.tv_steps) / max(1, np.sum(log.lengths)))
        record["goal_rate"] = float(np.mean(log.terminated))
        if hasattr(agent, "aleatoric"):  # the split at the TV: aleatoric high, epistemic low
            tv = states.index(base.tv)
            alea = np.asarray(agent.aleatoric(obs), dtype=float)
            record["aleatoric_tv"] = float(alea[tv])
            record["aleatoric_elsewhere"] = float(np.delete(alea, tv).mean())
        if estimate is not None:
            tv = states.index(base.tv)
            record["epistemic_tv"] = float(estimate[tv])
            record["epistemic_elsewhere"] = float(np.delete(estimate, tv).mean())
    record["seconds"] = time.perf_counter() - started
    write_json(spec["path"], record)
    return record


def episode_series(record: dict[str, Any]) -> dict[str, list[float]]:
    """Per-episode metrics for MLflow (step = episode)."""
    series: dict[str, list[float]] = {"return": record["returns"]}
    if "bad" in record:
        episode = np.arange(1, len(record["bad"]) + 1)
        series["bad_fraction"] = (np.cumsum(record["bad"]) / episode).tolist()
    if "tv_steps" in record:
        series["tv_fraction_episode"] = (
            np.asarray(record["tv_steps"]) / np.maximum(1, record["lengths"])
        ).tolist()
    return series


def run_specs(config: ExploreConfig, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The study's resolved settings and one :func:`run_one` spec per agent × size × seed, each
    writing ``out/runs/<agent>-N<size>-seed<seed>.json``."""
    settings = config.resolved()
    specs = []
    for agent in settings["agents"]:
        for size in settings["sizes"]:
            for seed in settings["seeds"]:
                run_settings = {
                    "agent_config": _agent_settings(agent, settings["agent"]),
                    "episodes": settings["episodes"],
                    "env": settings["env"],
                    "stop_when_solved": settings["stop_when_solved"],
                }
                if settings["env"].startswith("dubito/DeepSea"):
                    run_settings["mapping_seed"] = config.mapping_seed
                else:
                    run_settings |= {"noise_scale": config.noise_scale, "screen": config.screen}
                specs.append(
                    {
                        **run_settings,
                        "agent": agent,
                        "size": size,
                        "seed": seed,
                        "settings": run_settings,
                        "path": str(out / "runs" / f"{agent}-N{size}-seed{seed}.json"),
                    }
                )
    return settings, specs


def _agent_settings(agent: str, flat: dict[str, Any]) -> dict[str, Any]:
    """``agent``'s settings as its run records them: the β it runs with resolved
    (:func:`~dubito.agents.agents.prior_scale`), so a later change of the default cannot pass for
    the value a run used."""
    return {**flat, "prior_scale": prior_scale(agent, flat.get("prior_scale"))}


def _same_settings(stored: Any, current: dict[str, Any], agent: str | None = None) -> bool:
    """A run file's settings against this study's: agent settings the file lacks (added since it
    was written) count at their defaults, layer sizes compare as numbers, however typed, and β
    only for an ``agent`` with a randomized prior (records written before β was resolved per agent
    hold 3 for every agent)."""

    def comparable(settings: dict[str, Any]) -> dict[str, Any]:
        settings = json.loads(json.dumps(settings))
        flat = {**to_flat(AgentConfig(), text=True), **settings.get("agent_config", {})}
        if agent is not None:
            flat = _agent_settings(agent, flat)
        try:
            flat["hidden"] = list(parse_list("hidden", flat["hidden"], int))
        except DubitoError:
            pass  # compared as written
        return {**settings, "agent_config": flat}

    return isinstance(stored, dict) and comparable(stored) == comparable(current)


def run_params(
    config: ExploreConfig, settings: dict[str, Any], agent: str, size: int, seed: int
) -> dict[str, Any]:
    """The MLflow params of one run."""
    return {
        "agent": agent,
        "size": size,
        "seed": seed,
        "study": config.study,
        **{f"agent.{k}": v for k, v in _agent_settings(agent, settings["agent"]).items()},
    }


def log_run(
    config: ExploreConfig,
    settings: dict[str, Any],
    record: dict[str, Any],
    parent_id: str,
    path: Path,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """One MLflow child run of ``parent_id`` for a finished run (step = episode, from 1); its id is
    kept in the run's file ``path``, so a run finished but not yet logged when a study was killed
    is logged on resume. A run already partly logged (``record["mlflow_run_id"]``) gets only the
    episodes it lacks."""
    params = run_params(config, settings, record["agent"], record["size"], record["seed"])
    with tracked_run(
        config.experiment,
        run_name=run_name or f"{record['agent']}-N{record['size']}-seed{record['seed']}",
        params=params,
        tags={"mlflow.parentRunId": parent_id, **(tags or {})},
        run_id=record.get("mlflow_run_id"),
    ) as child:
        logged = child.last_step("return")
        child.log_series({k: v[logged:] for k, v in episode_series(record).items()}, start=logged + 1)
        child.log_metrics({k: record[k] for k in ("regret", "tv_fraction", "goal_rate") if k in record})
    record["mlflow_run_id"] = child.run_id
    write_json(path, record)


def run_exploration(config: ExploreConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the study; returns what ``--output/results.json`` holds. Every setting and
    the output folder are checked before anything is written; the folder is held for the run."""
    out = check_output(config.output)
    settings, specs = run_specs(config, out)
    check_tracking()
    with exclusive(out):
        with file_errors(out):
            (out / "runs").mkdir(parents=True, exist_ok=True)
        return _run_exploration(config, out, settings, specs, progress)


def _run_exploration(
    config: ExploreConfig, out: Path, settings: dict[str, Any], specs: list[dict], progress: bool
) -> dict[str, Any]:
    records: dict[tuple[str, int, int], dict] = {}
    todo = []
    for spec in specs:
        path = Path(spec["path"])
        if path.exists():
            record = read_json(path, "dubito wrote it: delete it and the study runs that run again")
            if not _same_settings(record.get("settings"), spec["settings"], spec["agent"]):
                raise DubitoError(
                    f"{path} was run with other settings ({record.get('settings')}); use another --output or delete it"
                )
            records[(spec["agent"], spec["size"], spec["seed"])] = record
        else:
            todo.append(spec)
    marker = out / "study.json"
    study = (
        read_json(marker, "dubito wrote it: delete it and run again (finished runs are kept in runs/)")
        if marker.exists()
        else {}
    )
    if (
        study.get("study", config.study) != config.study
        or study.get("experiment", config.experiment) != config.experiment
    ):
        raise DubitoError(
            f"{out} holds the {study.get('study')!r} study (MLflow experiment {study.get('experiment')!r}); "
            "use another --output"
        )
    started = time.perf_counter()
    with tracked_run(
        config.experiment,
        run_name=f"explore-{config.study}",
        params=config,
        tags={"dubito.command": "explore"},
        run_id=study.get("mlflow_parent_run_id")
        if study.get("folder", str(out.resolve())) == str(out.resolve())
        else None,
    ) as parent:
        write_json(
            marker,
            {
                "mlflow_parent_run_id": parent.run_id,
                "study": config.study,
                "experiment": config.experiment,
                "folder": str(out.resolve()),
            },
        )

        def log_child(record: dict[str, Any]) -> None:
            log_run(
                config,
                settings,
                record,
                parent.run_id,
                out / "runs" / f"{record['agent']}-N{record['size']}-seed{record['seed']}.json",
            )

        for record in records.values():
            if not record.get("mlflow_run_id"):
                log_child(record)

        def finished(record: dict[str, Any]) -> None:
            key = (record["agent"], record["size"], record["seed"])
            records[key] = record
            log_child(record)
            if progress:
                what = (
                    f"solved at episode {record['solve_episode']}"
                    if record.get("solve_episode")
                    else f"not solved in {record['episodes']} episodes"
                    if "bad" in record
                    else f"{100 * record['tv_fraction']:.0f} % of steps on the TV, goal in "
                    f"{100 * record['goal_rate']:.0f} % of episodes"
                )
                print(
                    f"[{len(records)}/{len(specs)}] {key[0]} N={key[1]} seed {key[2]}: {what} "
                    f"({record['seconds']:.0f} s; {time.perf_counter() - started:.0f} s so far)",
                    flush=True,
                )

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = max(1, min(config.workers or cores, len(todo) or 1))
        if workers == 1:
            for spec in todo:
                finished(run_one({**spec, "progress": progress}))
        else:
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
            try:
                futures = [pool.submit(run_one, {**spec, "threads": 1}) for spec in todo]
                for future in as_completed(futures):
                    finished(future.result())
            finally:  # on an error or Ctrl-C, runs not started are dropped (finished ones are on disk)
                pool.shutdown(wait=True, cancel_futures=True)
        results = summarize(config, settings, records)
        results["seconds"] = time.perf_counter() - started
        results["mlflow_parent_run_id"] = parent.run_id
        results["plots"] = _plots(results, records, out)
        record_study(
            parent,
            out,
            results,
            format_exploration(results),
            {
                f"{k}_{a}": v
                for a, s in results["summary"].items()
                for k, v in s.items()
                if k in ("score", "tv_fraction_mean", "epistemic_slope_mean") and v is not None
            },
        )
    return results


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(
    config: ExploreConfig, settings: dict[str, Any], records: dict[tuple[str, int, int], dict]
) -> dict[str, Any]:
    """Per agent: bsuite's Deep Sea score and episodes to solve per size, or the noisy-TV
    fractions; the epistemic-vs-visits slope; and every run's record (without per-state data)."""
    summary: dict[str, dict] = {}
    deep_sea = settings["env"].startswith("dubito/DeepSea")
    for agent in settings["agents"]:
        runs = [records[(agent, n, s)] for n in settings["sizes"] for s in settings["seeds"]]
        slopes = [r["epistemic"]["within_state_slope"] for r in runs if r.get("epistemic")]
        cross = [r["epistemic"]["slope"] for r in runs if r.get("epistemic")]
        effect = [r["epistemic"].get("visit_effect_slope") for r in runs if r.get("epistemic")]
        rhos = [r["epistemic"]["spearman"] for r in runs if r.get("epistemic")]
        s: dict[str, Any] = {}
        s["epistemic_slope_mean"], s["epistemic_slope_std"] = _mean_std(slopes)
        s["epistemic_spearman_mean"], _ = _mean_std(rhos)
        s["epistemic_final_slope_mean"], _ = _mean_std(cross)
        s["epistemic_visit_effect_mean"], _ = _mean_std(effect)
        if deep_sea:
            per_size = {}
            for n in settings["sizes"]:
                eps = [records[(agent, n, seed)]["solve_episode"] for seed in settings["seeds"]]
                solved = [e for e in eps if e is not None]
                per_size[str(n)] = {
                    "solve_episodes": eps,
                    "solved": len(solved),
                    "median_solved": float(np.median(solved)) if solved else None,
                }
            s["per_size"] = per_size
            s["score"] = float(
                np.mean(
                    [
                        r["solve_episode"] is not None and r["solve_episode"] < 2 ** r["size"] + 100
                        for r in runs
                    ]
                )
            )
            s["regret_mean"], _ = _mean_std([r["regret"] for r in runs])
        else:
            s["tv_fraction_mean"], s["tv_fraction_std"] = _mean_std([r["tv_fraction"] for r in runs])
            s["tv_fraction_median"] = float(np.median([r["tv_fraction"] for r in runs]))
            s["tv_fraction_per_run"] = [r["tv_fraction"] for r in runs]
            s["goal_rate_mean"], s["goal_rate_std"] = _mean_std([r["goal_rate"] for r in runs])
            for k in ("aleatoric_tv", "aleatoric_elsewhere", "epistemic_tv", "epistemic_elsewhere"):
                s[f"{k}_mean"], _ = _mean_std([r.get(k) for r in runs])
        summary[agent] = s
    runs_out = {
        f"{a}-N{n}-seed{s}": {
            k: v
            for k, v in r.items()
            if k not in ("visits", "epistemic", "settings", "lengths", "terminated", "bad", "tv_steps")
        }
        | (
            {
                "epistemic_within_state_slope": r["epistemic"]["within_state_slope"],
                "epistemic_final_slope": r["epistemic"]["slope"],
                "epistemic_visit_effect_slope": r["epistemic"].get("visit_effect_slope"),
                "epistemic_spearman": r["epistemic"]["spearman"],
            }
            if r.get("epistemic")
            else {}
        )
        for (a, n, s), r in sorted(records.items())
    }
    return {
        "config": to_flat(config, text=True),
        "settings": settings,
        "study": config.study,
        "summary": summary,
        "runs": runs_out,
    }


def _plots(results: dict[str, Any], records: dict[tuple[str, int, int], dict], out: Path) -> list[str]:
    from dubito.platform.plots import (
        epistemic_visits_figure,
        learning_curves_figure,
        scaling_figure,
        visitation_figure,
    )

    settings = results["settings"]
    agents, sizes, seeds = settings["agents"], settings["sizes"], settings["seeds"]
    paths = []
    largest, first = max(sizes), seeds[0]
    if settings["env"].startswith("dubito/DeepSea"):
        points = {}
        for a in agents:
            runs = [records[(a, n, s)] for n in sizes for s in seeds]
            points[a] = {
                "size": [r["size"] for r in runs],
                "episode": [r["solve_episode"] or r["episodes"] for r in runs],
                "solved": [r["solve_episode"] is not None for r in runs],
            }
        rule = "0.8" if settings["env"] == "dubito/DeepSeaStochastic-v0" else "0.9"
        paths.append(scaling_figure(points, out / "scaling.png", settings["episodes"], threshold=rule))
        mark = None
    else:
        curves = {}
        for a in agents:
            per_episode = [
                np.asarray(records[(a, largest, s)]["tv_steps"])
                / np.maximum(1, records[(a, largest, s)]["lengths"])
                for s in seeds
            ]
            length = min(len(p) for p in per_episode)
            window = max(1, length // 30)
            smooth = np.array(
                [np.convolve(p[:length], np.ones(window) / window, mode="valid") for p in per_episode]
            )
            std = smooth.std(0, ddof=1) if len(seeds) > 1 else np.zeros(smooth.shape[1])
            curves[a] = {
                "labels": list(range(window, length + 1)),
                "mean": smooth.mean(0).tolist(),
                "std": std.tolist(),
            }
        paths.append(
            learning_curves_figure(
                curves,
                out / "tv_time.png",
                "fraction of steps on the TV",
                xlabel="episode",
                title=f"on the TV ({window}-episode mean; ± std over seeds)",
                bounds=(0.0, 1.0),
            )
        )
        import dubito.agents.envs as envs

        mark = envs.NoisyTV(size=largest).tv
    maps = {a: np.asarray(records[(a, largest, first)]["visits"]) for a in agents}
    paths.append(
        visitation_figure(maps, out / "visits.png", f"visits, N = {largest}, seed {first}", mark=mark)
    )
    points = {}
    for a in agents:
        e = records[(a, largest, first)].get("epistemic")
        if e:
            snaps = e["snapshots"]
            points[a] = {
                "visits": [v for sn in snaps for v in sn["visits"]],
                "epistemic": [v for sn in snaps for v in sn["estimate"]],
                "episode": [sn["episode"] for sn in snaps for _ in sn["visits"]],
                "slope": e["within_state_slope"],
            }
    if points:
        paths.append(epistemic_visits_figure(points, out / "epistemic_vs_visits.png"))
    return [str(p) for p in paths]


def format_exploration(results: dict[str, Any]) -> str:
    """The study's summary as markdown."""
    settings = results["settings"]
    lines = [
        f"# exploration: {results['study']} ({settings['env']}), seeds {settings['seeds']}, budget "
        f"{settings['episodes']} episodes",
        "",
    ]

    def num(v, fmt=".2f"):
        return "–" if v is None else format(v, fmt)

    if settings["env"].startswith("dubito/DeepSea"):
        sizes = settings["sizes"]
        lines += [
            "| agent | score | "
            + " | ".join(f"N={n}" for n in sizes)
            + " | epistemic vs own visits (log-log slope) | trend removed |",
            "|---|---|" + "---|" * len(sizes) + "---|---|",
        ]
        for a, s in results["summary"].items():
            cells = []
            for n in sizes:
                p = s["per_size"][str(n)]
                cells.append(f"{num(p['median_solved'], '.0f')} ({p['solved']}/{len(p['solve_episodes'])})")
            lines.append(
                f"| {a} | {s['score']:.2f} | "
                + " | ".join(cells)
                + f" | {num(s['epistemic_slope_mean'])} | {num(s['epistemic_visit_effect_mean'])} |"
            )
        rule = "0.8 (from episode 100)" if settings["env"] == "dubito/DeepSeaStochastic-v0" else "0.9"
        lines += [
            "",
            f"Cells: median episode at which the running fraction of bad episodes fell below {rule} (solved runs / runs).",
            "Score: fraction of runs solved within 2^N + 100 episodes (bsuite's formula, on a "
            f"{settings['episodes']}-episode budget).",
            "Slope: how a state's epistemic estimate changes as its own visit count grows, over the "
            "run's snapshots (negative = falls);",
            "trend removed: the same, net of the change every state shares as training goes on (two-way fixed effects).",
        ]
    else:
        lines += [
            "| agent | steps on the TV | median | episodes reaching the goal | aleatoric std TV / "
            "elsewhere | epistemic TV / elsewhere | epistemic vs own visits (log-log slope) | trend removed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for a, s in results["summary"].items():
            lines.append(
                f"| {a} | {num(s['tv_fraction_mean'])} ± {num(s['tv_fraction_std'])} | {num(s['tv_fraction_median'])} | "
                f"{num(s['goal_rate_mean'])} | {num(s['aleatoric_tv_mean'], '.3f')} / "
                f"{num(s['aleatoric_elsewhere_mean'], '.3f')} | "
                f"{num(s['epistemic_tv_mean'], '.3f')} / "
                f"{num(s['epistemic_elsewhere_mean'], '.3f')} | {num(s['epistemic_slope_mean'])} | "
                f"{num(s['epistemic_visit_effect_mean'])} |"
            )
        lines += [
            "",
            "± is the sample standard deviation over runs. Slope: how a state's epistemic estimate changes as its own",
            "visit count grows, over the run's snapshots (negative = falls); trend removed: the same, net of the change",
            "every state shares as training goes on (two-way fixed effects).",
        ]
    return "\n".join(lines) + "\n"
