"""The simulated executor a profile asks for: the engine model of vLLM's scheduler when the
profile has an ``engine`` block, today's batch model (:class:`SimulatedExecutor`) otherwise.

>>> from rtlm_adapt.calibration.step_cost import StepCost
>>> type(simulated_executor("primary", StepCost.default())).__name__
'SimulatedExecutor'
>>> type(simulated_executor("primary", StepCost.load("vllm-cpu-smollm2-135m"))).__name__
'EngineExecutor'
"""

from __future__ import annotations

from collections.abc import Callable

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.request import Request
from rtlm_adapt.serving.engine.executor import EngineExecutor, no_priority
from rtlm_adapt.serving.sim import SimulatedExecutor


def simulated_executor(
    name: str,
    cost: StepCost,
    *,
    batching: str = "continuous",
    priority_of: Callable[[Request], int] | None = None,
    max_batch_size: int | None = None,
) -> SimulatedExecutor | EngineExecutor:
    """A simulated executor for ``cost``; ``priority_of`` gives the engine each request's
    priority (ignored by the batch model, which has no queue of its own)."""
    if cost.engine is None:
        return SimulatedExecutor(name, cost, batching=batching, max_batch_size=max_batch_size)
    if batching != "continuous":
        raise ValueError(
            f"profile {cost.name!r} models vLLM, which batches continuously; "
            f"batching={batching!r} does not apply"
        )
    return EngineExecutor(
        name, cost, max_batch_size=max_batch_size, priority_of=priority_of or no_priority
    )
