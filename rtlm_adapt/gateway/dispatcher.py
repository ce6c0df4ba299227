"""The dispatcher: the asyncio bridge between the controller's queue and the backends' slots.

A request waits in :class:`~rtlm_adapt.controller.AdaptiveController`'s queue until a backend
has a free in-flight slot. Whenever that may have changed (an arrival, a request ending, a
health check) :meth:`Dispatcher.pump` asks the controller, one request at a time, which request
the backend with the least predicted outstanding work should take; a secondary backend is only
given requests the policy marks offloadable. The waiting coroutine then wakes with its backend.

The controller sees each backend as an executor: ``running`` is its in-flight count and
``max_batch_size`` its in-flight cap, so the policy's batch cap (consolidation) becomes the
in-flight cap per primary backend.

With a cap above the engine's seats, the extra requests wait in the engine's own queue, ordered
there by the static priority they were sent with, where the controller's hard aging bound cannot
reach them: everything better sent later passes them. So a backend holding a streamed request
that has waited past the bound without its first token is sent nothing more until that request
starts (only a stream shows when a request starts; a non-streamed one is never held for).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.gateway.config import BackendConfig
from rtlm_adapt.request import Completion, FailureReason, Request
from rtlm_adapt.serving.base import ExecutorState, StepResult

logger = logging.getLogger(__name__)

#: What happened to a request whose client went away (reason ``cancelled``).
CLIENT_LEFT = "client disconnected"


@dataclass(eq=False)
class Backend:
    """One upstream server as the gateway sees it now."""

    config: BackendConfig
    max_inflight: int
    healthy: bool = True
    inflight: int = 0
    #: Predicted seconds of work of the requests in flight here (routing picks the least).
    outstanding_s: float = 0.0
    #: The requests in flight here (the tickets holding a slot).
    holders: set[Ticket] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def role(self) -> str:
        return self.config.role

    @property
    def has_room(self) -> bool:
        return self.healthy and self.inflight < self.max_inflight

    def holds_overdue(self, now: float, max_wait_s: float) -> bool:
        """Whether a streamed request here has waited ``max_wait_s`` since its arrival and not
        started (no first token yet): it waits in the engine's queue, where newer requests with
        better priorities would keep passing it."""
        return any(
            t.streamed and t.first_token_time is None and now - t.request.arrival_time >= max_wait_s
            for t in self.holders
        )


@dataclass(eq=False)
class Ticket:
    """One client request from arrival to its end, as the gateway tracks it."""

    request: Request
    #: Predicted output tokens and service seconds (the controller's, at arrival).
    predicted_tokens: float = 0.0
    service_s: float = 0.0
    #: The controller's priority key at admission, as an int for vLLM (lower runs first).
    priority: int = 0
    backend: Backend | None = None
    #: Whether the answer is streamed (then the first token says when the engine started it).
    streamed: bool = False
    #: Gateway-clock times: admitted to a backend, first token seen.
    start_time: float | None = None
    first_token_time: float | None = None
    ended: bool = False
    #: Whether the ticket holds a slot on ``backend`` now (so that a slot is freed exactly once).
    holding: bool = False
    tried: list[str] = field(default_factory=list)
    #: Resolved with the backend when the controller admits the request (see Dispatcher.enqueue).
    slot: asyncio.Future[Backend] | None = None


class NoBackendError(RuntimeError):
    """No healthy backend could take a retried request."""


class ShuttingDown(RuntimeError):
    """The gateway is shutting down: a queued request was withdrawn."""


class Dispatcher:
    """Assigns queued requests to backend slots and reports their ends to the controller.

    Parameters
    ----------
    controller
        The scheduler (its queue, predictor, latency models and policy).
    backends
        The upstream servers.
    clock
        The gateway's clock in seconds (arrival times, deadlines and the controller's ``now``).
    on_end
        Called with ``(ticket, completion)`` once per request that reached the controller, when
        it ends (the metrics hook).
    """

    def __init__(
        self,
        controller: AdaptiveController,
        backends: list[Backend],
        *,
        clock: Callable[[], float],
        on_end: Callable[[Ticket, Completion], None] | None = None,
    ) -> None:
        self.controller = controller
        self.backends = backends
        self.clock = clock
        self.on_end = on_end
        self._waiting: dict[str, tuple[Ticket, asyncio.Future[Backend]]] = {}
        # Retries wait here for any healthy backend they have not tried; served before the queue.
        self._retries: list[tuple[Ticket, asyncio.Future[Backend]]] = []
        for backend in backends:
            controller.register_executor(self._state_of(backend))

    # -- admission -------------------------------------------------------------------------------
    def enqueue(self, ticket: Ticket) -> None:
        """Register a request the moment it is submitted to the controller.

        This must happen in the same step as ``controller.submit``: any later pump may hand the
        request a slot, and the slot needs somewhere to go before anyone awaits it.
        """
        slot: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        ticket.slot = slot
        self._waiting[ticket.request.id] = (ticket, slot)

    async def admit(self, ticket: Ticket) -> Backend:
        """Wait until the controller gives ``ticket`` (already enqueued) a backend slot.

        If the caller is cancelled (the client went away) the request is withdrawn from the
        queue, or ended as cancelled if a slot was just given to it.
        """
        slot = ticket.slot
        if slot is None:
            raise RuntimeError(f"request {ticket.request.id!r} was never enqueued")
        self.pump()
        try:
            # Shielded: cancelling the caller must not cancel the slot itself, or a pump before
            # abandon() runs would hand it a request (InvalidStateError; request and slot lost).
            return await asyncio.shield(slot)
        except asyncio.CancelledError:
            self.abandon(ticket)
            raise

    def abandon(self, ticket: Ticket) -> None:
        """End a request whose caller gave up (the client went away) as ``cancelled``, wherever
        it is: withdrawn from the queue, or ended if it was given a slot. Idempotent."""
        if ticket.ended:
            return
        self._waiting.pop(ticket.request.id, None)
        slot = ticket.slot
        admitted = slot is not None and slot.done() and not slot.cancelled()
        if admitted and slot.exception() is None:
            self.finish(ticket, 0, reason=FailureReason.CANCELLED, detail=CLIENT_LEFT)
        elif self.controller.cancel(ticket.request.id) is not None:
            ticket.ended = True
            self._report_withdrawn(ticket, FailureReason.CANCELLED, f"{CLIENT_LEFT} while queued")

    async def readmit(self, ticket: Ticket) -> Backend:
        """A slot on a healthy backend ``ticket`` has not tried yet (for one retry).

        Raises :class:`NoBackendError` when no such backend exists or is healthy.
        """
        self._leave(ticket)
        if not any(b.healthy and b.name not in ticket.tried for b in self.backends):
            raise NoBackendError("no other healthy backend to retry on")
        slot: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        self._retries.append((ticket, slot))
        self.pump()
        try:
            return await asyncio.shield(slot)  # as in admit(): the slot outlives the caller
        except asyncio.CancelledError:
            self._retries = [r for r in self._retries if r[0] is not ticket]
            # frees any new slot
            self.finish(ticket, 0, reason=FailureReason.CANCELLED, detail=CLIENT_LEFT)
            raise

    def pump(self) -> None:
        """Hand free slots to waiting requests, best backend first, until nothing moves."""
        now = self.clock()
        self._serve_retries(now)
        while self._waiting:
            if not self._assign_one(now):
                break

    def _assign_one(self, now: float) -> bool:
        # Primaries by least predicted outstanding work, then the secondaries (the controller
        # only gives them offloadable requests).
        max_wait = self.controller.knobs.max_wait_s
        open_ = [b for b in self.backends if b.has_room and not b.holds_overdue(now, max_wait)]
        primaries = sorted((b for b in open_ if b.role == "primary"), key=lambda b: b.outstanding_s)
        secondaries = [b for b in open_ if b.role == "secondary"]
        for backend in primaries + secondaries:
            batch = self.controller.next_batch(self._state_of(backend, now), limit=1)
            if not batch:
                continue
            rid = batch[0].id
            ticket, slot = self._waiting.pop(rid)
            entry = self.controller.entry(rid)
            ticket.priority = entry.engine_priority if entry is not None else 0
            self._occupy(ticket, backend, now)
            slot.set_result(backend)
            return True
        return False

    def _serve_retries(self, now: float) -> None:
        still = []
        for ticket, slot in self._retries:
            if slot.done():
                continue
            fresh = [b for b in self.backends if b.name not in ticket.tried]
            if not any(b.healthy for b in fresh):
                slot.set_exception(NoBackendError("no other healthy backend to retry on"))
                continue
            free = [b for b in fresh if b.has_room]
            if not free:
                still.append((ticket, slot))
                continue
            backend = min(free, key=lambda b: (b.role != "primary", b.outstanding_s))
            self._occupy(ticket, backend, now)
            slot.set_result(backend)
        self._retries = still

    def _occupy(self, ticket: Ticket, backend: Backend, now: float) -> None:
        ticket.backend = backend
        ticket.holding = True
        ticket.tried.append(backend.name)
        if ticket.start_time is None:
            ticket.start_time = now
        backend.inflight += 1
        backend.outstanding_s += ticket.service_s
        backend.holders.add(ticket)

    def _leave(self, ticket: Ticket) -> None:
        backend = ticket.backend
        if backend is not None and ticket.holding:
            ticket.holding = False
            backend.inflight -= 1
            backend.outstanding_s = max(0.0, backend.outstanding_s - ticket.service_s)
            backend.holders.discard(ticket)

    def first_token(self, ticket: Ticket) -> None:
        """``ticket``'s first token arrived: the engine started it. If it was overdue, its
        backend may take requests again."""
        if ticket.first_token_time is not None:
            return
        now = ticket.first_token_time = self.clock()
        if now - ticket.request.arrival_time >= self.controller.knobs.max_wait_s:
            self.pump()

    # -- ends ------------------------------------------------------------------------------------
    def finish(
        self,
        ticket: Ticket,
        output_tokens: int,
        *,
        reason: FailureReason | None = None,
        detail: str = "",
    ) -> Completion | None:
        """End an admitted request exactly once: teach the controller, free its slot, pump.

        ``reason`` is None for a success; otherwise it says why the request failed and
        ``detail`` what happened (the Completion's error is ``"<reason>: <detail>"``). Returns
        the completion, or None if the ticket had already ended.
        """
        if ticket.ended:
            return None
        ticket.ended = True
        backend = ticket.backend
        now = self.clock()
        request = ticket.request
        completion = Completion.of(
            request,
            output_tokens=max(0, int(output_tokens)),
            start_time=ticket.start_time if ticket.start_time is not None else now,
            finish_time=now,
            executor=backend.name if backend is not None else "",
            prompt_tokens=request.prompt_tokens or 0,
            first_token_time=ticket.first_token_time,
            error=None if reason is None else reason.error(detail),
            failure=reason,
        )
        if reason is None and backend is not None and output_tokens > 1:
            self._learn_timing(ticket, backend, completion)
        self.controller.on_finish(completion)
        self._leave(ticket)  # a no-op if a failed retry already freed it
        if self.on_end is not None:
            self.on_end(ticket, completion)
        self.pump()
        return completion

    def _learn_timing(self, ticket: Ticket, backend: Backend, completion: Completion) -> None:
        # The engine's decode steps are not visible through HTTP; the request's own time per
        # output token, at the backend's current in-flight count, stands for one step.
        start = completion.first_token_time or completion.start_time
        iterations = completion.output_tokens - (1 if completion.first_token_time else 0)
        duration = completion.finish_time - start
        if duration <= 0 or iterations < 1:
            return
        batch = max(1, backend.inflight)
        context = batch * (completion.prompt_tokens + completion.output_tokens // 2)
        self.controller.on_step(
            backend.name,
            StepResult(
                duration_s=duration,
                iterations=iterations,
                batch_size=batch,
                context_tokens=context,
            ),
        )

    def _report_withdrawn(self, ticket: Ticket, reason: FailureReason, detail: str) -> None:
        # A request that left the queue without running: the controller counted it already.
        if self.on_end is None:
            return
        self.on_end(ticket, Completion.failed(ticket.request, reason, detail, self.clock()))

    def withdraw(self, ticket: Ticket, reason: FailureReason, detail: str) -> None:
        """Take a queued request out as failed with ``reason``; ``detail`` says what happened."""
        self._waiting.pop(ticket.request.id, None)
        if self.controller.withdraw(ticket.request.id, reason) is not None:
            ticket.ended = True
            self._report_withdrawn(ticket, reason, detail)

    def shutdown(self) -> None:
        """Withdraw every queued request (reason ``shutdown``) and fail waiting retries."""
        for ticket, slot in list(self._waiting.values()):
            self.withdraw(ticket, FailureReason.SHUTDOWN, "the gateway is stopping")
            if not slot.done():
                slot.set_exception(ShuttingDown("the gateway is shutting down"))
        for _, slot in self._retries:
            if not slot.done():
                slot.set_exception(NoBackendError("the gateway is shutting down"))
        self._retries = []

    # -- views -----------------------------------------------------------------------------------
    def _state_of(self, backend: Backend, now: float | None = None) -> ExecutorState:
        return ExecutorState(
            backend.name,
            backend.role,
            backend.inflight,
            backend.max_inflight,
            now=self.clock() if now is None else now,
        )

    @property
    def slots(self) -> int:
        """In-flight slots on healthy primaries (for wait estimates)."""
        return sum(b.max_inflight for b in self.backends if b.role == "primary" and b.healthy)

    @property
    def waiting(self) -> int:
        return len(self._waiting)


def monotonic_clock() -> Callable[[], float]:
    """Seconds since this call: small numbers keep the priority ints small."""
    start = time.monotonic()
    return lambda: time.monotonic() - start
