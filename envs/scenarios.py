"""Scenarios: the deployments a policy is trained across, one drawn per episode.

A policy trained on one prompt set, one trace and one executor learns that deployment, not the
knobs' effect. :class:`ScenarioSpace` draws, per episode, a prompt set, an arrival process, a load,
the primary's cost profile (a batch model, or an engine model of vLLM whose step hardly grows
with the batch: a policy that only ever met the first learns to shrink batches that the second
runs for free), its batch cap (log-uniform, so small caps, where requests queue, are as common as
large ones) and whether a secondary executor exists. Pure numpy: the evaluation grid uses the
same :class:`Scenario` records, and :func:`scenario_cost` turns one into the primary's costs.

>>> import numpy as np
>>> space = ScenarioSpace(prompts=("sharegpt",), arrivals=("poisson",), batch_caps=(4, 64))
>>> s = space.sample(np.random.default_rng(0))
>>> s.prompts, s.arrivals, 4 <= s.max_batch <= 64, 0.5 <= s.load <= 1.1
('sharegpt', 'poisson', True, True)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost


@dataclass(frozen=True)
class Scenario:
    """One episode's deployment."""

    prompts: str
    arrivals: str
    load: float
    max_batch: int
    secondary: bool
    #: The primary's cost profile (a name or path for ``StepCost.load``); None: the default
    #: profile of whoever serves the scenario (the environment's ``profile``).
    profile: str | None = None

    def label(self) -> str:
        side = "+secondary" if self.secondary else "alone"
        where = f"{self.prompts} | {self.arrivals} | load {self.load:g}"
        on = f" | {self.profile}" if self.profile else ""
        return f"{where} | cap {self.max_batch} {side}{on}"


@dataclass(frozen=True)
class ScenarioSpace:
    """What :meth:`sample` draws from (all uniformly, the batch cap log-uniformly).

    Parameters
    ----------
    prompts, arrivals
        Prompt sets (``"sharegpt"``, ``"alpaca:MODEL"``) and arrival specs (``"azure-conv"``,
        ``"azure-code"``, ``"poisson"``, ``"gamma:CV"``).
    loads
        ``(low, high)`` ranges; a load is drawn uniformly over their union, so a band can be
        held out for evaluation.
    batch_caps
        ``(low, high)`` of the primary's maximum batch size.
    secondary_prob
        Probability that the episode has a secondary executor.
    profiles
        The primary's cost profiles to draw from; empty: the environment's own profile.
    """

    prompts: tuple[str, ...] = ("alpaca:gpt4_1106_preview",)
    arrivals: tuple[str, ...] = ("azure-conv",)
    loads: tuple[tuple[float, float], ...] = ((0.5, 1.1),)
    batch_caps: tuple[int, int] = (16, 16)
    secondary_prob: float = 1.0
    profiles: tuple[str, ...] = ()
    _widths: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # JSON round trips (config.json) turn tuples into lists: normalise
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "arrivals", tuple(self.arrivals))
        object.__setattr__(self, "loads", tuple((float(a), float(b)) for a, b in self.loads))
        object.__setattr__(self, "batch_caps", tuple(int(c) for c in self.batch_caps))
        object.__setattr__(self, "profiles", tuple(self.profiles))
        if not self.prompts or not self.arrivals or not self.loads:
            raise ValueError("a ScenarioSpace needs at least one prompt set, trace and load range")
        if any(not (0 < a <= b and math.isfinite(b)) for a, b in self.loads):
            raise ValueError(f"load ranges must be (low, high) with 0 < low <= high: {self.loads}")
        low, high = self.batch_caps
        if not 1 <= low <= high:
            raise ValueError(f"batch_caps must be (low, high) with 1 <= low <= high: {low, high}")
        if not 0.0 <= self.secondary_prob <= 1.0:
            raise ValueError(f"secondary_prob must be in [0, 1], got {self.secondary_prob!r}")
        widths = np.array([b - a for a, b in self.loads]) + 1e-12  # a point range still counts
        object.__setattr__(self, "_widths", widths / widths.sum())

    @classmethod
    def from_options(cls, options: dict[str, Any] | ScenarioSpace) -> ScenarioSpace:
        """From a dict of the fields (what ``config.json`` and ``gym.make`` carry)."""
        return options if isinstance(options, ScenarioSpace) else cls(**options)

    def as_options(self) -> dict[str, Any]:
        return {"prompts": list(self.prompts), "arrivals": list(self.arrivals),
                "loads": [list(r) for r in self.loads], "batch_caps": list(self.batch_caps),
                "secondary_prob": self.secondary_prob, "profiles": list(self.profiles)}

    def sample(self, rng: np.random.Generator, load: float | None = None) -> Scenario:
        """One scenario; ``load`` pins the load. Only real choices draw from ``rng``, so a
        space of one prompt set, trace, load range and cap replays the seeds of a plain
        :class:`~rtlm_adapt.envs.episodes.EpisodeSampler`."""

        def pick(options: tuple[Any, ...]) -> Any:
            return options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]

        prompts, arrivals = pick(self.prompts), pick(self.arrivals)
        if load is None:
            ranges = self.loads
            low, high = ranges[int(rng.choice(len(ranges), p=self._widths))] if len(
                ranges) > 1 else ranges[0]
            load = float(rng.uniform(low, high)) if high > low else low
        low, high = self.batch_caps
        cap = round(math.exp(rng.uniform(math.log(low), math.log(high)))) if high > low else low
        secondary = self.secondary_prob >= 1.0 or (
            self.secondary_prob > 0.0 and bool(rng.random() < self.secondary_prob))
        profile = pick(self.profiles) if self.profiles else None
        return Scenario(prompts, arrivals, float(load), int(cap), secondary, profile)


@functools.lru_cache(maxsize=32)
def _load_profile(name: str) -> StepCost:
    return StepCost.load(name)  # profiles are frozen: one copy per name serves every episode


def scenario_cost(scenario: Scenario, default_profile: str) -> StepCost:
    """The primary's costs in ``scenario``: its profile (``default_profile`` where it names
    none) at its batch cap.

    >>> sc = Scenario("sharegpt", "poisson", 0.9, 8, False, profile="vllm-cpu-smollm2-135m")
    >>> cost = scenario_cost(sc, "smollm2-135m-cpu2")
    >>> cost.name, cost.max_batch_size, cost.engine.max_num_seqs
    ('vllm-cpu-smollm2-135m', 8, 8)
    """
    return _load_profile(scenario.profile or default_profile).with_max_batch(scenario.max_batch)


def grid(
    prompts: Sequence[str], arrivals: Sequence[str], loads: Sequence[float],
    caps: Sequence[int], secondary: bool = True, profile: str | None = None,
) -> list[Scenario]:
    """Every combination, in a stable order (the evaluation grid's cells), on ``profile``
    (None: the evaluator's default)."""
    return [Scenario(p, a, float(x), int(c), secondary, profile)
            for p in prompts for a in arrivals for x in loads for c in caps]
