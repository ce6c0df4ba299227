"""FaultyExecutor: wrap any executor and inject faults, for tests and the soak benchmark.

Per ``step`` call, with probability ``fault_rate`` the wrapper fails the step in one of three
ways (chosen at random): it raises before the inner step, it raises after the inner step ran
(the inner executor's state moved on and its results are lost), or it "hangs" (the inner result
comes back with a duration of ``hang_s`` virtual seconds, or, with ``hang_wall_s`` set, the call
really sleeps that long). With probability ``garbage_rate`` the step's result is corrupted
instead: a NaN or negative duration, a completion with negative tokens or a NaN finish time, a
completion for an unknown id, a duplicated completion, or negative ``new_tokens``.

Everything is drawn from one seeded generator, so a run is reproducible.

>>> from rtlm_adapt.request import Request, TRUE_LENGTH_KEY
>>> from rtlm_adapt.calibration.step_cost import StepCost
>>> from rtlm_adapt.serving.sim import SimulatedExecutor
>>> ex = FaultyExecutor(SimulatedExecutor("gpu", StepCost.default()), fault_rate=1.0, seed=0,
...                     kinds=("raise",))
>>> ex.admit([Request("a", "hi", 0.0, metadata={TRUE_LENGTH_KEY: 3})], now=0.0)
>>> ex.step(now=0.0)
Traceback (most recent call last):
...
rtlm_adapt.serving.faults.InjectedFault: gpu: injected fault before step 1
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Sequence

from rtlm_adapt.request import Completion, Request
from rtlm_adapt.serving.base import Executor, StepResult

FAULT_KINDS = ("raise", "raise_after", "hang")
GARBAGE_KINDS = (
    "nan_duration",
    "negative_duration",
    "negative_tokens",
    "nan_finish",
    "unknown_id",
    "duplicate",
    "negative_new_tokens",
)


class InjectedFault(RuntimeError):
    """The error a FaultyExecutor raises on purpose."""


class FaultyExecutor:
    """An executor that misbehaves on purpose; see the module docstring.

    Parameters
    ----------
    inner
        The executor doing the real work.
    fault_rate, garbage_rate
        Probabilities, per step call, of a fault and of a corrupted result.
    seed
        Seed of the generator behind every choice.
    kinds, garbage_kinds
        The fault and garbage variants to draw from (defaults: all).
    hang_s
        Virtual duration reported by a hang (virtual-time loops give up at ``step_timeout_s``).
    hang_wall_s
        If set, a hang really sleeps this many wall-clock seconds (for ``wall_timeout_s``).

    Attributes
    ----------
    injected
        How many of each fault and garbage kind were injected.
    """

    def __init__(
        self,
        inner: Executor,
        fault_rate: float = 0.0,
        garbage_rate: float = 0.0,
        seed: int = 0,
        *,
        kinds: Sequence[str] = FAULT_KINDS,
        garbage_kinds: Sequence[str] = GARBAGE_KINDS,
        hang_s: float = 3600.0,
        hang_wall_s: float | None = None,
    ) -> None:
        for name, rate in (("fault_rate", fault_rate), ("garbage_rate", garbage_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate!r}")
        unknown = (set(kinds) - set(FAULT_KINDS)) | (set(garbage_kinds) - set(GARBAGE_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        self.inner = inner
        self.name = inner.name
        self.max_batch_size = inner.max_batch_size
        self.fault_rate = fault_rate
        self.garbage_rate = garbage_rate
        self.kinds = tuple(kinds)
        self.garbage_kinds = tuple(garbage_kinds)
        self.hang_s = hang_s
        self.hang_wall_s = hang_wall_s
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._steps = 0

    # -- Executor protocol: delegated ------------------------------------------------------------
    def running(self) -> int:
        return self.inner.running()

    def running_ids(self) -> list[str]:
        return self.inner.running_ids()

    def admit(self, requests: Sequence[Request], now: float) -> None:
        self.inner.admit(requests, now)

    def abort(self, request_id: str, now: float) -> Completion | None:
        return self.inner.abort(request_id, now)

    def step(self, now: float, until: float = math.inf) -> StepResult:
        self._steps += 1
        rng = self._rng
        fault = None
        if rng.random() < self.fault_rate:
            fault = self.kinds[rng.randrange(len(self.kinds))]
        if fault == "raise":
            self.injected[fault] += 1
            raise InjectedFault(f"{self.name}: injected fault before step {self._steps}")
        result = self.inner.step(now, until)
        if fault == "raise_after":
            self.injected[fault] += 1
            raise InjectedFault(f"{self.name}: injected fault after step {self._steps}")
        if fault == "hang":
            self.injected[fault] += 1
            if self.hang_wall_s is not None:
                time.sleep(self.hang_wall_s)
            result.duration_s = max(result.duration_s, self.hang_s)
            return result
        if self.garbage_kinds and rng.random() < self.garbage_rate:
            kind = self._corrupt(result)
            if kind is not None:
                self.injected[kind] += 1
        return result

    # -- internals -------------------------------------------------------------------------------
    def _corrupt(self, result: StepResult) -> str | None:
        """Damage ``result`` in place (bypassing Completion's checks, as a buggy backend would)."""
        rng = self._rng
        kind = self.garbage_kinds[rng.randrange(len(self.garbage_kinds))]
        done = result.finished
        if kind == "nan_duration":
            result.duration_s = math.nan
        elif kind == "negative_duration":
            result.duration_s = -abs(result.duration_s) - 1.0
        elif kind == "negative_new_tokens":
            if not result.new_tokens:
                return None
            rid = next(iter(result.new_tokens))
            result.new_tokens[rid] = -5
        elif not done:
            return None  # the completion-level kinds need a completion to damage
        elif kind == "negative_tokens":
            done[rng.randrange(len(done))].output_tokens = -7
        elif kind == "nan_finish":
            done[rng.randrange(len(done))].finish_time = math.nan
        elif kind == "unknown_id":
            done.append(dataclasses.replace(done[0], request_id=f"ghost-{self._steps}"))
        elif kind == "duplicate":
            done.append(done[rng.randrange(len(done))])
        return kind
