"""Shadow replays and the shadow guard: the controller's traffic log, a replay that reproduces
the run it recorded, and a guard that hands a bad policy back on the same requests."""

from __future__ import annotations

import logging
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rtlm_adapt.arrival import ArrivalScore
from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.experiment import build_workload, engine_priorities, run_policy
from rtlm_adapt.knobs import Knobs
from rtlm_adapt.observation import Observation
from rtlm_adapt.policies import make_policy
from rtlm_adapt.policies.action_space import KnobsActionMap
from rtlm_adapt.policies.mlp_actor import MLPActor
from rtlm_adapt.policies.ppo import PPOPolicy
from rtlm_adapt.policies.shadow_guard import ShadowGuard
from rtlm_adapt.predictor import LengthPrediction
from rtlm_adapt.request import TRUE_LENGTH_KEY, Completion, Request
from rtlm_adapt.serving.base import ExecutorState
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.simulated import simulated_executor
from rtlm_adapt.shadow import (
    ShadowExecutor,
    ShadowSetup,
    repeated,
    replay,
    replay_requests,
)
from rtlm_adapt.traffic import TrafficLog, TrafficWindow

SECONDARY = StepCost.default_secondary()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def samples():
    from rtlm_adapt.data.datasets import load_prompts

    return load_prompts("alpaca:gpt4_1106_preview")


def _bad_policy(**kwargs) -> PPOPolicy:
    """A deliberately bad learned policy: a batch cap of 1/16 of the primary's, arrival order,
    no offloading (format 1's action map)."""
    actor = MLPActor([(np.zeros((6, 14)), np.array([-1.0, -1.0, -1.0, -1.0, -1.0, 1.0]))])
    return PPOPolicy(actor, action_map=KnobsActionMap(), **kwargs)


def _score(length: float, prompt_tokens: int = 7) -> ArrivalScore:
    return ArrivalScore({}, 0.5, LengthPrediction(length, length / 2, length * 2), prompt_tokens)


def _request(i: int, arrival: float = 0.0) -> Request:
    return Request(f"r{i}", "Write a short poem about the sea.", arrival)


# -- the traffic log -----------------------------------------------------------------------------
def test_traffic_log_keeps_the_last_requests_and_refuses_a_bad_capacity():
    log = TrafficLog(capacity=3)
    for i in range(5):
        log.record_submit(_request(i, i), _score(10.0))
    assert [r.request.id for r in log.records()] == ["r2", "r3", "r4"]
    assert log.accepted == 5 and len(log) == 5  # r0 and r1 still live: the window's backlog
    log.record_end("r0", output_tokens=9, finished_at=1.5)  # ended before the window opened
    log.record_withdrawn("r3")
    assert [r.request.id for r in log.records()] == ["r2", "r4"]
    assert [r.request.id for r in log.window().records] == ["r1", "r2", "r4"]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="capacity"):
            TrafficLog(capacity=bad)


def test_a_signals_snapshot_copies_every_field_and_stays_put():
    import dataclasses

    from rtlm_adapt.signals import ServingSignals

    names = [f.name for f in dataclasses.fields(ServingSignals)]
    live = ServingSignals(**{name: float(i + 1) for i, name in enumerate(names)})
    kept = live.snapshot()
    assert dataclasses.astuple(kept) == dataclasses.astuple(live) and kept is not live
    live.response_ewma = 99.0
    assert kept.response_ewma != 99.0


def test_controller_records_what_it_accepts_and_how_it_ended():
    ctl = AdaptiveController("fcfs")
    log = TrafficLog()
    ctl.watch_traffic(log)
    for i in range(4):
        ctl.submit(_request(i, 0.1 * i))
    primary = ExecutorState("gpu", "primary", running=0, max_batch_size=2, now=1.0)
    first, second = ctl.next_batch(primary)
    ctl.on_finish(Completion(first.id, 42, arrival_time=first.arrival_time, start_time=1.0,
                             finish_time=2.0, executor="gpu"))
    ctl.cancel("r3")  # withdrawn while it waited: it never ran, so a replay skips it
    ctl.fail_queued()  # r2
    records = {r.request.id: r for r in log.records()}
    assert sorted(records) == ["r0", "r1"]
    assert records["r0"].output_tokens == 42 and records["r1"].output_tokens is None
    assert records["r1"].score.prediction == ctl.entry("r1").prediction
    assert log.accepted == 4
    with pytest.raises(TypeError, match="TrafficLog"):
        ctl.watch_traffic([])


