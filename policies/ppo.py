"""PPOPolicy: a PPO actor trained in :class:`~rtlm_adapt.envs.ServingEnv`, as a Policy.

Deployed inference needs neither gymnasium nor stable-baselines3: :meth:`PPOPolicy.load` reads the
actor's weights from an ``.npz`` (numpy only) or out of an SB3 ``model.zip`` (``policy.pth``, with
torch), and ``decide`` is three small matrix products — a few microseconds — followed by the
same action map (:data:`~rtlm_adapt.policies.action_space.ACTION_MAPS`) the environment used.
The deterministic action (the Gaussian's mean, clipped to [-1, 1]) is what SB3's
``predict(deterministic=True)`` returns.

The guard is on by default: a :class:`~rtlm_adapt.policies.shadow_guard.ShadowGuard` replays
the controller's recent traffic in simulation under the learned policy and under the RT-LM
heuristic, and hands the knobs back when the learned policy does worse on those same requests,
with a log line and a count (``guard.metrics()``). The controller that takes the policy attaches
the guard (:meth:`PPOPolicy.attach`). ``guard=PerformanceGuard()`` (the policy name
``ppo-interleaved``) guards with interleaved live trials instead, which needs no controller;
``guard=None`` (or ``ppo-unguarded``) switches the guard off. With ``online=True`` the policy
also keeps learning from the live loop (see :class:`~rtlm_adapt.policies.ppo_online.OnlinePPO`).

Model files: :meth:`PPOPolicy.save` writes the actor as ``.npz`` (numpy only, the format the
packaged model uses, :data:`PACKAGED_MODEL`); :meth:`PPOPolicy.load` reads those and SB3
``model.zip`` files. Both record the model format: the observation the actor reads and the
action map it was trained with (an ``.npz`` in its metadata, a ``model.zip`` in its training's
``config.json``; format 1 and 2 models, from before the scale-free observation and the log-scale
action map, still run on theirs); a file this version cannot read raises a ValueError naming
the problem.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> layers = [(rng.normal(size=(8, 14)), np.zeros(8)), (rng.normal(size=(6, 8)), np.zeros(6))]
>>> policy = PPOPolicy(MLPActor(layers))
>>> policy.actor(np.zeros(14, dtype=np.float32)).shape, policy.observation_format
((6,), 2)
"""

from __future__ import annotations

import base64
import copy
import io
import json
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from rtlm_adapt.knobs import Knobs
from rtlm_adapt.observation import Observation

from .action_space import (
    ACTION_MAPS,
    OBSERVATION_FORMATS,
    KnobsActionMap,
    observation_array,
    observation_format_for_size,
    observation_vector,
)
from .heuristic import RTLMHeuristic
from .mlp_actor import ACTIVATIONS, MLPActor
from .ppo_guard import PerformanceGuard
from .ppo_online import epoch_cost
from .shadow_guard import ShadowGuard

#: The trained model that ships with the package (``--policies ppo``); its training config and
#: learning curve are ``ppo.json`` beside it.
PACKAGED_MODEL = Path(__file__).parent / "models" / "ppo.npz"
#: Version of the ``.npz`` model file layout written by :meth:`PPOPolicy.save`.
MODEL_FILE_VERSION = 1
_DEFAULT = object()  # "a fresh ShadowGuard", the default for ``guard``


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


def _training_config(model_path: Path) -> dict[str, Any] | None:
    """The config.json ppo_train wrote for the run a model comes from (beside the model, or one
    folder up for ``checkpoints/``); None where there is none or it does not parse."""
    for folder in (model_path.parent, model_path.parent.parent):
        file = folder / "config.json"
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except json.JSONDecodeError:
                return None
            return config if isinstance(config, dict) else None
    return None


def _model_format(config: dict[str, Any] | None) -> int | None:
    """The model format the training recorded; None where it did not (runs before format 3:
    their format follows from the actor's input size)."""
    fmt = (config or {}).get("model_format")
    return int(fmt) if fmt is not None else None


#: The deployments a learned policy tells apart, by whether a secondary executor exists (the
#: observation's ``has_secondary``): offloading is most of what the knobs can do with one, and
#: nothing without.
REGIMES = ("with_secondary", "without_secondary")


def regime_for(has_secondary: bool) -> str:
    """The regime (:data:`REGIMES`) of a deployment with or without a secondary executor."""
    return REGIMES[0] if has_secondary else REGIMES[1]


def regime_of(observation: Observation) -> str:
    """The regime ``observation`` belongs to."""
    return regime_for(observation.secondary_max_batch > 0)


