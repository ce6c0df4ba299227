"""Measure a real executor and fit StepCost's linear cost model to it.

Prefill cost is measured against prompt length (one prompt per forward), decode cost against
batch size and per-request context, both through the executor's own code paths
(``HFExecutor.time_prefill`` and ``HFExecutor.time_decode``), and, where the executor has
``time_membership``, what a request joining or leaving a running batch costs beyond that
(``join_s``, ``leave_s``: the mean over the measured batch sizes and contexts). The fit is
ordinary least squares with the coefficients kept non-negative (StepCost requires it), the
measured points are stored in ``extra`` so that a fit can be checked or redone later.

Profile SmolLM2 in a fresh process (the thread count must be set before any work)::

    rtlm-adapt profile --threads 2 --max-batch-size 16 --out cpu2.json
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np

from rtlm_adapt.serving.profile import StepCost


def nonneg_lstsq(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (active set: drop negatives, refit).

    Enough for the 2-3 coefficients fitted here; no scipy needed.

    >>> x = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    >>> nonneg_lstsq(x, np.array([1.0, 0.9, 0.8])).round(3).tolist()
    [0.9, 0.0]
    """
    active = list(range(features.shape[1]))
    coef = np.zeros(features.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(features[:, active], targets, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0.0
            coef[active] = sol
            return coef
        active = [a for a, v in zip(active, sol, strict=True) if v >= 0]
    return coef


def robust_fit(
    features: np.ndarray, targets: np.ndarray, passes: int = 2, cutoff: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """``nonneg_lstsq`` that drops outliers: points slower than the fit by more than
    ``cutoff`` times the median absolute residual, refitting up to ``passes`` times.

    Other jobs on a shared machine only make points slower, so only those are dropped.
    Returns the coefficients and a boolean mask of the points kept.
    """
    keep = np.ones(len(targets), dtype=bool)
    coef = nonneg_lstsq(features, targets)
    for _ in range(passes):
        residual = targets - features @ coef
        scale = np.median(np.abs(residual[keep])) + 1e-9
        new_keep = residual <= cutoff * scale
        if new_keep.sum() < features.shape[1] + 1 or (new_keep == keep).all():
            break
        keep = new_keep
        coef = nonneg_lstsq(features[keep], targets[keep])
    return coef, keep


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_description() -> str:
    """Platform, CPU count and torch threads (and the GPU, if one is used)."""
    import torch

    parts = [
        platform.platform(),
        platform.processor() or platform.machine(),
        f"{os.cpu_count()} CPUs",
        f"torch {torch.__version__} with {torch.get_num_threads()} threads",
    ]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    return ", ".join(parts)


def profile_executor(
    executor: Any,
    prompt_lengths: Sequence[int] = (16, 64, 128, 256, 512),
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
    context_lengths: Sequence[int] = (64, 256, 512),
    repeats: int = 3,
    *,
    name: str | None = None,
    model: str = "",
    max_batch_size: int | None = None,
    kv_token_budget: int | None = None,
    note: str = "",
) -> StepCost:
    """Measure ``executor`` (an HFExecutor) and fit a StepCost to the timings.

    Parameters
    ----------
    executor
        Has ``time_prefill(prompt_tokens)`` and ``time_decode(batch_size, context, steps)``.
    prompt_lengths, batch_sizes, context_lengths
        The grid measured; decode points are every (batch size, context) pair.
    repeats
        Timings per point; their minimum is fitted. On a shared machine other jobs only ever
        add time, so the minimum is the best estimate of the executor's own cost (the serving
        loop's latency model then learns the real, contended, cost online).
    name, model, max_batch_size, kv_token_budget, note
        Copied into the StepCost (``model`` and ``note`` go into ``source``).
    """
    load_before = _load_average()
    executor.time_prefill(min(prompt_lengths))  # warm-up: first calls allocate and tune
    executor.time_decode(min(batch_sizes), min(context_lengths), steps=2)

    prefill = []
    for n in prompt_lengths:
        prefill.append((n, min(executor.time_prefill(n) for _ in range(repeats))))
    decode = []
    rebuild = []
    for b in batch_sizes:
        for ctx in context_lengths:
            build, times = executor.time_decode(b, ctx, steps=repeats)
            decode.append((b, ctx, min(times)))
            rebuild.append((b, ctx, build))

    p = np.array(prefill, dtype=float)
    prefill_coef, prefill_kept = robust_fit(np.column_stack([np.ones(len(p)), p[:, 0]]), p[:, 1])
    d = np.array(decode, dtype=float)
    # context_tokens in StepCost is the total across the batch: batch * per-request context
    features = np.column_stack([np.ones(len(d)), d[:, 0], d[:, 0] * d[:, 1]])
    decode_coef, decode_kept = robust_fit(features, d[:, 2])
    decode_rel_err = (np.abs(features @ decode_coef - d[:, 2]) / d[:, 2])[decode_kept]
    r = np.array(rebuild, dtype=float)
    rebuild_per_token = float(
        np.sum(r[:, 0] * r[:, 1] * r[:, 2]) / np.sum((r[:, 0] * r[:, 1]) ** 2)
    )
    membership = {}
    if hasattr(executor, "time_membership"):
        joiner = int(np.median(prompt_lengths))
        for b in batch_sizes:
            for ctx in context_lengths:
                if b >= 2:
                    membership[(b, ctx)] = executor.time_membership(b, ctx, joiner, repeats)
    join_s = float(np.mean([m["join"] for m in membership.values()])) if membership else 0.0
    leave_s = float(np.mean([m["leave"] for m in membership.values()])) if membership else 0.0

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    source = f"measured by profile_executor on {date}: {model or 'model'}; {machine_description()}"
    if note:
        source += f". {note}"
    return StepCost(
        name=name or getattr(executor, "name", "profiled"),
        decode_s_base=float(decode_coef[0]),
        decode_s_per_seq=float(decode_coef[1]),
        decode_s_per_ctx_token=float(decode_coef[2]),
        prefill_s_base=float(prefill_coef[0]),
        prefill_s_per_token=float(prefill_coef[1]),
        max_batch_size=max_batch_size or getattr(executor, "max_batch_size", 16),
        kv_token_budget=kv_token_budget,
        join_s=join_s,
        leave_s=leave_s,
        padded_context=bool(getattr(executor, "padded_context", False)),
        source=source,
        extra={
            "prefill_points_s": {str(n): round(t, 5) for n, t in prefill},
            "decode_points_s": {f"b{b}_ctx{c}": round(t, 5) for b, c, t in decode},
            "outliers_dropped": [
                f"prefill {n}" for (n, _), k in zip(prefill, prefill_kept, strict=True) if not k
            ]
            + [
                f"decode b{b}_ctx{c}"
                for (b, c, _), k in zip(decode, decode_kept, strict=True)
                if not k
            ],
            "decode_fit_max_rel_err": round(float(decode_rel_err.max()), 3),
            "decode_fit_mean_rel_err": round(float(decode_rel_err.mean()), 3),
            # building the padded batch cache anew (compacting it): when a joiner does not fit
            # in place or the headroom runs out; not charged by the simulator (rare)
            "rebuild_s_per_ctx_token": rebuild_per_token,
            "membership_points_s": {
                f"b{b}_ctx{c}": {k: round(v, 5) for k, v in m.items()}
                for (b, c), m in membership.items()
            },
            "repeats": repeats,
            "load_average_before": load_before,
            "load_average_after": _load_average(),
        },
    )
