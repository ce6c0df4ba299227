"""A discrete-event simulation of routing among engine replicas (SIMULATED figures only).

Each replica has ``slots`` concurrent generations at ``tokens_per_s`` each (times its
``speed_factors`` entry, for unequal replicas) and a queue served by priority (the predicted
length: the ingress's key) or, with ``queue_order="fcfs"``, in arrival order, like the paced
engine behind Ray Serve. The
routers decide as Serve's would: ``power-of-two`` samples two replicas and takes the one with
fewer requests (running + queued; ties at random), ``least-requests`` takes the one with the
fewest of all replicas (lengths unseen), ``length-aware`` is the real
:class:`~rtlm_adapt.integrations.routing.WorkBook` (reserve at routing, release at the end).
``clairvoyant`` is no real router: it sees every replica's exact state and every request's true
length and sends each request where it will itself finish first (given the requests already
there; the engines still order their queues by the predicted key), a reference for what
perfect information could reach; ``clairvoyant-total`` sends it where it adds the least to the
summed response time of itself and the requests queued there (those it would overtake wait
longer).
No network, no Ray: this measures the routing *decision* and its effect, at replica counts this
machine cannot host.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rtlm_adapt.integrations.routing import WorkBook


@dataclass(frozen=True)
class SimResult:
    mean_rt_s: float
    p99_rt_s: float
    decision_us: float  # mean wall time of one routing decision (this Python process)


class _Replica:
    def __init__(self) -> None:
        self.running = 0
        self.queue: list[tuple[float, int]] = []
        self.ends: list[float] = []  # the running requests' finish times (a heap)


def simulate(
    router: str,
    *,
    replicas: int,
    slots: int,
    tokens_per_s: float,
    arrivals: Sequence[float],
    true_tokens: Sequence[int],
    predicted: Sequence[float],
    long_replicas: int = 0,
    offload_threshold: float = float("inf"),
    seed: int = 0,
    speed_factors: Sequence[float] = (),
    queue_order: str = "priority",
    make_book: Callable[[Callable[[], float]], Any] | None = None,
) -> SimResult:
    """Response times of one request sequence under ``router``. ``make_book(clock)`` builds
    the length-aware router's book in place of ``WorkBook(clock=clock)`` (a study's variant;
    its ``rank`` also gets the request's predicted ``tokens``)."""
    rng = random.Random(seed)
    state = [_Replica() for _ in range(replicas)]
    names = [f"r{i:03d}" for i in range(replicas)]
    index = {name: i for i, name in enumerate(names)}
    speeds = [
        tokens_per_s * (speed_factors[r] if r < len(speed_factors) else 1.0)
        for r in range(replicas)
    ]
    clock = [0.0]  # the simulated time, which the book reads
    book = (make_book or (lambda c: WorkBook(clock=c)))(lambda: clock[0])
    for name, speed in zip(names, speeds, strict=True):  # each replica reports its speed
        book.report(name, {"tokens_per_s": speed * slots}, backlog=False)
    events: list[tuple[float, int, int]] = []  # (finish time, request, replica)
    finish = np.zeros(len(arrivals))
    decision_s = 0.0

    def key(i: int) -> float:
        return predicted[i] if queue_order == "priority" else 0.0  # fcfs: arrival

    def start(r: int, i: int, now: float) -> None:
        state[r].running += 1
        heapq.heappush(events, (now + true_tokens[i] / speeds[r], i, r))
        heapq.heappush(state[r].ends, now + true_tokens[i] / speeds[r])

    def completions(r: int, queued: list[tuple[float, int]], now: float) -> list[float]:
        """When each of ``queued`` (in queue order) would end on ``r``, nothing else arriving."""
        free = list(state[r].ends) + [now] * (slots - state[r].running)
        heapq.heapify(free)
        ends = []
        for _, j in queued:
            ends.append(free[0] + true_tokens[j] / speeds[r])
            heapq.heapreplace(free, ends[-1])
        return ends

    def exact_cost(r: int, i: int, now: float) -> float:
        queue = sorted(state[r].queue)
        with_i = sorted([*queue, (key(i), i)])
        if router == "clairvoyant":
            return completions(r, with_i[: with_i.index((key(i), i)) + 1], now)[-1]
        return sum(completions(r, with_i, now)) - sum(completions(r, queue, now))

    def route(i: int, now: float) -> int:
        if router == "power-of-two":
            a, b = rng.sample(range(replicas), 2) if replicas > 1 else (0, 0)
            na = state[a].running + len(state[a].queue)
            nb = state[b].running + len(state[b].queue)
            return a if na < nb or (na == nb and rng.random() < 0.5) else b
        if router == "least-requests":  # every replica's count, not two sampled
            count = [s.running + len(s.queue) for s in state]
            return min(range(replicas), key=lambda r: (count[r], rng.random()))
        if router.startswith("clairvoyant"):
            return min(range(replicas), key=lambda r: (exact_cost(r, i, now), rng.random()))
        offload = predicted[i] >= offload_threshold
        ranked = (
            book.rank(names, offload=offload, long_replicas=long_replicas, tokens=predicted[i])
            if make_book
            else book.rank(names, offload=offload, long_replicas=long_replicas)
        )
        book.reserve(str(i), ranked[0], predicted[i], confirmed=True)
        return index[ranked[0]]

    nxt = 0
    while nxt < len(arrivals) or events:
        if nxt < len(arrivals) and (not events or arrivals[nxt] <= events[0][0]):
            i, now = nxt, arrivals[nxt]
            nxt += 1
            clock[0] = now
            t0 = time.perf_counter()
            r = route(i, now)
            decision_s += time.perf_counter() - t0
            if state[r].running < slots:
                start(r, i, now)
            else:
                heapq.heappush(state[r].queue, (key(i), i))
            continue
        now, i, r = heapq.heappop(events)
        finish[i] = now
        book.release(str(i))
        state[r].running -= 1
        heapq.heappop(state[r].ends)  # the earliest end on r is this one
        if state[r].queue:
            _, j = heapq.heappop(state[r].queue)
            start(r, j, now)
    rt = finish - np.asarray(arrivals)
    return SimResult(
        float(rt.mean()), float(np.percentile(rt, 99)), decision_s / len(arrivals) * 1e6
    )


def poisson_times(n: int, rate: float, seed: int) -> np.ndarray:
    """``n`` Poisson arrival times at ``rate`` per second."""
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))
