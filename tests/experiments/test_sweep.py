"""Ray Tune sweeps: a 2 x 2 labeling sweep recorded as one MLflow study, a trial that fails and
is retried from its checkpoint, an interrupted sweep restored with --resume, exploration and
training sweeps; every trial's numbers equal the same run outside Ray. All on the one shared
local Ray instance (``ray_session``)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from dubito import DubitoError
from dubito.acquisition.config import LoopConfig
from dubito.acquisition.loop import run_loop
from dubito.experiments.sweep import FAIL_ONCE_ENV, SweepConfig, parse_space, run_sweep
from tests.fixtures import TINY_LOOP

LABEL = dict(TINY_LOOP)


def _runs(uri: str, experiment: str):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def _steps(client: MlflowClient, run_id: str, metric: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


@contextlib.contextmanager
def _trial_threads():
    """The PyTorch thread count of a 1-CPU trial (Ray sets it): CPU sums depend on it at float
    rounding, so a run outside Ray is compared with a trial at the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _trial_folder(root: Path, key: str) -> Path:
    (folder,) = [
        p for p in (root / "trials").iterdir() if json.loads((p / "trial.json").read_text())["key"] == key
    ]
    return folder


def test_a_trials_own_record_survives_a_torn_line_and_wins_over_tunes(tmp_path):
    import pandas as pd

    from dubito.experiments.sweep import _append_row, _collect, _read_rows, _trial_dir

    folder = _trial_dir(tmp_path, "abc_00000", "seed=0")
    folder.mkdir(parents=True)
    assert _read_rows(folder) is None
    for step in (1, 2, 1):
        _append_row(folder, {"episode": step, "return": float(step)})
    with open(folder / "reported.jsonl", "a") as f:
        f.write('{"episode": 3, "ret')  # killed mid-write
    assert [r["episode"] for r in _read_rows(folder)] == [1, 2, 1]
    _append_row(folder, {"episode": 3, "return": 3.0})  # the retried step: the torn line does not swallow it
    assert [r["episode"] for r in _read_rows(folder)] == [1, 2, 1, 3]

    class Result:  # what Tune hands back: its own history has lost step 2
        config, metrics, error, path = (
            {"seed": 0},
            {"trial_id": "abc_00000"},
            None,
            str(tmp_path / "tune" / "x"),
        )
        metrics_dataframe = pd.DataFrame([{"episode": 1, "return": 1.0}, {"episode": 3, "return": 3.0}])

    (trial,) = _collect([Result()], tmp_path)
    assert [r["episode"] for r in trial["rows"]] == [1, 2, 1, 3] and trial["error"] is None
    Result.metrics = {"trial_id": "other"}  # no record of its own: Tune's rows
    assert [r["episode"] for r in _collect([Result()], tmp_path)[0]["rows"]] == [1, 3]


# ----------------------------------------------------------------------------- the search space
def test_space_parses_typed_values_aliases_and_distributions():
    grid, sampled = parse_space(
        "label",
        ["acquisition=random,bald", "seed=0,1"],
        ["lr=loguniform:1e-4:1e-2", "dropout=choice:0.1,0.3"],
    )
    assert grid == {"acquisition": ["random", "bald"], "seed": [0, 1]}
    assert sampled == {"lr": ("loguniform", [1e-4, 1e-2]), "dropout": ("choice", [0.1, 0.3])}
    grid, _ = parse_space("explore", ["agent=dqn,epistemic", "size=5,8"], [])
    assert grid == {"agents": ["dqn", "epistemic"], "sizes": ["5", "8"]}  # ExploreConfig's comma-list fields


@pytest.mark.parametrize(
    ("grid", "sample", "message"),
    [
        (["acquisiton=bald"], [], "not a label setting"),
        (["seed=0,x"], [], "not a valid int"),
        (["seed=0,0"], [], "distinct values"),
        (["output=a,b"], [], "cannot be swept"),
        ([], ["lr=normal:0:1"], "unknown distribution"),
        ([], ["lr=loguniform:0:1"], "LOW > 0"),
        ([], ["seed=uniform:0:3"], "does not fit a int"),
        (["seed=0,1"], ["seed=randint:0:4"], "already swept"),
    ],
)
def test_space_refuses_bad_axes(grid, sample, message):
    with pytest.raises(DubitoError, match=message):
        parse_space("label", grid, sample)