def test_a_policy_with_attach_is_attached_to_each_controller_that_takes_it():
    class Watching:
        name, length_source, consolidate = "watching", "predicted", True

        def __init__(self):
            self.controllers = []

        def decide(self, observation: Observation) -> Knobs:
            return Knobs()

        def attach(self, controller):
            self.controllers.append(controller)

    policy = Watching()
    ctl = AdaptiveController(policy)
    other = AdaptiveController("fcfs")
    other.policy = policy  # as a gateway swapping the policy of a resumed state does
    assert policy.controllers == [ctl, other]
    with pytest.raises(TypeError, match="not a Policy"):
        other.policy = object()


# -- replays -------------------------------------------------------------------------------------
def _recorded_run(policy, workload, secondary=SECONDARY):
    """Serve ``workload`` under ``policy`` with a traffic log as long as the workload."""
    log = TrafficLog(capacity=len(workload.requests))

    def factory(p, **kwargs):
        ctl = AdaptiveController(p, **kwargs)
        ctl.watch_traffic(log)
        return ctl

    return run_policy(policy, workload, secondary_cost=secondary, controller_factory=factory), log


@pytest.mark.parametrize("policy", ["heuristic", "fcfs"])
def test_a_replay_of_a_finished_run_reproduces_it(samples, policy):
    workload = build_workload(samples, arrivals="azure-conv", load=0.9, n=120, seed=3)
    run, log = _recorded_run(policy, workload)
    primary = StepCost.default()
    setup = ShadowSetup(ShadowExecutor("primary", primary, primary.max_batch_size),
                        ShadowExecutor("secondary", SECONDARY, SECONDARY.max_batch_size))
    again = replay(log.window(), make_policy(policy), setup)
    assert len(again.completions) == len(workload.requests)
    assert again.mean_response_s == pytest.approx(run.summary.mean_rt_s, rel=0.01)
    # the controller's own view (executors as reported, costs as learned) comes close too
    learned = replay(log.window(), make_policy(policy), ShadowSetup.of(run.controller))
    assert learned.mean_response_s == pytest.approx(run.summary.mean_rt_s, rel=0.05)
    # and a replay tells the policies apart as the runs do
    other = "fcfs" if policy == "heuristic" else "heuristic"
    assert replay(log.window(), make_policy(other), setup).mean_response_s != pytest.approx(
        again.mean_response_s, rel=0.01)


def test_a_replay_serves_every_primary_the_live_controller_had(samples):
    # A gateway with two backends: two primaries, and arrivals at 0.85 of what the two serve.
    workload = build_workload(samples, arrivals="azure-conv", load=1.7, n=160, seed=5)
    log = TrafficLog(capacity=len(workload.requests))
    ctl = AdaptiveController("heuristic")
    ctl.watch_traffic(log)
    cost = StepCost.default()
    replicas = [simulated_executor(name, cost, priority_of=engine_priorities(ctl))
                for name in ("gpu-a", "gpu-b")]
    live = ServingLoop(ctl, replicas).run(workload.requests)
    assert {c.executor for c in live.completions} == {"gpu-a", "gpu-b"}
    live_mean = float(np.mean([c.response_time for c in live.completions]))

    setup = ShadowSetup.of(ctl)
    assert [shadow.name for shadow in setup.primaries] == ["gpu-a", "gpu-b"]
    again = replay(log.window(), make_policy("heuristic"), setup)
    assert {c.executor for c in again.completions} == {"gpu-a", "gpu-b"}
    assert again.mean_response_s == pytest.approx(live_mean, rel=0.05)
    # replayed on the first backend alone, the same traffic overloads it: the judgement would
    # compare the policies in a situation the deployment is not in
    alone = replay(log.window(), make_policy("heuristic"), replace(setup, more_primaries=()))
    assert alone.mean_response_s > 1.5 * live_mean
    with pytest.raises(ValueError, match="different names"):
        ServingLoop(ctl, [replicas[0], replicas[0]])
    with pytest.raises(ValueError, match="at least one primary"):
        ServingLoop(ctl, [])


def test_a_replay_serves_live_requests_for_their_prediction_on_the_live_clock():
    log = TrafficLog()
    log.record_submit(Request("a", "Hi there.", 100.0, deadline=130.0, max_tokens=64),
                      _score(80.4, prompt_tokens=3))
    log.record_submit(_request(1, 104.0), _score(30.0, prompt_tokens=9))
    log.record_end("r1", output_tokens=55, finished_at=110.0)
    a, b = replay_requests(log.window())
    assert (a.arrival_time, a.deadline, b.arrival_time) == (100.0, 130.0, 104.0)
    # still live: its prediction (80), capped at its max_tokens; ended: what it generated
    assert a.metadata[TRUE_LENGTH_KEY] == 64 and b.metadata[TRUE_LENGTH_KEY] == 55
    assert b.prompt_tokens == 9
    assert ShadowSetup.of(AdaptiveController("fcfs")) is None  # no executor reported yet
    with pytest.raises(ValueError, match="empty"):
        TrafficLog().window()


