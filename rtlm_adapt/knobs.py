"""Knobs and Policy: the seam between a policy and the controller.

A :class:`Policy` maps an :class:`~rtlm_adapt.observation.Observation` of the queue and executors
to :class:`Knobs`, the handful of numbers the controller applies to every decision until the next
scheduling epoch. Both live here, low in the package, so that the controller and every policy
(``rtlm_adapt.policies``) import them from one place.

A request's priority (smaller runs first) is, in seconds::

    key = length_weight      * predicted_service_s
        + uncertainty_weight * uncertainty * predicted_service_s
        - wait_weight        * (now - arrival)
        + slack_weight       * (deadline - now - predicted_service_s)

For fixed knobs the order of these keys does not change with ``now`` (the ``now`` terms are
common to every request), so the controller keeps them in a heap and re-keys only when the knobs
change. FCFS is ``wait_weight=1`` with everything else 0; shortest-job-first is
``length_weight=1``; earliest-deadline-first is ``slack_weight=1``.

>>> Knobs(wait_weight=0.1).as_dict()["wait_weight"]
0.1
>>> Knobs(max_batch_size=0)
Traceback (most recent call last):
...
ValueError: Knobs.max_batch_size must be >= 1, got 0
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Protocol, runtime_checkable

from rtlm_adapt.observation import Observation

#: Which length estimate the controller ranks by: the online predictor's, the prompt's length (a
#: cheap proxy) or the true length (benchmarks only: the limit a perfect predictor could reach).
LENGTH_SOURCES = ("predicted", "prompt", "oracle")

#: Slack (s) assumed for a request without a deadline, so the slack term stays finite.
NO_DEADLINE_SLACK_S = 3600.0


@dataclass(frozen=True, slots=True)
class Knobs:
    """What a policy decides.

    Attributes
    ----------
    length_weight
        Weight of the predicted service time in the priority (shortest-first pressure).
    uncertainty_weight
        Extra weight on the predicted service time of uncertain prompts (0..1 uncertainty);
        positive pushes uncertain prompts back, as RT-LM does.
    wait_weight
        Aging: how much each second of waiting moves a request forward.
    slack_weight
        Deadline pressure: how much each second of slack moves a request back.
    max_batch_size
        Cap on requests running at once on the primary executor (dynamic consolidation);
        None leaves the executor's own maximum.
    offload_threshold
        Requests whose predicted output length (tokens) is at least this are eligible for the
        secondary executor; ``inf`` disables offloading.
    max_wait_s
        Hard aging bound: a request that has waited this long runs next, whatever its key.
    """

    length_weight: float = 1.0
    uncertainty_weight: float = 0.0
    wait_weight: float = 0.0
    slack_weight: float = 0.0
    max_batch_size: int | None = None
    offload_threshold: float = math.inf
    max_wait_s: float = math.inf

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> Knobs:
        for name in ("length_weight", "uncertainty_weight", "wait_weight", "slack_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"Knobs.{name} must be a number, got {value!r}")
            if math.isinf(value):
                raise ValueError(f"Knobs.{name} must be finite, got {value!r}")
        if self.max_batch_size is None:
            pass
        elif isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int):
            raise TypeError(f"Knobs.max_batch_size must be an int, got {self.max_batch_size!r}")
        elif self.max_batch_size < 1:
            raise ValueError(f"Knobs.max_batch_size must be >= 1, got {self.max_batch_size}")
        for name in ("offload_threshold", "max_wait_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
                raise ValueError(f"Knobs.{name} must be > 0 (inf disables it), got {value!r}")
        return self

    def priority(
        self, service_s: float, uncertainty: float, arrival_time: float, deadline: float | None
    ) -> float:
        """A request's time-invariant priority key (smaller runs first; see the module
        docstring). A request without a deadline is given :data:`NO_DEADLINE_SLACK_S` of slack.

        >>> Knobs(length_weight=1.0, wait_weight=0.5).priority(2.0, 0.0, 10.0, None)
        7.0
        """
        key = (
            self.length_weight + self.uncertainty_weight * uncertainty
        ) * service_s + self.wait_weight * arrival_time
        if self.slack_weight:
            if deadline is None:
                deadline = arrival_time + NO_DEADLINE_SLACK_S
            key += self.slack_weight * (deadline - service_s)
        return key

    def replace(self, **changes: float) -> Knobs:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def engine_priority(key: float) -> int:
    """An engine's integer ``priority`` (vLLM: lower runs first) for a :meth:`Knobs.priority` key:
    the key in milliseconds. The key is time-invariant for fixed knobs, so aging keeps working
    inside the engine's own queue.

    >>> engine_priority(12.3456)
    12346
    """
    return round(key * 1000)


@runtime_checkable
class Policy(Protocol):
    """What the controller asks of a policy.

    Attributes
    ----------
    name
        How reports and the command line call it.
    length_source
        Which length estimate the controller ranks by (one of :data:`LENGTH_SOURCES`).
    consolidate
        In static batching, whether a batch is grouped from requests of similar predicted length.
    """

    name: str
    length_source: str
    consolidate: bool

    def decide(self, observation: Observation) -> Knobs:
        """Knobs for the next scheduling epoch."""
        ...