def test_sweep_checks_every_trial_before_starting(tmp_path):
    bad = SweepConfig(
        kind="label", output=str(tmp_path / "s"), grid=("acquisition=bald,nonsense",), base=dict(LABEL)
    )
    with pytest.raises(DubitoError, match="--acquisition"):
        bad.validate()
    several = SweepConfig(
        kind="explore",
        output=str(tmp_path / "e"),
        grid=("agent=dqn,rnd",),
        base={"sizes": "5,8", "seeds": "0"},
    )
    with pytest.raises(DubitoError, match="one run"):
        several.validate()
    with pytest.raises(DubitoError, match="at least one --grid"):
        SweepConfig(kind="train", base={}).validate()
    # every choice and both ends of a sampled range are checked, not only the first
    with pytest.raises(DubitoError, match="acquisition=nonsense"):
        SweepConfig(
            kind="label", grid=("seed=0",), sample=("acquisition=choice:bald,nonsense",), base=dict(LABEL)
        ).validate()
    with pytest.raises(DubitoError, match="temperature=0.0: --temperature must be > 0"):
        SweepConfig(
            kind="label", grid=("seed=0",), sample=("temperature=uniform:0:1",), base=dict(LABEL)
        ).validate()
    for busy in ("scorers", "member_workers"):
        with pytest.raises(DubitoError, match="--scorers N / --member-workers N"):
            SweepConfig(kind="label", grid=("seed=0",), base=dict(LABEL, **{busy: 2})).validate()
    # refused whether set for every trial or as an axis
    with pytest.raises(
        DubitoError, match="scorers=2: sweep label trials train and score in their own process"
    ):
        SweepConfig(kind="label", grid=("scorers=0,2",), base=dict(LABEL)).validate()
    with pytest.raises(DubitoError, match="oracle=human"):
        SweepConfig(kind="label", grid=("oracle=simulated,human",), base=dict(LABEL)).validate()
    with pytest.raises(
        DubitoError, match="lr=-1.0: --lr must be > 0"
    ):  # the training settings of every round
        SweepConfig(kind="label", grid=("lr=0.001,-1",), base=dict(LABEL)).validate()
    # the corners of a sampled space: 7 initial + 6 x 2 rounds outgrow the 16-image pool, though neither end alone does
    with pytest.raises(
        DubitoError,
        match=r"initial=7, query=6: --initial 7 \+ --query 6 x 2 rounds needs 19 images; the pool has 16",
    ):
        SweepConfig(
            kind="label",
            grid=("seed=0",),
            sample=("initial=randint:4:8", "query=choice:2,6"),
            base=dict(LABEL),
        ).validate()
    SweepConfig(
        kind="label", grid=("seed=0",), sample=("initial=randint:4:8", "query=choice:2,4"), base=dict(LABEL)
    ).validate()


def test_a_busy_sweep_folder_is_refused_before_ray_starts(tmp_path, monkeypatch):
    import textwrap

    from dubito.platform.files import OutputInUse

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import sys, time
        from dubito.platform.files import exclusive
        with exclusive(sys.argv[1]):
            print("locked", flush=True)
            time.sleep(60)
    """),
            str(tmp_path / "s"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(
            "dubito.platform.cluster.connect", lambda *a, **k: pytest.fail("Ray started for a busy folder")
        )
        with pytest.raises(OutputInUse, match=f"is in use by process {holder.pid}"):
            run_sweep(
                SweepConfig(kind="label", output=str(tmp_path / "s"), grid=("seed=0,1",), base=dict(LABEL)),
                progress=False,
            )
    finally:
        holder.kill()
        holder.wait()


def test_ray_keeps_the_command_s_sigterm_handler(ray_session):
    """ray.init installs a SIGTERM handler of its own (a bare exit); dubito's (end like Ctrl-C:
    runs KILLED, locks released) is put back, so `dubito sweep` and `--scorers` end cleanly."""
    code = (
        "import signal\nfrom dubito.cli import _terminate\nsignal.signal(signal.SIGTERM, _terminate)\n"
        "from dubito.platform.cluster import connect\nconnect()\nprint(signal.getsignal(signal.SIGTERM) is _terminate)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "RAY_ADDRESS": ray_session},
    )
    assert done.stdout.strip().splitlines()[-1] == "True", done.stderr[-2000:]


def test_a_trial_refused_for_its_settings_ends_once_without_retries(tmp_path, monkeypatch):
    """Every value is checked before Ray starts; should a trial still meet a config error (a
    dataset folder changed meanwhile), it ends at once, reported as an error, instead of raising
    into Tune's retries."""
    import math
    import types

    import pandas as pd
    from ray import tune

    from dubito.experiments import sweep

    reported = []
    monkeypatch.setattr(tune, "get_context", lambda: types.SimpleNamespace(get_trial_id=lambda: "t0001"))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reported.append(metrics))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/unused.db")
    context = {
        "kind": "label",
        "base": dict(LABEL, lr=-1.0),
        "root": str(tmp_path),
        "tracking_uri": f"sqlite:///{tmp_path}/unused.db",
        "parent_run_id": "p",
        "experiment": "e",
        "checkpoint_every": 1,
        "inject": None,
        "gpus": 0,
        "threads": torch.get_num_threads(),
        "metric": "test_mean_iou",
    }
    sweep._trial({"seed": 0}, context)  # returns: Tune sees no failure to retry
    (folder,) = (tmp_path / "trials").iterdir()
    assert "--lr must be > 0" in json.loads((folder / "config_error.json").read_text())["error"]
    assert sorted(p.name for p in folder.iterdir() if p.name != ".dubito.lock") == [
        "config_error.json",
        "reported.jsonl",
        "trial.json",
    ]
    assert (
        len(reported) == 1
        and "--lr must be > 0" in reported[0]["config_error"]
        and math.isnan(reported[0]["test_mean_iou"])
    )
    result = types.SimpleNamespace(
        metrics_dataframe=pd.DataFrame(reported),
        config={"seed": 0},
        metrics={"trial_id": "t0001"},
        error=None,
        path=str(folder),
    )
    (trial,) = sweep._collect([result], tmp_path)
    assert trial["error"].startswith("config error (not retried): ") and "--lr" in trial["error"]
    assert not (tmp_path / "unused.db").exists()


