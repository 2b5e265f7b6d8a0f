"""Acquisition: which images to label next (acquisition functions, reductions, batch
selection, the pool-based labeling loop and its ledger, the modAL adapter).

Not built yet: see the acquisition issue. It uses only ``dubito.platform``."""
