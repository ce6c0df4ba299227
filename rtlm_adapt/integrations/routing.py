"""Length-aware replica choice, as plain Python: what :class:`LengthAwareRouter` decides with.

Each caller (a process holding a deployment handle) keeps a :class:`WorkBook`: the predicted
output tokens it has sent to each replica and not yet seen end, plus what each replica last
reported of itself (its backlog from all callers and its speed). A replica's load is its
predicted seconds of outstanding work; the router ranks replicas by it, least first, and sends
offload-eligible requests (predicted length at or above the policy's threshold) to a designated
"long" group, the last ``long_replicas`` replicas in id order, so that long answers do not take
the slots short ones need on the other replicas.

>>> book = WorkBook()
>>> book.reserve("r1", "a", 900.0, confirmed=True)
>>> book.rank(["a", "b"], offload=False)
['b', 'a']
>>> book.release("r1")
True
>>> book.rank(["a", "b", "c"], offload=True, long_replicas=1)[0]
'c'
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

#: The handle-call keyword arguments the router reads (the engine method accepts them too).
PREDICTED_TOKENS_KW = "rtlm_predicted_tokens"
PRIORITY_KW = "rtlm_priority"
OFFLOAD_KW = "rtlm_offload"


@dataclass(slots=True)
class ReplicaLoad:
    """One replica as one caller sees it."""

    #: Predicted tokens this caller sent there that have not ended.
    reserved_tokens: float = 0.0
    #: Predicted tokens the replica last said it holds (from every caller).
    reported_tokens: float = 0.0
    #: The replica's measured decode capacity, tokens per second over all its slots.
    tokens_per_s: float = 1.0

    @property
    def work_s(self) -> float:
        """Predicted seconds of outstanding work. The larger of the two views: this caller's
        own is exact but blind to other callers; the replica's covers them but is stale."""
        return max(self.reserved_tokens, self.reported_tokens) / self.tokens_per_s


@dataclass(slots=True)
class _Hold:
    replica: str
    tokens: float
    confirmed: bool
    since: float


class WorkBook:
    """Outstanding predicted work per replica, reserved at choice and released at the end.

    Parameters
    ----------
    tentative_ttl_s
        A reservation made when replicas are ranked holds until the request is routed; one
        never confirmed (the request was cancelled before it was sent) lapses after this long.
    clock
        Seconds (monotonic).
    """

    def __init__(
        self, tentative_ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tentative_ttl_s = tentative_ttl_s
        self.clock = clock
        self.loads: dict[str, ReplicaLoad] = {}
        self._holds: dict[str, _Hold] = {}
        self._tentative: OrderedDict[str, float] = OrderedDict()  # request id -> since
        self._random = random.Random(0)

    def load(self, replica: str) -> ReplicaLoad:
        """The replica's record (made on first use)."""
        found = self.loads.get(replica)
        if found is None:
            found = self.loads[replica] = ReplicaLoad()
        return found

    def reserve(self, request_id: str, replica: str, tokens: float, *, confirmed: bool) -> None:
        """Count ``tokens`` against ``replica`` for ``request_id`` (moving any earlier hold)."""
        self.release(request_id)
        now = self.clock()
        self._holds[request_id] = _Hold(replica, tokens, confirmed, now)
        if not confirmed:
            self._tentative[request_id] = now
        self.load(replica).reserved_tokens += tokens

    def release(self, request_id: str) -> bool:
        """The request ended (or moved): free its hold. False if it held nothing."""
        hold = self._holds.pop(request_id, None)
        if hold is None:
            return False
        self._tentative.pop(request_id, None)
        load = self.loads.get(hold.replica)
        if load is not None:
            load.reserved_tokens = max(0.0, load.reserved_tokens - hold.tokens)
        return True

    def report(self, replica: str, stats: Mapping[str, float], *, backlog: bool = True) -> None:
        """What the replica published (``record_routing_stats``): its speed and, if
        ``backlog``, its backlog from every caller (worth its staleness only when other
        callers send there too)."""
        load = self.load(replica)
        if backlog and "outstanding_tokens" in stats:
            load.reported_tokens = max(0.0, float(stats["outstanding_tokens"]))
        speed = float(stats.get("tokens_per_s", 0.0) or 0.0)
        if speed > 0:
            load.tokens_per_s = speed

    def forget(self, keep: Sequence[str]) -> None:
        """Drop replicas not in ``keep`` (they left), with their holds."""
        alive = set(keep)
        for rid in [r for r, h in self._holds.items() if h.replica not in alive]:
            self.release(rid)
        for replica in [r for r in self.loads if r not in alive]:
            del self.loads[replica]

    def rank(self, replicas: Sequence[str], *, offload: bool, long_replicas: int = 0) -> list[str]:
        """``replicas`` best first, by least predicted work. An offload-eligible request ranks
        the long group first; any other request ranks every replica alike, so it uses the
        long group's spare capacity but shuns the long answers' backlog there."""
        self._expire()
        if not offload or not 0 < long_replicas < len(replicas):
            return self._by_work(list(replicas))
        ordered = sorted(replicas)
        split = len(ordered) - long_replicas
        return self._by_work(ordered[split:]) + self._by_work(ordered[:split])

    def holds(self) -> int:
        """Requests with a reservation (for tests and stats)."""
        return len(self._holds)

    def _by_work(self, replicas: list[str]) -> list[str]:
        # A random tie-break: idle replicas share the first requests of a burst.
        return sorted(replicas, key=lambda r: (self.load(r).work_s, self._random.random()))

    def _expire(self) -> None:
        deadline = self.clock() - self.tentative_ttl_s
        while self._tentative:
            request_id, since = next(iter(self._tentative.items()))
            if since > deadline:
                break
            self.release(request_id)


__all__ = ["OFFLOAD_KW", "PREDICTED_TOKENS_KW", "PRIORITY_KW", "ReplicaLoad", "WorkBook"]
