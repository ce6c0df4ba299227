"""The RT-LM heuristic: uncertainty-aware priority, dynamic consolidation and strategic
offloading, with every threshold derived from the observed load, the learned latency model and the
predicted lengths. No training.

- **Priority**: shortest predicted service first, uncertain prompts pushed back (their long tail
  is what hurts the requests queued behind them), aging so that waiting moves a request forward,
  and a hard bound (a multiple of the typical service time) after which a request runs next.
- **Consolidation**: the primary's batch is capped at its *knee*: the smallest batch that reaches
  95% of its peak decode throughput according to the latency model learned online (the
  observation's ``primary_knee_batch``, from :func:`rtlm_adapt.observer.knee_batch`), while the
  load leaves room for the lost 5% or a secondary takes the overflow. Past the knee
  a larger batch adds little throughput but slows every running request; below it, requests wait
  in the shortest-first queue instead of sharing the executor (on a CPU the knee is small, on a
  GPU close to the maximum). In static batching the controller also groups each batch by
  predicted length, so short requests don't wait for a long one.
- **Offloading**: once requests wait for the primary, the longer part of the queue (predicted
  length at or above a quantile of the waiting requests') becomes eligible for the secondary
  executor, which would otherwise sit idle; the higher the load, the more is offloaded.

>>> from rtlm_adapt.observation import Observation
>>> obs = Observation(now=10.0, queue_length=40, primary_running=8, primary_max_batch=16,
...     secondary_running=0, secondary_max_batch=4, pred_len_mean=200.0, pred_len_p90=600.0,
...     uncertainty_mean=0.5, oldest_wait_s=30.0, min_slack_s=5.0, arrival_rate=1.0,
...     service_time_s=10.0, load=0.9, recent_response_s=20.0, recent_miss_rate=0.1,
...     step_time_s=0.1, primary_knee_batch=6, pred_len_p50=150.0)
>>> knobs = RTLMHeuristic().decide(obs)
>>> knobs.offload_threshold < float("inf"), knobs.max_batch_size
(True, 6)
"""

from __future__ import annotations

import math

from rtlm_adapt.knobs import Knobs
from rtlm_adapt.observation import Observation


def hard_aging_bound_s(
    obs: Observation, *, service_factor: float = 8.0, response_factor: float = 3.0
) -> float:
    """The hard aging bound at ``obs``: a request that has waited this long runs next on the
    primary. ``service_factor`` times the smoothed isolated service time (1 s before any is
    known), or ``response_factor`` times the smoothed response time where that is longer (under
    load a bound below the typical response time would put every request first).

    >>> from rtlm_adapt.observation import Observation
    >>> obs = Observation(now=0.0, queue_length=3, primary_running=4, primary_max_batch=4,
    ...     secondary_running=0, secondary_max_batch=0, pred_len_mean=200.0, pred_len_p90=400.0,
    ...     uncertainty_mean=0.2, oldest_wait_s=5.0, min_slack_s=9.0, arrival_rate=1.0,
    ...     service_time_s=2.0, load=0.9, recent_response_s=10.0, recent_miss_rate=0.0,
    ...     step_time_s=0.05)
    >>> hard_aging_bound_s(obs)  # 3 x 10 s beats 8 x 2 s
    30.0
    """
    service = obs.service_time_s if obs.service_time_s > 0 else 1.0
    return max(service_factor * service, response_factor * obs.recent_response_s)


def _on_grid(tokens: float) -> float:
    # quarter octaves, so small moves of a quantile don't re-flag the whole queue
    return 2.0 ** (round(4 * math.log2(max(1.0, tokens))) / 4)


class RTLMHeuristic:
    """RT-LM's three mechanisms with first-principles thresholds.

    Parameters
    ----------
    uncertainty_weight
        How much a fully uncertain prompt's predicted service time is inflated in the priority.
    aging
        Seconds of priority gained per second of waiting (0 = pure shortest-first).
    max_wait_factor, max_wait_response_factor
        Hard aging bound: a request runs next once it has waited ``max_wait_factor`` times the
        smoothed isolated service time or ``max_wait_response_factor`` times the recent mean
        response time, whichever is longer. Tied to the response time, the bound grows with the
        queue: under overload a bound of service times alone would turn the order into FCFS.
    slack_weight
        Deadline pressure (earliest-deadline-first component).
    consolidate_batch
        Cap the primary's batch at its knee (see the module docstring).
    offload
        Whether to use a secondary executor at all.
    offload_min_queue
        Offload once at least this many requests wait.
    """

    length_source = "predicted"
    consolidate = True

    def __init__(
        self,
        *,
        name: str = "heuristic",
        uncertainty_weight: float = 0.5,
        aging: float = 0.05,
        max_wait_factor: float = 8.0,
        max_wait_response_factor: float = 3.0,
        slack_weight: float = 0.0,
        consolidate_batch: bool = True,
        offload: bool = True,
        offload_min_queue: int = 1,
        length_source: str = "predicted",
    ) -> None:
        self.name = name
        self.uncertainty_weight = uncertainty_weight
        self.aging = aging
        self.max_wait_factor = max_wait_factor
        self.max_wait_response_factor = max_wait_response_factor
        self.slack_weight = slack_weight
        self.consolidate_batch = consolidate_batch
        self.offload = offload
        self.offload_min_queue = offload_min_queue
        self.length_source = length_source

    def decide(self, obs: Observation) -> Knobs:
        can_offload = self.offload and obs.secondary_max_batch > 0
        cap = max(1, obs.primary_max_batch)
        # The knee gives up to 5% of the primary's throughput: affordable while the load leaves
        # room or a secondary takes the overflow, not when the primary alone runs near capacity.
        knee = obs.primary_knee_batch
        if self.consolidate_batch and knee > 0 and (can_offload or obs.load < 0.8):
            cap = min(cap, knee)
        threshold = math.inf
        if can_offload and obs.queue_length >= self.offload_min_queue:
            # Under high load offload the longer half of the queue, under light load its tail.
            quantile_len = obs.pred_len_p50 if obs.load >= 0.8 else obs.pred_len_p90
            threshold = _on_grid(quantile_len or obs.pred_len_mean)
        return Knobs(
            length_weight=1.0,
            uncertainty_weight=self.uncertainty_weight,
            wait_weight=self.aging,
            slack_weight=self.slack_weight,
            max_batch_size=cap,
            offload_threshold=threshold,
            max_wait_s=hard_aging_bound_s(obs, service_factor=self.max_wait_factor,
                                          response_factor=self.max_wait_response_factor),
        )

    def __repr__(self) -> str:
        return (
            f"RTLMHeuristic(aging={self.aging}, uncertainty_weight={self.uncertainty_weight}, "
            f"consolidate_batch={self.consolidate_batch}, offload={self.offload})"
        )