def test_the_log_keeps_the_backlog_the_window_opened_with():
    log = TrafficLog(capacity=2)
    for i in range(3):  # r0..r2 arrive at 0, 1, 2
        log.record_submit(_request(i, float(i)), _score(10.0))
    log.record_end("r1", output_tokens=5, finished_at=1.5)
    window = log.window()  # r1, r2: the window opens at 1.0, while r0 still runs
    assert window.start == 1.0 and [r.request.id for r in window.backlog] == ["r0"]
    log.record_end("r0", output_tokens=5, finished_at=2.5)
    log.record_submit(_request(3, 3.0), _score(10.0))  # opens at 2.0: r0 ran until 2.5
    assert [r.request.id for r in log.window().backlog] == ["r0"]
    log.record_submit(_request(4, 4.0), _score(10.0))  # opens at 3.0: r0 and r1 had ended
    assert [r.request.id for r in log.window().records] == ["r2", "r3", "r4"]
    assert [r.request.id for r in log.window().backlog] == ["r2"]  # r2 is still live
    log.record_withdrawn("r2")
    assert len(log) == 2 and log.window().backlog == []


def test_a_replay_can_serve_the_windows_arrivals_a_second_time_after_it():
    log = TrafficLog()
    for i in range(4):  # arrivals at 10, 12, 14, 16 s
        log.record_submit(_request(i, 10.0 + 2.0 * i), _score(40.0))
        log.record_end(f"r{i}", output_tokens=40, finished_at=30.0)
    requests = replay_requests(log.window())
    again = repeated(requests, start=10.0)
    # the same pace, one mean gap (2 s) after the last arrival
    assert [r.arrival_time for r in again] == [18.0, 20.0, 22.0, 24.0]
    assert [r.id for r in again] == ["r0#again", "r1#again", "r2#again", "r3#again"]
    assert all(a.metadata == r.metadata for a, r in zip(again, requests, strict=True))
    setup = ShadowSetup(ShadowExecutor("gpu", StepCost.default(), 2))
    once = replay(log.window(), "fcfs", setup)
    twice = replay(log.window(), "fcfs", setup, repeat_arrivals=True)
    assert len(once.completions) == 4 and len(twice.completions) == 8
    assert {c.request_id for c in twice.completions} >= {r.id for r in again}
    assert (twice.window_requests, twice.backlog_requests) == (4, 0)


def _watching(observations):
    class Watching:
        name, length_source, consolidate = "watching", "predicted", True

        def decide(self, observation: Observation) -> Knobs:
            observations.append(observation)
            return Knobs()

    return Watching()


def test_a_replay_starts_from_the_backlog_and_the_signals_of_the_window():
    ctl = AdaptiveController("fcfs")
    log = TrafficLog(capacity=4)
    ctl.watch_traffic(log)
    for i in range(8):  # a backlog of four that never ran, then four more
        ctl.submit(_request(i, 2.0 * i))
    ctl._signals.response_ewma = 77.0  # as if recent answers were slow
    ctl.submit(_request(8, 16.0))
    window = log.window()
    assert window.start == 10.0 and len(window.backlog) == 5
    assert window.signals.response_ewma == 0.0  # as r5 arrived, not as now
    setup = ShadowSetup(ShadowExecutor("gpu", StepCost.default(), 2))
    seen: list[Observation] = []
    from_state = replay(window, _watching(seen), setup)
    assert len(from_state.completions) == 9 and from_state.backlog_requests == 5
    assert seen[0].now == 10.0 and seen[0].queue_length == 6  # the backlog, and r5 arriving
    # the same window with nothing before it, from fresh signals
    empty = replay(TrafficWindow.of(window.records[5:]), _watching([]), setup)
    assert len(empty.completions) == 4
    assert from_state.mean_response_s > empty.mean_response_s  # the backlog goes first
    # the signals the window opened with reach the policy (and what the backlog's own submits
    # would have added is not there)
    window_slow = replace(window, signals=replace(window.signals, response_ewma=42.0))
    seen.clear()
    replay(window_slow, _watching(seen), setup)
    assert seen[0].recent_response_s == 42.0 and seen[0].arrival_rate == window.signals.arrival_rate


