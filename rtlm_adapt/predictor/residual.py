"""The residual linear model: normalised LMS on sparse rows of standardized features.

A row (:class:`Row`) is what one request's features give the model: the positions of its
weights (hashed word buckets, dense features with the prior's standardization) and their values
(1.0 for a bucket, the clipped z-score for a dense feature), plus the dense features with running
standardization, whose weights live in their :class:`~rtlm_adapt.predictor.scaling.FeatureStats`.
The weights start at the prior's, so the model learns the served model's correction on top of it.

Normalised LMS: the step on the prediction itself is ``learning_rate * error`` whatever the
number of active features, so a long prompt cannot take a bigger step than a short one.

>>> import numpy as np
>>> model = NLMSRegression(np.zeros(4), learning_rate=0.5)
>>> row = Row(np.array([0, 2]), np.array([1.0, 1.0]), norm2=3.0)
>>> for _ in range(50):
...     model.learn_one(row, 2.0 - model.predict_one(row, 0.0))
>>> round(model.predict_one(row, 0.0), 3), float(model.weights[1])
(2.0, 0.0)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# BLAS level 1 straight from scipy (a dependency of river's too, imported with it): on the
# ~60 weights a request touches, numpy's per-call dispatch costs more than the arithmetic.
from scipy.linalg.blas import daxpy, ddot

from rtlm_adapt.predictor.scaling import FeatureStats

__all__ = ["NLMSRegression", "Row"]


class Row(NamedTuple):
    """One request's features as the linear model reads them.

    ``norm2``: the squared norm of ``x`` plus 1 (the offset's input). ``running``: ``(stats,
    value)`` of the dense features with running standardization. ``repeats``: ``idx`` holds a
    position twice (hashed keys given negative, as list indices).
    """

    idx: np.ndarray
    x: np.ndarray
    norm2: float
    running: list[tuple[FeatureStats, float]] = []
    repeats: bool = False


class NLMSRegression:
    """A linear model over ``weights``, learnt by normalised LMS steps.

    ``clip``: running-standardized values are clipped to ``[-clip, clip]``.
    """

    def __init__(self, weights: np.ndarray, learning_rate: float = 0.02, clip: float = 4.0):
        self.weights = weights
        self.learning_rate = learning_rate
        self.clip = clip

    def predict_one(self, row: Row, bias: float) -> float:
        """``bias + weights[idx] @ x`` plus the running features' terms, summed in that order."""
        x = row.x
        s = bias + (ddot(self.weights[row.idx], x) if len(x) else 0.0)
        clip = self.clip
        for st, value in row.running:
            s += st.weight * st.z(value, clip)
        return s

    def learn_one(self, row: Row, error: float) -> None:
        """One normalised LMS step on ``error`` (the target minus the prediction, clipped)."""
        clip = self.clip
        zs = [(st, st.z(value, clip)) for st, value in row.running]
        norm2 = row.norm2
        for _, z in zs:
            norm2 += z * z
        step = self.learning_rate * error / norm2
        w, idx, x = self.weights, row.idx, row.x
        if row.repeats:
            np.add.at(w, idx, step * x)
        elif len(x):
            w[idx] = daxpy(x, w[idx], len(x), step)
        for st, z in zs:
            st.weight += step * z

    def __repr__(self) -> str:
        return f"NLMSRegression({len(self.weights)} weights, learning_rate={self.learning_rate})"
