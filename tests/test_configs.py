"""Nested configs under flat names: the flags, ledgers, MLflow params and sweeps of the commands
whose configs hold other configs (a study holds its loops' settings, a loop its rounds' training
settings, an exploration study its agents' settings)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from dubito import DubitoError
from dubito.acquisition.config import LEDGER, LoopConfig, loop_config
from dubito.acquisition.ledger import Ledger
from dubito.agents.agents import AgentConfig
from dubito.cli import build_parser, config_from_args
from dubito.experiments.exploration import ExploreConfig
from dubito.experiments.labeling_budget import LabelConfig
from dubito.experiments.reproduce import ReproduceConfig
from dubito.experiments.sweep import SweepConfig
from dubito.platform.config import flat_fields, from_flat, nested, parse_list, to_flat
from dubito.platform.tracking import flatten_params
from dubito.platform.training import TrainConfig

# every flag of these commands in the release before configs were nested (each must keep working)
OLD_FLAGS = {
    "label": "--acquisition --batch-size --budget --data-seed --dataset --device --dropout --dropout-at "
    "--epochs --experiment --height --initial --lr --model --oracle --output --pool-images --query "
    "--reduction --root --rounds --samples --scorer-gpus --scorer-threads --scorers --seeds --selection "
    "--static-fraction --temperature --test-images --variant --width",
    "explore": "--agents --batch-size --buffer-size --dropout --ensemble --episodes --epsilon --experiment "
    "--gamma --hidden --kappa --lr --mapping-seed --mask-prob --min-replay --no-stop-when-solved "
    "--noise-scale --output --prior-scale --rnd-scale --samples --screen --seeds --sizes --source "
    "--stop-when-solved --study --target-every --train-every --workers",
    "reproduce": "--batch-size --datasets --device --epochs --experiment --fractions --height --lr --model "
    "--ood-dataset --ood-root --output --root --samples --seeds --test-images --train-images "
    "--val-images --variants --width",
}
# their defaults then (`dubito label` / `explore` with no flags)
OLD_DEFAULTS = {
    "label": {
        "output": "runs/label",
        "acquisition": "random,entropy,bald,aleatoric,epistemic",
        "seeds": "0,1,2",
        "dataset": "synthetic-camvid",
        "root": "",
        "initial": 8,
        "query": 4,
        "rounds": 4,
        "budget": 0,
        "reduction": "topq:0.1",
        "selection": "topk",
        "temperature": 1.0,
        "pool_images": 80,
        "test_images": 16,
        "static_fraction": 0.2,
        "model": "auto",
        "variant": "both",
        "dropout": 0.2,
        "dropout_at": "all",
        "height": 32,
        "width": 40,
        "epochs": 8,
        "batch_size": 8,
        "lr": 0.001,
        "samples": 8,
        "data_seed": 0,
        "oracle": "simulated",
        "device": "auto",
        "scorers": 0,
        "scorer_gpus": "auto",
        "scorer_threads": 0,
        "experiment": "dubito-label",
    },
    "explore": {
        "study": "deep-sea",
        "agents": None,
        "sizes": None,
        "seeds": "0,1,2",
        "hidden": "64,64",
        "lr": 0.001,
        "batch_size": 64,
        "buffer_size": 10000,
        "min_replay": 64,
        "dropout": 0.1,
        "samples": 10,
        "kappa": 3.0,
        "source": "ensemble",
        "workers": 0,
        "experiment": "dubito-explore",
    },
}
# what a ledger written by that release records for `LoopConfig()`
OLD_LEDGER_SETTINGS = {
    "acquisition": "bald",
    "batch_size": 8,
    "data_seed": 0,
    "dataset": "synthetic-camvid",
    "dropout": 0.2,
    "epochs": 8,
    "height": 32,
    "initial": 8,
    "lr": 0.001,
    "model": "tiny",
    "oracle": "simulated",
    "pool_images": 80,
    "query": 4,
    "reduction": "topq:0.1",
    "root": "",
    "samples": 8,
    "seed": 0,
    "selection": "topk",
    "static_fraction": 0.2,
    "temperature": 1.0,
    "test_images": 16,
    "variant": "both",
    "width": 40,
}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")}


@pytest.mark.parametrize("command", sorted(OLD_FLAGS))
def test_every_flag_of_the_flat_configs_is_still_a_flag(command):
    commands = _subcommands(build_parser())
    assert set(OLD_FLAGS[command].split()) <= _flags(commands[command])
    if command != "reproduce":  # and the sweep of the same kind takes them as the trials' settings
        sweep = _subcommands(commands["sweep"])[command]
        assert set(OLD_FLAGS[command].split()) - {"--seeds", "--workers"} <= _flags(sweep)


@pytest.mark.parametrize("command", sorted(OLD_DEFAULTS))
def test_the_flags_defaults_are_those_of_the_flat_configs(command):
    args = build_parser().parse_args([command])
    for name, old in OLD_DEFAULTS[command].items():
        new = getattr(args, name)
        assert new == old, name
    config = config_from_args(LabelConfig if command == "label" else ExploreConfig, args)
    flat = to_flat(config, text=True)
    assert {k: flat[k] for k in OLD_DEFAULTS[command] if k != "model"} == {
        k: v for k, v in OLD_DEFAULTS[command].items() if k != "model"
    }


def test_a_training_setting_reaches_the_labeling_rounds_without_an_edit_to_the_loop():
    args = build_parser().parse_args(
        ["label", "--weight-decay", "0", "--epochs", "3", "--seeds", "4", "--grad-clip", "1.5"]
    )
    config = config_from_args(LabelConfig, args)
    round_2 = config.loop_for("bald", 4).train_config(2)
    assert isinstance(round_2, TrainConfig)
    assert (round_2.weight_decay, round_2.epochs, round_2.grad_clip, round_2.seed) == (0.0, 3, 1.5, 4002)
    assert round_2.height == 32 and round_2.model == "tiny"  # the loop's defaults, auto resolved
    # the settings a loop sets itself or does not use are not flags of `dubito label`
    label = _flags(_subcommands(build_parser())["label"])
    assert {"--weight-decay", "--grad-clip", "--likelihood", "--amp"} <= label
    assert not {"--patience", "--workers", "--train-images", "--crop", "--class-weights"} & label


def test_nested_configs_round_trip_through_their_flat_names():
    label = LabelConfig.flat(seeds="3,1", acquisition="bald,random", dataset="digits", epochs=2, query=5)
    assert label.seeds == (3, 1) and label.acquisition == ("bald", "random")
    assert label.loop.query == 5 and label.loop.train.epochs == 2
    assert label.loop.train.model == "mlp"  # auto, resolved for the dataset given beside it
    assert from_flat(LabelConfig, to_flat(label)) == label
    explore = ExploreConfig.flat(hidden="8,4", agents="dqn", gamma=0.5, kappa=2.0)
    assert explore.agent.hidden == (8, 4) and explore.agent.kappa == 2.0
    assert explore.agent_config().gamma == 0.5 and explore.agent.gamma == 0.99  # the study's own
    assert from_flat(ExploreConfig, to_flat(explore)) == explore
    # the run records keep the text they held before lists were tuples (finished runs still resume)
    assert explore.resolved()["agent"]["hidden"] == "8,4"
    assert AgentConfig(**explore.resolved()["agent"]) == explore.agent_config()
    assert ReproduceConfig(fractions="1,0.5", seeds="2").parsed()[2] == [0.5, 1.0]


def test_bad_flat_settings_name_the_setting():
    with pytest.raises(DubitoError, match=r"unknown LoopConfig settings \['epoch'\]"):
        LoopConfig.flat(epoch=3)
    with pytest.raises(DubitoError, match="--seeds must be integers separated by commas, got '0,x'"):
        LabelConfig.flat(seeds="0,x")
    with pytest.raises(DubitoError, match="--hidden must be integers"):
        ExploreConfig.flat(hidden="64,wide")
    with pytest.raises(DubitoError, match="--hidden must be comma-separated positive"):
        AgentConfig(hidden="0")
    assert parse_list("seeds", " 1, 2 ,", int) == (1, 2)
    assert LabelConfig.flat(seeds=3).seeds == (3,) and ReproduceConfig(seeds=0).seeds == (0,)  # one value
    with pytest.raises(DubitoError, match="--sizes must be integers"):
        ExploreConfig.flat(sizes=[5, "x"])


@dataclasses.dataclass
class _Inner:
    lr: float = 0.1


@dataclasses.dataclass
class _Clash:
    lr: float = 0.2
    inner: _Inner = nested(_Inner)


@dataclasses.dataclass
class _Owner:
    lr: float = 0.2
    inner: _Inner = nested(_Inner, omit=("lr",))  # the outer config sets it itself


def test_a_setting_declared_twice_is_refused_when_the_config_is_defined():
    with pytest.raises(TypeError, match=r"settings \['lr'\] are declared twice"):
        flat_fields(_Clash)
    assert list(flat_fields(_Owner)) == ["lr"] and from_flat(_Owner, {"lr": 0.3}).inner.lr == 0.1


def test_mlflow_params_keep_flat_names_and_comma_joined_lists():
    params = flatten_params(LabelConfig.flat(seeds=(0, 1), epochs=3))
    assert params["seeds"] == "0,1" and params["epochs"] == "3" and params["dataset"] == "synthetic-camvid"
    assert set(params) == set(flat_fields(LabelConfig))
    assert not any("." in name for name in params)
    assert flatten_params(ExploreConfig())["hidden"] == "64,64"


def test_a_ledger_written_with_flat_settings_resumes(tmp_path):
    assert LoopConfig().settings() == OLD_LEDGER_SETTINGS  # new ledgers at the defaults read the same
    out = tmp_path / "loop"
    out.mkdir()
    with Ledger(out / LEDGER, OLD_LEDGER_SETTINGS):
        pass
    with Ledger(out / LEDGER) as ledger:
        config = loop_config(out, ledger)
    assert config == LoopConfig(output=str(out))
    with Ledger(out / LEDGER, config.settings()):  # the same settings: accepted
        pass
    changed = LoopConfig.flat(output=str(out), weight_decay=0.0)  # a training setting the ledger lacks
    assert changed.settings()["weight_decay"] == 0.0
    with pytest.raises(DubitoError, match="weight_decay"), Ledger(out / LEDGER, changed.settings()):
        pass


def test_a_sweep_takes_nested_settings_by_their_flat_names():
    config = SweepConfig(
        kind="label",
        base={"dataset": "digits", "epochs": 1, "initial": 4, "query": 2, "rounds": 1, "samples": 2},
        grid=("weight_decay=0,0.001", "acquisition=bald,random"),
    )
    trials = config.trial_configs()
    assert len(trials) == 4
    assert {(t["weight_decay"], t["acquisition"]) for t in trials} == {
        (w, a) for w in (0.0, 0.001) for a in ("bald", "random")
    }
    loop = from_flat(LoopConfig, trials[0])
    assert loop.train.dataset == "digits" and loop.train.weight_decay in (0.0, 0.001)
    with pytest.raises(DubitoError, match="unknown label settings"):
        SweepConfig(kind="label", base={"patience": 3}).base_config()
    explore = SweepConfig(
        kind="explore", base={"episodes": 5, "sizes": "5", "seeds": "0"}, grid=("agent=dqn,bootstrapped",)
    )
    assert [t["agents"] for t in explore.trial_configs()] == ["dqn", "bootstrapped"]
    sources = SweepConfig(kind="label", base={"dataset": "digits"}, grid=("epistemic=dropout,ensemble:3",))
    loops = [from_flat(LoopConfig, t) for t in sources.trial_configs()]
    assert [(lp.epistemic, lp.scoring().members()) for lp in loops] == [("dropout", 1), ("ensemble:3", 3)]


def test_exploration_run_files_compare_their_agent_settings_as_values():
    from dubito.experiments.exploration import _same_settings

    current = {"episodes": 5, "agent_config": to_flat(AgentConfig(), text=True)}
    # typed with spaces, and written before a setting existed (it counts at its default)
    older = {"episodes": 5, "agent_config": {**current["agent_config"], "hidden": " 64 ,64"}}
    del older["agent_config"]["rnd_scale"]
    assert _same_settings(older, current)
    assert not _same_settings({**older, "episodes": 6}, current)
    changed = {**current, "agent_config": {**current["agent_config"], "kappa": 1.0}}
    assert not _same_settings(older, changed) and not _same_settings(None, current)
    # β is recorded as each agent runs it; records written when every agent held β = 3 resume where
    # that is still the agent's β, or where the agent has no prior
    from pathlib import Path

    from dubito.experiments.exploration import ExploreConfig, run_specs

    _, specs = run_specs(
        ExploreConfig.flat(agents="dqn,bootstrapped,epistemic", sizes="5", seeds="0"), Path("x")
    )
    assert [s["agent_config"]["prior_scale"] for s in specs] == [None, 3.0, 10.0]
    three = {"prior_scale": 3.0}
    resumes = {
        s["agent"]: _same_settings(
            {**s["settings"], "agent_config": {**s["agent_config"], **three}}, s["settings"], s["agent"]
        )
        for s in specs
    }
    assert resumes == {"dqn": True, "bootstrapped": True, "epistemic": False}


def test_the_depth_cap_goes_to_the_datasets_that_take_it():
    from dubito.platform.data import DATASETS, DatasetInfo

    assert DATASETS["make3d"].takes("max_depth") and DATASETS["synthetic-make3d"].takes("max_depth")

    class NoCap:
        def __init__(self, root, split="train", size=None, transform=None):
            pass

    assert not DatasetInfo("no-cap", NoCap, "depth", "disk").takes("max_depth")
    with pytest.raises(DubitoError, match="--max-depth must be > 1"):
        TrainConfig(dataset="synthetic-make3d", max_depth=1.0).validate()
    TrainConfig(dataset="synthetic-make3d", max_depth=30.0).validate()
