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

import functools
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rtlm_adapt.knobs import Knobs
from rtlm_adapt.latency import LatencyModel
from rtlm_adapt.observation import Observation
from rtlm_adapt.persistence import decode_state, encode_state, read_state, write_bytes_atomic
from rtlm_adapt.predictor import LengthPrediction, LengthPredictor
from rtlm_adapt.queue import QueueEntry, RequestQueue
from rtlm_adapt.request import Completion, Request
from rtlm_adapt.serving.base import ExecutorState, StepResult
from rtlm_adapt.serving.profile import StepCost
from rtlm_adapt.uncertainty import UncertaintyScorer

logger = logging.getLogger(__name__)

#: Waiting requests an observation summarises (a sample: the queue may hold thousands).
OBSERVE_SAMPLE = 128

#: Slack (s) assumed for a request without a deadline, so the slack term stays finite.
NO_DEADLINE_SLACK_S = 3600.0

#: Why a request ended without a result. A failed Completion's ``error`` starts with one of
#: these followed by ": " (e.g. ``"timed_out: step exceeded 30 s"``); any other error text
#: counts as ``executor_failure``.
FAILURE_REASONS = ("rejected", "timed_out", "executor_failure", "cancelled", "shutdown")

_STATE_KIND = "rtlm_adapt.AdaptiveController"
_F = TypeVar("_F", bound=Callable[..., Any])


def failure_reason(error: str) -> str:
    """The :data:`FAILURE_REASONS` entry an error text belongs to."""
    head = error.split(":", 1)[0].strip()
    return head if head in FAILURE_REASONS else "executor_failure"


