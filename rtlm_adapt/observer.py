"""What a policy sees: the :class:`~rtlm_adapt.observation.Observation` built from the controller's
queue, executors, latency model and smoothed signals, and the primary's knee batch size that the
RT-LM heuristic caps its batches at.

Queue statistics are over at most :data:`OBSERVE_SAMPLE` waiting requests (the oldest wait is
exact), so an epoch costs the same whatever the queue length.

>>> from rtlm_adapt.latency import LatencyModel
>>> from rtlm_adapt.calibration.step_cost import StepCost
>>> knee_batch(LatencyModel(StepCost.default()), max_batch=16, context_per_seq=200.0) <= 16
True
"""

from __future__ import annotations

import math

from rtlm_adapt.executor_models import ExecutorModels
from rtlm_adapt.latency import LatencyModel
from rtlm_adapt.live_request import LiveRequest
from rtlm_adapt.observation import Observation
from rtlm_adapt.predictor import LengthPredictor
from rtlm_adapt.queue import RequestQueue
from rtlm_adapt.signals import ServingSignals

#: Waiting requests an observation summarises (a sample: the queue may hold thousands).
OBSERVE_SAMPLE = 128

#: Prompt tokens assumed per request when the observation estimates the primary's capacity.
_TYPICAL_PROMPT_TOKENS = 64


def observe(
    now: float,
    queue: RequestQueue,
    executors: ExecutorModels,
    signals: ServingSignals,
    predictor: LengthPredictor,
    reference_batch: int,
) -> Observation:
    """The observation at ``now``.

    ``predictor`` gives the mean length assumed when nothing waits; ``reference_batch`` stands
    for the primary's batch before it has reported.
    """
    lengths, uncert, min_slack = [], 0.0, math.inf
    entry: LiveRequest
    for entry in queue.sample(OBSERVE_SAMPLE):
        lengths.append(entry.prediction.length)
        uncert += entry.uncertainty
        if entry.request.deadline is not None:
            min_slack = min(min_slack, entry.request.deadline - now)
    first = queue.oldest()
    oldest = max(0.0, now - first.arrival_time) if first is not None else 0.0
    lengths.sort()
    n = len(lengths)
    primary = executors.states.get(executors.primary or "")
    secondary = executors.secondary()
    latency = executors.primary_latency()
    batch = max(1, primary.max_batch_size if primary else reference_batch)
    mean_len = sum(lengths) / n if n else predictor.predict_one({}).length
    per_request = latency.service_time(_TYPICAL_PROMPT_TOKENS, mean_len, batch_size=batch)
    capacity = batch / max(1e-9, per_request)
    slowdown = 0.0
    if secondary is not None and secondary.max_batch_size > 0:
        on_secondary = executors.latency_for(secondary.name).service_time(
            _TYPICAL_PROMPT_TOKENS, mean_len, batch_size=secondary.max_batch_size)
        slowdown = on_secondary / max(1e-9, per_request)
    return Observation(
        now=now,
        queue_length=len(queue),
        primary_running=primary.running if primary else 0,
        primary_max_batch=primary.max_batch_size if primary else reference_batch,
        secondary_running=secondary.running if secondary else 0,
        secondary_max_batch=secondary.max_batch_size if secondary else 0,
        pred_len_mean=mean_len if n else 0.0,
        pred_len_p90=lengths[min(n - 1, int(0.9 * n))] if n else 0.0,
        uncertainty_mean=uncert / n if n else 0.0,
        oldest_wait_s=oldest,
        min_slack_s=min_slack,
        arrival_rate=signals.arrival_rate,
        service_time_s=signals.service_ewma,
        load=signals.arrival_rate / capacity if capacity > 0 else 0.0,
        recent_response_s=signals.response_ewma,
        recent_miss_rate=signals.miss_ewma,
        step_time_s=signals.step_ewma,
        primary_knee_batch=knee_batch(latency, batch, _TYPICAL_PROMPT_TOKENS + mean_len / 2),
        pred_len_p50=lengths[n // 2] if n else 0.0,
        secondary_slowdown=slowdown,
        typical_len=signals.length_ewma,
    )


def knee_batch(
    model: LatencyModel, max_batch: int, context_per_seq: float, share: float = 0.95
) -> int:
    """Smallest batch whose decode throughput is ``share`` of the throughput at ``max_batch``,
    per the latency model (sequences of ``context_per_seq`` tokens each).

    The model's step time is affine in the batch with non-negative coefficients, so throughput
    never falls as the batch grows and a bisection finds the knee (an in-flight cap of a million,
    "no cap", costs 20 probes instead of a scan).

    >>> from rtlm_adapt.calibration.step_cost import StepCost
    >>> model = LatencyModel(StepCost("toy", 0.02, 0.001, 0.0, 0.0, 0.0))
    >>> knee_batch(model, 64, 100.0), knee_batch(model, 1_000_000, 100.0)
    (53, 380)
    """

    def throughput(b: int) -> float:
        return b / max(1e-12, model.step_time(b, int(b * context_per_seq)))

    target = share * throughput(max_batch)
    low, high = 1, max_batch  # throughput(high) >= target; find the smallest such batch
    while low < high:
        mid = (low + high) // 2
        if throughput(mid) >= target:
            high = mid
        else:
            low = mid + 1
    return low
