"""ExecutorModels: the executors a controller has heard of, and a latency model for each.

Each executor reports its :class:`~rtlm_adapt.serving.base.ExecutorState` whenever it asks for
work; the first one in the ``primary`` role is the primary, whose latency model turns predicted
lengths into predicted service times. A latency model starts from the executor's cost profile
(the default profile for executors not named) and learns from the timings the executor reports.

>>> from rtlm_adapt.serving.base import ExecutorState
>>> models = ExecutorModels()
>>> models.update(ExecutorState("gpu", "primary", running=0, max_batch_size=8, now=0.0))
>>> models.update(ExecutorState("gpu-2", "primary", running=0, max_batch_size=8, now=0.0))
>>> models.primary, sorted(models.latency)  # the first primary stays the primary
('gpu', ['gpu', 'gpu-2'])
"""

from __future__ import annotations

from collections.abc import Mapping

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.latency import LatencyModel
from rtlm_adapt.serving.base import ExecutorState


class ExecutorModels:
    """Executor states by name, the primary's name, and a latency model per executor."""

    def __init__(self, profiles: Mapping[str, StepCost] | None = None) -> None:
        #: Cost profile per executor name: where its latency model starts.
        self.profiles: dict[str, StepCost] = dict(profiles or {})
        #: Latency model per executor name, learned online.
        self.latency: dict[str, LatencyModel] = {}
        #: The latest state each executor reported.
        self.states: dict[str, ExecutorState] = {}
        #: The primary executor's name (None until one reports).
        self.primary: str | None = None

    def update(self, state: ExecutorState) -> None:
        """Record ``state``; an executor seen for the first time gets its latency model."""
        if not isinstance(state, ExecutorState):
            raise TypeError(f"next_batch() takes an ExecutorState, got {type(state).__name__}")
        if state.name not in self.states:
            if state.role == "primary" and self.primary is None:
                self.primary = state.name
            self.latency_for(state.name)
        self.states[state.name] = state

    def latency_for(self, name: str) -> LatencyModel:
        """``name``'s latency model, made from its profile if it has none yet."""
        model = self.latency.get(name)
        if model is None:
            prior = self.profiles.get(name) or StepCost.default()
            model = self.latency[name] = LatencyModel(prior)
        return model

    def primary_latency(self) -> LatencyModel:
        """The primary's latency model (one named ``primary`` before any executor reported)."""
        return self.latency_for(self.primary or "primary")

    def secondary(self) -> ExecutorState | None:
        """The first executor that is not the primary, if any reported."""
        return next((s for s in self.states.values() if s.role != "primary"), None)
