"""ShadowGuard: a deployed learned policy is compared with the heuristic on the same requests,
in simulation, and hands the knobs back when it does worse.

The interleaved guard (:class:`~rtlm_adapt.policies.ppo_guard.PerformanceGuard`) lets each
policy serve stretches of live traffic and compares the stretches. On bursty traffic two
stretches differ more than two policies do, so it hands good policies back by mistake
(BENCHMARKS.md 4.5: 34 of 96 windows), and every stretch the heuristic serves to keep its
figure recent is a stretch the better policy does not. This guard compares the two on the
*same* requests instead, and never lets the heuristic serve to find out:

1. The controller records what it serves in a :class:`~rtlm_adapt.traffic.TrafficLog`: the
   last ``window`` requests, with their predictions and true lengths, and the backlog and
   smoothed signals the live system had when the oldest of them arrived.
2. Every ``judge_every`` accepted requests the guard replays that window twice
   (:func:`rtlm_adapt.shadow.replay`), once under the learned policy and once under the
   heuristic, on simulated executors that cost what the controller's latency models learned.
   Each replay starts from the live state the window opened in: a policy that fails only once
   a backlog builds (its slow answers feed its observation, which leads it to worse knobs)
   looks fine from an empty start, and was missed so (BENCHMARKS.md 4.6). And each serves the
   window's arrivals a second time after it, so that the work a policy leaves behind meets new
   requests as it would live instead of draining on an idle system, where a policy that puts
   long requests off looks better than it is (``repeat_arrivals``, BENCHMARKS.md 4.7). The
   replays' mean response time is over both copies.
3. The learned policy is judged worse when its replays' mean response time exceeds the
   heuristic's by more than ``margin`` (a fraction, averaged over the last ``recent``
   judgements: one stretch of 200 requests can favour either policy), or when it misses more
   deadlines than the heuristic by more than ``miss_margin`` of the requests plus what chance
   explains (:func:`extra_misses`: a window of 50 requests differs by a miss or two between
   two policies that are equally good).
4. A policy handed back owes what its replays lost: the seconds by which they were slower
   than the heuristic's over the judgements that handed it back (``debt_s``). The judgements
   that follow add to that or pay it off. It takes the knobs again once the debt is paid and
   its last ``resume_after`` judgements were no worse on both figures. A calm stretch alone
   does not bring back a policy that failed in a burst: it fails again at the next one.

Both replays share the arrivals, the lengths and the simulator's errors, so what differs is
the policy. A judgement (two replays of 200 requests, each with their arrivals served twice)
costs about 120 ms of CPU on the 2-core machine, 2.4 ms per arriving request with the defaults
(``benchmarks/shadow_guard_cost.py``).

Every hand-over is logged (logger ``rtlm_adapt.policies.shadow_guard``, WARNING when the knobs
go back to the heuristic) and counted (``handbacks``, ``resumes``; ``metrics()`` for
exporters, with the latest replays' ratio).

The guard works only inside a controller: :class:`~rtlm_adapt.policies.ppo.PPOPolicy` attaches
it when a controller takes the policy.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from rtlm_adapt.knobs import Policy
from rtlm_adapt.observation import Observation
from rtlm_adapt.traffic import TrafficLog

if TYPE_CHECKING:
    from rtlm_adapt.controller import AdaptiveController
    from rtlm_adapt.shadow import ShadowRun

logger = logging.getLogger(__name__)


#: Standard deviations of chance a difference in deadline misses must exceed (see
#: :func:`extra_misses`).
MISS_Z = 2.0


def miss_rate(run: ShadowRun) -> float:
    """The share of a replay's requests that missed their deadline."""
    done = run.completions
    return sum(c.missed_deadline for c in done) / len(done) if done else 0.0


def extra_misses(learned: ShadowRun, heuristic: ShadowRun) -> tuple[int, float]:
    """Deadline misses the learned policy adds over the heuristic on the same requests, and
    the spread that chance alone gives that figure.

    A paired comparison (McNemar's): only the requests that one replay misses and the other
    does not tell the policies apart. If neither policy were worse, each such request would
    fall on either side like a coin, so their difference has a standard deviation of the
    square root of their number.
    """
    missed_by_heuristic = {c.request_id for c in heuristic.completions if c.missed_deadline}
    missed_by_learned = {c.request_id for c in learned.completions if c.missed_deadline}
    only_learned = len(missed_by_learned - missed_by_heuristic)
    only_heuristic = len(missed_by_heuristic - missed_by_learned)
    return only_learned - only_heuristic, math.sqrt(only_learned + only_heuristic)