def test_asha_budget_covers_every_grid_and_sampled_value():
    from dubito.experiments.sweep import _budget

    base = {"epochs": 3}
    assert (
        _budget(SweepConfig(kind="train", grid=("seed=0",), sample=("epochs=randint:2:9",), base=base)) == 8
    )  # 9 excluded
    assert (
        _budget(SweepConfig(kind="train", grid=("seed=0",), sample=("epochs=choice:2,8,4",), base=base)) == 8
    )
    assert _budget(SweepConfig(kind="train", grid=("epochs=5,20",), base=base)) == 20
    assert (
        _budget(SweepConfig(kind="label", grid=("rounds=2,6",), base=dict(LABEL))) == 7
    )  # rounds + the initial model


def test_gpus_the_cluster_lacks_are_refused(tmp_path, ray_session, mlflow_uri):
    config = SweepConfig(
        kind="label", output=str(tmp_path / "g"), grid=("seed=0,1",), gpus_per_trial="1", base=dict(LABEL)
    )
    with pytest.raises(DubitoError, match="no GPU"):
        run_sweep(config, progress=False)
    assert not (tmp_path / "g").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- labeling sweeps
@pytest.mark.slow
def test_two_by_two_label_sweep_is_one_mlflow_study(tmp_path, ray_session, mlflow_uri):
    root = tmp_path / "sweep"
    config = SweepConfig(
        kind="label", output=str(root), grid=("acquisition=random,bald", "seed=0,1"), base=dict(LABEL)
    )
    results = run_sweep(config, progress=False)

    assert results["finished"] == 4 and not results["errors"]
    assert set(results["summary"]) == {"acquisition=random", "acquisition=bald"}
    assert all(s["trials"] == 2 for s in results["summary"].values())
    table = (root / "tables.md").read_text()
    assert (
        "acquisition=random" in table
        and "acquisition=bald" in table
        and (root / "curves.png").stat().st_size > 0
    )

    client, parents, children = _runs(mlflow_uri, "dubito-sweep-label")
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.info.status == "FINISHED" for c in [*parents, *children])
    for child in children:  # one test metric per round, steps 0..rounds
        assert [s for s, _ in _steps(client, child.info.run_id, "test_mean_iou")] == [0, 1, 2]

    # a trial is the plain labeling loop: the same curve as run_loop with the same settings
    with _trial_threads():
        direct = run_loop(
            LoopConfig.flat(output=str(tmp_path / "direct"), acquisition="bald", seed=1, **LABEL),
            progress=False,
        )
    trial = results["trials"]["acquisition=bald,seed=1"]
    assert trial["curve"]["y"] == [c["test_mean_iou"] for c in direct["curve"]]
    assert trial["curve"]["x"] == [c["labels"] for c in direct["curve"]]
    # the group's numbers are the mean and sample std of its two seeds
    finals = [results["trials"][f"acquisition=bald,seed={s}"]["final"] for s in (0, 1)]
    assert results["summary"]["acquisition=bald"]["final_mean"] == pytest.approx(np.mean(finals))
    assert results["summary"]["acquisition=bald"]["final_std"] == pytest.approx(np.std(finals, ddof=1))


