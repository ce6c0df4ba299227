"""Shadow replays: recorded traffic served again, in virtual time, under any policy.

A controller that keeps a :class:`~rtlm_adapt.traffic.TrafficLog` knows the requests it served
lately: when each arrived, its prompt length and deadline, what it predicted for it, and how
many tokens it really generated. :func:`replay` serves a window of that traffic again on
simulated executors that cost what the controller's latency models have learned, under the
policy given, and says what each request's response time would have been. Two replays of the
same window under two policies compare the policies on the very same arrivals and lengths, at
no serving cost: what the shadow guard of a learned policy does
(:mod:`rtlm_adapt.policies.shadow_guard`).

A replay starts from the live state at the moment the window opened, so that a policy is judged
in the situation it made: the window's backlog (requests still waiting or running then) is
queued at that moment, and the replayed controller starts from the smoothed signals the live
one had then. What it takes as given:

- The backlog is queued afresh: a request that was running when the window opened is served
  from its first token, on either policy.
- Requests still live when the replay is made are served for their predicted length (their true
  one is not known yet); ended ones for the tokens they really generated.
- The predictions are the recorded ones: the replayed controller does not predict or learn
  lengths again, so the policy under test sees what the live one saw.
- Response times count from the window's opening: the wait a backlog request had before it is
  the same under any policy.
- Several primaries (a gateway's backends) are replayed as several primaries, each at its
  reported batch size and learned cost. Each takes work from the controller when it has room;
  the gateway's own choice among free backends (least predicted work first) is not replayed.

What happens after the window matters too. Served to the end on an idle system, a replay lets a
policy that leaves work behind (long requests put off, a secondary left unused) drain it with
no one else waiting, which live serving never does: such a policy looks better in the window
and does worse over a long run (BENCHMARKS.md 4.7). With ``repeat_arrivals`` (what the shadow
guard uses) the window's arrivals come a second time after it, at the same pace, so that what a
policy leaves behind meets new requests as it would live; the replay's figure is then over both
copies. (Cutting the time off at the second copy's last arrival instead was tried: under
overload most requests are still waiting there under either policy, so the two replays look
alike and a losing policy passes.)

>>> from rtlm_adapt.arrival import ArrivalScore
>>> from rtlm_adapt.predictor import LengthPrediction
>>> from rtlm_adapt.request import Request
>>> from rtlm_adapt.traffic import TrafficLog
>>> log = TrafficLog()
>>> score = ArrivalScore({}, 0.4, LengthPrediction(100.0, 50.0, 200.0), prompt_tokens=8)
>>> for i in range(6):
...     log.record_submit(Request(f"r{i}", "Tell me a story.", 2.0 * i), score)
...     log.record_end(f"r{i}", output_tokens=50 + 40 * i, finished_at=2.0 * i + 1.0)
>>> setup = ShadowSetup(primary=ShadowExecutor("gpu", StepCost.default(), 4))
>>> run = replay(log.window(), "fcfs", setup)
>>> len(run.completions), run.mean_response_s > 0
(6, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from rtlm_adapt.arrival import ArrivalScore
from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.experiment import engine_priorities
from rtlm_adapt.knobs import Policy
from rtlm_adapt.predictor import LengthPrediction
from rtlm_adapt.request import TRUE_LENGTH_KEY, Completion, Request
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.simulated import simulated_executor
from rtlm_adapt.signals import ServingSignals
from rtlm_adapt.traffic import TrafficRecord, TrafficWindow
from rtlm_adapt.uncertainty import UncertaintyScorer

if TYPE_CHECKING:
    from rtlm_adapt.serving.base import ExecutorState


#: What marks the id of a repeated arrival (``replay(..., repeat_arrivals=True)``).
REPEAT_SUFFIX = "#again"


@dataclass(frozen=True, slots=True)
class ShadowExecutor:
    """One simulated executor of a replay: its name, what a step costs, its batch size."""

    name: str
    cost: StepCost
    max_batch_size: int

    @classmethod
    def of(cls, state: ExecutorState, cost: StepCost) -> ShadowExecutor:
        return cls(state.name, cost, state.max_batch_size)


@dataclass(frozen=True, slots=True)
class ShadowSetup:
    """The executors and controller settings a replay serves with: a primary, any more
    primaries beside it (a gateway's other backends), and an optional secondary."""

    primary: ShadowExecutor
    secondary: ShadowExecutor | None = None
    epoch_s: float = 1.0
    batching: str = "continuous"
    reference_batch: int = 8
    more_primaries: tuple[ShadowExecutor, ...] = ()

    @property
    def primaries(self) -> tuple[ShadowExecutor, ...]:
        """Every primary, in the order the live ones first reported."""
        return (self.primary, *self.more_primaries)

    @classmethod
    def of(cls, controller: AdaptiveController) -> ShadowSetup | None:
        """What ``controller`` serves with now: its executors at their reported batch sizes,
        costing what its latency models have learned; None before a primary has reported."""
        states = controller.executor_states().values()  # in the order they first reported
        primaries = [s for s in states if s.role == "primary"]
        if not primaries:
            return None
        secondary = next((s for s in states if s.role != "primary"), None)

        def shadow(state: ExecutorState) -> ShadowExecutor:
            return ShadowExecutor.of(state, controller.latency[state.name].coefficients())

        return cls(shadow(primaries[0]), shadow(secondary) if secondary is not None else None,
                   controller.epoch_s, controller.batching, controller.reference_batch,
                   tuple(shadow(s) for s in primaries[1:]))


@dataclass(slots=True)
class ShadowRun:
    """What a replay served: one completion per request (the window's, and with
    ``repeat_arrivals`` their second copy's), from a window that opened at ``start``."""

    completions: list[Completion]
    start: float = 0.0

    @property
    def window_requests(self) -> int:
        """The window's requests, its backlog's included (not their repeated arrivals)."""
        return sum(not c.request_id.endswith(REPEAT_SUFFIX) for c in self.completions)

    @property
    def backlog_requests(self) -> int:
        """The requests that were live when the window opened."""
        return sum(c.arrival_time < self.start for c in self.completions)

    @property
    def mean_response_s(self) -> float:
        """Mean response time, counted from the window's opening for the backlog (see the
        module docstring)."""
        times = [c.finish_time - max(c.arrival_time, self.start) for c in self.completions]
        return sum(times) / len(times) if times else math.nan


class _RecordedLengths:
    """The predictor of a replayed controller: it neither predicts nor learns (the recorded
    predictions are used); ``predict_one`` answers only the observation's "typical length"."""

    def __init__(self, typical: LengthPrediction) -> None:
        self._typical = typical

    def predict_one(self, features: Mapping[Any, float]) -> LengthPrediction:
        return self._typical

    def learn_one(self, features: Mapping[Any, float], length: float) -> None:
        pass


class ReplayController(AdaptiveController):
    """A controller that takes each request's score (uncertainty, predicted length) from its
    record instead of scoring and predicting again, and learns no timings (its simulated
    executors charge what its latency models start from)."""

    learns_latency = False

    def __init__(
        self, policy: Policy | str, records: Mapping[str, TrafficRecord], **kwargs: Any
    ) -> None:
        self._records = records
        lengths = sorted(r.score.prediction.length for r in records.values()) or [1.0]
        median = lengths[len(lengths) // 2]
        kwargs.setdefault("predictor", _RecordedLengths(LengthPrediction(median, median, median)))
        super().__init__(policy, **kwargs)

    def score(self, request: Request, features: Mapping[Any, float] | None = None) -> ArrivalScore:
        return self._records[request.id].score

    def resume_signals(self, signals: ServingSignals, now: float) -> None:
        """Carry on from the live controller's smoothed ``signals``, with an epoch opening at
        ``now`` (what the backlog's submits added to them is dropped)."""
        self._signals = replace(signals, arrivals_in_epoch=0, epoch_start=now)


def replay_requests(window: TrafficWindow) -> list[Request]:
    """The window's records as requests to serve again, backlog first, each carrying the
    length it is served for (see the module docstring)."""
    out = []
    for record in window.records:
        live = record.request
        tokens = record.output_tokens
        if tokens is None:  # still live: its prediction is the best guess
            tokens = round(record.score.prediction.length)
        tokens = min(max(1, int(tokens)), live.max_tokens)
        out.append(replace(live, prompt_tokens=record.score.prompt_tokens,
                           metadata={TRUE_LENGTH_KEY: tokens}))
    return out


def repeated(requests: list[Request], start: float) -> list[Request]:
    """A second copy of the window's arriving ``requests`` (``start``: when it opened), right
    after them at the same pace: ids marked with :data:`REPEAT_SUFFIX`, arrivals and deadlines
    moved on by the window's span plus one mean gap between arrivals."""
    if not requests:
        return []
    last = requests[-1].arrival_time
    gap = (last - start) / max(1, len(requests) - 1) or 1.0
    shift = last - start + gap
    return [replace(r, id=r.id + REPEAT_SUFFIX, arrival_time=r.arrival_time + shift,
                    deadline=None if r.deadline is None else r.deadline + shift)
            for r in requests]


def replay(
    window: TrafficWindow,
    policy: Policy | str,
    setup: ShadowSetup,
    *,
    repeat_arrivals: bool = False,
    scorer: UncertaintyScorer | None = None,
) -> ShadowRun:
    """Serve ``window`` again under ``policy`` (a fresh one: a replay changes its state) on
    ``setup``'s simulated executors, from the state the window opened in; with
    ``repeat_arrivals``, followed by a second copy of its arrivals (see the module docstring).
    ``scorer`` saves building one (it is only carried)."""
    by_id = {r.request.id: r for r in window.records}
    requests = replay_requests(window)
    backlog = [r for r in requests if r.arrival_time < window.start]
    arriving = [r for r in requests if r.arrival_time >= window.start]
    if repeat_arrivals and arriving:
        again = repeated(arriving, window.start)
        by_id.update((r.id, by_id[r.id.removesuffix(REPEAT_SUFFIX)]) for r in again)
        arriving += again
    executors = [*setup.primaries, *([setup.secondary] if setup.secondary is not None else [])]
    profiles = {shadow.name: shadow.cost for shadow in executors}
    controller = ReplayController(
        policy, by_id, scorer=scorer, profiles=profiles, epoch_s=setup.epoch_s,
        batching=setup.batching, reference_batch=setup.reference_batch,
    )
    priority_of = engine_priorities(controller)

    def executor(shadow: ShadowExecutor):
        return simulated_executor(shadow.name, shadow.cost, batching=setup.batching,
                                  priority_of=priority_of, max_batch_size=shadow.max_batch_size)

    secondary = executor(setup.secondary) if setup.secondary is not None else None
    # registered in the live order, so the replayed controller takes the same one as its primary
    primaries = [executor(shadow) for shadow in setup.primaries]
    loop = ServingLoop(controller, primaries, secondary, batching=setup.batching)
    loop.advance(window.start)  # nothing to serve before the window opens: the clock moves
    for request in backlog:
        loop.submit_now(request)
    if window.signals is not None:
        controller.resume_signals(window.signals, now=window.start)
    return ShadowRun(loop.run(arriving).completions, window.start)