def _locked(method: _F) -> _F:
    # One re-entrant lock per controller: the loop thread, front-end threads and asyncio
    # callbacks may all call in at once. Every public call is short (microseconds), so a
    # single lock costs less than finer-grained schemes and makes each call atomic.
    @functools.wraps(method)
    def wrapper(self: AdaptiveController, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(slots=True, eq=False, kw_only=True)
class Tracked(QueueEntry):
    """What the controller remembers about one live request.

    It is the request's queue entry too: one object per request from submit to finish (the
    queue orders it while it waits, ``_running`` holds it while it runs).
    """

    request: Request
    features: Mapping[Any, float]
    uncertainty: float
    prediction: LengthPrediction
    prompt_tokens: int
    #: The length the priority uses (per the policy's ``length_source``).
    rank_length: float
    #: Predicted service time on the primary at the reference batch size.
    service_s: float
    executor: str | None = None


@dataclass(frozen=True, slots=True)
class ControllerStats:
    submitted: int
    queued: int
    running: int
    finished: int
    failed: int
    #: Failures per reason (:data:`FAILURE_REASONS`); they sum to ``failed``.
    failures: Mapping[str, int] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        """Every submitted request is queued, running, finished or failed: nothing lost."""
        return (
            self.submitted == self.queued + self.running + self.finished + self.failed
            and sum(self.failures.values()) == self.failed
        )


class AdaptiveController:
    """Uncertainty-aware scheduler with an online length predictor; see the module docstring.

    Parameters
    ----------
    policy
        A Policy object, or a name understood by :func:`rtlm_adapt.policies.make_policy`
        (``fcfs``, ``sjf-prompt``, ``oracle-sjf``, ``heuristic``, ...).
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
    ValueError) ends exactly once, as finished or failed with a reason from
    :data:`FAILURE_REASONS`, and :meth:`stats` always balances.
    """

    def __init__(
        self,
        policy: Any = "heuristic",
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
        for attr in ("decide", "length_source", "consolidate", "name"):
            if not hasattr(policy, attr):
                raise TypeError(f"policy {policy!r} lacks {attr!r}: not a Policy")
        if batching not in ("continuous", "static"):
            raise ValueError(
                f"unknown batching mode {batching!r}; expected 'continuous' or 'static'"
            )
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
        self._lock = threading.RLock()
        self.autosave_path = autosave_path
        self.autosave_every = autosave_every
        self._ended_since_save = 0
        self._failures: dict[str, int] = dict.fromkeys(FAILURE_REASONS, 0)
        self._cancel_marks: set[str] = set()  # running requests the loop should abort
        self._closed = False
        self.policy = policy
        # Default: the lexical tier from its packaged ShareGPT prior, useful on request one.
        self.predictor = predictor if predictor is not None else LengthPredictor.pretrained()
        self.scorer = scorer if scorer is not None else UncertaintyScorer()
        self.profiles = dict(profiles or {})
        self.latency: dict[str, LatencyModel] = {}
        self.epoch_s = float(epoch_s)
        self.batching = batching
        self.max_queue = max_queue
        self.reference_batch = reference_batch
        self.knobs = Knobs()
        self._queue = RequestQueue()
        self._running: dict[str, Tracked] = {}
        self._executors: dict[str, ExecutorState] = {}
        self._primary: str | None = None
        self._next_epoch = 0.0
        # No waiting request reaches the hard aging bound before this time (a lower bound, reset
        # whenever it might be too late), so next_batch need not look at the oldest until then.
        self._aging_due = -math.inf
        self._last_epoch = 0.0
        self._external_knobs = False
        # counters (the accounting invariant) and smoothed signals for the observation
        self._submitted = self._finished = 0
        self._arrivals_in_epoch = 0
        self._arrival_rate = 0.0
        self._service_ewma = 0.0
        self._response_ewma = 0.0
        self._miss_ewma = 0.0
        self._step_ewma = 0.0

    # -- the loop's calls ------------------------------------------------------------------------
    def submit(self, request: Request, features: Mapping[Any, float] | None = None) -> None:
        """Queue a request. ``features`` may carry precomputed features (a dict of uncertainty
        features, or the predictor's :class:`~rtlm_adapt.predictor.PromptFeatures`).

        Raises TypeError/ValueError for an invalid call (not counted), ``QueueFullError`` when
        ``max_queue`` requests wait and ``ControllerClosedError`` after :meth:`close` (both
        counted as submitted and failed, reasons ``rejected`` and ``shutdown``).
        """
        # The three hot calls (submit, next_batch, on_finish) take the lock inline rather than
        # through @_locked: a wrapper frame per call is a measurable share of their cost.
        with self._lock:
            if not isinstance(request, Request):
                raise TypeError(f"submit() takes a Request, got {type(request).__name__}")
            rid = request.id
            queue = self._queue
            if rid in queue or rid in self._running:
                raise ValueError(
                    f"duplicate request id {rid!r}: a request with this id is still live"
                )
            if self._closed:
                self._count_failure("shutdown", submitted=True)
                raise ControllerClosedError(
                    f"controller is shut down; request {rid!r} not accepted"
                )
            if self.max_queue is not None and len(queue) >= self.max_queue:
                self._count_failure("rejected", submitted=True)
                raise QueueFullError(
                    f"queue is full ({self.max_queue} waiting); request {rid!r} rejected"
                )
            if features is None:
                features = self.scorer.features(request.prompt)
                # score first: the predictor's features() then sees the complete set
                features["uncertainty"] = self.scorer.score(features)
                extend = getattr(self.predictor, "features", None)
                if callable(extend):
                    # The predictor's own features on top: hashed words and, on the
                    # encoder tier, the prompt embedding (batch 1 here; batch upstream and pass
                    # ``features`` to avoid that cost).
                    features = extend(request.prompt, base=features)
            uncertainty = features.get("uncertainty")
            if uncertainty is None:  # not precomputed upstream along with the features
                uncertainty = features["uncertainty"] = self.scorer.score(features)
            prediction = self.predictor.predict_one(features)
            prompt_tokens = request.prompt_tokens or max(
                1, int(features.get("prompt_tokens_est", 1))
            )
            if self.policy.length_source == "predicted":  # the common case, without a call
                rank_length = prediction.length
            else:
                rank_length = self._rank_length(request, prediction, prompt_tokens)
            latency = self.latency.get(self._primary)  # type: ignore[arg-type]
            if latency is None:  # no primary registered yet, or its model not made yet
                latency = self._primary_latency()
            service_s = latency.service_time(
                prompt_tokens, rank_length, batch_size=self.reference_batch
            )
            tracked = Tracked(
                rid,
                request.arrival_time,
                request=request,
                features=features,
                uncertainty=uncertainty,
                prediction=prediction,
                prompt_tokens=prompt_tokens,
                rank_length=rank_length,
                service_s=service_s,
            )
            tracked.key, tracked.offload = self._key_of(tracked)
            queue.push(tracked)
            if tracked.arrival_time + self.knobs.max_wait_s < self._aging_due:
                self._aging_due = -math.inf  # arrived out of order: older than the bound assumed
            self._submitted += 1
            self._arrivals_in_epoch += 1
            # smoothed isolated service time: the time scale of the observation and of aging
            isolated = latency.service_time(prompt_tokens, prediction.length)
            if self._submitted == 1:
                self._service_ewma = isolated
            else:
                self._service_ewma += 0.05 * (isolated - self._service_ewma)

    def next_batch(self, state: ExecutorState, *, limit: int | None = None) -> list[Request]:
        """The requests that should join ``state``'s executor now (possibly none).

        ``limit`` caps how many are handed out in this call (a router that spreads requests
        over several backends asks for one at a time); the batch cap still applies.
        """
        with self._lock:
            try:
                name = state.name
            except AttributeError:
                raise _not_executor_state(state) from None
            if name in self._executors:  # _register's common case, without a call
                self._executors[name] = state
            else:
                self._register(state)
            now = state.now
            if now >= self._next_epoch:
                self._run_policy(now)
            if not self._queue:
                return []
            primary = state.role == "primary"
            if primary:
                cap = self.knobs.max_batch_size or state.max_batch_size
                room = (cap if cap < state.max_batch_size else state.max_batch_size) - state.running
            else:
                room = state.free_slots
            if limit is not None:
                room = room if room < limit else limit
            if room <= 0:
                return []
            if self.batching == "static" and state.running == 0 and self.policy.consolidate:
                entries = self._consolidated(room, now, offload_only=not primary)
            else:
                entries = self._take(room, now, offload_only=not primary)
            batch = []
            running = self._running
            for tracked in entries:
                tracked.executor = name
                running[tracked.request_id] = tracked
                batch.append(tracked.request)
            return batch

    @_locked
    def on_step(self, executor: str, result: StepResult) -> None:
        """An executor ran ``result.iterations`` iterations: learn its timing."""
        if not isinstance(result, StepResult):
            raise TypeError(f"on_step() takes a StepResult, got {type(result).__name__}")
        model = self._latency_for(executor)
        model.learn_step(
            result.batch_size,
            result.context_tokens,
            result.prefill_tokens,
            result.duration_s,
            iterations=max(1, result.iterations),
        )
        if executor == self._primary and result.iterations > 0:
            per_iter = result.duration_s / result.iterations
            if math.isfinite(per_iter) and per_iter >= 0:
                self._step_ewma += 0.1 * (per_iter - self._step_ewma)

    def on_finish(self, completion: Completion) -> None:
        """A request ended (with a result or an error): account for it and learn its length.

        A failed completion is counted under ``failure_reason(completion.error)`` and teaches
        nothing (its token count is not a length the model would have produced).
        """
        with self._lock:
            try:
                rid = completion.request_id
            except AttributeError:
                raise TypeError(
                    f"on_finish() takes a Completion, got {type(completion).__name__}"
                ) from None
            tracked = self._running.pop(rid, None)
            if tracked is None:
                raise ValueError(
                    f"on_finish for request {rid!r}, which is not running "
                    "(unknown, never scheduled, or already finished)"
                )
            if self._cancel_marks:
                self._cancel_marks.discard(rid)
            if completion.error is not None:
                self._count_failure(failure_reason(completion.error))
            else:
                self._finished += 1
                self.predictor.learn_one(tracked.features, completion.output_tokens)
                rt = completion.response_time
                if 0.0 <= rt < math.inf:
                    self._response_ewma += 0.05 * (rt - self._response_ewma)
                self._miss_ewma += 0.05 * (completion.missed_deadline - self._miss_ewma)
            self._ended_since_save += 1
            if self.autosave_path is not None and self._ended_since_save >= self.autosave_every:
                # Amortized: one save (milliseconds, under the lock) per autosave_every requests.
                self._autosave()

    @_locked
    def cancel(self, request_id: str) -> Request | None:
        """Cancel a request.

        A waiting request is withdrawn at once (failed, reason ``cancelled``) and returned. A
        running one is marked: the serving loop collects the marks with
        :meth:`take_cancellations`, aborts the request on its executor and reports it through
        :meth:`on_finish` with a ``cancelled`` error; None is returned. Unknown or already
        ended ids are ignored (None): cancelling is idempotent.
        """
        request = self.withdraw(request_id, "cancelled")
        if request is None and request_id in self._running:
            self._cancel_marks.add(request_id)
        return request

    @_locked
    def withdraw(self, request_id: str, reason: str) -> Request | None:
        """Take a waiting request out of the queue as failed with ``reason`` (for example
        ``rejected`` when a gateway sheds it at arrival); returns it, or None if it is not
        waiting. Running requests are untouched."""
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}; expected {FAILURE_REASONS}")
        entry = self._queue.remove(request_id)
        if entry is None:
            return None
        self._count_failure(reason)
        return entry.request

    @_locked
    def entry(self, request_id: str) -> Tracked | None:
        """What the controller knows of a live request (waiting or running): its prediction,
        uncertainty, service-time estimate and priority ``key``; None once it has ended."""
        running = self._running.get(request_id)
        return running if running is not None else self._queue.get(request_id)

    @_locked
    def take_cancellations(self) -> list[str]:
        """Running requests marked by :meth:`cancel` since the last call (the loop aborts them)."""
        if not self._cancel_marks:
            return []
        marks = [rid for rid in self._cancel_marks if rid in self._running]
        self._cancel_marks.clear()
        return marks

    @_locked
    def work_ahead(self, request_id: str) -> float:
        """Predicted service seconds of the waiting requests that would run before this one
        (smaller keys): what it waits behind, for deadline admission. O(queue length)."""
        me = self._queue.get(request_id)
        if me is None:
            return 0.0
        return sum(t.service_s for t in self._queue if t.key < me.key)  # type: ignore[attr-defined]

    @_locked
    def fail_queued(self, reason: str = "shutdown") -> list[Request]:
        """Withdraw every waiting request as failed with ``reason``; returns them."""
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}; expected {FAILURE_REASONS}")
        out = []
        while self._queue:
            entry = self._queue.oldest()
            if entry is None:
                break
            self._queue.remove(entry.request_id)
            self._count_failure(reason)
            out.append(entry.request)
        return out

    @_locked
    def close(self) -> None:
        """Stop accepting requests (graceful shutdown); queued and running ones are untouched."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def is_running(self, request_id: str) -> bool:
        """Whether ``request_id`` was handed to an executor and has not ended."""
        return request_id in self._running

    # -- persistence -----------------------------------------------------------------------------
    @_locked
    def state_bytes(self) -> bytes:
        """The learned state as file bytes (see :meth:`save`)."""
        state = {
            "kind": _STATE_KIND,
            "policy": self.policy,
            "predictor": self.predictor,
            "scorer": self.scorer,
            "profiles": self.profiles,
            "latency": self.latency,
            "knobs": self.knobs,
            "external_knobs": self._external_knobs,
            "config": {
                "epoch_s": self.epoch_s,
                "batching": self.batching,
                "max_queue": self.max_queue,
                "reference_batch": self.reference_batch,
            },
            "counters": {
                "submitted": self._submitted,
                "finished": self._finished,
                "failed": self._failed_total(),
                "failures": dict(self._failures),
                # Live requests do not survive a restart: load() counts them as shut down.
                "in_flight": len(self._queue) + len(self._running),
            },
            "signals": {
                "arrival_rate": self._arrival_rate,
                "service_ewma": self._service_ewma,
                "response_ewma": self._response_ewma,
                "miss_ewma": self._miss_ewma,
                "step_ewma": self._step_ewma,
            },
        }
        return encode_state(state)

    def save(self, path: str | Path) -> None:
        """Write everything learned online to ``path``, atomically (temp file, fsync, rename).

        Saved: the policy, the length predictor, the uncertainty scorer, the latency models,
        the knobs and the counters. Not saved: queued and running requests (a restart loses
        them; :meth:`load` counts them as failed with reason ``shutdown``). The state is
        serialized under the lock and written outside it.
        """
        write_bytes_atomic(path, self.state_bytes())

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        autosave_path: str | Path | None = None,
        autosave_every: int = 1000,
    ) -> AdaptiveController:
        """A controller restored from a :meth:`save` file.

        Raises ValueError if the file is truncated, corrupted, of another format version or
        incomplete; nothing is half-loaded (the controller is built only from a fully checked
        state). Only load files you wrote yourself: the state is a pickle.
        """
        return cls._from_state(
            read_state(path, kind=_STATE_KIND), str(path), autosave_path, autosave_every
        )

    @classmethod
    def from_state_bytes(cls, data: bytes) -> AdaptiveController:
        """Like :meth:`load`, from :meth:`state_bytes` output."""
        return cls._from_state(decode_state(data, kind=_STATE_KIND), "<bytes>", None, 1000)

    @classmethod
    def _from_state(
        cls, state: dict, source: str, autosave_path: str | Path | None, autosave_every: int
    ) -> AdaptiveController:
        try:
            cfg, cnt, sig = state["config"], state["counters"], state["signals"]
            predictor, latency, knobs = state["predictor"], state["latency"], state["knobs"]
            if not isinstance(predictor, LengthPredictor):
                raise TypeError("predictor is not a LengthPredictor")
            if not isinstance(knobs, Knobs):
                raise TypeError("knobs are not Knobs")
            if not isinstance(latency, dict) or not all(
                isinstance(m, LatencyModel) for m in latency.values()
            ):
                raise TypeError("latency is not a dict of LatencyModel")
            failures = {r: int(cnt["failures"].get(r, 0)) for r in FAILURE_REASONS}
            failures["shutdown"] += int(cnt["in_flight"])
            ctl = cls(
                state["policy"],
                predictor=predictor,
                scorer=state["scorer"],
                profiles=state["profiles"],
                epoch_s=cfg["epoch_s"],
                batching=cfg["batching"],
                max_queue=cfg["max_queue"],
                reference_batch=cfg["reference_batch"],
                autosave_path=autosave_path,
                autosave_every=autosave_every,
            )
            ctl.latency = dict(latency)
            ctl.knobs = knobs
            ctl._external_knobs = bool(state["external_knobs"])
            ctl._submitted = int(cnt["submitted"])
            ctl._finished = int(cnt["finished"])
            ctl._failures = failures
            ctl._arrival_rate = float(sig["arrival_rate"])
            ctl._service_ewma = float(sig["service_ewma"])
            ctl._response_ewma = float(sig["response_ewma"])
            ctl._miss_ewma = float(sig["miss_ewma"])
            ctl._step_ewma = float(sig["step_ewma"])
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{source!r} holds an incomplete controller state: {exc!r}") from exc
        return ctl

    # -- knobs -----------------------------------------------------------------------------------
    @_locked
    def set_knobs(self, knobs: Knobs, *, hold: bool = True) -> None:
        """Apply knobs now (re-keys the queue). ``hold`` keeps them until the next call,
        suspending the policy (the RL environment drives the controller this way)."""
        if not isinstance(knobs, Knobs):
            raise TypeError(f"set_knobs() takes Knobs, got {type(knobs).__name__}")
        self._external_knobs = hold
        self._apply(knobs)

    @_locked
    def observe(self, now: float) -> Observation:
        """The current observation.

        Queue statistics are over at most ``OBSERVE_SAMPLE`` waiting requests (the oldest wait is
        exact), so an epoch costs the same whatever the queue length.
        """
        lengths, uncert, min_slack = [], 0.0, math.inf
        for entry in self._queue.sample(OBSERVE_SAMPLE):
            t: Tracked = entry
            lengths.append(t.prediction.length)
            uncert += t.uncertainty
            if t.request.deadline is not None:
                min_slack = min(min_slack, t.request.deadline - now)
        first = self._queue.oldest()
        oldest = max(0.0, now - first.arrival_time) if first is not None else 0.0
        lengths.sort()
        n = len(lengths)
        primary = self._executors.get(self._primary or "")
        secondary = next((s for s in self._executors.values() if s.role != "primary"), None)
        svc = self._service_ewma
        batch = max(1, primary.max_batch_size if primary else self.reference_batch)
        mean_len = sum(lengths) / n if n else self.predictor.predict_one({}).length
        per_request = self._primary_latency().service_time(64, mean_len, batch_size=batch)
        capacity = batch / max(1e-9, per_request)
        return Observation(
            now=now,
            queue_length=len(self._queue),
            primary_running=primary.running if primary else 0,
            primary_max_batch=primary.max_batch_size if primary else self.reference_batch,
            secondary_running=secondary.running if secondary else 0,
            secondary_max_batch=secondary.max_batch_size if secondary else 0,
            pred_len_mean=mean_len if n else 0.0,
            pred_len_p90=lengths[min(n - 1, int(0.9 * n))] if n else 0.0,
            uncertainty_mean=uncert / n if n else 0.0,
            oldest_wait_s=oldest,
            min_slack_s=min_slack,
            arrival_rate=self._arrival_rate,
            service_time_s=svc,
            load=self._arrival_rate / capacity if capacity > 0 else 0.0,
            recent_response_s=self._response_ewma,
            recent_miss_rate=self._miss_ewma,
            step_time_s=self._step_ewma,
            primary_knee_batch=self._knee_batch(batch, 64 + mean_len / 2),
            pred_len_p50=lengths[n // 2] if n else 0.0,
        )

    def _knee_batch(self, max_batch: int, context_per_seq: float, share: float = 0.95) -> int:
        """Smallest batch whose decode throughput is ``share`` of the throughput at max_batch."""
        model = self._primary_latency()

        def throughput(b: int) -> float:
            return b / max(1e-12, model.step_time(b, int(b * context_per_seq)))

        peak = throughput(max_batch)
        return next(b for b in range(1, max_batch + 1) if throughput(b) >= share * peak)

    @_locked
    def stats(self) -> ControllerStats:
        return ControllerStats(
            submitted=self._submitted,
            queued=len(self._queue),
            running=len(self._running),
            finished=self._finished,
            failed=self._failed_total(),
            failures=dict(self._failures),
        )

    def __len__(self) -> int:
        """Waiting requests."""
        return len(self._queue)

    # -- internals -------------------------------------------------------------------------------
    def _count_failure(self, reason: str, *, submitted: bool = False) -> None:
        if submitted:
            self._submitted += 1
        self._failures[reason] += 1

    def _failed_total(self) -> int:
        return sum(self._failures.values())

    def _autosave(self) -> None:
        # Called under the lock; a failing disk must not take the serving path down with it.
        self._ended_since_save = 0
        try:
            self.save(self.autosave_path)  # type: ignore[arg-type]
        except OSError:
            logger.exception("autosave to %s failed", self.autosave_path)

    @_locked
    def register_executor(self, state: ExecutorState) -> None:
        """Tell the controller about an executor before it first asks for work, so the first
        policy decision already knows a secondary exists (the loop does this on construction)."""
        if not isinstance(state, ExecutorState):
            raise TypeError(f"register_executor() takes an ExecutorState, got {state!r}")
        self._register(state)

    def _register(self, state: ExecutorState) -> None:
        if not isinstance(state, ExecutorState):
            raise _not_executor_state(state)
        if state.name not in self._executors:
            if state.role == "primary":
                self._primary = state.name
            self._latency_for(state.name)
        self._executors[state.name] = state

    def _latency_for(self, name: str) -> LatencyModel:
        model = self.latency.get(name)
        if model is None:
            prior = self.profiles.get(name) or StepCost.default()
            model = self.latency[name] = LatencyModel(prior)
        return model

    def _primary_latency(self) -> LatencyModel:
        return self._latency_for(self._primary or "primary")

    def _rank_length(
        self, request: Request, prediction: LengthPrediction, prompt_tokens: int
    ) -> float:
        source = self.policy.length_source
        if source == "predicted":
            return prediction.length
        if source == "prompt":
            return float(prompt_tokens)
        true = request.true_output_tokens
        if true is None:
            raise ValueError(
                f"policy {self.policy.name!r} ranks by true lengths, but request {request.id!r} "
                "carries none (metadata[TRUE_LENGTH_KEY])"
            )
        return float(true)

    def _key_of(self, t: Tracked) -> tuple[float, bool]:
        k = self.knobs
        s = t.service_s
        key = (
            k.length_weight + k.uncertainty_weight * t.uncertainty
        ) * s + k.wait_weight * t.request.arrival_time
        if k.slack_weight:
            deadline = t.request.deadline
            if deadline is None:
                deadline = t.request.arrival_time + NO_DEADLINE_SLACK_S
            key += k.slack_weight * (deadline - s)
        return key, _offloadable(t, k.offload_threshold)

    def _take(self, room: int, now: float, *, offload_only: bool) -> list[Tracked]:
        taken: list[Tracked] = []
        max_wait = self.knobs.max_wait_s
        queue = self._queue
        for _ in range(room):
            entry = None
            if max_wait < math.inf and not offload_only and now >= self._aging_due:
                oldest = queue.oldest()
                if oldest is not None:
                    if now - oldest.arrival_time >= max_wait:
                        entry = oldest
                        queue.remove(entry.request_id)
                    else:  # removals only make the oldest younger: no aged request before this
                        self._aging_due = oldest.arrival_time + max_wait
            if entry is None:
                entry = queue.pop(offload_only=offload_only)
            if entry is None:  # nothing (eligible) left
                break
            taken.append(entry)
        return taken

    def _consolidated(self, room: int, now: float, *, offload_only: bool) -> list[Tracked]:
        """A static batch: the best request plus those closest to it in predicted length."""
        window = self._take(min(len(self._queue), room * 4), now, offload_only=offload_only)
        if not window:
            return []
        head, rest = window[0], window[1:]
        target = math.log1p(head.rank_length)
        rest.sort(key=lambda e: abs(math.log1p(e.rank_length) - target))
        chosen, back = [head, *rest[: room - 1]], rest[room - 1 :]
        for entry in back:  # put the others back (keys unchanged; the queue re-sequences them)
            self._queue.push(entry)
        self._aging_due = -math.inf
        return chosen

    def _run_policy(self, now: float) -> None:
        elapsed = now - self._last_epoch
        if elapsed > 0:
            rate = self._arrivals_in_epoch / elapsed
            self._arrival_rate = (
                rate if self._last_epoch == 0 else (0.7 * self._arrival_rate + 0.3 * rate)
            )
        self._arrivals_in_epoch = 0
        self._last_epoch = now
        self._next_epoch = now + self.epoch_s
        if self._external_knobs:
            return
        knobs = self.policy.decide(self.observe(now))
        if knobs != self.knobs:
            self._apply(knobs)

    def _apply(self, knobs: Knobs) -> None:
        old, self.knobs = self.knobs, knobs
        self._aging_due = -math.inf  # max_wait_s may have changed
        # Re-key (O(n)) only when the order changes; a new offload threshold only re-flags.
        weights = ("length_weight", "uncertainty_weight", "wait_weight", "slack_weight")
        if any(getattr(old, w) != getattr(knobs, w) for w in weights):
            self._queue.rekey(self._key_of)
        elif old.offload_threshold != knobs.offload_threshold:
            threshold = knobs.offload_threshold
            self._queue.reflag(lambda entry: _offloadable(entry, threshold))


def _offloadable(tracked: Tracked, threshold: float) -> bool:
    """Eligible for the secondary executor: the length the policy ranks by reaches the threshold."""
    return tracked.rank_length >= threshold


class QueueFullError(RuntimeError):
    """The controller's queue is at ``max_queue``: the request was not accepted."""


class ControllerClosedError(RuntimeError):
    """The controller was closed (shutdown): the request was not accepted."""


def _not_executor_state(value: object) -> TypeError:
    return TypeError(f"next_batch() takes an ExecutorState, got {type(value).__name__}")
