"""The ``dubito`` command. Each subcommand maps its flags onto a config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from dubito import DubitoError, __version__
from dubito.platform.config import flag, flat_fields, from_flat

__all__ = ["main", "add_config_arguments", "config_from_args"]


def add_config_arguments(
    parser: argparse.ArgumentParser, config_cls: type, exclude: Sequence[str] = ()
) -> None:
    """One ``--flag`` per setting of a config dataclass (but ``exclude``), nested configs'
    settings under their own names, typed and defaulted from it; a list setting is given as
    ``a,b,c``."""
    for name, f in flat_fields(config_cls).items():
        if name in exclude:
            continue
        if f.type is bool:
            parser.add_argument(
                flag(name), action=argparse.BooleanOptionalAction, default=f.default, help=f.help
            )
        else:
            is_list = f.is_list()
            parser.add_argument(
                flag(name),
                type=str if is_list else f.type,
                default=",".join(map(str, f.default)) if is_list and f.default is not None else f.default,
                metavar=name.upper(),
                help=f.help,
            )


def config_from_args(config_cls: type, args: argparse.Namespace):
    """The config object the flags describe (nested configs built from their flags)."""
    return from_flat(config_cls, {name: getattr(args, name) for name in flat_fields(config_cls)})


def _cmd_demo(args: argparse.Namespace) -> int:
    from dubito.experiments.demo import DemoConfig, format_summary, run_demo

    config = config_from_args(DemoConfig, args)
    results = run_demo(config, progress=not args.no_progress)
    print(format_summary(results["summary"]))
    print(
        f"\nwrote {config.output}/results.json and {config.output}/uncertainty.png; MLflow run {results['mlflow_run_id']}"
    )
    return 0


def _use_address(args: argparse.Namespace) -> None:
    """``--address``: the Ray cluster to attach to (else ``RAY_ADDRESS``, else a local instance)."""
    import os

    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address


def _cmd_train(args: argparse.Namespace) -> int:
    from dubito.platform.training import TrainConfig, train_with_ray

    _use_address(args)
    config = config_from_args(TrainConfig, args)
    if args.ensemble:
        return _train_ensemble(config, args)
    results = train_with_ray(config, progress=not args.no_progress)
    last = results["history"][-1] if results["history"] else {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("val_"))
    print(f"{results['epochs_run']} epochs; best epoch {results['best_epoch']}; last epoch: {shown}")
    print(
        f"wrote {results['model']}, {config.output}/results.json, {config.output}/training.png; "
        f"MLflow run {results['mlflow_run_id']}"
    )
    return 0


def _train_ensemble(config, args: argparse.Namespace) -> int:
    from dubito.platform.ensemble_training import train_ensemble

    results = train_ensemble(config, args.ensemble, progress=not args.no_progress)
    for m in results["member_results"]:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m["best"].items())
        print(
            f"member {m['member']} (seed {m['seed']}): best epoch {m['best_epoch']} of {m['epochs_run']}: {shown}"
        )
    shown = ", ".join(f"{k} {v:.4f}" for k, v in results["ensemble_validation"].items())
    print(f"ensemble of {results['members']} (mean prediction): {shown}")
    print(
        f"wrote {results['model']}, {config.output}/results.json, {config.output}/training.png; "
        f"MLflow run {results['mlflow_run_id']} (one child run per member)"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dubito.platform.evaluation import EvalConfig, evaluate, format_evaluation

    config = config_from_args(EvalConfig, args)
    results = evaluate(config, progress=not args.no_progress)
    print(format_evaluation(results))
    print(f"\nwrote {config.output}/results.json and plots; MLflow run {results['mlflow_run_id']}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from dubito.experiments.reproduce import ReproduceConfig, format_tables, run_reproduce

    config = config_from_args(ReproduceConfig, args)
    results = run_reproduce(config, progress=not args.no_progress)
    print(format_tables(results))
    print(
        f"wrote {config.output}/tables.md, {config.output}/results.json and the plots ({results['seconds']:.0f} s)"
    )
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    if getattr(args, "label_command", None) == "export":
        return _cmd_label_export(args)
    if getattr(args, "label_command", None) == "import":
        return _cmd_label_import(args)
    from dubito.experiments.labeling_budget import LabelConfig, format_labeling, run_labeling
    from dubito.platform.tracking import default_tracking_uri

    _use_address(args)
    config = config_from_args(LabelConfig, args)
    results = run_labeling(config, progress=not args.no_progress)
    print(format_labeling(results))
    waiting = [k for k, v in results["loops"].items() if not v["finished"]]
    if waiting and config.loop.oracle == "human":
        loop = results["loops"][waiting[0]]["output"]
        print(
            f"waiting for labels: label the images in {loop}/queries/, then `dubito label import --output {loop} "
            "--labels FOLDER` and run this command again"
        )
    plots = ", ".join(results.get("plots", []))
    print(
        f"wrote {config.output}/results.json, {config.output}/tables.md{', ' + plots if plots else ''} "
        f"({results['seconds']:.0f} s); MLflow: {default_tracking_uri()} (parent run {results['mlflow_parent_run_id']})"
    )
    return 0


def _cmd_label_export(args: argparse.Namespace) -> int:
    from dubito.acquisition.human import export_waiting

    output = Path(args.loop_output)
    folder, waiting = export_waiting(output, args.to)
    if not waiting:
        print(f"{output}: no image is waiting for a label")
        return 0
    print(f"wrote {len(waiting)} images and queries.json to {folder}")
    return 0


def _cmd_label_import(args: argparse.Namespace) -> int:
    from dubito.acquisition.human import import_labels

    ids, missing = import_labels(args.loop_output, args.labels)
    print(f"imported {len(ids)} labels into {args.loop_output}")
    if missing:
        shown = ", ".join(str(i) for i in missing[:20]) + (" ..." if len(missing) > 20 else "")
        print(
            f"{len(missing)} image(s) still wait for a label: ids {shown}; import their files to continue",
            file=sys.stderr,
        )
        return 1
    print("every label is in: run the same `dubito label` command again to continue")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from dubito.platform.data.check import check_dataset
    from dubito.platform.files import check_output, exclusive

    if args.output:  # refused before the (long) check, not after it
        check_output(args.output)
    report = check_dataset(args.dataset, args.root, task=args.task, progress=not args.no_progress)
    print(report.format())
    if args.output:
        with exclusive(args.output):
            paths = report.save(args.output)
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0 if report.ok else 1


def _cmd_data_show(args: argparse.Namespace) -> int:
    from dubito.platform.data import dataset_info, get_dataset
    from dubito.platform.files import check_output
    from dubito.platform.plots import samples_figure

    if args.count < 1:
        raise DubitoError(f"--count must be >= 1, got {args.count}")
    check_output(args.output)
    options = {"normalize": None}
    if args.size:
        options["size"] = tuple(args.size)
    if dataset_info(args.dataset).synthetic:
        options.update(seed=args.seed, n=max(args.count, 1), ood=args.ood)
    dataset = get_dataset(args.dataset, args.split, args.root, **options)
    if len(dataset) == 0:
        raise DubitoError(f"{args.dataset} {args.split}: no items to show")
    items = [dataset[i] for i in range(min(args.count, len(dataset)))]
    path = samples_figure(
        items, Path(args.output) / f"{args.dataset}-{args.split}{'-ood' if args.ood else ''}.png"
    )
    print(f"wrote {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from dubito.platform.service import default_device
    from dubito.platform.tracking import default_tracking_uri

    print(f"dubito {__version__}")
    print(f"torch {torch.__version__}; default device {default_device()}")
    print(f"MLflow tracking URI {default_tracking_uri()}")
    return 0


def _cmd_explore(args: argparse.Namespace) -> int:
    from dubito.experiments.exploration import ExploreConfig, format_exploration, run_exploration

    config = config_from_args(ExploreConfig, args)
    results = run_exploration(config, progress=not args.no_progress)
    print(format_exploration(results))
    print(
        f"wrote {config.output}/results.json, tables.md and the plots ({results['seconds']:.0f} s); "
        f"MLflow run {results['mlflow_parent_run_id']}"
    )
    return 0


_SWEEP_EXCLUDE = {
    "label": ("output", "experiment"),
    "explore": ("output", "experiment", "workers"),
    "train": ("output", "experiment"),
}


def _cmd_sweep(args: argparse.Namespace) -> int:
    from dubito.experiments.sweep import SweepConfig, format_sweep, run_sweep
    from dubito.platform.tracking import default_tracking_uri

    _use_address(args)
    if args.resume:
        if args.kind:
            raise DubitoError(
                "--resume DIR continues the sweep in DIR with its own settings: give no KIND or flags"
            )
        results = run_sweep(resume=args.resume, progress=not args.no_progress)
        output = args.resume
    else:
        if not args.kind:
            raise DubitoError("give a sweep kind (label, explore, train) or --resume DIR")
        target = SweepConfig(kind=args.kind).target()
        base = {
            name: getattr(args, name) for name in flat_fields(target) if name not in _SWEEP_EXCLUDE[args.kind]
        }
        sweep = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(SweepConfig)
            if f.name not in ("kind", "base", "grid", "sample")
        }
        config = SweepConfig(
            kind=args.kind, grid=tuple(args.grid or ()), sample=tuple(args.sample or ()), base=base, **sweep
        )
        results = run_sweep(config, progress=not args.no_progress)
        output = config.output
    print(format_sweep(results))
    print(
        f"wrote {output}/results.json, tables.md{', curves.png' if results['plots'] else ''} ({results['seconds']:.0f} s); "
        f"MLflow: {default_tracking_uri()} (parent run {results['mlflow_parent_run_id']})"
    )
    return 1 if results["errors"] else 0


def _add_sweep_command(sub) -> None:
    from dubito.experiments.sweep import KINDS, SweepConfig

    sweep = sub.add_parser(
        "sweep",
        help="Ray Tune sweep over labeling loops, exploration runs or training runs (MLflow parent + child per trial)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sweep.add_argument(
        "--resume",
        metavar="DIR",
        help="restore the interrupted sweep in DIR (its unfinished and errored trials continue)",
    )
    sweep.add_argument(
        "--address", help="Ray cluster to attach to (default: RAY_ADDRESS, else a local instance)"
    )
    sweep.add_argument("--no-progress", action="store_true", help="hide Tune's progress table")
    sweep.set_defaults(func=_cmd_sweep, kind=None)
    kinds = sweep.add_subparsers(dest="kind", required=False, metavar="{" + ",".join(KINDS) + "}")
    helps = {
        "label": "labeling loops (one acquisition x seed x ... per trial)",
        "explore": "exploration runs (one agent x size x seed per trial)",
        "train": "training runs (learning rate x dropout x ...)",
    }
    for kind in KINDS:
        p = kinds.add_parser(kind, help=helps[kind], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        group = p.add_argument_group("sweep")
        fields = {f.name: f for f in dataclasses.fields(SweepConfig)}
        group.add_argument(
            "--grid", action="append", metavar="FIELD=V1,V2", help=fields["grid"].metadata["help"]
        )
        group.add_argument(
            "--sample", action="append", metavar="FIELD=DIST", help=fields["sample"].metadata["help"]
        )
        for name, f in fields.items():
            if name in ("kind", "base", "grid", "sample"):
                continue
            group.add_argument(
                "--" + name.replace("_", "-"),
                type=type(f.default),
                default=f.default,
                metavar=name.upper(),
                help=f.metadata.get("help"),
            )
        add_config_arguments(
            p.add_argument_group(f"shared settings of every trial (the {kind} flags)"),
            SweepConfig(kind=kind).target(),
            exclude=_SWEEP_EXCLUDE[kind],
        )
        # given before or after KIND: SUPPRESS keeps the sweep parser's value when absent here
        p.add_argument(
            "--address",
            default=argparse.SUPPRESS,
            help="Ray cluster to attach to (default: RAY_ADDRESS, else a local instance)",
        )
        p.add_argument(
            "--no-progress", action="store_true", default=argparse.SUPPRESS, help="hide Tune's progress table"
        )


def _config_command(sub, name: str, help: str, config_cls: type, func) -> argparse.ArgumentParser:
    """A subcommand whose flags are the fields of ``config_cls``, plus ``--no-progress``."""
    parser = sub.add_parser(name, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser, config_cls)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from dubito.experiments.demo import DemoConfig
    from dubito.experiments.exploration import ExploreConfig
    from dubito.experiments.labeling_budget import LabelConfig
    from dubito.experiments.reproduce import ReproduceConfig
    from dubito.platform.evaluation import EvalConfig
    from dubito.platform.training import TrainConfig

    parser = argparse.ArgumentParser(prog="dubito", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dubito {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _config_command(
        sub,
        "demo",
        "train the tiny FC-DenseNet on synthetic scenes and print aleatoric/epistemic summaries",
        DemoConfig,
        _cmd_demo,
    )
    train = _config_command(
        sub,
        "train",
        "train a model under Ray Train (resumes from --output/checkpoint.pt); MLflow-tracked",
        TrainConfig,
        _cmd_train,
    )
    train.add_argument(
        "--address", help="with --workers N: the Ray cluster (default: RAY_ADDRESS, else a local instance)"
    )
    train.add_argument(
        "--ensemble",
        type=int,
        default=0,
        metavar="K",
        help="train a deep ensemble of K members with distinct seeds into OUTPUT/member-k (each resumable; "
        "with --workers N as N parallel Ray tasks); OUTPUT/model.pt holds them all",
    )
    _config_command(
        sub,
        "evaluate",
        "metrics, calibration, uncertainty quality and OOD detection of a trained model",
        EvalConfig,
        _cmd_evaluate,
    )
    _config_command(
        sub,
        "reproduce",
        "the paper's studies (variants, training-set size, OOD, calibration) on any dataset",
        ReproduceConfig,
        _cmd_reproduce,
    )
    label = _config_command(
        sub,
        "label",
        "labeling-budget experiment: acquisitions x seeds of the pool-based loop (resumable)",
        LabelConfig,
        _cmd_label,
    )
    label.add_argument(
        "--address",
        help="with --scorers N / --member-workers N: the Ray cluster (default: RAY_ADDRESS, else a local instance)",
    )
    human = label.add_subparsers(
        dest="label_command",
        required=False,
        metavar="{export,import}",
        title="human in the loop (--oracle human)",
    )
    export = human.add_parser("export", help="write the images waiting for labels, with queries.json")
    export.add_argument(
        "--output", dest="loop_output", required=True, help="the loop's folder (holds ledger.sqlite)"
    )
    export.add_argument("--to", help="folder to write (default: OUTPUT/queries/pending)")
    imp = human.add_parser(
        "import", help="check and store returned label files (<id>_label.png / .npy / .txt)"
    )
    imp.add_argument(
        "--output", dest="loop_output", required=True, help="the loop's folder (holds ledger.sqlite)"
    )
    imp.add_argument("--labels", required=True, help="folder with the label files")
    _config_command(
        sub,
        "explore",
        "exploration study: agents x sizes x seeds on Deep Sea or the noisy TV (resumable)",
        ExploreConfig,
        _cmd_explore,
    )
    _add_sweep_command(sub)
    data = sub.add_parser("data", help="check or look at a dataset").add_subparsers(
        dest="data_command", required=True
    )
    check = data.add_parser(
        "check",
        help="read every file of a real dataset, print a summary, list bad files (exit 1 if any)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    check.add_argument("dataset", choices=("camvid", "make3d", "nyuv2"))
    check.add_argument("--root", required=True, help="folder that holds the dataset in its published layout")
    check.add_argument(
        "--task",
        choices=("depth", "segmentation"),
        help="NYUv2 only (default: segmentation when classMapping40.mat is present)",
    )
    check.add_argument("--output", help="also write results.json and a histogram PNG here")
    check.add_argument("--no-progress", action="store_true", help="hide progress bars")
    check.set_defaults(func=_cmd_data_check)
    show = data.add_parser(
        "show",
        help="plot a few items (image, target, mask, known noise)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    show.add_argument(
        "dataset", choices=("camvid", "make3d", "nyuv2", "synthetic-camvid", "synthetic-make3d")
    )
    show.add_argument("--root", help="dataset folder (real datasets)")
    show.add_argument("--split", default="train")
    show.add_argument("--count", type=int, default=4, help="items to show")
    show.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize to H W")
    show.add_argument("--seed", type=int, default=0, help="synthetic datasets: seed")
    show.add_argument(
        "--ood", action="store_true", help="synthetic datasets: the out-of-distribution (indoor) variant"
    )
    show.add_argument("--output", default="runs/data", help="folder for the PNG")
    show.set_defaults(func=_cmd_data_show)
    info = sub.add_parser("info", help="versions, default device and tracking URI")
    info.set_defaults(func=_cmd_info)
    return parser


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM ends a command like Ctrl-C: MLflow runs are marked KILLED, locks released, and the
    same command resumes."""
    raise KeyboardInterrupt(f"signal {signum}")


def _error(message: str) -> int:
    print(f"dubito: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``dubito`` command. Errors dubito raises on purpose, file-system errors, damaged
    files and SQLite errors end with one line naming the path and what to do (exit 2);
    ``DUBITO_DEBUG=1`` shows the traceback instead."""
    import os
    import signal
    import sqlite3

    from dubito.platform.files import describe_os_error

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("DUBITO_DEBUG", "") not in ("", "0")
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(
            "dubito: interrupted; what was recorded is kept: run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except DubitoError as err:
        if debug:
            raise
        return _error(str(err))
    except OSError as err:
        if debug:
            raise
        return _error(describe_os_error(err))
    except sqlite3.Error as err:
        if debug:
            raise
        return _error(
            f"SQLite: {err} (a ledger or tracking database is damaged or locked; DUBITO_DEBUG=1 shows where)"
        )
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