def untrained_regimes(config: dict[str, Any] | None) -> list[str]:
    """The regimes a training run never saw: ``without_secondary`` where every episode had a
    secondary executor, and without a config (the older models were trained so)."""
    without = [regime_for(False)]
    env = (config or {}).get("env", {})
    if not isinstance(env, dict):
        return without
    if env.get("secondary_profile", "default") is None:
        return []
    only_with = float(env.get("scenarios", {}).get("secondary_prob", 1.0)) >= 1.0
    return without if only_with else []


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
        Must match the environment the actor was trained in (the default, the map of the
        model's format, :data:`~rtlm_adapt.policies.action_space.ACTION_MAPS`, does).
    guard
        A :class:`ShadowGuard` (default: a fresh one) or :class:`PerformanceGuard`; ``decide``
        hands over to ``fallback`` whenever it judges the learned policy worse. ``None``
        switches it off.
    fallback
        The policy to fall back to (default: :class:`RTLMHeuristic`).
    online
        Optional :class:`~rtlm_adapt.policies.ppo_online.OnlinePPO` learner: ``decide`` then
        samples exploratory actions from it and it updates the actor periodically.
    heuristic_regimes
        The regimes (:data:`REGIMES`) where ``decide`` defers to ``fallback``: those the model
        never trained in (a model trained only with a secondary executor leans on offloading,
        which is outside what it learned without one), and those where its validation found it
        no better than the heuristic (:func:`~rtlm_adapt.policies.ppo_train.export_model`), so
        that a deployment gets the learned knobs only where they were shown to help.
        :meth:`load` reads them from the model file or the training's ``config.json``.
    observation_format
        The model format: the observation the actor reads and the action map it was trained
        with (see :data:`~rtlm_adapt.policies.action_space.OBSERVATION_FORMATS`); default: the
        format whose observation size matches the actor's input.
    """

    length_source = "predicted"
    consolidate = True

    def __init__(
        self,
        actor: MLPActor,
        *,
        name: str = "ppo",
        action_map: KnobsActionMap | None = None,
        guard: Any = _DEFAULT,
        fallback: Any = None,
        online: Any = None,
        heuristic_regimes: Collection[str] = (),
        observation_format: int | None = None,
    ) -> None:
        self.actor = actor
        self.name = name
        fmt = observation_format or observation_format_for_size(actor.obs_size)
        if fmt not in ACTION_MAPS:
            raise ValueError(
                f"model format {fmt}, which this rtlm-adapt does not know "
                f"(known: {sorted(ACTION_MAPS)}); upgrade rtlm-adapt or retrain the model"
            )
        self.action_map = action_map or ACTION_MAPS[fmt]()
        if actor.action_size != self.action_map.size:
            raise ValueError(
                f"the actor outputs {actor.action_size} numbers, the action map takes "
                f"{self.action_map.size}"
            )
        self.guard: ShadowGuard | PerformanceGuard | None = (
            ShadowGuard() if guard is _DEFAULT else guard)
        self.fallback = fallback if fallback is not None else RTLMHeuristic()
        self._fresh_fallback = copy.deepcopy(self.fallback)  # as it was before deciding anything
        self.online = online
        unknown = set(heuristic_regimes) - set(REGIMES)
        if unknown:
            raise ValueError(f"unknown regimes {sorted(unknown)}; known: {REGIMES}")
        self.heuristic_regimes = frozenset(heuristic_regimes)
        if len(OBSERVATION_FORMATS[fmt][1]) != actor.obs_size:
            raise ValueError(
                f"the actor reads {actor.obs_size} numbers, observation format {fmt} has "
                f"{len(OBSERVATION_FORMATS[fmt][1])}"
            )
        self.observation_format = fmt
        self._last_obs: Observation | None = None
        self._last_source = "learned"
        self.metadata: dict[str, Any] = {}

    # -- loading and saving --------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, online: bool = False, **kwargs: Any) -> PPOPolicy:
        """Load a model: an ``.npz`` from :meth:`save` (numpy only) or an SB3 ``model.zip``.

        A ``model.zip`` needs torch (to read ``policy.pth``) but not gymnasium or
        stable-baselines3, unless ``online=True``, which loads the whole SB3 model to keep
        training it. Other keyword arguments go to the constructor (``guard``, ``fallback``,
        ``name``, ...); ``observation_format`` reads the model in another format with the same
        observation, e.g. the packaged model (format 6: its knobs carry the heuristic's hard
        aging bound) as format 4, without the bound (BENCHMARKS.md 4.7, 4.9).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved PPO model at {path}")
        if path.suffix == ".npz":
            if online:
                raise ValueError(f"{path}: online learning needs the SB3 model.zip, not an .npz")
            return cls._load_npz(path, **kwargs)
        config = _training_config(path)  # read once for both
        kwargs.setdefault("heuristic_regimes", untrained_regimes(config))
        kwargs.setdefault("observation_format", _model_format(config))
        if online:
            from .ppo_online import OnlinePPO

            learner = OnlinePPO.load(path)
            return cls(learner.actor(), online=learner, **kwargs)
        import torch

        try:
            with zipfile.ZipFile(path) as z:
                state = torch.load(io.BytesIO(z.read("policy.pth")), weights_only=True)
                data = json.loads(z.read("data"))
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ValueError(f"{path} is not a stable-baselines3 model zip ({exc})") from None
        actor = MLPActor.from_state_dict(state, _activation_from_data(data))
        try:
            return cls(actor, **kwargs)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def _load_npz(cls, path: Path, **kwargs: Any) -> PPOPolicy:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z else {}
            version = meta.get("file_version")
            if version != MODEL_FILE_VERSION:
                raise ValueError(
                    f"{path}: model file version {version!r}; this rtlm-adapt reads version "
                    f"{MODEL_FILE_VERSION} (re-export it with PPOPolicy.save from its model.zip)"
                )
            # a caller may read the model in another format with the same observation, e.g. a
            # format-6 model as format 4 (its knobs without the heuristic's hard aging bound)
            fmt = int(kwargs.pop("observation_format", None) or meta["observation_format"])
            if fmt not in OBSERVATION_FORMATS:
                raise ValueError(
                    f"{path}: the model reads observation format {fmt}, which this rtlm-adapt "
                    f"does not build (known: {sorted(OBSERVATION_FORMATS)}); upgrade rtlm-adapt "
                    "or retrain the model"
                )
            layers = [(z[f"w{i}"], z[f"b{i}"]) for i in range(int(meta["layers"]))]
        # files before regimes were named say only whether training always had a secondary
        old = [regime_for(False)] if meta.get("trained_with_secondary") else []
        kwargs.setdefault("heuristic_regimes", meta.get("heuristic_regimes", old))
        policy = cls(MLPActor(layers, meta.get("activation", "Tanh")), observation_format=fmt,
                     **kwargs)
        policy.metadata = meta
        return policy

    def save(self, path: str | Path, **metadata: Any) -> Path:
        """The actor as ``.npz`` (weights and a JSON ``meta``: file version, observation
        format, activation, ``heuristic_regimes`` and any ``metadata`` given)."""
        meta = {**metadata, "file_version": MODEL_FILE_VERSION,
                "observation_format": self.observation_format,
                "activation": self.actor.activation, "layers": len(self.actor.layers),
                "heuristic_regimes": sorted(self.heuristic_regimes)}
        arrays: dict[str, Any] = {"meta": np.array(json.dumps(meta))}
        for i, (w, b) in enumerate(self.actor.layers):
            arrays[f"w{i}"], arrays[f"b{i}"] = w, b
        path = Path(path)
        with path.open("wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> PPOPolicy:
        """From a live SB3 PPO model (e.g. inside a training callback)."""
        state = model.policy.state_dict()
        activation = getattr(model.policy, "activation_fn", None)
        name = activation.__name__ if activation is not None else "Tanh"
        return cls(MLPActor.from_state_dict(state, name), **kwargs)

    # -- Policy protocol -----------------------------------------------------------------------
    def attach(self, controller: Any) -> None:
        """Called by the controller that takes this policy: a guard that replays the
        controller's traffic (:class:`~rtlm_adapt.policies.shadow_guard.ShadowGuard`) starts
        watching it."""
        attach = getattr(self.guard, "attach", None)
        if callable(attach):
            attach(controller, learned=self.unguarded, heuristic=self.fresh_fallback)

    def unguarded(self) -> PPOPolicy:
        """A fresh copy of this policy without its guard (the same actor, regimes and
        fallback): what a shadow replay runs as the learned policy."""
        return PPOPolicy(self.actor, name=self.name, action_map=self.action_map, guard=None,
                         fallback=self.fresh_fallback(), heuristic_regimes=self.heuristic_regimes,
                         observation_format=self.observation_format)

    def fresh_fallback(self) -> Any:
        """A fresh copy of the fallback policy, as it was before it decided anything."""
        return copy.deepcopy(self._fresh_fallback)

    def decide(self, observation: Observation) -> Knobs:
        """Knobs for the next epoch: the learned actor's, or the fallback's if the guard says so."""
        if self.heuristic_regimes and regime_of(observation) in self.heuristic_regimes:
            self._last_source = "fallback"
            return self.fallback.decide(observation)
        if self.online is not None and self._last_obs is not None:
            if self._last_source == "learned":
                self.online.record_reward(-epoch_cost(self._last_obs, observation))
        self._last_obs = observation
        source = self.guard.choose(observation) if self.guard is not None else "learned"
        self._last_source = source
        if source != "learned":
            if self.online is not None:
                self.online.interrupt()  # the fallback's epochs are not the learner's transitions
            return self.fallback.decide(observation)
        if self.online is not None:
            action = self.online.act(observation_array(observation, self.observation_format))
            if self.online.updated:
                self.actor = self.online.actor()
        else:
            # the hot path: plain floats in, plain floats out; clipping happens in to_knobs
            vec = observation_vector(observation, self.observation_format)
            action = self.actor.mean(vec).tolist()
        return self.action_map.knobs(action, observation)

    def __repr__(self) -> str:
        return f"PPOPolicy(name={self.name!r}, layers={len(self.actor.layers)})"
