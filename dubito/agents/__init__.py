"""Agents: gymnasium environments and uncertainty-driven RL agents.

Not built yet: see the exploration issue. It uses only ``dubito.platform``."""
