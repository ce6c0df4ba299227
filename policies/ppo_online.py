"""Online learning for the PPO policy, and the guard that keeps it honest.

- :func:`epoch_cost`: what one scheduling epoch cost, read off two consecutive observations —
  requests in the system times the epoch's length, in units of the mean service time. It is the
  live counterpart of :class:`~rtlm_adapt.envs.ServingEnv`'s reward (whose episode sum is the
  total response time), so the online learner optimises what the environment trained for.
- :class:`~rtlm_adapt.policies.ppo_guard.PerformanceGuard` (re-exported here): compares the
  learned policy with the heuristic online and hands the knobs back when it does worse.
- :class:`OnlinePPO`: collects (observation, action, reward) transitions from the live controller
  into an SB3 rollout buffer and runs a PPO update every ``n_steps`` decisions. Needs
  stable-baselines3 (and hence gymnasium) loaded, unlike plain inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rtlm_adapt.observation import Observation

from .mlp_actor import MLPActor
from .ppo_guard import SOURCES, PerformanceGuard

__all__ = ["SOURCES", "OnlinePPO", "PerformanceGuard", "epoch_cost"]


def epoch_cost(prev: Observation, cur: Observation) -> float:
    """Requests in the system during ``[prev.now, cur.now)`` times its length, over the mean
    isolated service time (0 for an empty or zero-length epoch)."""
    dt = cur.now - prev.now
    if dt <= 0:
        return 0.0
    in_system = prev.queue_length + prev.primary_running + prev.secondary_running
    svc = cur.service_time_s if cur.service_time_s > 0 else 1.0
    return in_system * dt / svc


class OnlinePPO:
    """Keeps training a saved SB3 PPO model on transitions from the live loop.

    Parameters
    ----------
    model
        A ``stable_baselines3.PPO`` model (see :meth:`load`).
    n_steps
        Decisions per update (the rollout length); the update is SB3's own ``PPO.train``.
    """

    def __init__(self, model: Any, n_steps: int = 128) -> None:
        from stable_baselines3.common.buffers import RolloutBuffer
        from stable_baselines3.common.logger import configure

        self.model = model
        model.set_logger(configure(None, []))  # updates log nowhere unless the caller sets one
        self.buffer = RolloutBuffer(
            n_steps, model.observation_space, model.action_space, device=model.device,
            gamma=model.gamma, gae_lambda=model.gae_lambda, n_envs=1,
        )
        self.version = 0
        self.updates = 0
        self._pending: tuple[np.ndarray, np.ndarray, Any, Any] | None = None
        self._episode_start = True
        self._seen_version = 0

    @classmethod
    def load(cls, path: str | Path, n_steps: int = 128) -> OnlinePPO:
        from stable_baselines3 import PPO

        return cls(PPO.load(str(path), device="cpu"), n_steps=n_steps)

    @property
    def updated(self) -> bool:
        """True once after each update (the caller then refreshes its numpy actor)."""
        fresh = self.version != self._seen_version
        self._seen_version = self.version
        return fresh

    def actor(self) -> MLPActor:
        activation = getattr(self.model.policy, "activation_fn", None)
        name = activation.__name__ if activation is not None else "Tanh"
        return MLPActor.from_state_dict(self.model.policy.state_dict(), name)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Sample an exploratory action for ``obs`` (and update first if a rollout is full)."""
        import torch

        if self.buffer.full:
            self._update(obs)
        with torch.no_grad():
            actions, values, log_probs = self.model.policy(torch.as_tensor(obs[None]))
        action = actions.cpu().numpy()
        self._pending = (obs[None], action, values, log_probs)
        return np.clip(action[0], -1.0, 1.0)

    def record_reward(self, reward: float) -> None:
        """The reward of the last action taken (call before the next ``act``)."""
        if self._pending is None:
            return
        obs, action, values, log_probs = self._pending
        self.buffer.add(obs, action, np.array([reward], dtype=np.float32),
                        np.array([self._episode_start]), values, log_probs)
        self._episode_start = False
        self._pending = None

    def interrupt(self) -> None:
        """Another policy decided in between: the next transition starts a new episode."""
        self._pending = None
        self._episode_start = True

    def _update(self, next_obs: np.ndarray) -> None:
        import torch

        with torch.no_grad():
            last_values = self.model.policy.predict_values(torch.as_tensor(next_obs[None]))
        self.buffer.compute_returns_and_advantage(last_values=last_values, dones=np.array([False]))
        self.model.rollout_buffer = self.buffer
        self.model.train()  # SB3's PPO update: clipped surrogate, n_epochs minibatch passes
        self.model.policy.set_training_mode(False)
        self.buffer.reset()
        self.updates += 1
        self.version += 1
