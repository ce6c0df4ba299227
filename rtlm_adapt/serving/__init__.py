"""Serving loop and executors (backends)."""

from rtlm_adapt.serving.base import Executor, ExecutorState, StepResult
from rtlm_adapt.serving.profile import StepCost

__all__ = ["Executor", "ExecutorState", "StepCost", "StepResult"]
