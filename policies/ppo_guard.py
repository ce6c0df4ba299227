"""PerformanceGuard: a deployed learned policy compares itself online with the heuristic and
hands the knobs back when it does worse.

Evidence comes in **trials** (the guard's epochs): runs of ``trial_epochs`` consecutive
scheduling epochs decided by one source. The first trial is the learned policy's warm-up: the
system fills from empty, which says nothing about the policy, so it is not scored. Then one trial
of the heuristic (the reference) and one of the learned policy; the guard judges after each
trial from then on, so a bad policy is handed back after two trials' worth of evidence.
Afterwards the active source decides, and the other one gets one trial in every
``probe_every`` so that both references stay recent and a policy handed back can earn the knobs
again.

A trial's score is how much the number of requests in the system (waiting or running) rose
during it, time-weighted, above its level when the trial began. By Little's law the mean number
in the system is the arrival rate times the mean response time, and both sources face the same
arrivals, so the source under which the system fills faster (or drains slower) serves worse;
measuring from the trial's own starting level keeps a trial from being blamed for the queue it
inherited. The learned policy is judged worse when its recent mean score exceeds the
heuristic's by more than ``margin`` times the requests expected to arrive in a trial (the
smoothed arrival rate times its length): a policy that leaves that share of the arrivals
unserved. It takes the knobs back only once its mean over a full window of trials is no worse
than the heuristic's (hysteresis: the trial that cost it the knobs counts against it a while).

Every hand-over is logged (logger ``rtlm_adapt.policies.ppo_guard``, WARNING when the knobs go
back to the heuristic) and counted (``handbacks``, ``resumes``; ``metrics()`` for exporters).

>>> from rtlm_adapt.observation import Observation
>>> def obs(now, in_system):
...     return Observation(now=now, queue_length=in_system, primary_running=0,
...         primary_max_batch=16, secondary_running=0, secondary_max_batch=0, pred_len_mean=0.0,
...         pred_len_p90=0.0, uncertainty_mean=0.0, oldest_wait_s=0.0, min_slack_s=1.0,
...         arrival_rate=1.0, service_time_s=10.0, load=0.9, recent_response_s=0.0,
...         recent_miss_rate=0.0, step_time_s=0.1)
>>> guard = PerformanceGuard(trial_epochs=2)
>>> queue, sources = 10, []
>>> for step in range(6):  # the learned policy adds 5 requests an epoch, the heuristic none
...     source = guard.choose(obs(5.0 * step, queue))
...     sources.append(source)
...     queue += 5 if source == "learned" else 0
>>> sources, guard.choose(obs(30.0, queue)), guard.handbacks
(['learned', 'learned', 'heuristic', 'heuristic', 'learned', 'learned'], 'heuristic', 1)
"""

from __future__ import annotations

import logging
from collections import deque

from rtlm_adapt.observation import Observation

logger = logging.getLogger(__name__)

SOURCES = ("learned", "heuristic")


def in_system(obs: Observation) -> int:
    """Requests waiting or running at ``obs``."""
    return obs.queue_length + obs.primary_running + obs.secondary_running


class _Trial:
    """The running tally of one trial: rise above the starting level, integrated over time."""

    def __init__(self, source: str, start: Observation) -> None:
        self.source = source
        self.start_level = in_system(start)
        self._last = start
        self.epochs = 0
        self._rise = 0.0  # integral of (n(t) - start_level) dt
        self._arrivals = 0.0  # integral of the smoothed arrival rate
        self._duration = 0.0

    def add(self, obs: Observation) -> None:
        """One scheduling epoch ended at ``obs`` (trapezoid over its two ends)."""
        dt = obs.now - self._last.now
        if dt > 0:
            mid = (in_system(self._last) + in_system(obs)) / 2.0
            self._rise += (mid - self.start_level) * dt
            self._arrivals += obs.arrival_rate * dt
            self._duration += dt
        self._last = obs
        self.epochs += 1

    @property
    def score(self) -> float:
        return self._rise / self._duration if self._duration > 0 else 0.0

    @property
    def arrivals(self) -> float:
        """Requests expected to arrive during the trial."""
        return self._arrivals


