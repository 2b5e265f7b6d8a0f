"""Acquisition: which images to label next.

- :mod:`~dubito.acquisition.functions`: acquisition scores from the uncertainty service's objects
  (``get_acquisition(name)``: random, entropy, bald, variation_ratio, margin, least_confidence,
  aleatoric, epistemic, total_variance);
- :mod:`~dubito.acquisition.reductions`: pixel → image (mean, max, top-q, class-balanced, grid);
- :mod:`~dubito.acquisition.selection`: batches (top-k, power, softmax, k-center, BatchBALD);
- :mod:`~dubito.acquisition.loop` and :mod:`~dubito.acquisition.ledger`: the resumable pool-based
  labeling loop and its SQLite ledger;
- :mod:`~dubito.acquisition.modal`: query strategies and an estimator for modAL's ActiveLearner.

It uses only ``dubito.platform``.
"""

from dubito.acquisition.functions import ACQUISITIONS, Acquisition, get_acquisition
from dubito.acquisition.ledger import Ledger
from dubito.acquisition.loop import LoopConfig, run_loop
from dubito.acquisition.reductions import REDUCTIONS, parse_reduction, reduce_scores
from dubito.acquisition.selection import SELECTIONS, select

__all__ = [
    "ACQUISITIONS", "Acquisition", "get_acquisition", "REDUCTIONS", "parse_reduction", "reduce_scores",
    "SELECTIONS", "select", "Ledger", "LoopConfig", "run_loop",
]  # fmt: skip
