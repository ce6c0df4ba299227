"""MLPActor: the deterministic actor of a stable-baselines3 ``MlpPolicy``, in numpy.

Inference needs neither torch nor stable-baselines3: the weights are read once (from a saved
model or a live SB3 policy's state dict) and ``decide`` is a few small matrix products.

>>> import numpy as np
>>> actor = MLPActor([(np.eye(2), np.zeros(2)), (np.array([[2.0, 0.0]]), np.zeros(1))])
>>> actor(np.array([0.1, 0.5])).round(3)
array([0.199])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Hidden-layer activations an actor may use, by the name SB3 gives their torch class.
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Tanh": np.tanh,
    "ReLU": lambda x: np.maximum(x, 0.0),
}


class MLPActor:
    """The deterministic actor of an SB3 ``MlpPolicy`` in numpy: hidden layers, then the mean.

    Parameters
    ----------
    layers
        ``(weight, bias)`` per linear layer, the last one being SB3's ``action_net``.
    activation
        ``"Tanh"`` (SB3's PPO default) or ``"ReLU"``, applied after every hidden layer.
    """

    def __init__(
        self, layers: Sequence[tuple[np.ndarray, np.ndarray]], activation: str = "Tanh"
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unsupported activation {activation!r}; expected one of {list(ACTIVATIONS)}"
            )
        if not layers:
            raise ValueError("MLPActor needs at least one layer")
        # float64 is as fast as float32 at this size and avoids casting on every call
        self.layers = [
            (np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64)) for w, b in layers
        ]
        self.activation = activation
        self._act = ACTIVATIONS[activation]
        self.obs_size = self.layers[0][0].shape[1]
        self.action_size = self.layers[-1][0].shape[0]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """The action in [-1, 1]^k for one observation vector (SB3's deterministic predict)."""
        return np.minimum(np.maximum(self.mean(obs), -1.0), 1.0)

    def mean(self, obs: np.ndarray | list[float]) -> np.ndarray:
        """The Gaussian's mean, unclipped (the action map clips; np.clip costs microseconds)."""
        x = np.asarray(obs, dtype=np.float64)
        for w, b in self.layers[:-1]:
            x = self._act(w @ x + b)
        w, b = self.layers[-1]
        return w @ x + b

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], activation: str = "Tanh") -> MLPActor:
        """From an SB3 ActorCriticPolicy state dict (``mlp_extractor.policy_net.*``,
        ``action_net``); tensors or arrays."""

        def arr(key: str) -> np.ndarray:
            value = state[key]
            return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)

        prefix = "mlp_extractor.policy_net."
        indices = sorted(
            {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
        )
        layers = [(arr(f"{prefix}{i}.weight"), arr(f"{prefix}{i}.bias")) for i in indices]
        if "action_net.weight" not in state:
            raise ValueError("not an SB3 actor-critic state dict: no action_net.weight")
        layers.append((arr("action_net.weight"), arr("action_net.bias")))
        return cls(layers, activation)
