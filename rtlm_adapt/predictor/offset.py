"""The per-deployment offset: a log-scale bias that follows the served model's verbosity.

Deployments differ mostly in how verbose the served model is (AlpacaEval models differ by 2x in
median length on the same prompts), so a bias in log space (a scale on tokens) learns quickly. It
takes small steps on the clipped residuals and jumps to the new level when river's ``ADWIN``
detects a change in them (a model swap, a new workload).

>>> offset = DriftingOffset(learning_rate=0.05)
>>> for _ in range(300):
...     _ = offset.learn_one(0.0)
>>> drifts = [offset.learn_one(1.0) for _ in range(300)]
>>> offset.n_drifts >= 1 and offset.predict_one() > 0.9
True
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from river import drift

__all__ = ["Drift", "DriftingOffset"]

logger = logging.getLogger("rtlm_adapt.predictor")


class Drift(NamedTuple):
    """A detected change: the offset moved by ``shift``; the last ``width`` residuals are
    the ones measured since the change."""

    shift: float
    width: int


class DriftingOffset:
    """A bias learnt by small steps, with ADWIN on the residuals (``drift_delta`` None: off)."""

    def __init__(self, learning_rate: float = 0.025, drift_delta: float | None = 0.002) -> None:
        self.learning_rate = learning_rate
        self.drift_delta = drift_delta
        self.value = 0.0
        self.n_drifts = 0
        self.adwin = drift.ADWIN(delta=drift_delta) if drift_delta is not None else None

    def predict_one(self) -> float:
        """The current offset (log space)."""
        return self.value

    def learn_one(self, residual: float) -> Drift | None:
        """Step towards ``residual`` (already clipped); return the drift if one is detected."""
        self.value += self.learning_rate * residual
        adwin = self.adwin
        if adwin is None:
            return None
        adwin.update(residual)
        if not adwin.drift_detected:
            return None
        # ADWIN dropped the old part of its window; its estimate is now the mean residual since
        # the change. Jump by it instead of waiting for the slow steps, and restart the detector
        # on the corrected residuals.
        shift = adwin.estimation
        self.value += shift
        self.n_drifts += 1
        logger.info(
            "LengthPredictor: drift in residuals (recent mean %.2f); offset moved by it",
            shift,
        )
        self.adwin = drift.ADWIN(delta=self.drift_delta)
        return Drift(shift, int(adwin.width))