@pytest.mark.slow
def test_failed_trial_is_retried_from_its_checkpoint(tmp_path, ray_session, mlflow_uri, monkeypatch):
    root = tmp_path / "sweep"
    monkeypatch.setenv(FAIL_ONCE_ENV, "seed=1@1")  # the seed-1 trial dies right after round 1 is recorded
    config = SweepConfig(
        kind="label",
        output=str(root),
        grid=("seed=0,1",),
        max_failures=1,
        experiment="retry",
        base=dict(LABEL, acquisition="bald"),
    )
    results = run_sweep(config, progress=False)

    assert (root / "injected-failure").exists()  # the failure happened
    assert results["finished"] == 2 and not results["errors"]
    client, parents, children = _runs(mlflow_uri, "retry")
    assert len(parents) == 1 and len(children) == 2  # the retried trial kept its one MLflow run
    for child in children:
        assert [s for s, _ in _steps(client, child.info.run_id, "test_mean_iou")] == [0, 1, 2]
    folder = _trial_folder(root, "seed=1")
    ledger_rounds = json.loads((folder / "results.json").read_text())["curve"]
    assert [c["round"] for c in ledger_rounds] == [0, 1, 2]
    with _trial_threads():
        direct = run_loop(
            LoopConfig.flat(output=str(tmp_path / "direct"), acquisition="bald", seed=1, **LABEL),
            progress=False,
        )
    assert [c["test_mean_iou"] for c in ledger_rounds] == [c["test_mean_iou"] for c in direct["curve"]]
    assert json.loads((folder / "results.json").read_text())["queried"] == json.loads(
        json.dumps(direct["queried"])
    )


