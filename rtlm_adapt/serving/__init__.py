"""Serving loop and executors (backends)."""

# StepCost lives in calibration; served from here too, where users have imported it from
from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.serving.base import Executor, ExecutorState, StepResult

__all__ = ["Executor", "ExecutorState", "StepCost", "StepResult"]
