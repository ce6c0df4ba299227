"""ServingEnv: the library's own serving loop as a gymnasium environment.

Each episode replays a window of a real arrival trace (Azure LLM inference, conversation by
default) rescaled to a load drawn from a range, with real prompts and the lengths of their real
responses, through the very :class:`~rtlm_adapt.serving.loop.ServingLoop`,
:class:`~rtlm_adapt.controller.AdaptiveController` (uncertainty scorer, online length predictor,
latency models) and simulated executors that ``rtlm-adapt simulate`` runs. The agent replaces
the controller's policy: it sets the Knobs once per scheduling epoch.

Spaces
------
- **Action**: ``Box(-1, 1, (6,), float32)``, mapped to Knobs by the action map of the model
  format (``model_format``, default 4,
  :class:`rtlm_adapt.policies.action_space.LogKnobsActionMap`: length, uncertainty,
  aging and slack weights; the batch cap on a log scale up to the primary's maximum and the
  offload threshold on a log scale of predicted tokens; format 5 scales that threshold to the
  prompt mix's typical predicted length, format 2 sets the last two relative to the knee and
  the waiting requests' median predicted length).
- **Observation**: ``Box(-1, 2, (15,), float32)``, :meth:`Observation.scale_free_speed_vector`
  (observation formats 2-5: queue per batch slot, executor utilisations, whether a secondary
  exists and its share of the slots, the knee over the batch cap, predicted-length quantiles
  over their mean, mean uncertainty, oldest wait and smallest slack over the service time,
  offered load, recent response time over the service time and miss rate; formats 4 and 5
  add how many times slower the secondary serves a request than the primary). Only
  ratios, so one policy reads any executor and prompt mix.
- **Reward** per epoch ``[t0, t1)``::

      r = -( integral over [t0, t1) of (requests waiting or running) dt ) / S
          - miss_penalty * (deadline misses completed in the epoch)

  where ``S`` is the episode's mean isolated service time. The integral summed over an episode is
  the total response time of its requests, so the undiscounted return is
  ``-(n / S) * mean response time - miss_penalty * misses``: the real-time goals, per step.
  With ``reference="heuristic"`` each epoch's reward is that minus the same figure for the
  heuristic serving the same requests (:class:`~rtlm_adapt.envs.reference.ReferenceRun`, run
  once per episode): the return becomes the agent's gain over the heuristic, and the part of
  it that the episode's input alone decides no longer reaches PPO's advantages.
  With ``tail_weight > 0`` (which needs a reference) the reward also weighs the tail of the
  response times: each epoch loses::

      tail_weight * (agent's excess - reference's excess) / ((1 - q) * S)

  where ``q`` is ``tail_quantile``, ``tau`` the reference run's ``q`` quantile of its response
  times on that episode, and an excess the sum of ``max(0, response time - tau)`` over the
  requests completed in the epoch (by the agent, or by the reference in the same interval).
  That is the excess part of the Rockafellar-Uryasev bound of the tail's mean,
  ``CVaR_q(RT) <= tau + E[(RT - tau)+] / (1 - q)``, tight when ``tau`` is the ``q`` quantile:
  over an episode the term is ``-(n / S) * tail_weight`` times the agent's bound minus the
  reference's, so ``tail_weight=1`` weighs a second of the tail's mean like a second of the
  mean response time.
- **Episode end**: ``terminated`` once every request of the window has finished;
  ``truncated`` after ``max_episode_steps`` epochs (a safety net). The last step's info carries
  ``mean_response_s``, ``miss_rate`` and ``tail_response_s`` (the mean of the agent's response
  times at or above their ``tail_quantile`` quantile).

>>> env = ServingEnv(n_requests=20, load=0.9)
>>> obs, info = env.reset(seed=0)
>>> obs.shape, env.action_space.shape
((15,), (6,))
>>> obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
>>> bool(reward <= 0.0)
True
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.experiment import Workload, engine_priorities
from rtlm_adapt.knobs import Knobs
from rtlm_adapt.observation import Observation
from rtlm_adapt.policies.action_space import (
    ACTION_MAPS,
    OBS_HIGH,
    OBS_LOW,
    OBSERVATION_FORMAT,
    OBSERVATION_FORMATS,
    KnobsActionMap,
    observation_array,
)
from rtlm_adapt.request import Completion
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.simulated import simulated_executor

from .episodes import EpisodeSampler, shared_scorer
from .reference import REFERENCES, ReferenceRun
from .scenarios import Scenario, ScenarioSpace, scenario_cost

EXECUTORS = ("sim", "hf")
PREDICTOR_TIERS = ("lexical",)


class ServingEnv(gym.Env):
    """The serving loop, one scheduling epoch per step (see the module docstring).

    Parameters
    ----------
    prompts
        Prompt set with real responses: ``"alpaca:MODEL"`` (default
        ``alpaca:gpt4_1106_preview``), ``"sharegpt"``, or an AlpacaEval-format file.
    arrivals
        ``"azure-conv"`` (default) or ``"azure-code"``: windows of the real trace; or
        ``"poisson"`` / ``"gamma:CV"``.
    load
        Offered load vs the primary's capacity: a number, or a ``(low, high)`` range drawn per
        episode (default ``(0.6, 1.1)``).
    n_requests
        Requests per episode (default 100: a few hundred epochs).
    trace_slice
        Fraction of the trace that windows are drawn from (default ``(0, 0.8)``; evaluate on
        ``(0.8, 1)`` for unseen windows).
    epoch_s
        Virtual seconds per step (default 5, about a seventh of a typical isolated service time
        with the packaged profile).
    batching
        ``"continuous"`` (default) or ``"static"``.
    executor
        ``"sim"``: simulated executors with the cost profiles below (virtual time, thousands of
        steps per second). ``"hf"``: the real model (``model``) on the wall-clock
        :class:`~rtlm_adapt.serving.realtime.RealTimeLoop`, a secondary executor sharing its
        weights; an epoch then lasts ``epoch_s`` real seconds and generation is capped at
        ``hf_max_tokens`` (for evaluating or fine-tuning a policy on the real loop, not for
        training from scratch).
    model
        With ``executor="hf"``: ``smollm2`` (packaged), ``tiny`` (a tiny random model, for tests)
        or a local path / hub id.
    profile, secondary_profile
        Cost profiles (names or paths for :meth:`StepCost.load`); ``secondary_profile=None``
        disables offloading. A profile with an ``engine`` block (``vllm-cpu-smollm2-135m``,
        ``vllm-h100-llama3-8b``, ...) runs on the engine model of vLLM's scheduler, so PPO
        learns the knobs for that engine.
    predictor_tier
        The length predictor: ``"lexical"`` (online linear model on the uncertainty features).
    slo
        Deadline mix.
    miss_penalty
        Reward lost per deadline miss, in units of one request's mean isolated service time.
    scenarios
        A :class:`~rtlm_adapt.envs.scenarios.ScenarioSpace` (or a dict of its fields): each
        episode then draws its prompt set, arrivals, load, the primary's batch cap and whether a
        secondary exists from it, overriding ``prompts``, ``arrivals`` and ``load`` (the
        secondary is ``secondary_profile`` when drawn).
    max_episode_steps
        Truncation bound.
    reference
        ``"heuristic"``: rewards relative to the heuristic on the same episode (see the
        module docstring); None (default): absolute rewards. Simulated executors only.
    tail_weight
        Weight of the tail term in the reward (see the module docstring), >= 0; default 0 (no
        tail term). Above 0 it needs a ``reference``, whose run sets the tail threshold.
    tail_quantile
        The quantile ``q`` in (0, 1) where the tail starts (default 0.95): the tail term's
        threshold and the ``tail_response_s`` of the episode's last info.
    model_format
        The observation and action map a policy trained here reads and uses
        (:data:`~rtlm_adapt.policies.action_space.ACTION_MAPS`; default
        :data:`~rtlm_adapt.policies.action_space.OBSERVATION_FORMAT`).
    render_mode
        Only None: there is nothing to render (the info dict carries the figures).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        *,
        prompts: str = "alpaca:gpt4_1106_preview",
        arrivals: str = "azure-conv",
        load: float | tuple[float, float] = (0.6, 1.1),
        n_requests: int = 100,
        trace_slice: tuple[float, float] = (0.0, 0.8),
        epoch_s: float = 5.0,
        batching: str = "continuous",
        executor: str = "sim",
        profile: str = "smollm2-135m-cpu2",
        secondary_profile: str | None = "smollm2-135m-cpu2-secondary",
        predictor_tier: str = "lexical",
        slo: str = "0.7:2,0.3:10",
        miss_penalty: float = 0.5,
        scenarios: ScenarioSpace | dict[str, Any] | None = None,
        max_episode_steps: int = 20_000,
        render_mode: str | None = None,
        model: str = "smollm2",
        hf_max_tokens: int = 256,
        model_format: int = OBSERVATION_FORMAT,
        reference: str | None = None,
        tail_weight: float = 0.0,
        tail_quantile: float = 0.95,
    ) -> None:
        super().__init__()
        if render_mode is not None:
            raise ValueError(f"ServingEnv renders nothing; got render_mode={render_mode!r}")
        self.render_mode = render_mode
        if executor not in EXECUTORS:
            raise ValueError(f"unknown executor {executor!r}; expected one of {EXECUTORS}")
        self.executor = executor
        self.model = model
        self.hf_max_tokens = int(hf_max_tokens)
        self._hf: tuple[Any, Any] | None = None  # (primary, secondary) real executors, loaded once
        if predictor_tier not in PREDICTOR_TIERS:
            raise ValueError(
                f"unknown predictor_tier {predictor_tier!r}; expected one of {PREDICTOR_TIERS}"
            )
        if batching not in ("continuous", "static"):
            raise ValueError(f"unknown batching {batching!r}; expected 'continuous' or 'static'")
        if not (epoch_s > 0 and math.isfinite(epoch_s)):
            raise ValueError(f"epoch_s must be a positive number, got {epoch_s!r}")
        self.profile = profile
        self.primary_cost = StepCost.load(profile)
        self.secondary_cost = StepCost.load(secondary_profile) if secondary_profile else None
        if scenarios is None:
            low, high = (load, load) if isinstance(load, (int, float)) else load
            cap = self.primary_cost.max_batch_size
            scenarios = ScenarioSpace(
                prompts=(prompts,), arrivals=(arrivals,), loads=((low, high),),
                batch_caps=(cap, cap), secondary_prob=1.0 if self.secondary_cost else 0.0,
            )
        self.scenarios = ScenarioSpace.from_options(scenarios)
        if executor == "hf" and len(set(self.scenarios.batch_caps)) > 1:
            raise ValueError("executor='hf' runs the real model: its batch cap cannot vary")
        self._sampler_options = {"n_requests": n_requests, "trace_slice": tuple(trace_slice),
                                 "slo": slo, "cost": self.primary_cost}
        self._samplers: dict[tuple[str, str], EpisodeSampler] = {}
        self.sampler = self._sampler_for(self.scenarios.prompts[0], self.scenarios.arrivals[0])
        self.scenario: Scenario | None = None
        self.episode_cost = self.primary_cost
        self.epoch_s = float(epoch_s)
        self.batching = batching
        self.miss_penalty = float(miss_penalty)
        self.max_episode_steps = int(max_episode_steps)
        if model_format not in ACTION_MAPS:
            raise ValueError(
                f"unknown model_format {model_format!r}; expected one of {sorted(ACTION_MAPS)}"
            )
        self.model_format = int(model_format)
        if reference is not None and (reference not in REFERENCES or executor != "sim"):
            raise ValueError(f"reference must be None or one of {REFERENCES}, with "
                             f"executor='sim'; got {reference!r} with executor={executor!r}")
        self.reference = reference
        self._reference_run: ReferenceRun | None = None
        self._reference_work = 0.0  # W(now) of the reference run, as _work is the agent's
        if not (math.isfinite(tail_weight) and tail_weight >= 0):
            raise ValueError(f"tail_weight must be a finite number >= 0, got {tail_weight!r}")
        if not 0 < tail_quantile < 1:
            raise ValueError(f"tail_quantile must lie strictly between 0 and 1, "
                             f"got {tail_quantile!r}")
        if tail_weight > 0 and reference is None:
            raise ValueError(f"tail_weight > 0 needs a reference (its run sets the tail "
                             f"threshold); got tail_weight={tail_weight!r}, reference=None")
        self.tail_weight = float(tail_weight)
        self.tail_quantile = float(tail_quantile)
        self._tail_tau = math.inf  # the episode's tail threshold (the reference's quantile)
        self.action_map = ACTION_MAPS[self.model_format]()
        self.action_space = spaces.Box(-1.0, 1.0, (KnobsActionMap.size,), dtype=np.float32)
        n_obs = len(OBSERVATION_FORMATS[self.model_format][1])
        self.observation_space = spaces.Box(OBS_LOW, OBS_HIGH, (n_obs,), dtype=np.float32)
        self.workload: Workload | None = None
        self.controller: AdaptiveController | None = None
        self.loop: ServingLoop | None = None

    # -- gymnasium API -------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode on a fresh window. ``options={"load": x}`` pins the load."""
        super().reset(seed=seed)
        if self.loop is not None and not self.loop.done:
            # a truncated episode: end what is left, so reused real executors start empty
            self.loop.shutdown(drain=False)
        load = (options or {}).get("load")
        self.scenario = sc = self.scenarios.sample(self.np_random, load=load)
        self.sampler = self._sampler_for(sc.prompts, sc.arrivals)
        self.episode_cost = scenario_cost(sc, self.profile)
        secondary_cost = self.secondary_cost if sc.secondary else None
        self.workload = wl = self.sampler.sample(self.np_random, load=sc.load,
                                                 cost=self.episode_cost)
        profiles = {"primary": self.episode_cost}
        if secondary_cost is not None:
            profiles["secondary"] = secondary_cost
        # The policy object is never consulted: the knobs are held from outside (set_knobs).
        self.controller = AdaptiveController(
            "fcfs", profiles=profiles, epoch_s=self.epoch_s, batching=self.batching,
            scorer=shared_scorer(),
        )
        self.controller.set_knobs(Knobs(), hold=True)
        requests = wl.requests
        if self.executor == "hf":
            from rtlm_adapt.serving.realtime import RealTimeLoop

            primary, secondary = self._real_executors()
            # the real model decides its lengths; cap them so an epoch stays bounded
            requests = [replace(r, max_tokens=self.hf_max_tokens) for r in requests]
            self.loop = RealTimeLoop(
                self.controller, primary, secondary, batching=self.batching,
                on_completion=self._on_completion,
            )
        else:
            # a profile with an engine block gets the engine model of vLLM's scheduler
            priority_of = engine_priorities(self.controller)
            primary = simulated_executor(
                "primary", self.episode_cost, batching=self.batching, priority_of=priority_of
            )
            secondary = None
            if secondary_cost is not None:
                secondary = simulated_executor(
                    "secondary", secondary_cost, batching=self.batching, priority_of=priority_of
                )
            self.loop = ServingLoop(
                self.controller, primary, secondary, batching=self.batching,
                on_completion=self._on_completion,
            )
        self.loop.add_requests(requests)
        if self.reference is not None:
            self._reference_run = ReferenceRun.serve(
                self.reference, wl, primary_cost=self.episode_cost,
                secondary_cost=secondary_cost, epoch_s=self.epoch_s, batching=self.batching)
            if self.tail_weight > 0:
                # The reference's quantile, not the agent's own: it is known before the episode
                # and the agent cannot move it, so the term is a sum over completions, paid as
                # they finish; the bound holds at any threshold and is tight for the reference.
                self._tail_tau = self._reference_run.quantile(self.tail_quantile)
        # prefix sums of arrival times, in arrival order, for the O(1) accrued-work formula
        self._arrival_cumsum = [0.0]
        for t in sorted(r.arrival_time for r in wl.requests):
            self._arrival_cumsum.append(self._arrival_cumsum[-1] + t)
        self._service_s = wl.mean_service_s
        self._n_done = 0
        self._finish_sum = 0.0
        self._rt_sum = 0.0
        self._misses = 0
        self._epoch_misses = 0
        self._response_times: list[float] = []
        self._epoch_excess = 0.0  # sum over the epoch's completions of max(0, rt - tau)
        self._steps = 0
        self._work = 0.0  # W(now): response time accrued so far, over all requests
        self.loop.advance(0.0)
        if self._reference_run is not None:  # what the reference accrued by now, like _work
            self._reference_work = self._reference_run.work(self.loop.now)
        info = {"load": wl.load, "rate_rps": wl.rate_rps, "workload": wl.description,
                "scenario": sc.label()}
        return self._obs(), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.loop is None or self.controller is None:
            raise RuntimeError("call reset() before step()")
        knobs = self.knobs_for(action)
        self.controller.set_knobs(knobs, hold=True)
        self._epoch_misses = 0
        self._epoch_excess = 0.0
        started = self.loop.now
        done = self.loop.advance(started + self.epoch_s)
        self._steps += 1
        work = self._accrued(self.loop.now)
        rise, misses = work - self._work, self._epoch_misses
        # The agent's last epoch settles what is left of the reference's run too: an agent that
        # finishes first must not lose the credit for the reference's last requests.
        until = math.inf if done else self.loop.now
        if self._reference_run is not None:
            reference_work = self._reference_run.work(until)
            rise -= reference_work - self._reference_work
            misses -= self._reference_run.misses(started, until)
            self._reference_work = reference_work
        reward = -rise / self._service_s - self.miss_penalty * misses
        if self.tail_weight > 0:  # skipped at 0: the reward stays exactly what it was without
            reward -= self._tail_term(started, until)
        self._work = work
        truncated = not done and self._steps >= self.max_episode_steps
        info: dict[str, Any] = {"time": self.loop.now, "completed": self._n_done}
        if done or truncated:
            info["mean_response_s"] = self._rt_sum / max(1, self._n_done)
            info["miss_rate"] = self._misses / max(1, self._n_done)
            info["tail_response_s"] = tail_mean(self._response_times, self.tail_quantile)
        return self._obs(), float(reward), bool(done), bool(truncated), info

    # -- helpers -------------------------------------------------------------------------------
    def knobs_for(self, action: np.ndarray) -> Knobs:
        """The Knobs an action means at the observation the agent last saw (which sets the
        batch cap's and the offload threshold's scale)."""
        return self.action_map.knobs(action, self._seen)

    def _sampler_for(self, prompts: str, arrivals: str) -> EpisodeSampler:
        """One sampler per (prompt set, trace), built on first use (prompts load once)."""
        key = (prompts, arrivals)
        if key not in self._samplers:
            self._samplers[key] = EpisodeSampler(prompts, arrivals=arrivals,
                                                 **self._sampler_options)
        return self._samplers[key]

    def observation(self) -> Observation:
        """The controller's current Observation (what a Policy would see)."""
        assert self.controller is not None and self.loop is not None
        return self.controller.observe(self.loop.now)

    def _obs(self) -> np.ndarray:
        self._seen = self.observation()
        return observation_array(self._seen, self.model_format)

    def _real_executors(self) -> tuple[Any, Any]:
        """The real primary (and a secondary sharing its weights), loaded on first use.

        Executors hold no request between episodes (every episode runs to its end), so they are
        reused rather than reloading the model each reset.
        """
        if self._hf is None:
            from rtlm_adapt.serving.factory import load_executor, sibling_executor

            primary = load_executor(
                self.model, name="primary", max_batch_size=self.primary_cost.max_batch_size
            )
            secondary = None
            if self.secondary_cost is not None:
                secondary = sibling_executor(
                    primary, name="secondary", max_batch_size=self.secondary_cost.max_batch_size
                )
            self._hf = (primary, secondary)
        return self._hf

    def _on_completion(self, c: Completion) -> None:
        self._n_done += 1
        self._finish_sum += c.finish_time
        self._rt_sum += c.response_time
        self._response_times.append(c.response_time)
        self._epoch_excess += max(0.0, c.response_time - self._tail_tau)
        if c.missed_deadline:
            self._misses += 1
            self._epoch_misses += 1

    def _tail_term(self, started: float, until: float) -> float:
        """What the tail term takes from the reward of the epoch ``(started, until]``: the
        weighted excess over the threshold, the agent's minus the reference's (module
        docstring)."""
        assert self._reference_run is not None
        reference = self._reference_run.tail_excess(started, until, self._tail_tau)
        scale = (1.0 - self.tail_quantile) * self._service_s
        return self.tail_weight * (self._epoch_excess - reference) / scale

    def _accrued(self, t: float) -> float:
        """W(t) = sum over arrived requests of (min(finish, t) - arrival), in O(1).

        = (sum of finish times of completed) + (open requests) * t - (sum of arrival times),
        where the loop has submitted exactly the arrivals up to ``t``.
        """
        assert self.loop is not None
        n_arrived = self.loop.result.submitted
        open_ = n_arrived - self._n_done
        return self._finish_sum + open_ * t - self._arrival_cumsum[n_arrived]


def tail_mean(values: list[float], q: float) -> float:
    """The mean of the values at or above their ``q`` quantile (0 for none).

    >>> tail_mean([1.0, 2.0, 3.0, 10.0], 0.5), tail_mean([], 0.95)
    (6.5, 0.0)
    """
    if not values:
        return 0.0
    array = np.asarray(values, dtype=float)
    return float(np.mean(array[array >= np.quantile(array, q)]))
