"""The RT-LM heuristic: uncertainty-aware priority, dynamic consolidation and strategic
offloading, with every threshold derived from the observed load and predicted lengths. No
training.

- **Priority**: shortest predicted service first, uncertain prompts pushed back (their long tail
  is what hurts the requests queued behind them), and aging that grows with the queue so a long
  request waits at most a bounded multiple of the typical service time.
- **Consolidation**: the primary runs full batches while there is a queue (throughput), and the
  controller groups static batches by predicted length.
- **Offloading**: when the primary is saturated and a queue builds, requests predicted to be
  among the longest waiting go to the secondary executor, which would otherwise sit idle.

>>> from rtlm_adapt.observation import Observation
>>> obs = Observation(now=10.0, queue_length=40, primary_running=8, primary_max_batch=8,
...     secondary_running=0, secondary_max_batch=4, pred_len_mean=200.0, pred_len_p90=600.0,
...     uncertainty_mean=0.5, oldest_wait_s=30.0, min_slack_s=5.0, arrival_rate=1.0,
...     service_time_s=10.0, load=0.9, recent_response_s=20.0, recent_miss_rate=0.1,
...     step_time_s=0.1)
>>> knobs = RTLMHeuristic().decide(obs)
>>> knobs.offload_threshold < float("inf"), knobs.max_batch_size
(True, 8)
"""

from __future__ import annotations

import math

from rtlm_adapt.knobs import Knobs
from rtlm_adapt.observation import Observation


class RTLMHeuristic:
    """RT-LM's three mechanisms with first-principles thresholds.

    Parameters
    ----------
    uncertainty_weight
        How much a fully uncertain prompt's predicted service time is inflated in the priority.
    aging
        Seconds of priority gained per second of waiting (0 = pure shortest-first).
    max_wait_factor
        Hard aging bound, as a multiple of the smoothed isolated service time.
    slack_weight
        Deadline pressure (earliest-deadline-first component).
    offload
        Whether to use a secondary executor at all.
    offload_quantile_queue
        Offload once the queue is at least this many times the primary's batch size.
    """

    length_source = "predicted"
    consolidate = True

    def __init__(
        self,
        *,
        name: str = "heuristic",
        uncertainty_weight: float = 0.5,
        aging: float = 0.05,
        max_wait_factor: float = 20.0,
        slack_weight: float = 0.0,
        offload: bool = True,
        offload_queue_factor: float = 1.0,
        length_source: str = "predicted",
    ) -> None:
        self.name = name
        self.uncertainty_weight = uncertainty_weight
        self.aging = aging
        self.max_wait_factor = max_wait_factor
        self.slack_weight = slack_weight
        self.offload = offload
        self.offload_queue_factor = offload_queue_factor
        self.length_source = length_source

    def decide(self, obs: Observation) -> Knobs:
        svc = obs.service_time_s if obs.service_time_s > 0 else 1.0
        # Offloading pays only when the primary is full and requests queue behind it: then the
        # secondary takes the long tail (p90 of predicted lengths waiting).
        threshold = math.inf
        if (
            self.offload
            and obs.secondary_max_batch > 0
            and obs.queue_length >= self.offload_queue_factor * obs.primary_max_batch
        ):
            # on a grid of quarter octaves, so small moves of the p90 don't re-flag the queue
            threshold = 2.0 ** (round(4 * math.log2(max(1.0, obs.pred_len_p90))) / 4)
        return Knobs(
            length_weight=1.0,
            uncertainty_weight=self.uncertainty_weight,
            wait_weight=self.aging,
            slack_weight=self.slack_weight,
            max_batch_size=max(1, obs.primary_max_batch),
            offload_threshold=threshold,
            max_wait_s=self.max_wait_factor * svc,
        )

    def __repr__(self) -> str:
        return f"RTLMHeuristic(aging={self.aging}, uncertainty_weight={self.uncertainty_weight})"
