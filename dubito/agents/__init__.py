"""Agents: gymnasium environments and uncertainty-driven RL agents.

Importing ``dubito.agents`` registers ``dubito/DeepSea-v0``, ``dubito/DeepSeaStochastic-v0`` and
``dubito/NoisyTV-v0`` with gymnasium. Agents (:data:`AGENTS`) share one replay buffer, one training
loop (:func:`run_episodes`), the platform's networks and its UncertaintyService.
It uses only ``dubito.platform``.
"""

from dubito.agents.agents import AGENTS, Agent, AgentConfig, make_agent
from dubito.agents.envs import ENV_IDS, DeepSea, NoisyTV, optimal_return, register_envs
from dubito.agents.loop import EpisodeLog, run_episodes
from dubito.agents.replay import ReplayBuffer

register_envs()

__all__ = [
    "AGENTS",
    "Agent",
    "AgentConfig",
    "make_agent",
    "ENV_IDS",
    "DeepSea",
    "NoisyTV",
    "optimal_return",
    "register_envs",
    "EpisodeLog",
    "run_episodes",
    "ReplayBuffer",
]
