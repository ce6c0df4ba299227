"""Feature standardization: a named record per dense feature, running (Welford) or fixed.

Features the prior knows keep the prior's standardization (``fixed``, :class:`PriorScaling`: the
prior's weights were fitted on those z-scores); any other feature gets running mean and variance
(:class:`FeatureScaler`), updated with each finished request.

>>> scaler = FeatureScaler()
>>> for v in (1.0, 2.0, 3.0):
...     scaler.learn_one({"words": v})
>>> st = scaler.stats["words"]
>>> st.count, st.mean, round(st.z(3.0, clip=4.0), 3)
(3, 2.0, 1.225)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = ["FeatureScaler", "FeatureStats", "PriorScaling", "ScaledFeatures"]


@dataclass(slots=True)
class FeatureStats:
    """Standardization of one dense feature, and its weight in the residual model.

    ``weight`` is the running features' weight; a fixed feature's weight lives in the residual
    model's weight vector (see :class:`rtlm_adapt.predictor.residual.NLMSRegression`).
    """

    count: int
    mean: float
    m2: float
    inv_std: float
    weight: float
    fixed: bool

    def z(self, value: float, clip: float) -> float:
        """The z-score of ``value``, clipped to ``[-clip, clip]``."""
        z = (value - self.mean) * self.inv_std
        return z if -clip <= z <= clip else (clip if z > 0 else -clip)

    def learn_one(self, value: float) -> None:
        """Welford's update of the running mean and variance."""
        n = self.count + 1
        mu = self.mean
        delta = value - mu
        mu += delta / n
        m2 = self.m2 + delta * (value - mu)
        self.count, self.mean, self.m2 = n, mu, m2
        var = m2 / n
        # A constant feature carries no information: scale 0 maps it to the mean.
        self.inv_std = 1.0 / math.sqrt(var) if var > 1e-12 else 0.0

    def as_list(self) -> list[float]:
        """``[count, mean, m2, inv_std, weight, fixed]``: the saved (format version 1) form."""
        return [
            self.count,
            self.mean,
            self.m2,
            self.inv_std,
            self.weight,
            int(self.fixed),
        ]

    @classmethod
    def from_list(cls, record: list[float]) -> FeatureStats:
        n, mean, m2, inv_std, weight, fixed = record
        return cls(n, mean, m2, inv_std, weight, bool(fixed))


class FeatureScaler:
    """One :class:`FeatureStats` per dense feature seen; the prior's are fixed."""

    def __init__(self, prior_dense: tuple[tuple[str, float, float, float], ...] = ()) -> None:
        self.stats: dict[Any, FeatureStats] = {
            name: FeatureStats(1, mu, 0.0, inv_sd, w, True) for name, mu, inv_sd, w in prior_dense
        }

    def learn_one(self, x: Mapping[Any, float]) -> None:
        """Update the running statistics with ``x``'s values; unseen features get a record."""
        stats = self.stats
        for name, value in x.items():
            st = stats.get(name)
            if st is None:
                st = stats[name] = FeatureStats(0, 0.0, 0.0, 0.0, 0.0, False)
            elif st.fixed:
                continue
            st.learn_one(value)


class ScaledFeatures(NamedTuple):
    """A prompt's features as the residual model reads them, standardized by ``scaling``.

    ``idx``: the weights' positions (the prior's dense features, then the hashed buckets);
    ``x``: their inputs (clipped z-scores, then 1.0 each); ``norm2``: ``1 + x @ x`` (the 1 is the
    offset's input); ``complete``: every dense feature is one the scaling standardizes.
    """

    scaling: PriorScaling
    idx: np.ndarray
    x: np.ndarray
    norm2: float
    complete: bool


class PriorScaling:
    """The prior's fixed standardization of its dense features, and where their weights are
    (``names[j]``'s at ``first_position + j``, after the hashed buckets).

    Frozen like the prior, so a prompt's features are standardized once, when they are made
    (:meth:`scale`), and read by every predictor with an equal scaling.

    >>> s = PriorScaling(("a", "b"), (0.0, 1.0), (1.0, 0.5), clip=4.0, first_position=8)
    >>> row = s.scale(("b", "a", "other"), np.array([3.0, 9.0, 1.0]), np.array([2, 5]))
    >>> row.idx.tolist(), row.x.tolist(), row.norm2, row.complete
    ([9, 8, 2, 5], [1.0, 4.0, 1.0, 1.0], 20.0, False)
    """

    def __init__(
        self,
        names: tuple[Any, ...],
        mean: tuple[float, ...],
        inv_std: tuple[float, ...],
        clip: float,
        first_position: int,
    ) -> None:
        self.names, self.mean, self.inv_std = tuple(names), tuple(mean), tuple(inv_std)
        self.clip, self.first_position = clip, first_position
        self._index = {name: j for j, name in enumerate(self.names)}
        self._key = (self.names, self.mean, self.inv_std, clip, first_position)
        # the common case: features named exactly as the prior's, in its order
        self._all = np.arange(len(self.names), dtype=np.intp)
        self._positions = self._all + first_position
        self._mean, self._inv_std = np.array(self.mean), np.array(self.inv_std)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PriorScaling) and self._key == other._key

    __hash__ = None  # type: ignore[assignment]

    def scale(
        self, names: tuple[Any, ...], dense: np.ndarray, hashed: np.ndarray
    ) -> ScaledFeatures:
        """Standardize the dense features this scaling knows and append the hashed buckets."""
        if names == self.names:
            at, j = self._all, self._all
        else:
            index = self._index
            pairs = [(i, index[n]) for i, n in enumerate(names) if n in index]
            at = np.array([i for i, _ in pairs], np.intp)
            j = np.array([k for _, k in pairs], np.intp)
        z = (dense[at] - self._mean[j]) * self._inv_std[j]
        np.minimum(z, self.clip, out=z)
        np.maximum(z, -self.clip, out=z)
        values = z.tolist()
        # summed left to right from 1.0, as each z was added before
        norm2 = sum([v * v for v in values], 1.0) + len(hashed)
        return ScaledFeatures(
            self,
            np.concatenate((self._positions[j], hashed)),
            np.concatenate((z, np.ones(len(hashed)))),
            norm2,
            len(at) == len(names),
        )
