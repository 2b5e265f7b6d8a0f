"""The ``dubito`` command. Each subcommand maps its flags onto a config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence

from dubito import DubitoError, __version__

__all__ = ["main", "add_config_arguments", "config_from_args"]


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One ``--flag`` per field of a config dataclass, typed and defaulted from it."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        kind = hints[field.name]
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=field.metadata.get("help"))
        else:
            parser.add_argument(flag, type=kind, default=default, metavar=field.name.upper(), help=field.metadata.get("help", " "))


def config_from_args(config_cls: type, args: argparse.Namespace):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def _cmd_demo(args: argparse.Namespace) -> int:
    from dubito.experiments.demo import DemoConfig, format_summary, run_demo

    config = config_from_args(DemoConfig, args)
    results = run_demo(config, progress=not args.no_progress)
    print(format_summary(results["summary"]))
    print(f"\nwrote {config.output}/results.json and {config.output}/uncertainty.png; MLflow run {results['mlflow_run_id']}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from dubito.platform.service import default_device
    from dubito.platform.tracking import default_tracking_uri

    print(f"dubito {__version__}")
    print(f"torch {torch.__version__}; default device {default_device()}")
    print(f"MLflow tracking URI {default_tracking_uri()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dubito.experiments.demo import DemoConfig

    parser = argparse.ArgumentParser(prog="dubito", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dubito {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train the tiny FC-DenseNet on synthetic scenes and print aleatoric/epistemic summaries",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_arguments(demo, DemoConfig)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_cmd_demo)
    info = sub.add_parser("info", help="versions, default device and tracking URI")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DubitoError as err:
        print(f"dubito: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
