"""Fit a StepCost to the steps a real serving run took.

``rtlm-adapt serve-bench`` records every single-iteration step of each executor (batch size,
context, prefill tokens, joins, leaves, seconds) in its JSON (``policies.NAME.steps``). A
profile fitted to those steps charges what the served loop actually pays, including whatever
the synthetic profiler (``rtlm_adapt.calibration.profiler``) does not see: the loop's own work
between forwards, the cache layout of a long-running batch, the machine's load at the time.

The model is StepCost's linear form, fitted by non-negative least squares on the features
``[1, batch, context, has_prefill, prefill_tokens, joins, leaves]`` (``context``: the attended
context as the base profile charges it, ``batch * longest`` when ``padded_context``). In real
serving every joiner is prefilled in its first step, so ``joins`` and ``has_prefill`` move
together and the split between ``join_s`` and ``prefill_s_base`` is loosely determined; their
sum, what a join step costs, is what the fit pins down. ``run_steps`` reads a run's steps,
timed by default by their whole cycle in the serving loop (see ``TARGETS``).

>>> base = StepCost("b", 0.01, 0.002, 1e-5, 0.02, 1e-4, padded_context=True)
>>> rows = [
...     (b, c * b, c * b, p, j, 0, base.step_time(b, c * b, p, joins=j))
...     for b in range(1, 9) for c in (50, 200) for p, j in ((0, 0), (30, 1), (90, 2))
... ]
>>> fit = fit_step_cost(rows, base, name="fitted", source="doctest")
>>> round(fit.decode_s_per_seq, 6), round(fit.prefill_s_per_token, 6)
(0.002, 0.0001)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rtlm_adapt.calibration.step_cost import COST_COEFFICIENTS, StepCost

#: What ``fit_step_cost`` fits, per step, in this order. ``context_tokens``: the batch's total
#: context; ``attended_tokens``: what its decode attended to (``batch * longest`` for a padded
#: executor; ``context_tokens`` where the executor does not say); ``joins``: requests whose
#: first step this was; ``leaves``: requests that ended in the previous step; ``duration_s``:
#: real seconds.
FIT_COLUMNS = (
    "batch_size",
    "context_tokens",
    "attended_tokens",
    "prefill_tokens",
    "joins",
    "leaves",
    "duration_s",
)
#: One recorded step (serve-bench's ``steps.EXECUTOR.columns``): ``FIT_COLUMNS`` and
#: ``done_at_s``, when the serving loop took the step's result (seconds from the run's start).
STEP_COLUMNS = (*FIT_COLUMNS, "done_at_s")

#: ``run_steps`` targets: ``cycle``, the seconds from the previous step's result to this one's
#: (the step plus the loop's own work around it: what serving pays per iteration), or
#: ``step``, the executor's step alone (``duration_s``).
TARGETS = ("cycle", "step")

#: Steps slower than the first fit by more than this many robust standard deviations of the
#: relative residual are dropped before the refit.
OUTLIER_SIGMAS = 3.0


def step_features(rows: np.ndarray, padded_context: bool) -> np.ndarray:
    """The fit's design matrix for ``rows`` (an array in ``FIT_COLUMNS`` order): one column
    per StepCost coefficient, in ``COST_COEFFICIENTS`` order."""
    batch, ctx, attended, prefill, joins, leaves = (rows[:, i] for i in range(6))
    context = attended if padded_context else ctx
    has_prefill = (prefill > 0).astype(float)
    ones = np.ones(len(rows))
    return np.column_stack([ones, batch, context, has_prefill, prefill, joins, leaves])


def _nnls(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    # columns span 1 to ~10^4 tokens: scale them to a common size so the solver's tolerances
    # treat every coefficient alike, then undo the scaling
    scale = np.abs(features).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(features / scale, targets)
    return coef / scale


def _check_rows(rows: Sequence[Sequence[float]], min_steps: int) -> np.ndarray:
    try:
        data = np.asarray(rows, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"step rows must be numbers in columns {FIT_COLUMNS}: {exc}") from exc
    if data.ndim != 2 or (len(data) and data.shape[1] != len(FIT_COLUMNS)):
        raise ValueError(f"step rows must have {len(FIT_COLUMNS)} columns {FIT_COLUMNS}")
    if len(data) < min_steps:
        raise ValueError(f"too few steps to fit a profile: {len(data)}, need at least {min_steps}")
    bad = ~np.isfinite(data)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"non-finite {FIT_COLUMNS[j]} in step {i}: {data[i, j]!r}")
    negative = data < 0
    if negative.any():
        i, j = np.argwhere(negative)[0]
        raise ValueError(f"negative {FIT_COLUMNS[j]} in step {i}: {data[i, j]!r}")
    if (data[:, 0] < 1).any():
        raise ValueError(f"batch_size must be >= 1 (step {int(np.argmax(data[:, 0] < 1))})")
    if (data[:, 6] <= 0).any():
        raise ValueError(f"duration_s must be > 0 (step {int(np.argmax(data[:, 6] <= 0))})")
    return data


def fit_step_cost(
    rows: Sequence[Sequence[float]],
    base: StepCost,
    *,
    name: str,
    source: str,
    min_steps: int = 20,
) -> StepCost:
    """A StepCost fitted to real steps (``rows`` in ``FIT_COLUMNS`` order).

    ``base`` supplies what steps cannot tell: ``max_batch_size``, ``padded_context`` (which
    context column is charged) and ``kv_token_budget``, and the coefficient of any term the
    steps never exercise (no prefill, no joins or no leaves): those are kept and named in the
    profile's ``source``. ``source`` says where the rows came from (run file, policy,
    executor); it is kept in ``extra["fitted_from"]``.
    """
    data = _check_rows(rows, min_steps)
    features = step_features(data, base.padded_context)
    targets = data[:, 6]
    base_coef = np.array([getattr(base, k) for k in COST_COEFFICIENTS])
    # a term the steps never exercise would be fitted as 0 by default: keep base's instead
    unseen = {
        "prefill": not (data[:, 3] > 0).any(),
        "joins": not (data[:, 4] > 0).any(),
        "leaves": not (data[:, 5] > 0).any(),
    }
    kept = {3, 4} if unseen["prefill"] else set()
    kept |= {5} if unseen["joins"] else set()
    kept |= {6} if unseen["leaves"] else set()
    free = [i for i in range(len(COST_COEFFICIENTS)) if i not in kept]
    fixed = [i for i in range(len(COST_COEFFICIENTS)) if i in kept]

    def fit(mask: np.ndarray) -> np.ndarray:
        coef = base_coef.copy()
        rest = targets[mask] - features[mask][:, fixed] @ base_coef[fixed]
        coef[free] = _nnls(features[mask][:, free], rest)
        return coef

    # Robustness: a real run has a few steps stalled by things that are not the executor's
    # cost (a garbage collection, another job taking the core, the OS); they only ever make a
    # step slower, and a handful of multi-second stalls would pull the per-token terms. So fit,
    # drop the steps slower than the fit by more than OUTLIER_SIGMAS robust (MAD) standard
    # deviations of the relative residual (relative: a prefill step is 10x a decode step), and
    # refit once. One-sided trimming, not Huber: fast steps are real and must keep their weight.
    # The seconds dropped are reported (extra), since the served loop did pay them.
    keep = np.ones(len(data), dtype=bool)
    coef = fit(keep)
    predicted = np.maximum(features @ coef, 1e-9)
    rel = (targets - predicted) / predicted
    mad = 1.4826 * np.median(np.abs(rel - np.median(rel)))
    outliers = rel > np.median(rel) + OUTLIER_SIGMAS * max(mad, 1e-3)
    if outliers.any() and (~outliers).sum() >= min(min_steps, len(data)):
        keep = ~outliers
        coef = fit(keep)

    values = {k: float(v) for k, v in zip(COST_COEFFICIENTS, coef, strict=True)}
    if values["decode_s_base"] + values["decode_s_per_seq"] <= 0:
        raise ValueError(
            "the fit gives a decode step no fixed or per-request cost (steps too uniform?)"
        )
    predicted = features @ coef
    rel_err = np.abs(predicted - targets) / targets
    notes = []
    if unseen["prefill"]:
        notes.append("no step prefilled anything: prefill coefficients kept from the base")
    if unseen["joins"]:
        notes.append("no joins: join_s kept from the base")
    if unseen["leaves"]:
        notes.append("no leaves: leave_s kept from the base")
    text = (
        f"fitted by fit_step_cost (non-negative least squares, {int((~keep).sum())} slow "
        f"outliers dropped) to {int(keep.sum())} of {len(data)} real steps from {source}; "
        f"base profile {base.name!r}"
    )
    if notes:
        text += ". " + "; ".join(notes)
    return dataclasses.replace(
        base,
        name=name,
        **values,
        source=text,
        extra={
            "fitted_from": source,
            "base_profile": base.name,
            "steps": len(data),
            "steps_kept": int(keep.sum()),
            "fit_mean_rel_err": round(float(rel_err[keep].mean()), 4),
            "fit_mean_rel_err_all_steps": round(float(rel_err.mean()), 4),
            # real seconds over predicted, all steps: what the simulator misses in total
            "real_over_fit_busy_s": round(float(targets.sum() / predicted.sum()), 4),
            "outlier_share_of_busy_s": round(float(targets[~keep].sum() / targets.sum()), 4),
            "kept_from_base": [COST_COEFFICIENTS[i] for i in fixed],
            "mean_batch": round(float(data[:, 0].mean()), 3),
        },
    )


def run_steps(
    payload: Mapping[str, Any],
    *,
    policy: str | None = None,
    executor: str = "primary",
    target: str = "cycle",
) -> list[list[float]]:
    """The recorded steps of ``executor`` in a serve-bench JSON ``payload`` (one policy's run,
    or every policy's pooled when ``policy`` is None), as rows in ``FIT_COLUMNS`` order.

    ``target="cycle"`` puts in ``duration_s`` the seconds between the loop taking the
    previous step's result and this one's: the step plus the loop's own work between steps
    (completions, the controller's decisions, admitting and tokenising joiners, handing the
    step to the executor's thread), which the simulator otherwise never charges. Where the
    executor sat idle before a step (its batch had emptied), the cycle would include the wait
    for an arrival: such a step gets its own duration plus the median overhead of the others.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    policies = payload.get("policies")
    if not isinstance(policies, Mapping) or not policies:
        raise ValueError("not a serve-bench JSON: no 'policies'")
    if policy is not None and policy not in policies:
        raise ValueError(f"policy {policy!r} not in the run (it has {sorted(policies)})")
    rows: list[list[float]] = []
    for name in [policy] if policy is not None else list(policies):
        steps = policies[name].get("steps")
        if steps is None:
            raise ValueError(
                f"policy {name!r} has no recorded steps (a serve-bench JSON from before steps "
                "were recorded?)"
            )
        if executor not in steps:
            raise ValueError(
                f"policy {name!r} recorded no steps of executor {executor!r} "
                f"(it has {sorted(steps)})"
            )
        columns = list(steps[executor]["columns"])
        wanted = STEP_COLUMNS if target == "cycle" else FIT_COLUMNS
        missing = [c for c in wanted if c not in columns]
        if missing:
            hint = " (fit target='step' instead)" if missing == ["done_at_s"] else ""
            raise ValueError(f"policy {name!r}: steps lack columns {missing}{hint}")
        order = [columns.index(c) for c in wanted]
        policy_rows = [[row[i] for i in order] for row in steps[executor]["rows"]]
        rows.extend(_cycles(policy_rows) if target == "cycle" else policy_rows)
    return rows


def _cycles(rows: list[list[float]]) -> list[list[float]]:
    """``STEP_COLUMNS`` rows of one run -> ``FIT_COLUMNS`` rows timed by their cycles."""
    # step k follows its predecessor at once when the predecessor's batch outnumbered its
    # leavers (requests were still running): then the cycle holds no idle wait
    busy = [k > 0 and rows[k - 1][0] > rows[k][5] for k in range(len(rows))]
    gaps = [rows[k][7] - rows[k - 1][7] - rows[k][6] for k in range(len(rows)) if busy[k]]
    overhead = max(0.0, float(np.median(gaps))) if gaps else 0.0
    return [
        [*row[:6], row[7] - rows[k - 1][7] if busy[k] else row[6] + overhead]
        for k, row in enumerate(rows)
    ]


def run_profile(payload: Mapping[str, Any], executor: str = "primary") -> StepCost:
    """The profile ``executor`` was served with in a serve-bench run (stored in its JSON, or
    a packaged profile by the name it records)."""
    stored = payload.get("profiles", {}).get(executor)
    if stored:
        return StepCost.from_dict(stored)
    named = payload.get("profile" if executor == "primary" else f"{executor}_profile")
    if not named:
        raise ValueError(f"the run names no profile for {executor!r}: give a base profile")
    try:
        return StepCost.load(named)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"the run's {executor} profile {named!r}: {exc}; give a base") from exc
