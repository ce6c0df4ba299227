"""The gateway's Prometheus metrics (prefix ``rtlm_``), in a registry of its own.

Every request that reached the controller is counted once in ``rtlm_requests_total``, by outcome
(``completed`` or ``failed``) and reason (a :data:`~rtlm_adapt.request.FAILURE_REASONS` entry;
empty for completed), so the counter and ``AdaptiveController.stats()`` tell the same story.
Requests refused before that (malformed: 400, too large: 413) are ``rtlm_invalid_requests_total``.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from scipy.stats import kendalltau

from rtlm_adapt.knobs import Knobs
from rtlm_adapt.request import FAILURE_REASONS, Completion

_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Finished requests the sliding Kendall tau looks at, and how often it is recomputed.
TAU_WINDOW = 256
TAU_EVERY = 16


class GatewayMetrics:
    """What ``GET /metrics`` shows."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge(
            "rtlm_queue_length", "Requests waiting in the gateway", registry=r
        )
        self.inflight = Gauge(
            "rtlm_inflight", "Requests in flight per backend", ["backend"], registry=r
        )
        self.healthy = Gauge(
            "rtlm_backend_healthy", "1 if the backend is in rotation", ["backend"], registry=r
        )
        self.requests = Counter(
            "rtlm_requests",
            "Requests that ended, by outcome and failure reason",
            ["outcome", "reason"],
            registry=r,
        )
        self.invalid = Counter(
            "rtlm_invalid_requests", "Requests refused as malformed", ["status"], registry=r
        )
        self.retries = Counter(
            "rtlm_retries", "Requests retried on another backend", ["backend"], registry=r
        )
        self.predicted_tokens = Histogram(
            "rtlm_predicted_output_tokens",
            "Predicted output tokens at arrival",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.actual_tokens = Histogram(
            "rtlm_actual_output_tokens",
            "Output tokens of completed requests",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.tau = Gauge(
            "rtlm_prediction_kendall_tau",
            f"Kendall tau of predicted vs actual output tokens over the last {TAU_WINDOW}",
            registry=r,
        )
        self.response_time = Histogram(
            "rtlm_response_time_seconds",
            "Arrival to last byte, per backend",
            ["backend"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "rtlm_ttft_seconds",
            "Arrival to first token (streams), per backend",
            ["backend"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.deadline_misses = Counter(
            "rtlm_deadline_misses",
            "Completed requests that finished after their deadline",
            registry=r,
        )
        self.knob = Gauge("rtlm_knob", "The knobs in force", ["name"], registry=r)
        self.policy_guard = Gauge(
            "rtlm_policy_guard",
            "A learned policy's guard (ppo): handbacks and resumes so far, trials judged, "
            "learned_active (1 while the learned policy holds the knobs, 0 while the heuristic) "
            "shadow_ratio (the latest shadow replays' mean response time, learned over "
            "heuristic) and debt_s (what a handed-back policy's replays must make up before it "
            "resumes, seconds)",
            ["figure"],
            registry=r,
        )
        for reason in FAILURE_REASONS:  # visible at 0 from the start
            self.requests.labels("failed", reason)
        self.requests.labels("completed", "")
        self._pairs: deque[tuple[float, int]] = deque(maxlen=TAU_WINDOW)
        self._since_tau = 0
        self._knobs: Knobs | None = None

    def record_end(self, predicted_tokens: float, completion: Completion) -> None:
        """Count one ended request (called exactly once per request)."""
        if completion.error is not None:
            self.requests.labels("failed", completion.failure).inc()
            return
        self.requests.labels("completed", "").inc()
        self.actual_tokens.observe(completion.output_tokens)
        self.response_time.labels(completion.executor).observe(completion.response_time)
        if completion.first_token_time is not None:
            self.ttft.labels(completion.executor).observe(
                completion.first_token_time - completion.arrival_time
            )
        if completion.missed_deadline:
            self.deadline_misses.inc()
        self._pairs.append((predicted_tokens, completion.output_tokens))
        self._since_tau += 1
        if self._since_tau >= TAU_EVERY and len(self._pairs) >= 8:
            self._since_tau = 0
            predicted, actual = zip(*self._pairs, strict=True)
            tau = kendalltau(predicted, actual).statistic
            self.tau.set(tau if tau == tau else 0.0)  # NaN when one side is constant

    def record_knobs(self, knobs: Knobs) -> None:
        if knobs is self._knobs:
            return
        self._knobs = knobs
        for name, value in knobs.as_dict().items():
            self.knob.labels(name).set(float("inf") if value is None else float(value))

    def count(self, outcome: str, reason: str = "") -> float:
        """The current value of ``rtlm_requests_total{outcome, reason}`` (for checks)."""
        value = self.registry.get_sample_value(
            "rtlm_requests_total", {"outcome": outcome, "reason": reason}
        )
        return value or 0.0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
