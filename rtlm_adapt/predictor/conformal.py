"""Prequential conformal intervals on log-length residuals.

Each finished request is scored before it is learnt from, so its residual is an honest
out-of-sample error. Interval ends are quantiles of the recent residuals (asymmetric: length
errors are skewed), and the same residuals give the length still to come of a running request.

>>> interval = ConformalInterval(coverage=0.8, window=100, min_residuals=10)
>>> for r in range(-50, 50):
...     interval.learn_one(r / 50)
>>> low, high = interval.predict_one()
>>> round(low, 2), round(high, 2)
(-0.82, 0.8)
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from statistics import NormalDist

__all__ = ["ConformalInterval"]


class ConformalInterval:
    """Quantiles of the last ``window`` residuals; a normal guess until ``min_residuals``."""

    def __init__(
        self,
        coverage: float = 0.9,
        window: int = 500,
        min_residuals: int = 30,
        default_log_spread: float = 1.0,
    ) -> None:
        self.window = window
        self.min_residuals = min_residuals
        self.default_log_spread = default_log_spread
        alpha = 1.0 - coverage
        self.q_low = alpha / 2.0
        self.q_high = 1.0 - alpha / 2.0
        self.z_default = NormalDist().inv_cdf(self.q_high) * default_log_spread
        # Arrival order (to evict) and sorted (to read quantiles by index).
        self.fifo: deque[float] = deque()
        self.sorted: list[float] = []

    def learn_one(self, residual: float) -> None:
        """Add a residual, evicting the oldest beyond the window."""
        fifo, srt = self.fifo, self.sorted
        if len(fifo) >= self.window:
            del srt[bisect.bisect_left(srt, fifo.popleft())]
        fifo.append(residual)
        bisect.insort(srt, residual)

    def predict_one(self) -> tuple[float, float]:
        """``(low, high)`` offsets to add to a log prediction."""
        srt = self.sorted
        n = len(srt)
        if n < self.min_residuals:
            return -self.z_default, self.z_default
        # Split-conformal order statistics: widen by one rank on each side so that small
        # windows do not under-cover (the +1 in ceil((n + 1) q)).
        lo = math.floor((n + 1) * self.q_low) - 1
        hi = math.ceil((n + 1) * self.q_high) - 1
        return srt[lo if lo > 0 else 0], srt[hi if hi < n else n - 1]

    def shift(self, shift: float, keep: int) -> None:
        """After a drift: keep the last ``keep`` residuals, measured against the new level."""
        recent = list(self.fifo)[-keep:] if keep > 0 else []
        self.fifo = deque(r - shift for r in recent)
        self.sorted = sorted(self.fifo)

    def tail_quantiles(self, threshold: float) -> tuple[float, float, float] | None:
        """Low, middle and high quantiles of the residuals above ``threshold`` (a log-normal
        sample before calibration); None when fewer than 10 are."""
        srt = self.sorted
        if len(srt) < self.min_residuals:
            nd = NormalDist(0.0, self.default_log_spread)
            srt = [nd.inv_cdf((i + 0.5) / 200) for i in range(200)]
        tail = srt[bisect.bisect_right(srt, threshold) :]
        n = len(tail)
        if n < 10:
            return None
        lo = max(0, math.floor((n + 1) * self.q_low) - 1)
        hi = min(n - 1, math.ceil((n + 1) * self.q_high) - 1)
        return tail[lo], tail[n // 2], tail[hi]
