"""The dispatcher on its own (no HTTP): the races between a request ending and another leaving."""

from __future__ import annotations

import asyncio
import itertools

from rtlm_adapt import Request
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.gateway.config import BackendConfig
from rtlm_adapt.gateway.dispatcher import Backend, Dispatcher, Ticket
from rtlm_adapt.request import Completion, FailureReason


def setup(max_inflight: int = 1) -> tuple[Dispatcher, Backend, list[Ticket]]:
    controller = AdaptiveController("fcfs")
    backend = Backend(BackendConfig("http://127.0.0.1:9"), max_inflight)
    dispatcher = Dispatcher(controller, [backend], clock=lambda: 1.0)
    return dispatcher, backend, []


def submit(dispatcher: Dispatcher, rid: str) -> Ticket:
    request = Request(rid, f"prompt {rid}", arrival_time=0.0)
    dispatcher.controller.submit(request)
    ticket = Ticket(request)
    dispatcher.enqueue(ticket)
    return ticket


def test_a_queued_request_cancelled_while_a_slot_frees_ends_once_and_frees_the_slot():
    # b's caller is cancelled; before abandon() runs, a's end pumps and hands b the slot.
    async def scenario() -> None:
        dispatcher, backend, _ = setup()
        a, b = submit(dispatcher, "a"), submit(dispatcher, "b")
        task_a = asyncio.ensure_future(dispatcher.admit(a))
        task_b = asyncio.ensure_future(dispatcher.admit(b))
        await asyncio.sleep(0)
        assert task_a.done() and not task_b.done()
        task_b.cancel()
        dispatcher.finish(a, 1)  # must not raise: b's slot is still a live future
        try:
            await task_b
        except asyncio.CancelledError:
            pass
        stats = dispatcher.controller.stats()
        assert backend.inflight == 0
        assert stats.running == 0 and stats.queued == 0
        assert stats.finished == 1 and stats.failures["cancelled"] == 1 and stats.balanced

    asyncio.run(scenario())


def test_a_request_submitted_but_not_yet_awaited_can_be_admitted_by_another_pump():
    async def scenario() -> None:
        dispatcher, backend, _ = setup(max_inflight=2)
        a = submit(dispatcher, "a")
        dispatcher.pump()  # e.g. another request ended before a's handler awaited admit()
        assert a.slot is not None and a.slot.done() and backend.inflight == 1
        assert await dispatcher.admit(a) is backend

    asyncio.run(scenario())


def test_finish_with_a_reason_ends_the_request_failed_for_that_reason_and_teaches_nothing():
    async def scenario() -> None:
        dispatcher, backend, _ = setup()
        ticks = itertools.count(1)
        dispatcher.clock = lambda: float(next(ticks))  # each end takes time: a timing to learn
        ended: list[Completion] = []
        dispatcher.on_end = lambda ticket, completion: ended.append(completion)
        a = submit(dispatcher, "a")
        await dispatcher.admit(a)
        steps: list[object] = []
        dispatcher.controller.on_step = lambda *timing: steps.append(timing)
        done = dispatcher.finish(a, 5, reason=FailureReason.TIMED_OUT, detail="b1: TimeoutError")
        assert done is not None and ended == [done]
        assert done.failure is FailureReason.TIMED_OUT
        assert done.error == "timed_out: b1: TimeoutError" and done.output_tokens == 5
        assert dispatcher.finish(a, 5) is None  # ended once
        stats = dispatcher.controller.stats()
        assert stats.failures["timed_out"] == 1 and stats.finished == 0 and backend.inflight == 0
        assert dispatcher.controller.predictor.n_learned == 0 and steps == []
        b = submit(dispatcher, "b")  # a success, for contrast: it teaches both
        await dispatcher.admit(b)
        assert dispatcher.finish(b, 5).failure is None
        assert dispatcher.controller.predictor.n_learned == 1 and len(steps) == 1

    asyncio.run(scenario())


def test_abandon_ends_a_queued_request_cancelled_with_what_happened():
    async def scenario() -> None:
        dispatcher, _, _ = setup()
        ended: list[Completion] = []
        dispatcher.on_end = lambda ticket, completion: ended.append(completion)
        a, b = submit(dispatcher, "a"), submit(dispatcher, "b")
        await dispatcher.admit(a)  # b waits behind it
        dispatcher.abandon(b)
        dispatcher.abandon(a)
        assert [(c.request_id, c.failure, c.error) for c in ended] == [
            ("b", FailureReason.CANCELLED, "cancelled: client disconnected while queued"),
            ("a", FailureReason.CANCELLED, "cancelled: client disconnected"),
        ]
        assert dispatcher.controller.stats().failures["cancelled"] == 2

    asyncio.run(scenario())
