"""Experiments: build a workload from real data, run policies on it, summarize.

This is what ``rtlm-adapt simulate`` and the benchmarks call. Every policy sees the very same
requests (same prompts, lengths, arrivals and deadlines) and a fresh controller and executors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.data import (
    PromptSample,
    assign_deadlines,
    build_requests,
    make_arrivals,
)
from rtlm_adapt.metrics import Summary, summarize
from rtlm_adapt.predictor import LengthPredictor, PromptFeatures
from rtlm_adapt.request import Completion, Request
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.simulated import simulated_executor


@dataclass
class Workload:
    """Requests ready to replay, and how they were made."""

    requests: list[Request]
    rate_rps: float
    load: float
    mean_service_s: float
    capacity_rps: float
    description: str
    #: Prompt features per predictor tier, filled by :func:`workload_features` (kept on the
    #: workload itself, so they live and die with it).
    features_by_tier: dict[str, dict[str, PromptFeatures]] = field(
        default_factory=dict, repr=False, compare=False
    )


def capacity_rps(
    cost: StepCost, samples: Sequence[PromptSample], batch: int, batching: str = "continuous"
) -> float:
    """Requests/s the executor sustains with full batches of ``batch`` on this prompt mix,
    served in arrival order (the FCFS capacity: load 1.0 saturates FCFS).

    Continuous: a request of prompt P and output L occupies L iterations of a full batch (1/batch
    of each one's cost, at the batch's mean context) plus its own prefill. Static: a batch of
    ``batch`` random requests runs max(L) iterations, every member paying for every one.
    """
    if batching == "static":
        rng = np.random.default_rng(0)
        durations = []
        for _ in range(200):
            group = [samples[i] for i in rng.integers(0, len(samples), size=batch)]
            longest = max(s.response_tokens for s in group)
            prompt = sum(s.prompt_tokens for s in group)
            ctx = int(prompt + batch * longest / 2)
            durations.append(
                longest * cost.step_time(batch, context_tokens=ctx)
                + cost.prefill_s_base
                + cost.prefill_s_per_token * prompt
            )
        return batch / float(np.mean(durations))
    per_request = []
    for s in samples:
        ctx = batch * (s.prompt_tokens + s.response_tokens / 2)
        step = cost.step_time(batch, context_tokens=int(ctx))
        prefill = cost.prefill_s_base / batch + cost.prefill_s_per_token * s.prompt_tokens
        per_request.append(s.response_tokens * step / batch + prefill)
    return 1.0 / float(np.mean(per_request))


def mean_isolated_service_s(cost: StepCost, samples: Sequence[PromptSample]) -> float:
    return float(
        np.mean([cost.isolated_service_time(s.prompt_tokens, s.response_tokens) for s in samples])
    )


def build_workload(
    samples: Sequence[PromptSample],
    *,
    arrivals: str = "poisson",
    load: float = 0.9,
    n: int = 1000,
    seed: int = 0,
    slo: str = "0.7:2,0.3:10",
    cost: StepCost | None = None,
    batch: int | None = None,
    batching: str = "continuous",
) -> Workload:
    """Sample ``n`` prompts (with replacement if needed), arrivals at ``load`` of capacity."""
    if not samples:
        raise ValueError("build_workload() needs at least one prompt sample")
    if not (isinstance(load, (int, float)) and load > 0 and math.isfinite(load)):
        raise ValueError(f"load must be a positive number, got {load!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of requests must be an int >= 1, got {n!r}")
    cost = cost or StepCost.default()
    batch = batch or cost.max_batch_size
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(samples), size=n, replace=n > len(samples))
    chosen = [samples[i] for i in idx]
    cap = capacity_rps(cost, chosen, batch, batching)
    rate = load * cap
    times = make_arrivals(arrivals, n, rate, seed)
    mean_svc = mean_isolated_service_s(cost, chosen)
    deadlines = assign_deadlines(times, mean_svc, seed=seed, slo=slo)
    requests = build_requests(chosen, times, deadlines)  # ids are positions: unique
    desc = (
        f"{n} requests, arrivals={arrivals}, load={load} ({rate:.3f} req/s of "
        f"{cap:.3f} capacity, {batching} batches of {batch}), "
        f"mean isolated service {mean_svc:.2f}s, slo={slo}"
    )
    return Workload(requests, rate, load, mean_svc, cap, desc)


@dataclass
class PolicyRun:
    name: str
    summary: Summary
    completions: list[Completion]
    controller: AdaptiveController
    #: Requests the simulated engines preempted (engine-model profiles; 0 for the batch model).
    preemptions: int = 0


def run_policy(
    policy: str,
    workload: Workload,
    *,
    batching: str = "continuous",
    primary_cost: StepCost | None = None,
    secondary_cost: StepCost | None = None,
    controller_factory: Callable[..., AdaptiveController] | None = None,
    on_completion: Callable[[Completion], None] | None = None,
    tier: str = "lexical",
    controller_profiles: Mapping[str, StepCost] | None = None,
) -> PolicyRun:
    """Serve the workload under one policy on simulated executors.

    ``tier`` picks the length predictor (``lexical`` or ``encoder``); prompt features are
    computed once per workload, in batches, as a serving front end would upstream.
    ``controller_profiles``: the costs the controller's latency models start from, where they
    differ from what the simulated executors charge (a replay of a real run whose controller
    believed one profile while the machine cost another); default the executors' own.
    """
    primary_cost = primary_cost or StepCost.default()
    profiles = {"primary": primary_cost}
    if secondary_cost is not None:
        profiles["secondary"] = secondary_cost
    if controller_profiles is not None:
        profiles = {**profiles, **controller_profiles}
    if controller_factory is not None:
        controller = controller_factory(policy, profiles=profiles, batching=batching)
    else:
        predictor = LengthPredictor.pretrained(tier)
        controller = PrecomputedFeaturesController(
            policy,
            profiles=profiles,
            batching=batching,
            predictor=predictor,
            features=workload_features(workload, tier),
        )
    priority_of = engine_priorities(controller)
    secondary = None
    if secondary_cost is not None:
        secondary = simulated_executor(
            "secondary", secondary_cost, batching=batching, priority_of=priority_of
        )
    primary = simulated_executor(
        "primary", primary_cost, batching=batching, priority_of=priority_of
    )
    loop = ServingLoop(
        controller,
        primary,
        secondary,
        batching=batching,
        on_completion=on_completion,
    )
    result = loop.run(workload.requests)
    stats = controller.stats()
    if not stats.balanced or len(result.completions) != len(workload.requests):
        raise RuntimeError(f"accounting mismatch after the run: {stats}")
    preemptions = sum(getattr(ex, "preemptions", 0) for ex in (primary, secondary))
    return PolicyRun(
        policy, summarize(result.completions), result.completions, controller, preemptions
    )


def engine_priorities(controller: AdaptiveController) -> Callable[[Request], int]:
    """A simulated engine's lookup of vLLM's ``priority`` for each admitted request, as the
    gateway sends it (:attr:`~rtlm_adapt.live_request.LiveRequest.engine_priority`: the
    controller's key in milliseconds)."""

    def priority(request: Request) -> int:
        entry = controller.entry(request.id)
        return entry.engine_priority if entry is not None else 0

    return priority


def workload_features(workload: Workload, tier: str) -> dict[str, PromptFeatures]:
    """The predictor's features of every request by id, batched (cached on the workload).

    >>> from rtlm_adapt.request import Request
    >>> w = Workload([Request("a", "Write a poem.", 0.0, deadline=9.0)], 1.0, 0.9, 1.0, 1.0, "")
    >>> workload_features(w, "lexical") is workload_features(w, "lexical")
    True
    """
    cached = workload.features_by_tier.get(tier)
    if cached is None:
        # the encoder tier (any encoder, "encoder:NAME" too) embeds the prompts in batches
        full = LengthPredictor.pretrained(tier).features_many([r.prompt for r in workload.requests])
        cached = {r.id: f for r, f in zip(workload.requests, full, strict=True)}
        workload.features_by_tier[tier] = cached
    return cached


class PrecomputedFeaturesController(AdaptiveController):
    """A controller fed features computed upstream (batched), as a front end would."""

    def __init__(self, *args, features: Mapping[str, PromptFeatures], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._features = features

    def submit(self, request: Request, features: Mapping[Any, float] | None = None) -> None:
        if features is None:
            features = self._features.get(request.id)
        super().submit(request, features)
