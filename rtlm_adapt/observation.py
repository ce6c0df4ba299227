"""Observation: the compact view of the queue and executors that a policy maps to Knobs.

The controller builds one per scheduling epoch. ``as_vector`` gives the fixed-size, roughly
unit-scaled float vector that the RL environment uses as its observation (its layout is
``Observation.VECTOR_FIELDS``).
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

    def as_vector(self) -> list[float]:
        """Fixed-size features, squashed to about [0, 1] (log scales for unbounded ones)."""
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
