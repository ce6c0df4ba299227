"""Gymnasium environments over the serving loop (installed as ``rtlm_adapt.envs``).

Importing this package registers ``rtlm_adapt/Serving-v0``::

    import gymnasium as gym
    import rtlm_adapt.envs  # noqa: F401
    env = gym.make("rtlm_adapt/Serving-v0", load=(0.7, 1.0), n_requests=100)
"""

from gymnasium.envs.registration import register, registry

from .episodes import EpisodeSampler
from .serving_env import ServingEnv

ENV_ID = "rtlm_adapt/Serving-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="rtlm_adapt.envs.serving_env:ServingEnv")

__all__ = ["ENV_ID", "EpisodeSampler", "ServingEnv"]
