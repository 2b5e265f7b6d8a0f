"""The exploration studies end to end (the issue's acceptance): Deep Sea N = 10 and the noisy TV,
results.json, plots, MLflow parent and children, resuming, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from dubito import DubitoError
from dubito.experiments.exploration import ExploreConfig, _within_state_slope, run_exploration, solve_episode
from dubito.platform.config import to_flat

pytestmark = pytest.mark.usefixtures("one_thread")


def test_solve_episode_is_bsuites_criterion():
    assert solve_episode([True] * 5) is None
    # running bad fraction 1, 1, 2/3 (< 0.9): solved at episode 3
    assert solve_episode([True, True, False, True]) == 3
    assert solve_episode([False]) == 1
    bad = [True] * 99 + [False] * 200  # stochastic variant: < 0.8 and from episode 100 on
    frac = np.cumsum(bad) / np.arange(1, len(bad) + 1)
    assert solve_episode(bad, stochastic=True) == int(np.flatnonzero(frac < 0.8)[0] + 1) == 124


def test_within_state_slope_recovers_a_power_law():
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, 1, 30)  # states differ for other reasons (e.g. nearness to the reward)
    snaps = []
    for t in (1, 3, 10, 30):
        visits = rng.integers(0, 50, 30) * t
        # a trend shared by every state (training goes on) must not count as an effect of visits
        snaps.append((t, visits.astype(float), np.exp(offsets) * t**-0.7 * (1 + visits) ** -0.5))
    assert _within_state_slope(snaps, remove_trend=True) == pytest.approx(-0.5, abs=1e-9)
    flat = [(t, v, np.exp(offsets) * t**-0.7) for t, v, _ in snaps]  # falls with time only
    assert _within_state_slope(flat, remove_trend=True) == pytest.approx(0.0, abs=1e-9)
    assert _within_state_slope(flat) < -0.1  # without the trend removed, time passes for visits
    # no common trend: both measures recover the power law
    plain = [(t, v, np.exp(offsets) * (1 + v) ** -0.5) for t, v, _ in snaps]
    assert _within_state_slope(plain) == pytest.approx(-0.5, abs=1e-9)


@pytest.mark.slow
@pytest.mark.finding
def test_deep_sea_10_uncertainty_agents_solve_and_dithering_does_not(tmp_path, mlflow_uri, finding):
    seeds = ",".join(str(finding.seed(s)) for s in (0, 1, 2))
    config = ExploreConfig.flat(
        study="deep-sea",
        agents="epistemic,bootstrapped,dqn",
        sizes="10",
        seeds=seeds,
        episodes=500,
        output=str(tmp_path / "ds"),
        workers=2,
    )
    results = run_exploration(config, progress=False)
    per = {
        a: results["summary"][a]["per_size"]["10"]["solve_episodes"]
        for a in ("epistemic", "bootstrapped", "dqn")
    }
    print("\nDeep Sea N=10, episode solved (seeds 0-2):", per)
    solved = {a: sum(e is not None for e in per[a]) for a in per}
    for agent in ("epistemic", "bootstrapped"):  # most seeds, within 500 episodes
        finding.check(f"Deep Sea N=10: seeds {agent} solves", solved[agent], ">=", 2, per[agent])
    # dithering needs ~2^10 episodes; a lucky early walk to the reward can still teach it (seed 2: episode 87)
    finding.check("Deep Sea N=10: seeds dqn solves", solved["dqn"], "<=", 1, per["dqn"])
    for agent in ("epistemic", "bootstrapped"):
        finding.check(
            f"Deep Sea N=10: seeds {agent} solves minus dqn's", solved[agent] - solved["dqn"], ">", 0, per
        )
    out = tmp_path / "ds"
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["epistemic"]["score"] == results["summary"]["epistemic"]["score"]
    finding.check(
        "Deep Sea N=10: bsuite score of epistemic", results["summary"]["epistemic"]["score"], ">", 0.6
    )
    for name in ("scaling.png", "visits.png", "epistemic_vs_visits.png", "tables.md"):
        assert (out / name).stat().st_size > 0
    run = json.loads((out / "runs" / f"epistemic-N10-seed{finding.seed(0)}.json").read_text())
    if run["solve_episode"] is not None:
        assert run["episodes"] == run["solve_episode"]  # stopped once solved
        assert sum(run["bad"]) / run["episodes"] < 0.9 <= sum(run["bad"][:-1]) / max(1, run["episodes"] - 1)
    # MLflow: one parent, one child per run with per-episode metrics (step = episode)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("dubito-explore")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == results["mlflow_parent_run_id"]]
    assert len(parent) == 1 and len(children) == 9
    child = next(r for r in children if r.data.params["agent"] == "dqn")
    history = client.get_metric_history(child.info.run_id, "bad_fraction")
    dqn_run = json.loads((out / "runs" / f"dqn-N10-seed{child.data.params['seed']}.json").read_text())
    assert len(history) == dqn_run["episodes"] and [m.step for m in history] == list(
        range(1, dqn_run["episodes"] + 1)
    )
    assert history[-1].value == pytest.approx(sum(dqn_run["bad"]) / dqn_run["episodes"])
    assert dqn_run["mlflow_run_id"] == child.info.run_id
    # rerunning resumes: nothing is run again, the same numbers come back
    again = run_exploration(config, progress=False)
    assert again["summary"] == results["summary"]
    assert len(client.search_runs([exp.experiment_id])) == 10
    with pytest.raises(DubitoError, match="other settings"):
        run_exploration(ExploreConfig.flat(**{**to_flat(config), "kappa": 1.0}), progress=False)
    with pytest.raises(DubitoError, match="holds the 'deep-sea' study"):
        run_exploration(
            ExploreConfig.flat(**{**to_flat(config), "study": "noisy-tv", "sizes": "5"}), progress=False
        )
    # a run finished but never logged (the study was killed in between) is logged when the study resumes
    path = out / "runs" / f"dqn-N10-seed{finding.seed(0)}.json"
    record = json.loads(path.read_text())
    del record["mlflow_run_id"]
    path.write_text(json.dumps(record))
    run_exploration(config, progress=False)
    assert len(client.search_runs([exp.experiment_id])) == 11
    assert json.loads(path.read_text())["mlflow_run_id"]


@pytest.mark.slow
@pytest.mark.finding
def test_noisy_tv_noise_seekers_watch_and_the_epistemic_agent_does_not(tmp_path, mlflow_uri, finding):
    seeds = ",".join(str(finding.seed(s)) for s in (0, 1, 2, 3))
    config = ExploreConfig.flat(
        study="noisy-tv",
        agents="epistemic,total,rnd",
        seeds=seeds,
        episodes=300,
        output=str(tmp_path / "tv"),
        workers=2,
    )
    results = run_exploration(config, progress=False)
    s = results["summary"]
    tv = {a: s[a]["tv_fraction_mean"] for a in s}
    median = {a: s[a]["tv_fraction_median"] for a in s}
    slope = s["epistemic"]["epistemic_slope_mean"]
    effect = s["epistemic"]["epistemic_visit_effect_mean"]
    print(
        f"\nnoisy TV, fraction of steps on the TV (mean / median over 4 seeds): "
        f"{ {a: (round(tv[a], 3), round(median[a], 3)) for a in tv} }; epistemic agent's "
        f"within-state slope {slope:.3f}, trend removed {effect:.3f}"
    )
    for agent, factor in (("total", 2.0), ("rnd", 1.3)):
        for what, values in (("mean", tv), ("median", median)):
            finding.check(
                f"noisy TV: TV share, {agent} over epistemic ({what} of 4 seeds)",
                values[agent] / max(values["epistemic"], 1e-9),
                ">",
                factor,
                (tv, median),
            )
    # the split: the heteroscedastic head puts the TV's noise in aleatoric variance
    finding.check(
        "noisy TV: epistemic agent's aleatoric std, TV over elsewhere",
        s["epistemic"]["aleatoric_tv_mean"] / s["epistemic"]["aleatoric_elsewhere_mean"],
        ">",
        3.0,
    )
    # a state's epistemic estimate falls as its visit count grows
    finding.check("noisy TV: within-state slope of epistemic std vs visits", slope, "<", -0.05)
    assert (tmp_path / "tv" / "tv_time.png").stat().st_size > 0


def test_stochastic_deep_sea_study_runs(tmp_path):
    config = ExploreConfig.flat(
        study="deep-sea-stochastic",
        agents="bootstrapped",
        sizes="4",
        seeds="0",
        episodes=150,
        output=str(tmp_path / "st"),
        workers=1,
    )
    results = run_exploration(config, progress=False)
    run = results["runs"]["bootstrapped-N4-seed0"]
    assert (
        results["settings"]["env"] == "dubito/DeepSeaStochastic-v0"
        and results["settings"]["agent"]["gamma"] == 0.99
    )
    solved = run["solve_episode"]
    assert solved is None or (
        solved >= 100 and run["episodes"] == solved
    )  # bsuite's stochastic rule: from episode 100


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(DubitoError, match="--study"):
        run_exploration(ExploreConfig.flat(study="mountain-car", output=str(tmp_path)))
    with pytest.raises(DubitoError, match="--agents"):
        run_exploration(ExploreConfig.flat(agents="dqn,ucb", output=str(tmp_path)))
    with pytest.raises(DubitoError, match="--sizes"):
        run_exploration(ExploreConfig.flat(sizes="10,x", output=str(tmp_path)))
    with pytest.raises(DubitoError, match="--mapping-seed"):
        run_exploration(ExploreConfig.flat(mapping_seed=-1, output=str(tmp_path)))
    with pytest.raises(DubitoError, match="--noise-scale"):
        run_exploration(ExploreConfig.flat(study="noisy-tv", noise_scale=-1.0, output=str(tmp_path)))
    with pytest.raises(DubitoError, match="--min-replay"):
        run_exploration(ExploreConfig.flat(min_replay=100, buffer_size=50, output=str(tmp_path)))
    assert not (tmp_path / "study.json").exists()  # nothing started