# -- the shadow guard ----------------------------------------------------------------------------
@pytest.mark.parametrize("arrivals,load", [("poisson", 0.9), ("azure-conv", 0.7)])
def test_shadow_guard_hands_a_bad_policy_back_at_its_first_judgement(samples, arrivals, load,
                                                                     caplog):
    workload = build_workload(samples, arrivals=arrivals, load=load, n=200, seed=1)
    policy = _bad_policy()  # the shadow guard is the default
    assert isinstance(policy.guard, ShadowGuard)
    handed_back_at = []
    decide = policy.decide

    def watch(obs):
        knobs = decide(obs)
        if policy.guard.handbacks and not handed_back_at:
            handed_back_at.append(policy.guard.judgements)
        return knobs

    policy.decide = watch
    with caplog.at_level("WARNING", logger="rtlm_adapt.policies.shadow_guard"):
        guarded = run_policy(policy, workload, secondary_cost=SECONDARY)
    assert handed_back_at == [1]  # the first judgement: after judge_every (50) arrivals
    assert policy.guard.active == "heuristic" and policy.guard.metrics()["shadow_ratio"] > 2
    assert any("handing the knobs back to the heuristic" in r.message for r in caplog.records)
    unguarded = run_policy(_bad_policy(guard=None), workload, secondary_cost=SECONDARY)
    assert guarded.summary.mean_rt_s < 0.2 * unguarded.summary.mean_rt_s


def test_a_background_guard_judges_on_its_worker_and_acts_on_the_verdict(samples):
    workload = build_workload(samples, arrivals="poisson", load=0.9, n=120, seed=1)
    policy = _bad_policy(guard=ShadowGuard(background=True))
    run_policy(policy, workload, secondary_cost=SECONDARY)
    policy.guard.settle()  # the run may end before the worker does
    assert policy.guard.judgements >= 1 and policy.guard.handbacks == 1
    assert policy.guard.active == "heuristic"


class _Guarded:
    """A policy that the guard switches between ``learned`` (built by ``make_learned``) and
    the heuristic, as PPOPolicy does."""

    name, length_source, consolidate = "guarded", "predicted", True

    def __init__(self, guard: ShadowGuard, make_learned) -> None:
        self.guard, self.make_learned = guard, make_learned
        self.heuristic = make_policy("heuristic")

    def attach(self, controller):
        self.guard.attach(controller, learned=lambda: self.make_learned(),
                          heuristic=lambda: make_policy("heuristic"))

    def decide(self, observation):
        learned = self.guard.choose(observation) == "learned"
        return (self.make_learned() if learned else self.heuristic).decide(observation)


def test_shadow_guard_keeps_a_policy_as_good_and_gives_back_the_knobs_once_it_made_up_for_it(
    samples,
):
    workload = build_workload(samples, arrivals="poisson", load=0.9, n=300, seed=2)
    # the heuristic as the learned policy: no worse, so never handed back
    same = _Guarded(ShadowGuard(), lambda: make_policy("heuristic"))
    run_policy(same, workload, secondary_cost=SECONDARY)
    assert same.guard.judgements == 6 and same.guard.handbacks == 0
    assert same.guard.last_means[0] == pytest.approx(same.guard.last_means[1])
    # worse than the heuristic for the first 100 arrivals (fcfs), then better (the packaged
    # model): handed back, and it takes the knobs again once its replays made up what they lost
    workload = build_workload(samples, arrivals="poisson", load=0.9, n=500, seed=2)
    for then, resumes in (("ppo-unguarded", 1), ("heuristic", 0)):
        guard = ShadowGuard(judge_every=50, window=50, resume_after=2, recent=1)

        def learned(guard=guard, then=then):
            return make_policy("fcfs" if guard.traffic.accepted <= 100 else then)

        run_policy(_Guarded(guard, learned), workload, secondary_cost=SECONDARY)
        assert guard.handbacks == 1 and guard.resumes == resumes, then
        if resumes == 0:  # only as good as the heuristic afterwards: it never pays its debt
            assert guard.active == "heuristic" and guard.debt_s > 0
            assert guard.metrics()["debt_s"] == guard.debt_s
        else:
            assert guard.active == "learned" and guard.metrics()["debt_s"] == 0.0


