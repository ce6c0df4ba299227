"""The Executor protocol: one interface for the simulated backend, the transformers backend and,
later, a production engine.

An executor runs a batch of requests iteration by iteration. The serving loop admits requests
(they join before the next iteration: continuous batching) and calls ``step``; each step reports
how long it took and which requests ended. A simulated executor may fuse several iterations into
one ``step`` call while nothing changes (no request ends, no new request could join before
``until``); a real one runs exactly one iteration.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from rtlm_adapt.request import Completion, Request


@dataclass(slots=True)
class StepResult:
    """What one ``Executor.step`` call did.

    Attributes
    ----------
    duration_s
        Seconds the call took (virtual seconds for a simulated executor).
    iterations
        Decode iterations run (1 for a real executor; more when a simulator fused them).
    batch_size
        Requests running during the call.
    prefill_tokens
        Prompt tokens prefilled in this call (new joiners).
    context_tokens
        Total context (prompt + generated) tokens across the batch at the start of the call.
    attended_tokens
        Context tokens the decode attended to (``batch * longest`` for an executor whose
        batch cache is padded to its longest member); 0 when the executor does not say.
    finished
        Requests that ended in this call, successfully or with an error.
    new_tokens
        Tokens generated in this call, per request id.
    """

    duration_s: float
    iterations: int
    batch_size: int
    prefill_tokens: int = 0
    context_tokens: int = 0
    finished: list[Completion] = field(default_factory=list)
    new_tokens: dict[str, int] = field(default_factory=dict)
    attended_tokens: int = 0


@runtime_checkable
class Executor(Protocol):
    """A backend that runs batches of requests."""

    name: str
    max_batch_size: int

    def running(self) -> int:
        """Number of requests currently in the batch."""
        ...

    def running_ids(self) -> list[str]:
        """Ids of the requests currently in the batch."""
        ...

    def admit(self, requests: Sequence[Request], now: float) -> None:
        """Add requests to the batch; they start with the next step."""
        ...

    def step(self, now: float, until: float = math.inf) -> StepResult:
        """Run at least one iteration starting at ``now``; fused iterations end by ``until``."""
        ...

    def abort(self, request_id: str, now: float) -> Completion | None:
        """Remove a running request; return its (error) completion, or None if not running."""
        ...


@dataclass(frozen=True, slots=True)
class ExecutorState:
    """What the controller needs to know about an executor to choose its next requests."""

    name: str
    role: str  # "primary" or "secondary"
    running: int
    max_batch_size: int
    now: float
    running_context_tokens: int = 0

    def __post_init__(self) -> None:
        # one cheap test on the per-step path; the slow explanation only when it fails
        try:
            ok = (
                (self.role == "primary" or self.role == "secondary")
                and 0 <= self.running
                and 1 <= self.max_batch_size
                and 0 <= self.running_context_tokens
                and -math.inf < self.now < math.inf
                and isinstance(self.name, str)
                and self.name != ""
            )
        except TypeError:
            ok = False
        if not ok:
            raise _state_error(self)

    @property
    def free_slots(self) -> int:
        return max(0, self.max_batch_size - self.running)


def _state_error(state: ExecutorState) -> Exception:
    """The first bad field of ``state``, named."""
    if not isinstance(state.name, str) or not state.name:
        return TypeError(f"ExecutorState.name must be a non-empty string, got {state.name!r}")
    if state.role not in ("primary", "secondary"):
        return ValueError(
            f"ExecutorState.role must be 'primary' or 'secondary', got {state.role!r}"
        )
    for field_name, low in (("running", 0), ("max_batch_size", 1), ("running_context_tokens", 0)):
        value = getattr(state, field_name)
        try:
            operator.index(value)  # int, numpy integers; not float, str or None
        except TypeError:
            return TypeError(
                f"ExecutorState.{field_name} must be an int, got {type(value).__name__}"
            )
        if value < low:
            return ValueError(f"ExecutorState.{field_name} must be >= {low}, got {value}")
    return ValueError(f"ExecutorState.now must be a finite time, got {state.now!r}")
