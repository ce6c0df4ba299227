"""The Policy protocol: an observation of the queue and executors in, Knobs out.

A policy also says which length estimate the controller ranks by (``length_source``): the online
predictor (``"predicted"``), the prompt's length (``"prompt"``, a cheap proxy) or the true length
(``"oracle"``, benchmarks only: the limit a perfect predictor could reach); and whether a static
batch is consolidated from requests of similar predicted length (``consolidate``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rtlm_adapt.knobs import Knobs
from rtlm_adapt.observation import Observation

LENGTH_SOURCES = ("predicted", "prompt", "oracle")


@runtime_checkable
class Policy(Protocol):
    name: str
    length_source: str
    consolidate: bool

    def decide(self, observation: Observation) -> Knobs:
        """Knobs for the next scheduling epoch."""
        ...


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
