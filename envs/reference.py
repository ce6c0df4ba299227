"""ReferenceRun: the same episode served by a reference policy, for rewards relative to it.

A serving episode's return is driven mostly by its input: the prompt set, the trace window and
the load decide whether the mean response time is 10 s or 100 s, whatever the knobs do. PPO's
advantage estimates then carry that input's variance, and the actor drifts (BENCHMARKS.md 4.2,
4.3). An *input-dependent baseline* removes it (Mao et al., "Variance Reduction for
Reinforcement Learning in Input-Driven Environments", ICLR 2019): serve the very same requests
with a reference policy (the heuristic) once, before the episode, and give the agent, each
epoch, its reward minus the reference's reward over the same interval. The subtracted term
depends on the episode's input only, never on the agent's actions, so the policy gradient's
expectation is unchanged; what goes is the part of each return that the input alone explains.

>>> from rtlm_adapt.request import Completion
>>> done = [Completion("a", 10, arrival_time=0.0, start_time=0.0, finish_time=4.0,
...                    executor="sim"),
...         Completion("b", 10, arrival_time=1.0, start_time=4.0, finish_time=9.0,
...                    executor="sim", deadline=6.0)]
>>> ref = ReferenceRun(done)
>>> ref.work(2.0), ref.work(5.0), ref.work(20.0)  # response time accrued by t
(3.0, 8.0, 12.0)
>>> ref.misses(0.0, 5.0), ref.misses(5.0, 10.0)  # deadline misses completed in (t0, t1]
(0, 1)
>>> ref.quantile(0.5), ref.tail_excess(0.0, 10.0, 5.0)  # sum of max(0, rt - 5) over (t0, t1]
(6.0, 3.0)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.experiment import Workload, run_policy
from rtlm_adapt.request import Completion

from .episodes import shared_scorer

#: Reference policies a ServingEnv's reward can be measured against.
REFERENCES = ("heuristic",)


class ReferenceRun:
    """What a reference policy accrued over an episode: response time, deadline misses and
    the response times themselves (for a tail threshold and the excess over it)."""

    def __init__(self, completions: Sequence[Completion]) -> None:
        self._arrivals = np.array([c.arrival_time for c in completions], dtype=float)
        self._finishes = np.array([c.finish_time for c in completions], dtype=float)
        self._miss_times = np.sort(
            np.array([c.finish_time for c in completions if c.missed_deadline], dtype=float)
        )
        # response times in order of finish, so those finishing in (t0, t1] are one slice
        order = np.argsort(self._finishes, kind="stable")
        self._finish_order = self._finishes[order]
        self._response_times = (self._finishes - self._arrivals)[order]

    @classmethod
    def serve(
        cls,
        policy: str,
        workload: Workload,
        *,
        primary_cost: StepCost,
        secondary_cost: StepCost | None,
        epoch_s: float,
        batching: str,
    ) -> ReferenceRun:
        """``workload`` served by ``policy`` with the controller a ServingEnv builds."""
        if policy not in REFERENCES:
            raise ValueError(f"unknown reference policy {policy!r}; expected one of {REFERENCES}")
        factory = functools.partial(AdaptiveController, epoch_s=epoch_s, scorer=shared_scorer())
        run = run_policy(policy, workload, batching=batching, primary_cost=primary_cost,
                         secondary_cost=secondary_cost, controller_factory=factory)
        return cls(run.completions)

    def work(self, t: float) -> float:
        """Response time accrued by ``t``: the sum over arrived requests of
        ``min(finish, t) - arrival``."""
        arrived = self._arrivals <= t
        return float(np.sum(np.minimum(self._finishes[arrived], t) - self._arrivals[arrived]))

    def misses(self, t0: float, t1: float) -> int:
        """Deadline misses completed in ``(t0, t1]``."""
        times = self._miss_times
        return int(np.searchsorted(times, t1, "right") - np.searchsorted(times, t0, "right"))

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the reference's response times (``np.quantile``'s default,
        linear interpolation)."""
        return float(np.quantile(self._response_times, q))

    def tail_excess(self, t0: float, t1: float, tau: float) -> float:
        """The sum of ``max(0, response time - tau)`` over completions finishing in
        ``(t0, t1]``."""
        lo, hi = np.searchsorted(self._finish_order, (t0, t1), "right")
        return float(np.sum(np.maximum(self._response_times[lo:hi] - tau, 0.0)))
