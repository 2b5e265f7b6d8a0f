"""Experiments: the studies users run, each a config dataclass plus a run function.

Present now: :mod:`dubito.experiments.demo`."""