def test_shadow_guard_catches_a_policy_that_fails_only_once_a_backlog_builds():
    """A model trained with the tail term (BENCHMARKS.md 4.6) runs 17x the heuristic in this
    held-out cell: its slow answers feed its observation, which leads it to worse knobs. Replays
    from an empty start never saw it (session 17); replays from the live state must."""
    from rtlm_adapt.policies.ppo_train import held_out_cells, run_summary

    failing = ROOT / "benchmarks/results/ppo_session17/ppo30_tail05.npz"
    cell = "alpaca:phi-2 | gamma:4 | load 0.9 | cap 16"
    case = next(cases for sc, cases in held_out_cells(1, 1600, caps=(16,))
                if sc.label().startswith(cell))[0]
    heuristic = run_summary(make_policy("heuristic"), case, {}).mean_rt_s
    assert run_summary(make_policy(f"ppo-unguarded:{failing}"), case, {}).mean_rt_s > 10 * heuristic
    guarded = make_policy(f"ppo:{failing}")
    assert run_summary(guarded, case, {}).mean_rt_s < 1.15 * heuristic
    assert guarded.guard.handbacks == 1 and guarded.guard.resumes == 0  # no second failure
    packaged = make_policy("ppo")  # the packaged model does well here: never handed back
    assert run_summary(packaged, case, {}).mean_rt_s < heuristic
    assert packaged.guard.handbacks == 0


def test_a_judgement_that_fails_is_logged_and_serving_goes_on(samples, caplog):
    def broken():
        raise RuntimeError("no replay today")

    workload = build_workload(samples, arrivals="poisson", load=0.9, n=120, seed=5)
    policy = _Guarded(ShadowGuard(), broken)
    policy.make_learned = lambda: make_policy("heuristic")  # the live side works
    policy.attach = lambda controller: policy.guard.attach(
        controller, learned=broken, heuristic=lambda: make_policy("heuristic"))
    with caplog.at_level(logging.ERROR, logger="rtlm_adapt.policies.shadow_guard"):
        run = run_policy(policy, workload, secondary_cost=SECONDARY)
    assert len(run.completions) == 120 and policy.guard.judgements == 0
    assert sum("a judgement failed" in r.message for r in caplog.records) == 2  # at 50 and 100


def test_shadow_guard_options_and_an_unattached_guard(caplog):
    for bad in ({"window": 0}, {"judge_every": 1.5}, {"margin": -0.1}, {"miss_margin": "x"},
                {"resume_after": 0}, {"recent": 0}):
        with pytest.raises(ValueError, match="ShadowGuard"):
            ShadowGuard(**bad)
    policy = _bad_policy()  # never given to a controller: the guard cannot see any traffic
    obs = Observation(now=0.0, queue_length=3, primary_running=1, primary_max_batch=16,
                      secondary_running=0, secondary_max_batch=4, pred_len_mean=100.0,
                      pred_len_p90=200.0, uncertainty_mean=0.3, oldest_wait_s=1.0,
                      min_slack_s=5.0, arrival_rate=0.1, service_time_s=10.0, load=0.9,
                      recent_response_s=20.0, recent_miss_rate=0.0, step_time_s=0.1)
    with caplog.at_level(logging.WARNING, logger="rtlm_adapt.policies.shadow_guard"):
        policy.decide(obs)
        policy.decide(obs)
    warnings = [r for r in caplog.records if "not attached" in r.message]
    assert len(warnings) == 1 and policy.guard.active == "learned"


def test_a_saved_controller_with_a_shadow_guarded_policy_loads_and_guards_again(samples,
                                                                                 tmp_path):
    workload = build_workload(samples, arrivals="poisson", load=0.9, n=60, seed=4)
    run = run_policy(_bad_policy(), workload, secondary_cost=SECONDARY)
    assert len(run.controller.policy.guard.traffic) == 60
    path = tmp_path / "state.bin"
    run.controller.save(path)
    restored = AdaptiveController.load(path)
    guard = restored.policy.guard
    assert isinstance(guard, ShadowGuard) and guard.handbacks == 1
    assert restored.traffic is guard.traffic and len(guard.traffic) == 0  # watching anew
    restored.submit(_request(0))
    assert len(guard.traffic) == 1
    assert pickle.loads(pickle.dumps(restored.policy)).guard.handbacks == 1
    # a guard saved by session 17: no debt, and a log without the backlog
    state = guard.__getstate__()
    del state["debt_s"], state["_lost_s"]
    old_log = TrafficLog.__new__(TrafficLog)
    old_log.__dict__.update(capacity=200, _records={}, accepted=0)
    state["traffic"] = old_log
    old = ShadowGuard.__new__(ShadowGuard)
    old.__setstate__(state)
    assert old.debt_s == 0.0 and old.handbacks == 1 and old.metrics()["debt_s"] == 0.0
    old.traffic.record_submit(_request(0), _score(10.0))
    assert len(old.traffic.window().records) == 1
