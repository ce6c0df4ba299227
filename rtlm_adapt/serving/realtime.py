"""RealTimeLoop: the serving loop on the wall clock, for executors that really compute.

:class:`~rtlm_adapt.serving.loop.ServingLoop` runs on virtual time: an executor reports how long
a step took and the loop jumps there. A real executor (:class:`~rtlm_adapt.serving.hf.HFExecutor`)
spends that time for real, so here

- the clock is the wall clock (seconds since the loop first advanced);
- requests are submitted when the wall clock reaches their ``arrival_time``;
- each executor steps on its own worker thread, so the primary and the secondary compute
  concurrently (torch releases the GIL inside its kernels); the loop thread only waits for
  the first step to return, the next arrival, or a hang deadline, whichever comes first;
- the controller decides exactly as in ServingLoop (the same dispatch, admission, retry, fault
  and cancellation code: this class only changes how a step is started and collected).

Torch threads. ``threads={"primary": 2, "secondary": 1}`` sets each executor's torch thread
count on its worker thread right before each of its steps. In torch 2.13 (CPU, OpenMP) the
count is process-wide and read when a parallel region starts, so while both executors step at
once their counts interleave; each gets about the count it asked for (measured: a 2-thread
and a 1-thread matmul loop side by side on 2 cores). On a 2-core machine the two executors
share the cores: the secondary buys concurrency (a short request need not wait behind a full
primary batch), not extra compute (measured: no gain in total tokens/s).

Every request handed to an executor ends exactly once, as in ServingLoop: a step that raises
or returns garbage faults its requests (retried on the other executor, then failed), a step
that runs past ``wall_timeout_s`` is abandoned (``timed_out``) and its executor is out of
service until the call returns. A cancellation while a step is in flight ends the request at
once; its abort is applied to the executor when the step returns (executors are not
thread-safe, so the loop never touches one while it steps).
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from rtlm_adapt.request import FailureReason, Request
from rtlm_adapt.serving.base import Executor, StepResult
from rtlm_adapt.serving.lane import Lane
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.loop_result import LoopResult
from rtlm_adapt.serving.step_checks import check_step

#: Placeholder ``Lane.pending`` while a lane's step runs on its worker thread.
_IN_FLIGHT = StepResult(duration_s=0.0, iterations=0, batch_size=0)


class RealTimeLoop(ServingLoop):
    """A :class:`ServingLoop` whose clock is the wall clock and whose executors step concurrently.

    Parameters
    ----------
    controller, primary, secondary, batching, on_completion, max_retries, keep_completions
        As in :class:`ServingLoop`.
    wall_timeout_s
        A step running longer than this (wall seconds) is a hang: its requests are retried or
        failed (``timed_out``); the executor is out of service until the call returns.
    threads
        Torch threads per executor name (e.g. ``{"primary": 2, "secondary": 1}``); set on the
        executor's worker thread before each step. Names not given keep torch's setting.
    clock
        Wall clock (seconds); injectable for tests.
    """

    def __init__(
        self,
        controller,
        primary: Executor,
        secondary: Executor | None = None,
        *,
        batching: str = "continuous",
        on_completion: Callable[[Any], None] | None = None,
        max_retries: int = 1,
        wall_timeout_s: float | None = None,
        keep_completions: bool = True,
        threads: Mapping[str, int] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(
            controller,
            primary,
            secondary,
            batching=batching,
            on_completion=on_completion,
            max_retries=max_retries,
            wall_timeout_s=wall_timeout_s,
            keep_completions=keep_completions,
        )
        self.threads = dict(threads or {})
        for name, n in self.threads.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"threads[{name!r}] must be an int >= 1, got {n!r}")
        self.clock = clock
        self._origin: float | None = None
        #: lanes whose step runs now: (future, wall time it was started)
        self._flight: dict[Lane, tuple[concurrent.futures.Future, float]] = {}
        #: aborts asked for while the lane's step was in flight, applied when it returns
        self._deferred: dict[Lane, list[str]] = {}

    # -- clock ---------------------------------------------------------------------------------
    def wall(self) -> float:
        """Seconds on the loop's clock now (the clock starts at the first ``advance``)."""
        if self._origin is None:
            return self.now
        return max(self.now, self.clock() - self._origin)

    def _tick(self) -> float:
        self.now = self.wall()
        return self.now

    # -- public API --------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return not self._flight and super().done

    def submit_now(self, request: Request) -> bool:
        self._tick()
        return super().submit_now(request)

    def shutdown(self, *, drain: bool = True) -> LoopResult:
        if not drain:
            # let the running steps return (one iteration each), so no executor is mid-step
            for lane, (future, _) in list(self._flight.items()):
                concurrent.futures.wait([future], timeout=self.wall_timeout_s)
                self._tick()
                if future.done():
                    self._collect(lane)
                else:
                    self._hang(lane)
        return super().shutdown(drain=drain)

    def advance(self, until: float) -> bool:
        """Serve in real time until the loop's clock reaches ``until``; True when all is done."""
        if self._origin is None:
            self._origin = self.clock() - self.now
        while True:
            now = self._tick()
            for lane, (future, started) in list(self._flight.items()):
                if future.done():
                    self._collect(lane)
                elif self.wall_timeout_s is not None and now - started > self.wall_timeout_s:
                    self._hang(lane)
            now = self._tick()
            self._cancellations.apply(now)
            self._submit_arrivals(now)
            self._dispatch(now)
            if self.done:
                return True
            if now >= until:
                return False
            next_arrival = self._next_arrival()
            wake = min(next_arrival, until)
            if self.wall_timeout_s is not None:
                for _, started in self._flight.values():
                    wake = min(wake, started + self.wall_timeout_s)
            futures = [future for future, _ in self._flight.values()]
            if futures:
                timeout = None if wake == math.inf else max(0.0, wake - now)
                concurrent.futures.wait(
                    futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
                )
                continue
            waiting = bool(len(self.controller)) or any(
                lane.retry or lane.inflight for lane in self._lanes
            )
            stuck = [lane.stuck for lane in self._lanes if lane.stuck is not None]
            if waiting and stuck:
                # only a hung executor could take the work: wait for it to come back
                timeout = None if wake == math.inf else max(0.0, wake - now)
                if self.wall_timeout_s is not None:
                    timeout = self.wall_timeout_s if timeout is None else timeout
                concurrent.futures.wait(
                    stuck, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
                )
                continue
            if waiting and next_arrival == math.inf:
                raise RuntimeError(
                    f"{len(self.controller)} requests are queued but no executor will take "
                    "them (check the knobs and executor batch sizes)"
                )
            if wake == math.inf:
                return self.done
            time.sleep(max(0.0, wake - now))

    # -- steps on worker threads ---------------------------------------------------------------
    def _start_step(self, lane: Lane, now: float, next_arrival: float) -> bool:
        try:
            if not self._fill(lane, now):
                return False
        except Exception as exc:  # an admission error is a fault of this lane's requests
            self._retries.fault(
                lane, list(lane.inflight), FailureReason.EXECUTOR_FAILURE, f"{exc!r}", now
            )
            return False
        if lane.pool is None:
            lane.pool = concurrent.futures.ThreadPoolExecutor(1, f"step-{lane.executor.name}")
        threads = self.threads.get(lane.executor.name)
        future = lane.pool.submit(self._run_step, lane.executor, threads)
        lane.pending = _IN_FLIGHT
        lane.busy_until = math.inf
        self._flight[lane] = (future, now)
        return True

    def _run_step(self, executor: Executor, threads: int | None) -> StepResult:
        """On the lane's worker thread: one real step, starting at the current wall time."""
        if threads is not None:
            import torch

            torch.set_num_threads(threads)  # process-wide: re-set before every step
        return executor.step(self.wall())

    def _collect(self, lane: Lane) -> None:
        """A lane's step returned: apply deferred aborts, then account for it as ServingLoop
        does for a step that ends."""
        future, _ = self._flight.pop(lane)
        lane.pending = None
        for rid in self._deferred.pop(lane, []):
            self._abort_quietly(lane, rid, self.now)
        now = self._tick()
        try:
            result = future.result()
        except Exception as exc:  # any executor error is a fault of this step, not of the loop
            self._retries.fault(
                lane, list(lane.inflight), FailureReason.EXECUTOR_FAILURE, f"{exc!r}", now
            )
            return
        problem = check_step(result)
        if problem is not None:
            self.result.garbage += 1
            self._retries.fault(
                lane, lane.step_ids, FailureReason.EXECUTOR_FAILURE, f"garbage step: {problem}", now
            )
            return
        lane.pending = result
        self._finish_step(lane)

    def _hang(self, lane: Lane) -> None:
        """A step ran past ``wall_timeout_s``: give up on it; the lane waits for the call."""
        future, _ = self._flight.pop(lane)
        self._deferred.pop(lane, None)  # the returning call's leftovers are aborted anyway
        lane.pending = None
        lane.stuck = future
        detail = f"step ran past {self.wall_timeout_s} s of wall time"
        self._retries.fault(
            lane, lane.step_ids, FailureReason.TIMED_OUT, detail, self._tick(), abort=False
        )

    def _lane_usable(self, lane: Lane, now: float) -> bool:
        return lane not in self._flight and super()._lane_usable(lane, now)

    def _abort_quietly(self, lane: Lane, rid: str, now: float) -> None:
        if lane in self._flight:  # never touch an executor while it steps
            self._deferred.setdefault(lane, []).append(rid)
            return
        super()._abort_quietly(lane, rid, now)
