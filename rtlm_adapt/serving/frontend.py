"""AsyncServer: an asyncio (and thread-safe) front end to a :class:`ServingLoop`.

Callers submit requests from any thread or event loop; one driver thread owns the serving loop
(the loop itself is single-threaded) and is the only code that touches it. Hand-off is a deque
under a condition variable; results come back through ``concurrent.futures.Future`` objects,
which asyncio awaits with :func:`asyncio.wrap_future` (thread-safe by construction).

Every request accepted by :meth:`AsyncServer.submit` resolves its future exactly once, with a
successful or a failed :class:`~rtlm_adapt.request.Completion` (rejected, cancelled, timed out,
executor failure, shutdown) -- never left pending: even if the driver thread dies, the pending
futures get its exception.

>>> import asyncio
>>> from rtlm_adapt.controller import AdaptiveController
>>> from rtlm_adapt.request import Request, TRUE_LENGTH_KEY
>>> from rtlm_adapt.serving.loop import ServingLoop
>>> from rtlm_adapt.calibration.step_cost import StepCost
>>> from rtlm_adapt.serving.sim import SimulatedExecutor
>>> async def main():
...     loop = ServingLoop(AdaptiveController("fcfs"), SimulatedExecutor("gpu", StepCost.default()))
...     async with AsyncServer(loop) as server:
...         req = Request("a", "Name a prime.", 0.0, metadata={TRUE_LENGTH_KEY: 5})
...         return await server.generate(req)
>>> asyncio.run(main()).output_tokens
5
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from typing import Any

from rtlm_adapt.request import Completion, Request
from rtlm_adapt.serving.loop import ServingLoop

logger = logging.getLogger(__name__)


class ServerStoppedError(RuntimeError):
    """The server is stopping or stopped: the request was not accepted."""


class AsyncServer:
    """Serve requests from threads and asyncio tasks through one :class:`ServingLoop`.

    Parameters
    ----------
    loop
        The serving loop to drive. Its ``on_completion`` callback is chained, not replaced.
        Build it with ``keep_completions=False`` for a long-running server.
    slice_s
        The driver advances the loop's clock by at most this many (virtual) seconds between two
        looks at the inbox, so new arrivals join promptly.
    """

    def __init__(self, loop: ServingLoop, *, slice_s: float = 1.0) -> None:
        if not isinstance(loop, ServingLoop):
            raise TypeError(f"AsyncServer needs a ServingLoop, got {type(loop).__name__}")
        if not 0 < slice_s < float("inf"):
            raise ValueError(f"slice_s must be a finite number > 0, got {slice_s!r}")
        self.loop = loop
        self.slice_s = float(slice_s)
        self._chained = loop.on_completion
        loop.on_completion = self._on_completion
        self._cv = threading.Condition()
        self._inbox: deque[tuple[str, Any]] = deque()  # ("submit", Request) / ("cancel", id)
        self._waiters: dict[str, concurrent.futures.Future[Completion]] = {}
        self._stopping = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> AsyncServer:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self._drive, name="rtlm-serving-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; serve (``drain=True``) or fail the rest; wait for the driver."""
        with self._cv:
            self._stopping = True
            self._drain = drain
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    async def __aenter__(self) -> AsyncServer:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop)

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request: Request) -> concurrent.futures.Future[Completion]:
        """Hand ``request`` to the loop (any thread); the future resolves when it ends.

        Raises TypeError for a non-Request, ValueError if a request with this id is still
        pending here, ServerStoppedError after :meth:`stop`.
        """
        if not isinstance(request, Request):
            raise TypeError(f"submit() takes a Request, got {type(request).__name__}")
        future: concurrent.futures.Future[Completion] = concurrent.futures.Future()
        with self._cv:
            if self._stopping or self.error is not None:
                raise ServerStoppedError(f"server is stopped; request {request.id!r} not accepted")
            if request.id in self._waiters:
                raise ValueError(f"duplicate request id {request.id!r}: still pending")
            self._waiters[request.id] = future
            self._inbox.append(("submit", request))
            self._cv.notify()
        return future

    async def generate(self, request: Request) -> Completion:
        """Submit ``request`` and await its Completion; cancelling the task cancels the request."""
        future = self.submit(request)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            self.cancel(request.id)
            raise

    def cancel(self, request_id: str) -> None:
        """Ask the loop to cancel a request (queued or running); it ends as ``cancelled``."""
        with self._cv:
            self._inbox.append(("cancel", request_id))
            self._cv.notify()

    @property
    def pending(self) -> int:
        """Requests submitted here that have not ended."""
        with self._cv:
            return len(self._waiters)

    # -- the driver thread -----------------------------------------------------------------------
    def _on_completion(self, completion: Completion) -> None:
        with self._cv:
            future = self._waiters.pop(completion.request_id, None)
        if future is not None and not future.done():
            future.set_result(completion)
        if self._chained is not None:
            self._chained(completion)

    def _drive(self) -> None:
        loop = self.loop
        try:
            while True:
                with self._cv:
                    while not self._inbox and not self._stopping and loop.done:
                        self._cv.wait()
                    items = list(self._inbox)
                    self._inbox.clear()
                    stopping, drain = self._stopping, self._drain
                for kind, value in items:
                    if kind == "submit":
                        loop.submit_now(value)  # a refusal ends it with a failure Completion
                    else:
                        loop.cancel(value)
                if stopping:
                    loop.shutdown(drain=drain)
                    break
                if not loop.done:
                    loop.advance(loop.now + self.slice_s)
        except BaseException as exc:  # never leave a caller waiting forever
            logger.exception("serving loop driver died")
            self.error = exc
        finally:
            with self._cv:
                self._stopping = True
                left = list(self._waiters.values())
                self._waiters.clear()
            for future in left:
                if not future.done():
                    future.set_exception(
                        self.error or ServerStoppedError("server stopped before the request ended")
                    )
