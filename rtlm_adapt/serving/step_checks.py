"""Checks on what an executor reports: a step result or a completion the loop can trust.

An executor is outside code (a real model, an engine, a simulator); the serving loop learns only
from results that pass these checks and faults the rest (see :mod:`rtlm_adapt.serving.loop`).
Each check returns why the value cannot be trusted, or None.

>>> from rtlm_adapt.serving.base import StepResult
>>> check_step(StepResult(duration_s=0.1, iterations=1, batch_size=2)) is None
True
>>> check_step(StepResult(duration_s=float("nan"), iterations=1, batch_size=2))
'duration_s=nan'
"""

from __future__ import annotations

import math
import numbers

from rtlm_adapt.request import Completion
from rtlm_adapt.serving.base import StepResult


def is_count(value: object) -> bool:
    # numbers.Integral admits numpy integers, which real executors may well return
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def is_time(value: object) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def check_step(result: object) -> str | None:
    """Why a step result cannot be trusted, or None. O(batch): cheap next to the step."""
    if not isinstance(result, StepResult):
        return f"step returned {type(result).__name__}, not a StepResult"
    if not is_time(result.duration_s):
        return f"duration_s={result.duration_s!r}"
    for name in ("iterations", "batch_size", "prefill_tokens", "context_tokens"):
        if not is_count(getattr(result, name)):
            return f"{name}={getattr(result, name)!r}"
    if not isinstance(result.finished, list) or not isinstance(result.new_tokens, dict):
        return "finished/new_tokens have the wrong types"
    if not all(is_count(n) for n in result.new_tokens.values()):
        return "negative or non-integer new_tokens"
    return None


def check_completion(c: object) -> str | None:
    if not isinstance(c, Completion):
        return f"{type(c).__name__} is not a Completion"
    if not is_count(c.output_tokens):
        return f"output_tokens={c.output_tokens!r}"
    for name in ("arrival_time", "start_time", "finish_time"):
        if not is_time(getattr(c, name)):
            return f"{name}={getattr(c, name)!r}"
    if c.finish_time < c.start_time:
        return "finish_time before start_time"
    if c.first_token_time is not None and not is_time(c.first_token_time):
        return f"first_token_time={c.first_token_time!r}"
    return None
