"""A workload served on real executors in real time, with what a benchmark records of it.

:func:`run_real_policy` serves a workload under one policy on
:class:`~rtlm_adapt.serving.realtime.RealTimeLoop` and records, per executor, every
single-iteration step (what ``rtlm-adapt profile --from-run`` fits a profile to) and how far the
real step times were from the profile's. :func:`request_records` and :func:`step_records` write
a run into serve-bench's JSON.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.calibration.step_fit import STEP_COLUMNS
from rtlm_adapt.experiment import PrecomputedFeaturesController, Workload, workload_features
from rtlm_adapt.metrics import Summary, summarize
from rtlm_adapt.predictor import LengthPredictor
from rtlm_adapt.request import Completion


@dataclass
class RealRun:
    name: str
    summary: Summary
    completions: list[Completion]
    offloaded: int
    #: per executor: steps, busy seconds, real step time / the profile's prediction, batch
    step_check: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    #: per executor: every single-iteration step, a tuple in ``STEP_COLUMNS`` order (what a
    #: profile can be fitted to: ``rtlm-adapt profile --from-run``)
    steps: dict[str, list[tuple]] = dataclasses.field(default_factory=dict)


def run_real_policy(
    policy: str,
    workload: Workload,
    primary,
    secondary=None,
    *,
    profiles: dict[str, StepCost],
    threads: dict[str, int] | None = None,
    tier: str = "lexical",
    wall_timeout_s: float | None = 120.0,
    on_completion: Callable[[Completion], None] | None = None,
) -> RealRun:
    """Serve ``workload`` in real time under ``policy``; every request ends (checked)."""
    from rtlm_adapt.serving.realtime import RealTimeLoop

    controller = PrecomputedFeaturesController(
        policy,
        profiles=profiles,
        batching="continuous",
        predictor=LengthPredictor.pretrained(tier),
        features=workload_features(workload, tier),
    )
    loop = RealTimeLoop(
        controller,
        primary,
        secondary,
        threads=threads,
        wall_timeout_s=wall_timeout_s,
        on_completion=on_completion,
    )
    checks: dict[str, list[float]] = {name: [0.0, 0.0, 0, 0] for name in profiles}
    seen: dict[str, set[str]] = {name: set() for name in profiles}
    left: dict[str, int] = {name: 0 for name in profiles}
    steps: dict[str, list[tuple]] = {name: [] for name in profiles}
    origin = time.perf_counter()
    on_step = controller.on_step

    def record(name: str, step) -> None:
        # real step seconds vs what the profile predicts for the same batch, context, prefill
        # and membership changes (joiners: first seen in this step; leavers: ended in the last)
        if name in checks and step.iterations == 1:
            cost = profiles[name]
            joins = len(set(step.new_tokens) - seen[name])
            seen[name].update(step.new_tokens)
            attended = step.attended_tokens or step.context_tokens
            ctx = attended if cost.padded_context else step.context_tokens
            steps[name].append(
                (
                    step.batch_size,
                    step.context_tokens,
                    attended,
                    step.prefill_tokens,
                    joins,
                    left[name],
                    step.duration_s,
                    time.perf_counter() - origin,  # when the loop took the result
                )
            )
            c = checks[name]
            c[0] += step.duration_s
            c[1] += cost.step_time(
                step.batch_size, ctx, step.prefill_tokens, joins=joins, leaves=left[name]
            )
            c[2] += 1
            c[3] += step.batch_size
            left[name] = len(step.finished)
        on_step(name, step)

    controller.on_step = record
    executors = {"primary": primary, "secondary": secondary}
    stats_before = {
        name: dict(ex.batch_stats) for name, ex in executors.items() if hasattr(ex, "batch_stats")
    }
    result = loop.run(workload.requests)
    step_check = {
        name: {
            "steps": int(c[2]),
            "real_over_profile": c[0] / c[1] if c[1] else float("nan"),
            "busy_s": c[0],
            "mean_batch": c[3] / c[2] if c[2] else 0.0,
        }
        for name, c in checks.items()
    }
    for name, before in stats_before.items():
        # batch-cache membership work: in-place joins/leaves and full rebuilds in this run
        after = executors[name].batch_stats
        step_check.setdefault(name, {}).update({k: after[k] - before[k] for k in before})
    ids = {c.request_id for c in result.completions}
    if len(result.completions) != len(workload.requests) or ids != {
        r.id for r in workload.requests
    }:
        raise RuntimeError(
            f"{policy}: {len(result.completions)} completions for {len(workload.requests)} requests"
        )
    offloaded = sum(1 for c in result.completions if secondary and c.executor == secondary.name)
    return RealRun(
        policy, summarize(result.completions), result.completions, offloaded, step_check, steps
    )


def request_records(completions: Sequence[Completion]) -> list[dict[str, Any]]:
    """Per request (in id order): output tokens, response time, executor, error; enough to
    replay the run through another profile later (``replay_json``)."""
    return [
        {
            "id": c.request_id,
            "output_tokens": c.output_tokens,
            "response_time_s": round(c.response_time, 4),
            "executor": c.executor,
            "error": c.error,
        }
        for c in sorted(completions, key=lambda c: c.request_id)
    ]


def step_records(steps: dict[str, list[tuple]]) -> dict[str, dict[str, list]]:
    """Per executor: the recorded steps as ``{"columns": STEP_COLUMNS, "rows": [...]}``
    (seconds to the microsecond)."""
    return {
        name: {
            "columns": list(STEP_COLUMNS),
            "rows": [[*row[:-2], round(row[-2], 6), round(row[-1], 6)] for row in rows],
        }
        for name, rows in steps.items()
    }