class PerformanceGuard:
    """Chooses who sets the knobs, the learned policy or the heuristic, from trials of each.

    Parameters
    ----------
    trial_epochs
        Scheduling epochs per trial (24: two minutes with 5-second epochs, a few service times,
        so a trial is not judged on the batch it inherited).
    probe_every
        After the first three trials (warm-up, heuristic, learned), one trial in every
        ``probe_every`` goes to the inactive source.
    window
        Recent trials per source that a judgement averages.
    margin
        Tolerance, as a fraction of the requests arriving in a trial, before the learned
        policy counts as worse.
    """

    def __init__(
        self, *, trial_epochs: int = 24, probe_every: int = 6, window: int = 3, margin: float = 0.15
    ) -> None:
        if trial_epochs < 1 or window < 1 or probe_every < 2 or margin < 0:
            raise ValueError(
                "need trial_epochs >= 1, window >= 1, probe_every >= 2 and margin >= 0"
            )
        self.trial_epochs = int(trial_epochs)
        self.probe_every = int(probe_every)
        self.margin = float(margin)
        self.scores: dict[str, deque[float]] = {s: deque(maxlen=window) for s in SOURCES}
        self.arrivals: dict[str, deque[float]] = {s: deque(maxlen=window) for s in SOURCES}
        self.active = "learned"
        self.trials = 0
        self.handbacks = 0
        self.resumes = 0
        self._trial: _Trial | None = None

    def choose(self, obs: Observation) -> str:
        """Who decides the epoch starting at ``obs``; ``obs`` also ends the previous epoch."""
        trial = self._trial
        if trial is not None:
            trial.add(obs)
            if trial.epochs >= self.trial_epochs:
                self._finish(trial)
                trial = None
        if trial is None:
            trial = self._trial = _Trial(self._next_source(), obs)
        return trial.source

    def metrics(self) -> dict[str, float]:
        """Figures for an exporter: hand-backs, resumes, trials, and who is active (1: learned)."""
        return {"handbacks": float(self.handbacks), "resumes": float(self.resumes),
                "trials": float(self.trials), "learned_active": float(self.active == "learned")}

    def _next_source(self) -> str:
        if self.trials < 3:  # warm-up, the reference, the learned policy
            return ("learned", "heuristic", "learned")[self.trials]
        other = "heuristic" if self.active == "learned" else "learned"
        probing = (self.trials - 3) % self.probe_every == self.probe_every - 1
        return other if probing else self.active

    def _finish(self, trial: _Trial) -> None:
        self.trials += 1
        if self.trials == 1:
            return  # the warm-up
        self.scores[trial.source].append(trial.score)
        self.arrivals[trial.source].append(trial.arrivals)
        learned, heuristic = self.scores["learned"], self.scores["heuristic"]
        if not learned or not heuristic:
            return
        mean_l, mean_h = sum(learned) / len(learned), sum(heuristic) / len(heuristic)
        arrivals = [*self.arrivals["learned"], *self.arrivals["heuristic"]]
        tolerance = self.margin * max(1.0, sum(arrivals) / len(arrivals))
        if self.active == "learned" and mean_l - mean_h > tolerance:
            worse = True
        elif self.active == "heuristic" and len(learned) == learned.maxlen and mean_l <= mean_h:
            worse = False
        else:
            return
        self.active = "heuristic" if worse else "learned"
        detail = (f"requests in system rose {mean_l:+.2f} per trial under the learned policy, "
                  f"{mean_h:+.2f} under the heuristic (tolerance {tolerance:.2f}; "
                  f"{len(learned)} and {len(heuristic)} trials of {self.trial_epochs} epochs)")
        if worse:
            self.handbacks += 1
            logger.warning("PPO guard: the learned policy does worse than the heuristic: "
                           "handing the knobs back to the heuristic; %s", detail)
        else:
            self.resumes += 1
            logger.info("PPO guard: the learned policy does as well as the heuristic again: "
                        "it takes the knobs back; %s", detail)
