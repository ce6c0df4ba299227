"""PPOPolicy: a PPO actor trained in :class:`~rtlm_adapt.envs.ServingEnv`, as a Policy.

Deployed inference needs neither gymnasium nor stable-baselines3: :meth:`PPOPolicy.load` reads the
actor's weights out of the SB3 ``model.zip`` (``policy.pth``, with torch) into numpy, and
``decide`` is three small matrix products — a few microseconds — followed by the same
:class:`~rtlm_adapt.policies.action_space.KnobsActionMap` the environment uses. The deterministic
action (the Gaussian's mean, clipped to [-1, 1]) is what SB3's ``predict(deterministic=True)``
returns.

With ``online=True`` the policy keeps learning from the live loop (see
:class:`~rtlm_adapt.policies.ppo_online.OnlinePPO`), and a
:class:`~rtlm_adapt.policies.ppo_online.PerformanceGuard` hands the knobs to the RT-LM heuristic
whenever the learned policy's recent performance falls below the heuristic's.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> layers = [(rng.normal(size=(8, 11)), np.zeros(8)), (rng.normal(size=(6, 8)), np.zeros(6))]
>>> policy = PPOPolicy(MLPActor(layers))
>>> policy.actor(np.zeros(11, dtype=np.float32)).shape
(6,)
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path
from typing import Any

from rtlm_adapt.knobs import Knobs
from rtlm_adapt.observation import Observation

from .action_space import OBS_HIGH, OBS_LOW, KnobsActionMap, observation_array
from .heuristic import RTLMHeuristic
from .mlp_actor import ACTIVATIONS, MLPActor
from .ppo_online import SOURCES, PerformanceGuard, epoch_cost


def _activation_from_data(data: dict[str, Any]) -> str:
    """The activation named in a saved model's policy_kwargs (SB3's default: Tanh)."""
    fn = data.get("policy_kwargs", {}).get("activation_fn")
    if fn is None:
        return "Tanh"
    # SB3 stores classes cloudpickled by reference: the class name is in the pickle's bytes.
    blob = base64.b64decode(fn.get(":serialized:", "")) if isinstance(fn, dict) else b""
    for name in ACTIVATIONS:
        if name.encode() in blob:
            return name
    raise ValueError(f"unsupported activation_fn in the saved model: {fn!r:.80}")


def _trained_with_secondary(model_path: Path) -> bool:
    """From the training's config.json beside the model (ppo_train writes it); default True."""
    config = model_path.parent / "config.json"
    if not config.is_file():
        return True
    try:
        env = json.loads(config.read_text()).get("env", {})
    except (json.JSONDecodeError, AttributeError):
        return True
    return env.get("secondary_profile", "default") is not None


class PPOPolicy:
    """A trained PPO actor behind the Policy protocol (``name``, ``length_source``,
    ``consolidate``, ``decide``).

    Parameters
    ----------
    actor
        The numpy actor (see :meth:`load`).
    name
        Policy name in tables.
    action_map
        Must match the environment the actor was trained in (the default does).
    guard
        Optional :class:`PerformanceGuard`; with it, ``decide`` hands over to ``fallback``
        whenever the guard judges the learned policy worse.
    fallback
        The policy to fall back to (default: :class:`RTLMHeuristic`).
    online
        Optional :class:`~rtlm_adapt.policies.ppo_online.OnlinePPO` learner: ``decide`` then
        samples exploratory actions from it and it updates the actor periodically.
    trained_with_secondary
        Whether the training environment had a secondary executor. A policy trained with one
        leans on offloading (and caps the primary's batch accordingly); where the controller has
        no secondary that is outside what it learned, so ``decide`` defers to ``fallback``.
        :meth:`load` reads it from the training's ``config.json`` beside the model, if any.
    """

    length_source = "predicted"
    consolidate = True

    def __init__(
        self,
        actor: MLPActor,
        *,
        name: str = "ppo",
        action_map: KnobsActionMap | None = None,
        guard: PerformanceGuard | None = None,
        fallback: Any = None,
        online: Any = None,
        trained_with_secondary: bool = True,
    ) -> None:
        self.actor = actor
        self.name = name
        self.action_map = action_map or KnobsActionMap()
        if actor.action_size != self.action_map.size:
            raise ValueError(
                f"the actor outputs {actor.action_size} numbers, the action map takes "
                f"{self.action_map.size}"
            )
        self.guard = guard
        self.fallback = fallback if fallback is not None else RTLMHeuristic()
        self.online = online
        self.trained_with_secondary = trained_with_secondary
        self._last_obs: Observation | None = None
        self._last_source = "learned"

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, online: bool = False, **kwargs: Any) -> PPOPolicy:
        """Load the actor of an SB3 PPO ``model.zip``.

        Needs torch (to read ``policy.pth``) but not gymnasium or stable-baselines3, unless
        ``online=True``, which loads the whole SB3 model to keep training it. Other keyword
        arguments go to the constructor (``guard``, ``fallback``, ``name``, ...).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved PPO model at {path}")
        if online:
            from .ppo_online import OnlinePPO

            learner = OnlinePPO.load(path)
            kwargs.setdefault("guard", PerformanceGuard())
            kwargs.setdefault("trained_with_secondary", _trained_with_secondary(path))
            return cls(learner.actor(), online=learner, **kwargs)
        import torch

        try:
            with zipfile.ZipFile(path) as z:
                state = torch.load(io.BytesIO(z.read("policy.pth")), weights_only=True)
                data = json.loads(z.read("data"))
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ValueError(f"{path} is not a stable-baselines3 model zip ({exc})") from None
        kwargs.setdefault("trained_with_secondary", _trained_with_secondary(path))
        return cls(MLPActor.from_state_dict(state, _activation_from_data(data)), **kwargs)

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> PPOPolicy:
        """From a live SB3 PPO model (e.g. inside a training callback)."""
        state = model.policy.state_dict()
        activation = getattr(model.policy, "activation_fn", None)
        name = activation.__name__ if activation is not None else "Tanh"
        return cls(MLPActor.from_state_dict(state, name), **kwargs)

    # -- Policy protocol -----------------------------------------------------------------------
    def decide(self, observation: Observation) -> Knobs:
        """Knobs for the next epoch: the learned actor's, or the fallback's if the guard says so."""
        source = "learned"
        if self.trained_with_secondary and observation.secondary_max_batch == 0:
            self._last_source = "fallback"
            return self.fallback.decide(observation)
        if self.guard is not None or self.online is not None:
            if self._last_obs is not None:
                cost = epoch_cost(self._last_obs, observation)
                if self.guard is not None and self._last_source in SOURCES:
                    self.guard.record(self._last_source, cost)
                if self.online is not None and self._last_source == "learned":
                    self.online.record_reward(-cost)
            self._last_obs = observation
            if self.guard is not None:
                source = self.guard.choose()
        self._last_source = source
        if source != "learned":
            if self.online is not None:
                self.online.interrupt()  # the fallback's epochs are not the learner's transitions
            return self.fallback.decide(observation)
        if self.online is not None:
            action = self.online.act(observation_array(observation))
            if self.online.updated:
                self.actor = self.online.actor()
        else:
            # the hot path: plain floats in, plain floats out; clipping happens in to_knobs
            vec = [min(OBS_HIGH, max(OBS_LOW, v)) for v in observation.as_vector()]
            action = self.actor.mean(vec).tolist()
        return self.action_map.to_knobs(action, max(1, observation.primary_max_batch))

    def __repr__(self) -> str:
        return f"PPOPolicy(name={self.name!r}, layers={len(self.actor.layers)})"