@pytest.mark.slow
def test_interrupted_sweep_resumes_from_the_command_line(tmp_path, ray_session, mlflow_uri):
    root = tmp_path / "sweep"
    env = {**os.environ, "RAY_ADDRESS": ray_session, FAIL_ONCE_ENV: "acquisition=bald@1"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in LABEL.items()]
    command = [
        sys.executable,
        "-m",
        "dubito",
        "sweep",
        "label",
        f"--output={root}",
        "--grid=acquisition=random,bald",
        "--max-failures=0",
        "--experiment=resumed",
        "--no-progress",
        *flags,
    ]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "1 errored" in first.stdout and "injected failure after step 1" in first.stdout

    env.pop(FAIL_ONCE_ENV)
    again = subprocess.run(
        [sys.executable, "-m", "dubito", "sweep", "--resume", str(root), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 trials finished, 0 errored" in again.stdout
    results = json.loads((root / "results.json").read_text())
    assert set(results["summary"]) == {"acquisition=random", "acquisition=bald"}
    client, parents, children = _runs(mlflow_uri, "resumed")
    assert len(parents) == 1 and len(children) == 2  # the same parent run continued
    bald = next(c for c in children if c.data.params["acquisition"] == "bald")
    assert [s for s, _ in _steps(client, bald.info.run_id, "test_mean_iou")] == [0, 1, 2]
    # a sweep already in a folder is not overwritten by a new one
    with pytest.raises(DubitoError, match="--resume"):
        run_sweep(
            SweepConfig(kind="label", output=str(root), grid=("seed=0,1",), base=dict(LABEL)), progress=False
        )


# ----------------------------------------------------------------------------- exploration and training
@pytest.mark.slow
def test_explore_sweep_resumes_a_run_mid_way_to_the_same_episodes(
    tmp_path, ray_session, mlflow_uri, monkeypatch
):
    from dubito.experiments.exploration import ExploreConfig, run_one, run_specs

    root = tmp_path / "sweep"
    monkeypatch.setenv(FAIL_ONCE_ENV, "agents=bootstrapped@37")  # dies at episode 37; last checkpoint at 30
    base = {"study": "deep-sea", "sizes": "6", "seeds": "0", "episodes": 60, "stop_when_solved": False}
    config = SweepConfig(
        kind="explore",
        output=str(root),
        grid=("agent=dqn,bootstrapped",),
        checkpoint_every=10,
        max_failures=1,
        experiment="explore-sweep",
        base=base,
    )
    results = run_sweep(config, progress=False)
    assert (root / "injected-failure").exists() and results["finished"] == 2 and not results["errors"]

    for agent in ("dqn", "bootstrapped"):
        folder = _trial_folder(root, f"agents={agent}")
        (record_path,) = (folder / "runs").glob("*.json")
        record = json.loads(record_path.read_text())
        _, specs = run_specs(ExploreConfig.flat(**{**base, "agents": agent}), tmp_path / f"direct-{agent}")
        (tmp_path / f"direct-{agent}" / "runs").mkdir(parents=True)
        with _trial_threads():
            direct = run_one(specs[0])
        assert record["returns"] == direct["returns"] and record["visits"] == direct["visits"]
        assert (
            len(results["trials"][f"agents={agent}"]["curve"]["y"]) == 60
        )  # each episode once, after the retry
        # the trial's own record holds every row it reported, the retried ones again (Tune's may have lost some)
        reported = [
            row["episode"] for row in map(json.loads, (folder / "reported.jsonl").read_text().splitlines())
        ]
        assert reported == (
            list(range(1, 38)) + list(range(31, 61)) if agent == "bootstrapped" else list(range(1, 61))
        )

    client, parents, children = _runs(mlflow_uri, "explore-sweep")
    assert len(parents) == 1 and len(children) == 2
    for child in children:
        assert [s for s, _ in _steps(client, child.info.run_id, "return")] == list(range(1, 61))


@pytest.mark.slow
def test_train_sweep_with_asha_records_epochs(tmp_path, ray_session, mlflow_uri):
    from dubito.platform.training import TrainConfig, train

    root = tmp_path / "sweep"
    base = dict(
        model="tiny", height=24, width=32, train_images=8, val_images=4, epochs=3, batch_size=4, device="cpu"
    )
    # two samples per grid point from a one-value space: four trials, two with the same settings
    config = SweepConfig(
        kind="train",
        output=str(root),
        grid=("dropout=0.1,0.3",),
        sample=("lr=choice:0.001",),
        num_samples=2,
        scheduler="asha",
        experiment="train-sweep",
        base=base,
    )
    results = run_sweep(config, progress=False)
    assert results["finished"] == 4 and results["metric"] == "val_mean_iou" and results["mode"] == "max"
    assert set(results["summary"]) == {"dropout=0.1,lr=0.001", "dropout=0.3,lr=0.001"}
    assert len(results["trials"]) == 4 and all(
        s["trials"] == 2 for s in results["summary"].values()
    )  # none lost to a shared name
    client, parents, children = _runs(mlflow_uri, "train-sweep")
    assert len(parents) == 1 and len(children) == 4
    statuses = {c.info.status for c in children}  # ASHA-stopped trials' runs are KILLED, the others FINISHED
    assert statuses <= {"FINISHED", "KILLED"} and "FINISHED" in statuses, statuses
    for child in children:
        steps = [s for s, _ in _steps(client, child.info.run_id, "val_mean_iou")]
        assert steps == list(range(1, len(steps) + 1)) and steps
    with _trial_threads():
        direct = train(TrainConfig(output=str(tmp_path / "direct"), dropout=0.3, **base), progress=False)
    for key, trial in results["trials"].items():
        if key.startswith(
            "dropout=0.3"
        ):  # same seed, same settings: the plain trainer's curve, as far as ASHA let it run
            n = len(trial["curve"]["y"])
            assert trial["curve"]["y"] == [h["val_mean_iou"] for h in direct["history"]][:n]


@pytest.mark.slow
def test_sweep_with_a_relative_output_resumes_from_anywhere(tmp_path, ray_session, mlflow_uri, monkeypatch):
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    config = SweepConfig(kind="label", output="relative-sweep", grid=("seed=0",), base=dict(LABEL, rounds=1))
    first = run_sweep(config, progress=False)
    root = tmp_path / "here" / "relative-sweep"
    saved = json.loads((root / "sweep.json").read_text())
    assert saved["config"]["output"] == str(root)  # recorded absolute
    again = SweepConfig(
        **{
            **saved["config"],
            "grid": tuple(saved["config"]["grid"]),
            "sample": tuple(saved["config"]["sample"]),
        }
    )
    assert again.base == config.base and again.grid == config.grid

    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = run_sweep(resume=str(root), progress=False)
    assert resumed["finished"] == 1 and resumed["mlflow_parent_run_id"] == first["mlflow_parent_run_id"]
    assert not any((tmp_path / "elsewhere").iterdir())  # nothing started anew where the command ran
    assert resumed["trials"]["seed=0"]["curve"] == first["trials"]["seed=0"]["curve"]
