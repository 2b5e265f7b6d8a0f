"""dubito: Bayesian deep learning uncertainties turned into decisions.

The package has four parts (see docs/architecture.md): ``dubito.platform`` (the uncertainty
service), ``dubito.acquisition`` (what to label next), ``dubito.agents`` (where to
explore) and ``dubito.experiments`` (the studies users run).
"""

from __future__ import annotations

__version__ = "0.1.0"


class DubitoError(Exception):
    """Base class of every error dubito raises on purpose (bad input, bad config, bad files)."""


__all__ = ["DubitoError", "__version__"]
