"""Observation: the compact view of the queue and executors that a policy maps to Knobs.

The controller builds one per scheduling epoch. Two fixed-size, roughly unit-scaled float vectors
read it for a learned policy:

- ``scale_free_vector`` (format 2, ``SCALE_FREE_FIELDS``), what the RL environment observes: only
  ratios (queue per batch slot, waits and slack over the service time, length quantiles over
  their mean, the knee over the batch cap), the load, and rates; no seconds, no tokens, no batch
  sizes. One policy then reads a small CPU model and a large GPU one alike.
- ``scale_free_speed_vector`` (formats 4 and 5, ``SCALE_FREE_SPEED_FIELDS``): the same and the
  secondary's slowdown over the primary, so a policy can tell a secondary worth offloading to
  from one that only slows requests down.
- ``as_vector`` (format 1, ``VECTOR_FIELDS``), kept so models trained on it still load: it has
  queue lengths and predicted lengths in absolute units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Observation:
    now: float
    queue_length: int
    primary_running: int
    primary_max_batch: int
    secondary_running: int
    secondary_max_batch: int
    #: Mean and 90th percentile of the predicted output length of waiting requests (tokens).
    pred_len_mean: float
    pred_len_p90: float
    #: Mean uncertainty score (0..1) of waiting requests.
    uncertainty_mean: float
    #: Longest wait among queued requests (s).
    oldest_wait_s: float
    #: Smallest deadline slack among queued requests (s; inf when none has a deadline).
    min_slack_s: float
    #: Arrival rate, smoothed (requests/s).
    arrival_rate: float
    #: Smoothed isolated service time of a request on the primary, as predicted (s).
    service_time_s: float
    #: Offered load: arrival rate over the primary's estimated capacity (1.0 = saturated).
    load: float
    #: Recent mean response time (s) and deadline-miss rate of finished requests.
    recent_response_s: float
    recent_miss_rate: float
    #: Recent duration of one decode iteration on the primary (s).
    step_time_s: float
    #: The primary's knee batch size: the smallest batch reaching 95% of its peak decode
    #: throughput per the learned latency model (0 when unknown). Larger batches add latency
    #: for everyone and little throughput. Not part of ``as_vector``.
    primary_knee_batch: int = 0
    #: Median predicted output length of waiting requests (tokens). Not part of ``as_vector``.
    pred_len_p50: float = 0.0
    #: How many times longer a typical request takes on the secondary than on the primary, each
    #: at its full batch, per the learned latency models (0 without a secondary). Offloading to a
    #: secondary pays when it is not much slower; a CPU secondary beside a fast engine loses.
    #: Only in the format-4 (and 5) vector.
    secondary_slowdown: float = 0.0
    #: Smoothed predicted output length of arriving requests (tokens; 0 before the first): the
    #: prompt mix's length scale, which format 5's offload threshold is relative to. In no
    #: vector: the observation stays scale-free.
    typical_len: float = 0.0

    VECTOR_FIELDS = (
        "queue_length",
        "primary_util",
        "secondary_util",
        "pred_len_mean",
        "pred_len_p90",
        "uncertainty_mean",
        "oldest_wait",
        "min_slack",
        "load",
        "recent_response",
        "recent_miss_rate",
    )

    SCALE_FREE_FIELDS = (
        "queue_per_slot",
        "primary_util",
        "secondary_util",
        "has_secondary",
        "secondary_share",
        "knee_fraction",
        "p90_over_mean",
        "p50_over_mean",
        "uncertainty_mean",
        "oldest_wait",
        "min_slack",
        "load",
        "recent_response",
        "recent_miss_rate",
    )

    def scale_free_vector(self) -> list[float]:
        """Format 2: ratios and rates only, squashed to about [0, 1] (slack to [-1, 1])."""
        svc = max(self.service_time_s, 1e-6)
        slots = max(1, self.primary_max_batch)
        slack = self.min_slack_s if math.isfinite(self.min_slack_s) else 100 * svc
        mean_len = self.pred_len_mean
        has_secondary = self.secondary_max_batch > 0
        return [
            # requests waiting per batch slot: what a queue of 10 means depends on the cap
            math.log1p(self.queue_length / slots) / 4.0,
            self.primary_running / slots,
            self.secondary_running / max(1, self.secondary_max_batch),
            1.0 if has_secondary else 0.0,
            self.secondary_max_batch / (slots + self.secondary_max_batch),
            self.primary_knee_batch / slots,
            # the queue's length spread (how much shortest-first can gain), not its scale
            math.log1p(self.pred_len_p90 / mean_len) / 2.0 if mean_len > 0 else 0.0,
            math.log1p(self.pred_len_p50 / mean_len) / 2.0 if mean_len > 0 else 0.0,
            self.uncertainty_mean,
            math.log1p(self.oldest_wait_s / svc) / 5.0,
            math.tanh(slack / svc / 10.0),
            min(self.load, 3.0) / 3.0,
            math.log1p(self.recent_response_s / svc) / 5.0,
            self.recent_miss_rate,
        ]

    #: Format 4: format 2's fields and the secondary's slowdown.
    SCALE_FREE_SPEED_FIELDS = (*SCALE_FREE_FIELDS, "secondary_slowdown")

    def scale_free_speed_vector(self) -> list[float]:
        """Format 4: :meth:`scale_free_vector` and the secondary's slowdown over the primary,
        on a log scale (1x: 0.25, 15x: 1; 0 without a secondary)."""
        slowdown = max(0.0, self.secondary_slowdown)
        return [*self.scale_free_vector(), math.log2(1.0 + slowdown) / 4.0]

    def as_vector(self) -> list[float]:
        """Format 1: fixed-size features, squashed to about [0, 1] (log scales for unbounded
        ones); queue and predicted lengths in absolute units (see ``scale_free_vector``)."""
        svc = max(self.service_time_s, 1e-6)
        slack = self.min_slack_s if math.isfinite(self.min_slack_s) else 100 * svc
        return [
            math.log1p(self.queue_length) / 8.0,
            self.primary_running / max(1, self.primary_max_batch),
            self.secondary_running / max(1, self.secondary_max_batch),
            math.log1p(self.pred_len_mean) / 8.0,
            math.log1p(self.pred_len_p90) / 8.0,
            self.uncertainty_mean,
            math.log1p(self.oldest_wait_s / svc) / 5.0,
            math.tanh(slack / svc / 10.0),
            min(self.load, 3.0) / 3.0,
            math.log1p(self.recent_response_s / svc) / 5.0,
            self.recent_miss_rate,
        ]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
