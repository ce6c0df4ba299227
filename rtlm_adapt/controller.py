"""AdaptiveController: the scheduler a serving loop embeds.

The loop tells the controller three things and asks it one::

    controller.submit(request)                 # a request arrived
    batch = controller.next_batch(state)       # an executor has room: which requests run there?
    controller.on_step(executor_name, result)  # an executor ran an iteration (timings)
    controller.on_finish(completion)           # a request ended

On ``submit`` the controller scores the prompt's uncertainty, predicts its output length (with an
interval) and its service time, and queues it under a priority key built from the current
:class:`~rtlm_adapt.knobs.Knobs`. ``next_batch`` hands out the best keys, honouring the batch cap,
the offload threshold (only long or uncertain requests go to a secondary executor) and the hard
aging bound. ``on_finish`` feeds the true length back to the predictor and ``on_step`` the timings
back to the latency model, so both keep tracking the served model. Every ``epoch_s`` seconds the
policy looks at an :class:`~rtlm_adapt.observation.Observation` and may change the knobs.

>>> from rtlm_adapt import Request
>>> from rtlm_adapt.serving.base import ExecutorState
>>> ctl = AdaptiveController(policy="fcfs")
>>> ctl.submit(Request("a", "Write a long story about the sea.", arrival_time=0.0))
>>> ctl.submit(Request("b", "Name one prime number.", arrival_time=0.1))
>>> [r.id for r in ctl.next_batch(ExecutorState("gpu", "primary", 0, 8, now=0.2))]
['a', 'b']
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rtlm_adapt import observer
from rtlm_adapt.accounting import ControllerStats, RequestCounts
from rtlm_adapt.arrival import ArrivalScore, prompt_features, score_arrival
from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.checkpoint import Checkpointed, ControllerCheckpoint, ControllerConfig
from rtlm_adapt.executor_models import ExecutorModels
from rtlm_adapt.knobs import Knobs, Policy
from rtlm_adapt.latency import LatencyModel
from rtlm_adapt.live_request import LiveRequest
from rtlm_adapt.observation import Observation
from rtlm_adapt.predictor import LengthPredictor
from rtlm_adapt.request import (
    FAILURE_REASONS,
    Completion,
    ControllerClosedError,
    FailureReason,
    QueueFullError,
    Request,
)
from rtlm_adapt.running import RunningRequests
from rtlm_adapt.serving.base import ExecutorState, StepResult
from rtlm_adapt.signals import ServingSignals
from rtlm_adapt.traffic import TrafficLog
from rtlm_adapt.uncertainty import UncertaintyScorer
from rtlm_adapt.waiting_room import WaitingRoom

#: The Policy attributes the controller relies on (a policy lacking one is refused up front).
_POLICY_ATTRIBUTES = ("decide", "length_source", "consolidate", "name")


class AdaptiveController(Checkpointed):
    """Uncertainty-aware scheduler with an online length predictor; see the module docstring.

    Parameters
    ----------
    policy
        A :class:`~rtlm_adapt.knobs.Policy`, or a name understood by
        :func:`rtlm_adapt.policies.make_policy` (``fcfs``, ``sjf-prompt``, ``oracle-sjf``,
        ``heuristic``, ...).
    predictor
        The online length predictor (default: ``LengthPredictor.pretrained("lexical")``, which
        starts from a prior fitted on ShareGPT and adapts to the served model online).
    profiles
        Cost profile per executor name, the starting point of each latency model; executors not
        named start from the default profile.
    epoch_s
        How often (seconds on the loop's clock) the policy may change the knobs.
    batching
        ``continuous`` or ``static``; in static mode batches are consolidated by predicted length.
    max_queue
        Optional bound on waiting requests; a submit beyond it raises ``QueueFullError`` (and
        counts as submitted and failed with reason ``rejected``).
    autosave_path, autosave_every
        Periodic checkpoint: after every ``autosave_every`` ended requests the learned state is
        written to ``autosave_path`` with :meth:`save` (atomically).

    Every public method takes the controller's lock, so threads may call in concurrently.

    Accounting: every request passed to :meth:`submit` that is not invalid (TypeError or
    ValueError) ends exactly once, as finished or failed with a
    :class:`~rtlm_adapt.request.FailureReason`, and :meth:`stats` always balances.
    """

    #: Whether ``on_step`` teaches the latency models (a replay, whose simulated executors
    #: charge what the models already believe, has nothing to teach them).
    learns_latency = True

    def __init__(
        self,
        policy: Policy | str = "heuristic",
        *,
        predictor: LengthPredictor | None = None,
        scorer: UncertaintyScorer | None = None,
        profiles: Mapping[str, StepCost] | None = None,
        epoch_s: float = 1.0,
        batching: str = "continuous",
        max_queue: int | None = None,
        reference_batch: int = 8,
        autosave_path: str | Path | None = None,
        autosave_every: int = 1000,
    ) -> None:
        if isinstance(policy, str):
            from rtlm_adapt.policies import make_policy

            policy = make_policy(policy)
        _check_settings(policy, batching, epoch_s, max_queue, autosave_every)
        # One re-entrant lock per controller: the loop thread, front-end threads and asyncio
        # callbacks may all call in at once. Every public call is short (microseconds), so a
        # single lock costs less than finer-grained schemes and makes each call atomic.
        self._lock = threading.RLock()
        self._init_autosave(autosave_path, autosave_every)
        self._closed = False
        # Default: the lexical tier from its packaged ShareGPT prior, useful on request one.
        self.predictor = predictor if predictor is not None else LengthPredictor.pretrained()
        self.scorer = scorer if scorer is not None else UncertaintyScorer()
        self._executors = ExecutorModels(profiles)
        self.epoch_s = float(epoch_s)
        self.batching = batching
        self.max_queue = max_queue
        self.reference_batch = reference_batch
        self._room = WaitingRoom()
        # Looked up and withdrawn from directly; only the room adds to it and orders it.
        self._queue = self._room.queue
        self._running = RunningRequests()  # on executors, with their cancellation marks
        self._next_epoch = 0.0  # when the policy decides next
        self._external_knobs = False
        self._counts = RequestCounts()  # the accounting invariant
        self._signals = ServingSignals()  # what the observation reports of recent serving
        #: Recent requests and their outcomes, kept only for a policy that asked for them.
        self.traffic: TrafficLog | None = None
        self.policy = policy

    # -- the loop's calls ------------------------------------------------------------------------
    def submit(self, request: Request, features: Mapping[Any, float] | None = None) -> None:
        """Queue a request. ``features`` may carry precomputed features (a dict of uncertainty
        features, or the predictor's :class:`~rtlm_adapt.predictor.PromptFeatures`).

        Raises TypeError/ValueError for an invalid call (not counted), ``QueueFullError`` when
        ``max_queue`` requests wait and ``ControllerClosedError`` after :meth:`close` (both
        counted as submitted and failed, reasons ``rejected`` and ``shutdown``).
        """
        with self._lock:
            if not isinstance(request, Request):
                raise TypeError(f"submit() takes a Request, got {type(request).__name__}")
            rid = request.id
            if rid in self._queue or rid in self._running:
                raise ValueError(
                    f"duplicate request id {rid!r}: a request with this id is still live"
                )
            if self._closed:
                self._counts.count_failure(FailureReason.SHUTDOWN, submitted=True)
                raise ControllerClosedError(
                    f"controller is shut down; request {rid!r} not accepted"
                )
            if self.max_queue is not None and len(self._queue) >= self.max_queue:
                self._counts.count_failure(FailureReason.REJECTED, submitted=True)
                raise QueueFullError(
                    f"queue is full ({self.max_queue} waiting); request {rid!r} rejected"
                )
            score = self.score(request, features)
            latency = self._executors.primary_latency()
            live = LiveRequest.scored(request, score, policy=self.policy, latency=latency,
                                      reference_batch=self.reference_batch)
            self._room.admit(live)
            self._counts.submitted += 1
            if self.traffic is not None:
                self.traffic.record_submit(request, score, self._signals)
            # smoothed isolated service time: the time scale of the observation and of aging
            length = score.prediction.length
            self._signals.record_submit(latency.service_time(score.prompt_tokens, length), length)

    def score(self, request: Request, features: Mapping[Any, float] | None = None) -> ArrivalScore:
        """``request`` scored as :meth:`submit` does (:mod:`rtlm_adapt.arrival`); a replay of
        recorded traffic overrides it to reuse the score each request got live."""
        if features is None:
            features = self.prompt_features(request.prompt)
        return score_arrival(request, features, scorer=self.scorer, predictor=self.predictor)

    def prompt_features(self, prompt: str) -> Mapping[Any, float]:
        """The features :meth:`submit` computes when given none. It touches no queue state, so
        a front end may run it on another thread (the encoder tier's embedding takes ms)."""
        return prompt_features(prompt, self.scorer, self.predictor)

    def next_batch(self, state: ExecutorState, *, limit: int | None = None) -> list[Request]:
        """The requests that should join ``state``'s executor now (possibly none).

        ``limit`` caps how many are handed out in this call (a router that spreads requests
        over several backends asks for one at a time); the batch cap still applies.
        """
        with self._lock:
            self._executors.update(state)
            now = state.now
            if now >= self._next_epoch:
                self._run_policy(now)
            if not self._queue:
                return []
            primary = state.role == "primary"
            if primary:
                cap = min(self.knobs.max_batch_size or state.max_batch_size, state.max_batch_size)
                room = cap - state.running
            else:
                room = state.free_slots
            if limit is not None:
                room = min(room, limit)
            if room <= 0:
                return []
            if self.batching == "static" and state.running == 0 and self.policy.consolidate:
                entries = self._room.take_similar(room, now, offload_only=not primary)
            else:
                entries = self._room.take(room, now, offload_only=not primary)
            for live in entries:
                self._running.start(live, state.name)
            return [live.request for live in entries]

    def on_step(self, executor: str, result: StepResult) -> None:
        """An executor ran ``result.iterations`` iterations: learn its timing."""
        with self._lock:
            if not isinstance(result, StepResult):
                raise TypeError(f"on_step() takes a StepResult, got {type(result).__name__}")
            if result.iterations <= 0:  # the executor computed nothing (it waited): no timing
                return
            if self.learns_latency:
                self._executors.latency_for(executor).learn_step(
                    result.batch_size, result.context_tokens, result.prefill_tokens,
                    result.duration_s, iterations=result.iterations)
            if executor == self._executors.primary:
                self._signals.record_step(result.duration_s / result.iterations)

    def on_finish(self, completion: Completion) -> None:
        """A request ended (with a result or an error): account for it and learn its length.

        A failed completion is counted under its ``failure`` reason and teaches nothing (its
        token count is not a length the model would have produced).
        """
        with self._lock:
            if not isinstance(completion, Completion):
                raise TypeError(f"on_finish() takes a Completion, got {type(completion).__name__}")
            rid = completion.request_id
            tracked = self._running.end(rid)
            if tracked is None:
                raise ValueError(
                    f"on_finish for request {rid!r}, which is not running "
                    "(unknown, never scheduled, or already finished)"
                )
            if self.traffic is not None:
                self.traffic.record_end(rid, output_tokens=completion.output_tokens,
                                        finished_at=completion.finish_time)
            if completion.failure is not None:
                self._counts.count_failure(completion.failure)
            else:
                self._counts.finished += 1
                self.predictor.learn_one(tracked.features, completion.output_tokens)
                self._signals.record_finish(completion.response_time, completion.missed_deadline)
            self._autosave_after_end()

    def cancel(self, request_id: str) -> Request | None:
        """Cancel a request.

        A waiting request is withdrawn at once (failed, reason ``cancelled``) and returned. A
        running one is marked: the serving loop collects the marks with
        :meth:`take_cancellations`, aborts the request on its executor and reports it through
        :meth:`on_finish` with a ``cancelled`` error; None is returned. Unknown or already
        ended ids are ignored (None): cancelling is idempotent.
        """
        with self._lock:
            request = self.withdraw(request_id, FailureReason.CANCELLED)
            if request is None:
                self._running.mark_cancelled(request_id)
            return request

    def withdraw(self, request_id: str, reason: FailureReason | str) -> Request | None:
        """Take a waiting request out of the queue as failed with ``reason`` (for example
        ``rejected`` when a gateway sheds it at arrival); returns it, or None if it is not
        waiting. Running requests are untouched."""
        with self._lock:
            reason = _failure_reason(reason)
            entry = self._queue.remove(request_id)
            if entry is None:
                return None
            self._counts.count_failure(reason)
            if self.traffic is not None:
                self.traffic.record_withdrawn(request_id)
            return entry.request

    def entry(self, request_id: str) -> LiveRequest | None:
        """What the controller knows of a live request (waiting or running): its prediction,
        uncertainty, service-time estimate and priority ``key``; None once it has ended."""
        with self._lock:
            return self._running.get(request_id) or self._queue.get(request_id)

    def take_cancellations(self) -> list[str]:
        """Running requests marked by :meth:`cancel` since the last call (the loop aborts them)."""
        with self._lock:
            return self._running.take_cancellations()

    def work_ahead(self, request_id: str) -> float:
        """Predicted service seconds of the waiting requests that would run before this one
        (smaller keys): what it waits behind, for deadline admission. O(queue length)."""
        with self._lock:
            return self._room.work_ahead(request_id)

    def fail_queued(self, reason: FailureReason | str = FailureReason.SHUTDOWN) -> list[Request]:
        """Withdraw every waiting request as failed with ``reason``; returns them."""
        with self._lock:
            reason = _failure_reason(reason)
            out = []
            while (entry := self._queue.oldest()) is not None:
                out.append(self.withdraw(entry.request_id, reason))
            return out

    def close(self) -> None:
        """Stop accepting requests (graceful shutdown); queued and running ones are untouched."""
        with self._lock:
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def is_running(self, request_id: str) -> bool:
        """Whether ``request_id`` was handed to an executor and has not ended."""
        return request_id in self._running

    # -- persistence -----------------------------------------------------------------------------
    def checkpoint(self) -> ControllerCheckpoint:
        """The learned state, as typed records (:mod:`rtlm_adapt.checkpoint`)."""
        with self._lock:
            return ControllerCheckpoint(
                policy=self.policy,
                predictor=self.predictor,
                scorer=self.scorer,
                profiles=self._executors.profiles,
                latency=self._executors.latency,
                knobs=self.knobs,
                external_knobs=self._external_knobs,
                config=ControllerConfig(
                    self.epoch_s, self.batching, self.max_queue, self.reference_batch
                ),
                counts=self._counts,
                in_flight=len(self._queue) + len(self._running),
                signals=self._signals,
            )

    @classmethod
    def restore(
        cls,
        checkpoint: ControllerCheckpoint,
        *,
        autosave_path: str | Path | None = None,
        autosave_every: int = 1000,
    ) -> AdaptiveController:
        """A controller that continues from ``checkpoint``."""
        ctl = cls(
            checkpoint.policy,
            predictor=checkpoint.predictor,
            scorer=checkpoint.scorer,
            profiles=checkpoint.profiles,
            **asdict(checkpoint.config),  # epoch_s, batching, max_queue, reference_batch
            autosave_path=autosave_path,
            autosave_every=autosave_every,
        )
        ctl._executors.latency = dict(checkpoint.latency)
        ctl._room.set_knobs(checkpoint.knobs)
        ctl._external_knobs = checkpoint.external_knobs
        ctl._counts = checkpoint.counts
        ctl._signals = checkpoint.signals
        return ctl

    # -- knobs -----------------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        """The policy that sets the knobs every epoch."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        # A policy with ``attach(controller)`` watches the controller that runs it (a learned
        # policy's shadow guard replays its traffic); it is told of every controller it joins.
        _check_policy(policy)
        with self._lock:
            self._policy = policy
            attach = getattr(policy, "attach", None)
            if callable(attach):
                attach(self)

    def set_knobs(self, knobs: Knobs, *, hold: bool = True) -> None:
        """Apply knobs now (re-keys the queue). ``hold`` keeps them until the next call,
        suspending the policy (the RL environment drives the controller this way)."""
        with self._lock:
            if not isinstance(knobs, Knobs):
                raise TypeError(f"set_knobs() takes Knobs, got {type(knobs).__name__}")
            self._external_knobs = hold
            self._room.set_knobs(knobs)

    def watch_traffic(self, log: TrafficLog | None) -> None:
        """Record every accepted request, its prediction and its outcome into ``log`` from now
        on (None stops): what a shadow replay serves again (:mod:`rtlm_adapt.traffic`)."""
        with self._lock:
            if log is not None and not isinstance(log, TrafficLog):
                raise TypeError(f"watch_traffic() takes a TrafficLog, got {type(log).__name__}")
            self.traffic = log

    def executor_states(self) -> dict[str, ExecutorState]:
        """The latest state each executor reported, by name."""
        with self._lock:
            return dict(self._executors.states)

    def observe(self, now: float) -> Observation:
        """The current observation (see :func:`rtlm_adapt.observer.observe`)."""
        with self._lock:
            return observer.observe(now, self._queue, self._executors, self._signals,
                                    self.predictor, self.reference_batch)

    def stats(self) -> ControllerStats:
        with self._lock:
            return self._counts.stats(queued=len(self._queue), running=len(self._running))

    @property
    def knobs(self) -> Knobs:
        """The knobs in force."""
        return self._room.knobs

    @property
    def latency(self) -> dict[str, LatencyModel]:
        """The latency model per executor name, learned online."""
        return self._executors.latency

    def __len__(self) -> int:
        """Waiting requests."""
        return len(self._queue)

    def register_executor(self, state: ExecutorState) -> None:
        """Tell the controller about an executor before it first asks for work, so the first
        policy decision already knows a secondary exists (the loop does this on construction)."""
        with self._lock:
            if not isinstance(state, ExecutorState):
                raise TypeError(f"register_executor() takes an ExecutorState, got {state!r}")
            self._executors.update(state)

    # -- internals -------------------------------------------------------------------------------
    def _run_policy(self, now: float) -> None:
        self._signals.close_epoch(now)
        self._next_epoch = now + self.epoch_s
        if self._external_knobs:
            return
        knobs = self.policy.decide(self.observe(now))
        if knobs != self.knobs:
            self._room.set_knobs(knobs)


def _failure_reason(reason: FailureReason | str) -> FailureReason:
    try:
        return FailureReason(reason)
    except ValueError:
        raise ValueError(
            f"unknown failure reason {reason!r}; expected one of "
            f"{[r.value for r in FAILURE_REASONS]}"
        ) from None


def _check_policy(policy: Policy) -> None:
    for attr in _POLICY_ATTRIBUTES:
        if not hasattr(policy, attr):
            raise TypeError(f"policy {policy!r} lacks {attr!r}: not a Policy")


def _check_settings(
    policy: Policy, batching: str, epoch_s: float, max_queue: int | None, autosave_every: int
) -> None:
    """Refuse a controller's settings that cannot work, naming the one at fault."""
    _check_policy(policy)
    if batching not in ("continuous", "static"):
        raise ValueError(f"unknown batching mode {batching!r}; expected 'continuous' or 'static'")
    if not (isinstance(epoch_s, (int, float)) and epoch_s > 0 and math.isfinite(epoch_s)):
        raise ValueError(f"epoch_s must be a positive number, got {epoch_s!r}")
    if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 1):
        raise ValueError(f"max_queue must be an int >= 1 or None, got {max_queue!r}")
    if (
        isinstance(autosave_every, bool)
        or not isinstance(autosave_every, int)
        or (autosave_every < 1)
    ):
        raise ValueError(f"autosave_every must be an int >= 1, got {autosave_every!r}")
