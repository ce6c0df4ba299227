"""FixedPolicy: knobs that never change, the base of the classic baselines.

The :class:`~rtlm_adapt.knobs.Policy` protocol it follows lives beside
:class:`~rtlm_adapt.knobs.Knobs` in :mod:`rtlm_adapt.knobs`.

>>> from rtlm_adapt.knobs import Knobs, Policy
>>> sjf = FixedPolicy("sjf", Knobs(length_weight=1.0))
>>> isinstance(sjf, Policy), sjf.decide(None).length_weight
(True, 1.0)
"""

from __future__ import annotations

from rtlm_adapt.knobs import LENGTH_SOURCES, Knobs
from rtlm_adapt.observation import Observation


class FixedPolicy:
    """A policy whose knobs never change: the base of the classic baselines."""

    def __init__(
        self,
        name: str,
        knobs: Knobs,
        *,
        length_source: str = "predicted",
        consolidate: bool = False,
    ) -> None:
        if length_source not in LENGTH_SOURCES:
            raise ValueError(
                f"unknown length_source {length_source!r}; expected one of {LENGTH_SOURCES}"
            )
        self.name = name
        self.knobs = knobs
        self.length_source = length_source
        self.consolidate = consolidate

    def decide(self, observation: Observation) -> Knobs:
        return self.knobs

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, length_source={self.length_source!r})"
