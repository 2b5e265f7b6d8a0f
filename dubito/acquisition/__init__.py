"""Acquisition: which images to label next.

- :mod:`~dubito.acquisition.functions`: acquisition scores from the uncertainty service's objects
  (``get_acquisition(name)``: random, entropy, bald, variation_ratio, margin, least_confidence,
  aleatoric, epistemic, total_variance);
- :mod:`~dubito.acquisition.reductions`: pixel → image (mean, max, top-q, class-balanced, grid);
- :mod:`~dubito.acquisition.selection`: batches (top-k, power, softmax, k-center, BatchBALD);
- :mod:`~dubito.acquisition.scoring`: one path from the service to scores and a selection, for
  the loop, its Ray scorer (:mod:`~dubito.acquisition.distributed`) and the modAL strategy;
- :mod:`~dubito.acquisition.pool`: the pool's datasets and its position ↔ id translation;
- :mod:`~dubito.acquisition.loop`, :mod:`~dubito.acquisition.config` and
  :mod:`~dubito.acquisition.ledger`: the resumable pool-based labeling loop, its settings and its
  SQLite ledger; :mod:`~dubito.acquisition.human`: a person as the oracle (export / import);
- :mod:`~dubito.acquisition.modal`: query strategies and an estimator for modAL's ActiveLearner.

Acquisitions, reductions and selections are registries users extend without editing dubito:
``register_acquisition``, ``register_reduction``, ``register_selection``, or entry points of the
groups ``dubito.acquisitions``, ``dubito.reductions``, ``dubito.selections``.

It uses only ``dubito.platform``.
"""

from dubito.acquisition.config import LoopConfig
from dubito.acquisition.functions import ACQUISITIONS, Acquisition, get_acquisition, register_acquisition
from dubito.acquisition.ledger import Ledger
from dubito.acquisition.loop import run_loop
from dubito.acquisition.reductions import (
    REDUCTIONS,
    Reduction,
    parse_reduction,
    reduce_scores,
    register_reduction,
)
from dubito.acquisition.selection import SELECTIONS, Selection, register_selection, select

__all__ = [
    "ACQUISITIONS",
    "Acquisition",
    "get_acquisition",
    "register_acquisition",
    "REDUCTIONS",
    "Reduction",
    "parse_reduction",
    "reduce_scores",
    "register_reduction",
    "SELECTIONS",
    "Selection",
    "register_selection",
    "select",
    "Ledger",
    "LoopConfig",
    "run_loop",
]
