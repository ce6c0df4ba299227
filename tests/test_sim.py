import pytest
from conftest import make_request

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.serving.sim import SimulatedExecutor

COST = StepCost(
    "t",
    decode_s_base=0.01,
    decode_s_per_seq=0.002,
    decode_s_per_ctx_token=1e-5,
    prefill_s_base=0.02,
    prefill_s_per_token=1e-4,
    max_batch_size=4,
)


def step_by_step_cost(batch, ctx0, k, prefill):
    total = 0.0
    for j in range(k):
        total += COST.step_time(batch, ctx0 + j * batch, prefill if j == 0 else 0)
    return total


def test_fused_steps_cost_the_same_as_single_steps():
    ex = SimulatedExecutor("p", COST)
    ex.admit(
        [make_request("a", 0, 5, prompt_tokens=10), make_request("b", 0, 9, prompt_tokens=20)], 0.0
    )
    r = ex.step(0.0)
    assert r.iterations == 5 and [c.request_id for c in r.finished] == ["a"]
    assert r.duration_s == pytest.approx(step_by_step_cost(2, 30, 5, 30))
    assert r.finished[0].output_tokens == 5
    assert r.finished[0].first_token_time == pytest.approx(COST.step_time(2, 30, 30))
    r2 = ex.step(r.duration_s)
    assert [c.output_tokens for c in r2.finished] == [9]


def test_horizon_limits_fusion_and_joiner_starts_next_step():
    ex = SimulatedExecutor("p", COST)
    ex.admit([make_request("a", 0, 100)], 0.0)
    r = ex.step(0.0, until=0.1)
    assert 1 <= r.iterations < 100 and r.duration_s <= 0.1 + 1e-12
    ex.admit([make_request("b", 0.05, 3)], r.duration_s)
    r2 = ex.step(r.duration_s)
    assert r2.new_tokens["b"] == r2.iterations >= 1
    assert r2.prefill_tokens == 16


def test_static_batch_runs_to_the_longest_member():
    ex = SimulatedExecutor("p", COST, batching="static")
    ex.admit([make_request("a", 0, 2), make_request("b", 0, 7)], 0.0)
    r = ex.step(0.0, until=0.001)
    assert r.iterations == 7
    assert {c.request_id: c.output_tokens for c in r.finished} == {"a": 2, "b": 7}
    assert all(c.finish_time == pytest.approx(r.duration_s) for c in r.finished)
    ex.admit([make_request("c", 0, 1)], r.duration_s)
    with pytest.raises(RuntimeError, match="static batching"):
        ex.admit([make_request("d", 0, 1)], r.duration_s)


def test_errors_are_clear():
    ex = SimulatedExecutor("p", COST)
    with pytest.raises(RuntimeError, match="empty batch"):
        ex.step(0.0)
    from rtlm_adapt.request import Request

    with pytest.raises(ValueError, match="true output length"):
        ex.admit([Request("x", "hi", 0.0)], 0.0)
    with pytest.raises(RuntimeError, match="max_batch_size"):
        ex.admit([make_request(str(i), 0, 3) for i in range(5)], 0.0)
    with pytest.raises(ValueError, match="batching"):
        SimulatedExecutor("p", COST, batching="dynamic")


def test_abort_returns_an_error_completion():
    ex = SimulatedExecutor("p", COST)
    ex.admit([make_request("a", 0, 10)], 0.0)
    c = ex.abort("a", 1.0)
    assert c.error == "aborted" and ex.running() == 0
    assert ex.abort("zz", 1.0) is None


def test_membership_changes_and_padded_context_are_charged():
    import dataclasses

    cost = dataclasses.replace(COST, join_s=0.5, leave_s=0.25, padded_context=True)
    ex = SimulatedExecutor("p", cost)
    ex.admit(
        [make_request("a", 0, 5, prompt_tokens=10), make_request("b", 0, 9, prompt_tokens=20)], 0.0
    )
    r = ex.step(0.0)
    # two joins; attention over 2 rows of the longest context (20), growing by 1 a step
    assert r.attended_tokens == 40 and r.context_tokens == 30
    assert r.duration_s == pytest.approx(step_by_step_cost(2, 40, 5, 30) + 2 * 0.5)
    # the next call pays for "a" leaving, and then for nothing more
    r2 = ex.step(r.duration_s)
    assert r2.duration_s == pytest.approx(step_by_step_cost(1, 25, 4, 0) + 0.25)
    assert [c.request_id for c in r2.finished] == ["b"]


def test_old_profiles_charge_no_membership_cost():
    old = {
        "name": "old",
        "decode_s_base": 0.01,
        "decode_s_per_seq": 0.002,
        "decode_s_per_ctx_token": 1e-5,
        "prefill_s_base": 0.02,
        "prefill_s_per_token": 1e-4,
    }
    cost = StepCost.from_dict(old)
    assert (cost.join_s, cost.leave_s, cost.padded_context) == (0.0, 0.0, False)
    assert cost.step_time(2, 30, 0, joins=3, leaves=1) == cost.step_time(2, 30)
    with pytest.raises(ValueError, match="padded_context"):
        StepCost.from_dict({**old, "padded_context": 1})
    with pytest.raises(ValueError, match="join_s"):
        StepCost.from_dict({**old, "join_s": -1.0})


def test_a_replay_controller_can_believe_another_profile_than_the_executor_charges():
    # serve-bench's fidelity replay: the simulated executor charges a calibrated profile while
    # the controller starts from the profile the real run's controller served with.
    from rtlm_adapt.experiment import Workload, run_policy

    served = StepCost.default()
    calibrated = StepCost(
        "calibrated", 0.2, 0.01, 2e-5, 0.1, 0.003, max_batch_size=served.max_batch_size
    )
    requests = [make_request(f"r{i}", 0.5 * i, 20 + 7 * i) for i in range(12)]
    workload = Workload(requests, 2.0, 0.8, 1.0, 2.5, "test")
    plain = run_policy("heuristic", workload, primary_cost=calibrated)
    replay = run_policy(
        "heuristic", workload, primary_cost=calibrated, controller_profiles={"primary": served}
    )
    assert plain.controller.latency["primary"].prior is calibrated
    assert replay.controller.latency["primary"].prior is served
    # the executor charged the calibrated costs in both: the same work takes as long
    busy = calibrated.step_time(1, 16 + 20)
    assert min(c.finish_time - c.start_time for c in replay.completions) >= busy