class ShadowGuard:
    """Chooses who sets the knobs, the learned policy or the heuristic, from shadow replays of
    the live traffic under each (see the module docstring).

    Parameters
    ----------
    window
        Recent requests a judgement replays.
    judge_every
        Accepted requests between judgements (the first comes after this many too). Counting
        arrivals, not completions, keeps a policy that finishes little from delaying its own
        judgement.
    margin
        How much longer the learned policy's mean response time may be, as a fraction of the
        heuristic's, before it counts as worse. On the held-out grid a 2% margin handed a
        better policy back in 16 of 94 windows, 5% (with ``recent=4``) in 6, while still
        catching most windows where it was worse (BENCHMARKS.md 4.6).
    recent
        Judgements whose extra response time is averaged (the latest, and those before it).
    miss_margin
        How much higher its deadline-miss rate may be (a share of requests).
    resume_after
        Judgements in a row, no worse on both figures, before a policy that was handed back
        takes the knobs again (once it has also paid its debt, step 4 above).
    background
        Replay on a worker thread instead of inside ``choose``, and act on the verdict at the
        first ``choose`` after it is in. A serving loop on the wall clock (the gateway turns it
        on) then never pauses for a judgement; in virtual time keep it off, so that runs repeat
        exactly.
    """

    def __init__(
        self, *, window: int = 200, judge_every: int = 50, margin: float = 0.05,
        miss_margin: float = 0.01, resume_after: int = 2, recent: int = 4,
        background: bool = False,
    ) -> None:
        counts = {"window": window, "judge_every": judge_every, "resume_after": resume_after,
                  "recent": recent}
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ShadowGuard {name} must be an int >= 1, got {value!r}")
        for name, value in {"margin": margin, "miss_margin": miss_margin}.items():
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"ShadowGuard {name} must be a number >= 0, got {value!r}")
        self.judge_every = judge_every
        self.margin = float(margin)
        self.miss_margin = float(miss_margin)
        self.resume_after = resume_after
        self.background = bool(background)
        self.traffic = TrafficLog(capacity=window)
        self.active = "learned"
        self.judgements = 0
        self.handbacks = 0
        self.resumes = 0
        #: The latest judgement's mean response times (learned, heuristic), in seconds.
        self.last_means: tuple[float, float] | None = None
        self._no_worse_in_a_row = 0
        #: While handed back: seconds of mean response time the learned policy's replays have
        #: lost to the heuristic's since (and including) the judgements that handed it back.
        self.debt_s = 0.0
        self._extra_times: deque[float] = deque(maxlen=recent)
        self._lost_s: deque[float] = deque(maxlen=recent)  # learned minus heuristic, seconds
        self._next_judgement = judge_every
        self._controller: Callable[[], AdaptiveController | None] | None = None
        self._policies: dict[str, Callable[[], Policy]] = {}
        self._warned_unattached = False
        self._pending: Future[tuple[ShadowRun, ShadowRun]] | None = None  # a background verdict

    def attach(
        self, controller: AdaptiveController, *, learned: Callable[[], Policy],
        heuristic: Callable[[], Policy],
    ) -> None:
        """Watch ``controller``'s traffic from now on; ``learned`` and ``heuristic`` make a
        fresh copy of each policy for a replay."""
        self._controller = weakref.ref(controller)  # the controller owns the policy, not we it
        self._policies = {"learned": learned, "heuristic": heuristic}
        self.traffic.clear()
        self._next_judgement = self.judge_every
        controller.watch_traffic(self.traffic)

    def choose(self, obs: Observation) -> str:
        """Who decides the epoch starting at ``obs``: ``"learned"`` or ``"heuristic"``."""
        if self._controller is None and not self._warned_unattached:
            self._warned_unattached = True
            logger.warning("PPO shadow guard: not attached to a controller, so it sees no "
                           "traffic and cannot judge; the learned policy keeps the knobs")
        if self._pending is not None and self._pending.done():
            self._conclude_from(self._pending.result)
            self._pending = None
        if self.traffic.accepted >= self._next_judgement and self._pending is None:
            self._next_judgement = self.traffic.accepted + self.judge_every
            job = self._replays()
            if job is not None and self.background:
                self._pending = _worker().submit(job)
            elif job is not None:
                self._conclude_from(job)
        return self.active

    def settle(self) -> None:
        """Wait for a judgement running in the background and act on it (tests, shutdown)."""
        if self._pending is not None:
            self._conclude_from(self._pending.result)
            self._pending = None

    def metrics(self) -> dict[str, float]:
        """Figures for an exporter: hand-backs, resumes, judgements (``trials``), who is active
        (1: learned), the latest replays' mean response time ratio, learned over heuristic, and
        the debt a handed-back policy must pay before it resumes (seconds; 0 while active)."""
        ratio = math.nan if self.last_means is None else self.last_means[0] / self.last_means[1]
        learned_active = self.active == "learned"
        return {"handbacks": float(self.handbacks), "resumes": float(self.resumes),
                "trials": float(self.judgements), "learned_active": float(learned_active),
                "shadow_ratio": ratio, "debt_s": 0.0 if learned_active else self.debt_s}

    def _replays(self) -> Callable[[], tuple[ShadowRun, ShadowRun]] | None:
        """The two replays of a judgement, ready to run anywhere: what they read from the
        controller and the log is copied now, the fresh policies are made when they run (None
        before there is anything to replay)."""
        from rtlm_adapt.shadow import ShadowSetup, replay  # the simulator: only when judging

        controller = self._controller() if self._controller is not None else None
        setup = ShadowSetup.of(controller) if controller is not None else None
        if controller is None or setup is None or not self.traffic.records():
            return None
        window = self.traffic.window()  # copies
        make, scorer = dict(self._policies), controller.scorer

        def run() -> tuple[ShadowRun, ShadowRun]:
            def under(side: str) -> ShadowRun:
                return replay(window, make[side](), setup, repeat_arrivals=True, scorer=scorer)

            return under("learned"), under("heuristic")

        return run

    def _conclude_from(self, replays: Callable[[], tuple[ShadowRun, ShadowRun]]) -> None:
        """Judge from ``replays``' result; a judgement that fails is logged and skipped (the
        guard must never stop the serving it watches) and the knobs stay where they are."""
        try:
            learned, heuristic = replays()
        except Exception:
            logger.exception("PPO shadow guard: a judgement failed; the %s policy keeps the "
                             "knobs", self.active)
            return
        self._conclude(learned, heuristic)

    def _conclude(self, learned: ShadowRun, heuristic: ShadowRun) -> None:
        """Judge from the two replays, and hand the knobs over if the verdict says so."""
        n = len(learned.completions)
        learned_s, heuristic_s = learned.mean_response_s, heuristic.mean_response_s
        self.judgements += 1
        self.last_means = (learned_s, heuristic_s)
        self._extra_times.append(learned_s / heuristic_s - 1.0)
        self._lost_s.append(learned_s - heuristic_s)
        extra_time = sum(self._extra_times) / len(self._extra_times)
        misses, chance = extra_misses(learned, heuristic)
        worse_misses = misses > self.miss_margin * n + MISS_Z * chance
        worse = extra_time > self.margin or worse_misses
        no_worse = extra_time <= 0.0 and not worse_misses
        self._no_worse_in_a_row = self._no_worse_in_a_row + 1 if no_worse else 0
        detail = (f"shadow replays of {learned.window_requests} requests "
                  f"({learned.backlog_requests} of them the backlog the window opened with), "
                  f"their arrivals served twice: mean response time "
                  f"{learned_s:.2f} s under the learned policy, "
                  f"{heuristic_s:.2f} s under the heuristic ({extra_time:+.1%}, "
                  f"margin {self.margin:.0%}); deadline misses {miss_rate(learned):.1%} and "
                  f"{miss_rate(heuristic):.1%}: {misses:+d} requests (margin "
                  f"{self.miss_margin:.0%} + {MISS_Z:g} x {chance:.1f} of chance)")
        if self.active == "learned" and worse:
            self.active = "heuristic"
            self.handbacks += 1
            # what handed it back is what it owes: the seconds its replays lost to the
            # heuristic's over the judgements just averaged
            self.debt_s = sum(self._lost_s)
            logger.warning("PPO shadow guard: the learned policy does worse than the heuristic: "
                           "handing the knobs back to the heuristic; %s", detail)
        elif self.active == "heuristic":
            self.debt_s += self._lost_s[-1]
            if self._no_worse_in_a_row >= self.resume_after and self.debt_s <= 0.0:
                self.active = "learned"
                self.resumes += 1
                self.debt_s = 0.0
                logger.info("PPO shadow guard: the learned policy does as well as the heuristic "
                            "again, and its replays have made up what they lost: it takes the "
                            "knobs back; %s", detail)

    def __getstate__(self) -> dict[str, Any]:
        # A saved controller pickles its policy: the links to the controller are remade when a
        # restored controller attaches the policy again, and the log starts over there.
        state = dict(self.__dict__)
        state.update(_controller=None, _policies={}, _pending=None,
                     traffic=TrafficLog(self.traffic.capacity))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A guard saved before the debt and the log's backlog existed (session 17) loads with
        # no debt and an empty log of the new kind.
        state.setdefault("debt_s", 0.0)
        state.setdefault("_lost_s", deque(maxlen=state["_extra_times"].maxlen))
        state["traffic"] = TrafficLog(state["traffic"].capacity)
        self.__dict__.update(state)


@functools.cache
def _worker() -> ThreadPoolExecutor:
    """The one thread that runs background judgements (started on first use)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow-guard")
