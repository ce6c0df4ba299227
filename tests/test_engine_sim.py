"""The engine model of vLLM's V1 scheduler: queue order, token budget, KV blocks, preemption,
step costs, fusion, and its selection by a profile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import make_request

from rtlm_adapt.calibration.engine_spec import EngineSpec
from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.serving.engine.executor import EngineExecutor
from rtlm_adapt.serving.engine.scheduler import EngineScheduler
from rtlm_adapt.serving.engine.sequence import EngineSequence
from rtlm_adapt.serving.engine.waiting_queue import create_waiting_queue
from rtlm_adapt.serving.sim import SimulatedExecutor
from rtlm_adapt.serving.simulated import simulated_executor

VLLM_PROFILES = [
    "vllm-cpu-smollm2-135m",
    "vllm-cpu-smollm2-135m-16",
    "vllm-a100-llama3-8b",
    "vllm-h100-llama3-8b",
]


def cost_with(engine: EngineSpec, max_batch_size: int = 64) -> StepCost:
    return StepCost(
        "t",
        decode_s_base=0.01,
        decode_s_per_seq=0.002,
        decode_s_per_ctx_token=1e-5,
        prefill_s_base=0.02,
        prefill_s_per_token=1e-4,
        max_batch_size=max_batch_size,
        engine=engine,
    )


def seq(prompt: int, target: int, priority: int = 0, order: int = 0) -> EngineSequence:
    return EngineSequence(None, prompt, target, priority=priority, order=order)


def run_steps(sched: EngineScheduler, n: int) -> list:
    plans = []
    for _ in range(n):
        plan = sched.schedule()
        sched.complete(plan)
        plans.append(plan)
    return plans


# -- the waiting queue -------------------------------------------------------------------------
def test_priority_queue_serves_lower_priority_first_ties_by_arrival():
    q = create_waiting_queue("priority")
    for order, priority in enumerate([3, 1, 3, 0, 1]):
        q.add(seq(4, 4, priority=priority, order=order))
    assert [(s.priority, s.order) for s in (q.pop() for _ in range(5))] == [
        (0, 3), (1, 1), (1, 4), (3, 0), (3, 2)
    ]  # fmt: skip


def test_fcfs_queue_puts_preempted_requests_at_the_front():
    q = create_waiting_queue("fcfs")
    a, b, c = seq(4, 4, order=0), seq(4, 4, order=1), seq(4, 4, order=2)
    q.add(a)
    q.add(b)
    q.prepend(c)
    assert [q.pop() for _ in range(3)] == [c, a, b]
    with pytest.raises(ValueError, match="scheduling policy"):
        create_waiting_queue("lifo")


# -- the token budget --------------------------------------------------------------------------
def test_token_budget_chunks_a_long_prompt_and_decodes_go_first():
    sched = EngineScheduler(
        EngineSpec(max_num_seqs=4, kv_cache_tokens=4096, max_num_batched_tokens=8)
    )
    short = seq(4, 10, order=0)
    sched.add(short)
    run_steps(sched, 1)  # its prefill: now decoding
    long = seq(20, 3, order=1)
    sched.add(long)
    plans = run_steps(sched, 3)
    # each step: the running decode takes 1 token, the new prompt the remaining 7, 7, then 6
    assert [[(s.order, n) for s, n in p.scheduled] for p in plans] == [
        [(0, 1), (1, 7)], [(0, 1), (1, 7)], [(0, 1), (1, 6)]
    ]  # fmt: skip
    assert [p.prefill_tokens for p in plans] == [7, 7, 6]
    assert all(sum(n for _, n in p.scheduled) <= 8 for p in plans)
    assert long.generated == 1 and long.computed == 20  # its first token came with the last chunk


def test_max_num_seqs_caps_running_requests():
    sched = EngineScheduler(EngineSpec(max_num_seqs=2, kv_cache_tokens=4096))
    for i in range(5):
        sched.add(seq(4, 10, order=i))
    run_steps(sched, 3)
    assert [s.order for s in sched.running] == [0, 1] and len(sched.waiting) == 3


# -- KV blocks and preemption ------------------------------------------------------------------
def tiny_cache(policy: str) -> EngineScheduler:
    # 4 blocks of 4 tokens: two requests of 4 + 10 tokens cannot both grow to the end
    return EngineScheduler(
        EngineSpec(max_num_seqs=2, kv_cache_tokens=16, block_size=4, scheduling_policy=policy)
    )


def test_blocks_are_allocated_as_tokens_grow():
    sched = tiny_cache("priority")
    a = seq(4, 10)
    sched.add(a)
    run_steps(sched, 1)
    assert (a.computed, a.blocks) == (4, 1)
    run_steps(sched, 1)  # the decode of token 1 needs slot 5: a second block
    assert (a.computed, a.blocks, sched.kv.free_blocks) == (5, 2, 2)


def test_preemption_recomputes_the_worst_priority_request_from_scratch():
    sched = tiny_cache("priority")
    good, bad = seq(4, 10, priority=0, order=0), seq(4, 10, priority=5, order=1)
    sched.add(good)
    sched.add(bad)
    plans = run_steps(sched, 6)
    preempted = [p for p in plans if p.preempted]
    assert len(preempted) == 1 and preempted[0].preempted == [bad]
    assert sched.preemptions == 1 and bad.preemptions == 1 and good.preemptions == 0
    # its KV is gone and it waits; its generated tokens stay
    assert bad.computed == 0 and bad.blocks == 0 and bad in list(sched.waiting)
    assert bad.generated == 5 and good.blocks == 3
    while bad in list(sched.waiting):
        run_steps(sched, 1)
    # recompute: prompt and generated tokens prefilled again before it samples its next token
    assert bad.computed == 9 and bad.generated == 6
    assert good.generated == good.target and good.blocks == 0  # it finished first


def test_a_request_that_is_itself_the_worst_preempts_itself_and_blocks_the_rest():
    sched = tiny_cache("priority")
    bad, good = seq(4, 10, priority=5, order=0), seq(4, 10, priority=0, order=1)
    sched.add(bad)
    run_steps(sched, 1)  # bad starts alone: it is first in the running list
    sched.add(good)
    plans = run_steps(sched, 8)
    (plan,) = [p for p in plans if p.preempted]
    # bad needed a block, was itself the worst: preempted, and good did not run in that step
    assert plan.preempted == [bad] and plan.scheduled == []
    assert bad not in sched.running and good.preemptions == 0


def test_fcfs_preempts_the_last_started_request():
    sched = tiny_cache("fcfs")
    first, second = seq(4, 10, priority=0, order=0), seq(4, 10, priority=9, order=1)
    sched.add(first)
    sched.add(second)
    plans = run_steps(sched, 6)
    assert [p.preempted for p in plans if p.preempted] == [[second]]
    # no waiting request is admitted in a step that preempted
    assert all(p.admitted == 0 for p in plans if p.preempted)


def test_preempted_request_costs_its_recompute_in_the_executor():
    engine = EngineSpec(max_num_seqs=2, kv_cache_tokens=16, block_size=4)
    ex = EngineExecutor("p", cost_with(engine), priority_of=lambda r: int(r.metadata["prio"]))
    requests = [
        make_request("good", 0, 10, prompt_tokens=4),
        make_request("bad", 0, 10, prompt_tokens=4),
    ]
    requests[0].metadata["prio"], requests[1].metadata["prio"] = 0, 5
    ex.admit(requests, 0.0)
    done, now, prefill = {}, 0.0, 0
    while ex.running():
        r = ex.step(now)
        now += r.duration_s
        prefill += r.prefill_tokens
        done.update({c.request_id: c for c in r.finished})
    assert ex.preemptions == 1
    assert {rid: c.output_tokens for rid, c in done.items()} == {"good": 10, "bad": 10}
    assert done["good"].finish_time < done["bad"].finish_time
    assert prefill == 4 + 4 + (4 + 5)  # two prompts, then bad's prompt and 5 generated again


# -- step costs --------------------------------------------------------------------------------
def test_ample_cache_run_matches_the_step_cost_by_hand():
    cost = cost_with(EngineSpec(max_num_seqs=4, kv_cache_tokens=4096))
    ex = EngineExecutor("p", cost)
    ex.admit(
        [make_request("a", 0, 3, prompt_tokens=10), make_request("b", 0, 5, prompt_tokens=20)], 0.0
    )
    finished, now = {}, 0.0
    while ex.running():
        r = ex.step(now)
        now += r.duration_s
        finished.update({c.request_id: c for c in r.finished})
    # step 1 prefills both prompts (30 tokens) and samples their first tokens
    t1 = 0.01 + 0.02 + 30e-4
    # steps 2-3 decode both (contexts 11 + 21, then 12 + 22); a ends with its 3rd token
    t_a = t1 + (0.01 + 2 * 0.002 + 32e-5) + (0.01 + 2 * 0.002 + 34e-5)
    # steps 4-5 decode b alone (contexts 23, 24)
    t_b = t_a + (0.01 + 0.002 + 23e-5) + (0.01 + 0.002 + 24e-5)
    assert finished["a"].first_token_time == pytest.approx(t1)
    assert finished["a"].finish_time == pytest.approx(t_a)
    assert finished["b"].finish_time == pytest.approx(t_b)
    assert [finished[r].output_tokens for r in "ab"] == [3, 5]


def drain(ex: EngineExecutor, fuse: bool) -> dict[str, tuple[float, float]]:
    out, now = {}, 0.0
    while ex.running():
        r = ex.step(now, math.inf if fuse else now)  # until=now: one iteration per call
        assert r.iterations >= 1 and (fuse or r.iterations == 1)
        now += r.duration_s
        out.update({c.request_id: (c.first_token_time, c.finish_time) for c in r.finished})
    return out


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_fused_steps_match_single_steps_with_preemptions(policy):
    rng = np.random.default_rng(0)
    requests = [
        make_request(f"r{i}", 0, int(rng.integers(1, 60)), prompt_tokens=int(rng.integers(1, 40)))
        for i in range(30)
    ]
    prio = {r.id: int(rng.integers(0, 4)) for r in requests}
    engine = EngineSpec(max_num_seqs=6, kv_cache_tokens=256, block_size=16,
                        max_num_batched_tokens=48, scheduling_policy=policy)  # fmt: skip
    runs = []
    for fuse in (True, False):
        ex = EngineExecutor("p", cost_with(engine), priority_of=lambda r: prio[r.id])
        ex.admit(requests, 0.0)
        runs.append((drain(ex, fuse), ex.preemptions))
    (fused, n_fused), (single, n_single) = runs
    assert n_fused == n_single > 0  # the small cache did preempt
    assert fused.keys() == single.keys() == {r.id for r in requests}
    for rid in fused:
        assert fused[rid] == pytest.approx(single[rid])


def test_priority_order_holds_through_the_engine():
    ex = EngineExecutor("p", cost_with(EngineSpec(max_num_seqs=1, kv_cache_tokens=4096)),
                        priority_of=lambda r: int(r.id[1:]))  # fmt: skip
    ex.admit([make_request(f"p{p}", 0, 3) for p in (7, 2, 9, 0, 5)], 0.0)
    order, now = [], 0.0
    while ex.running():
        r = ex.step(now)
        now += r.duration_s
        order += [c.request_id for c in r.finished]
    assert order == ["p0", "p2", "p5", "p7", "p9"]


def test_abort_frees_blocks_and_too_long_requests_are_refused():
    ex = EngineExecutor(
        "p", cost_with(EngineSpec(max_num_seqs=2, kv_cache_tokens=64, block_size=16))
    )
    ex.admit(
        [make_request("a", 0, 20, prompt_tokens=30), make_request("huge", 0, 60, prompt_tokens=30)],
        0.0,
    )
    r = ex.step(0.0, until=0.0)
    assert [(c.request_id, "cache" in c.error) for c in r.finished] == [("huge", True)]
    assert ex.scheduler.kv.free_blocks == 2
    aborted = ex.abort("a", 1.0)
    assert aborted.error == "aborted" and ex.running() == 0 and ex.scheduler.kv.free_blocks == 4


# -- the API server's hand-off -----------------------------------------------------------------
def test_a_request_reaches_the_scheduler_a_handoff_after_admission():
    engine = EngineSpec(max_num_seqs=4, kv_cache_tokens=4096, handoff_s=0.05)
    ex = EngineExecutor("p", cost_with(engine))
    ex.admit([make_request("a", 0, 3, prompt_tokens=10)], 0.0)
    assert ex.running() == 1  # in flight from the submitter's side already
    wait = ex.step(0.0)
    assert (wait.iterations, wait.batch_size, wait.duration_s) == (0, 0, pytest.approx(0.05))
    now, finished = 0.05, []
    while ex.running():
        r = ex.step(now)
        now += r.duration_s
        finished += r.finished
    (a,) = finished
    assert a.start_time == 0.0  # admission, as the gateway records it
    assert a.first_token_time == pytest.approx(0.05 + 0.02 + 0.01 + 10e-4)  # hand-off + prefill


def test_a_request_already_in_the_engine_takes_the_seat_before_a_better_one_on_the_way():
    # One seat; "long" waits inside the engine behind "run". "short" (better priority) is
    # admitted the moment "run" ends: with no hand-off it overtakes "long", with one it cannot.
    order = {}
    for handoff in (0.0, 0.05):
        engine = EngineSpec(max_num_seqs=1, kv_cache_tokens=4096, handoff_s=handoff)
        ex = EngineExecutor("p", cost_with(engine), priority_of=lambda r: {"short": 0}.get(r.id, 5))
        ex.admit([make_request("run", 0, 2), make_request("long", 0, 20)], 0.0)
        now, done = 0.0, []
        while "run" not in done:  # one step at a time, so nothing is fused past its end
            r = ex.step(now, until=now)
            now += r.duration_s
            done += [c.request_id for c in r.finished]
        ex.admit([make_request("short", now, 2)], now)
        while ex.running():
            r = ex.step(now)
            now += r.duration_s
            done += [c.request_id for c in r.finished]
        order[handoff] = done
    assert order[0.0] == ["run", "short", "long"]
    assert order[0.05] == ["run", "long", "short"]


def test_fused_decodes_stop_when_a_request_comes_in():
    engine = EngineSpec(max_num_seqs=4, kv_cache_tokens=4096, handoff_s=0.05)
    ex = EngineExecutor("p", cost_with(engine))
    ex.admit([make_request("long", 0, 200)], 0.0)
    now = 0.0
    while now < 0.2:
        now += ex.step(now, until=0.2).duration_s
    ex.admit([make_request("next", now, 2)], now)
    r = ex.step(now)  # decodes of "long" alone: fused only up to when "next" comes in
    joined = now + r.duration_s
    assert now + 0.05 - 0.02 <= joined <= now + 0.05  # the last step end before it comes in
    finished, t = {}, joined
    while ex.running():
        r = ex.step(t)
        t += r.duration_s
        finished.update({c.request_id: c for c in r.finished})
    assert finished["next"].first_token_time < joined + 0.06  # prefilled within two steps
    assert finished["next"].finish_time < finished["long"].finish_time


def test_aborting_a_request_on_the_way_in_means_the_engine_never_runs_it():
    engine = EngineSpec(max_num_seqs=4, kv_cache_tokens=4096, handoff_s=0.05)
    ex = EngineExecutor("p", cost_with(engine))
    ex.admit([make_request("a", 0, 3), make_request("b", 0, 3)], 0.0)
    assert ex.abort("a", 0.01).error == "aborted"
    now, finished = 0.01, []
    while ex.running():
        r = ex.step(now)
        now += r.duration_s
        finished += [c.request_id for c in r.finished]
    assert finished == ["b"] and ex.scheduler.kv.free_blocks == ex.scheduler.kv.num_blocks


@pytest.mark.parametrize("bad", [-0.01, float("nan"), 60.0, True, "0.05"])
def test_engine_handoff_is_checked(bad):
    with pytest.raises(ValueError, match="handoff_s"):
        EngineSpec(max_num_seqs=4, kv_cache_tokens=4096, handoff_s=bad)


# -- profiles and selection --------------------------------------------------------------------
@pytest.mark.parametrize("name", VLLM_PROFILES)
def test_packaged_vllm_profiles_load_round_trip_and_select_the_engine(name):
    cost = StepCost.load(name)
    assert cost.engine is not None and cost.source
    assert StepCost.from_dict(json.loads(cost.to_json())) == cost
    assert isinstance(simulated_executor("primary", cost), EngineExecutor)
    with pytest.raises(ValueError, match="continuously"):
        simulated_executor("primary", cost, batching="static")


def test_default_profile_keeps_the_batch_model_and_its_json_shape():
    cost = StepCost.default()
    assert cost.engine is None and "engine" not in json.loads(cost.to_json())
    assert isinstance(simulated_executor("primary", cost), SimulatedExecutor)


def test_engine_block_is_checked():
    with pytest.raises(ValueError, match="unknown fields"):
        EngineSpec.from_dict({"max_num_seqs": 4, "kv_cache_tokens": 64, "swap_space": 4})
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineSpec(max_num_seqs=4, kv_cache_tokens=64, scheduling_policy="sjf")
    with pytest.raises(ValueError, match="whole block"):
        EngineSpec(max_num_seqs=4, kv_cache_tokens=8, block_size=16)


def test_cpu_profile_reproduces_its_two_measurements():
    """The vLLM-CPU profile was solved from a request alone (32.18 ms per token over 64 tokens,
    a 31-token prompt) and the saturated rate (121 tok/s): check both against the engine model."""
    cost = StepCost.load("vllm-cpu-smollm2-135m")
    ex = EngineExecutor("p", cost)
    ex.admit([make_request("alone", 0, 64, prompt_tokens=31)], 0.0)
    ((_, finish_s),) = drain(ex, fuse=True).values()
    assert finish_s / 64 == pytest.approx(cost.extra["alone_s_per_token"], rel=0.01)
    # saturated: 4 slots always full, requests of the calibration's mean sizes
    ex = EngineExecutor("p", cost, max_batch_size=10_000)
    n, prompt, length = 400, 32, 73
    ex.admit([make_request(f"r{i}", 0, length, prompt_tokens=prompt) for i in range(n)], 0.0)
    now = 0.0
    while ex.running():
        now += ex.step(now).duration_s
    assert n * length / now == pytest.approx(cost.extra["saturated_tokens_per_s"], rel=0.03)


# -- the same policies on the engine model -----------------------------------------------------
def test_16_seat_cpu_profile_reproduces_the_steps_it_was_fitted_to():
    """The measured 16-seat profile (``profile --engine vllm --measure``) gives back its own
    decode steps at the batches it was fitted on, and says how far it is below them."""
    cost = StepCost.load("vllm-cpu-smollm2-135m-16")
    assert cost.engine is not None and cost.engine.max_num_seqs == cost.max_batch_size == 16
    fitted_from = cost.extra["decode_fit_min_batch"]
    ratios: dict[int, list[float]] = {}
    for batch, context, step_s in cost.extra["decode_samples"]:
        ratios.setdefault(int(batch), []).append(cost.step_time(int(batch), int(context)) / step_s)
    for batch, values in ratios.items():
        if batch >= fitted_from:  # each point within 10%, each batch's mean within 3%
            assert all(0.9 < r < 1.1 for r in values), (batch, values)
            assert np.mean(values) == pytest.approx(1.0, abs=0.03)
            assert np.mean(values) == pytest.approx(
                cost.extra["decode_fit_ratio_by_batch"][str(batch)], abs=1e-3
            )
    # the step grows with the batch: 16 sequences cost more than 4, which cost about 1
    assert cost.step_time(16, 16 * 150) > 1.5 * cost.step_time(4, 4 * 150)


def test_policies_and_the_environment_run_on_the_engine_model():
    from rtlm_adapt.data import PromptSample
    from rtlm_adapt.experiment import build_workload, run_policy

    rng = np.random.default_rng(1)
    samples = [
        PromptSample(
            str(i), f"Question {i}?", int(rng.integers(1, 300)), int(rng.integers(5, 80)), "t"
        )
        for i in range(200)
    ]
    cost = StepCost.load("vllm-cpu-smollm2-135m")
    workload = build_workload(samples, load=1.1, n=200, seed=0, cost=cost)
    runs = {p: run_policy(p, workload, primary_cost=cost) for p in ("fcfs", "oracle-sjf")}
    for run in runs.values():
        assert run.summary.completed == 200 and run.summary.failed == 0
    # ranked by the true length, short answers overtake long ones: a lower mean at overload
    assert runs["oracle-sjf"].summary.mean_rt_s < runs["fcfs"].summary.mean_rt_s


def test_the_engine_sends_the_controller_priority():
    """In-flight cap above the engine's seats: requests wait in the engine's own queue, where
    the controller's key (oracle-sjf: the true length) must decide who runs first."""
    from rtlm_adapt.experiment import Workload, run_policy

    engine = EngineSpec(max_num_seqs=1, kv_cache_tokens=4096)
    cost = cost_with(engine, max_batch_size=8)
    lengths = [50, 40, 30, 20, 10, 5, 3, 1]
    # longest first, 50 ms apart (more than a step): each enters the engine as it arrives (cap
    # 8), in arrival order, while the first one runs (50 steps of ~12 ms)
    requests = [make_request(f"r{n}", i * 0.05, n, deadline=100.0) for i, n in enumerate(lengths)]
    workload = Workload(requests, 1.0, 1.0, 1.0, 1.0, "a burst")
    run = run_policy("oracle-sjf", workload, primary_cost=cost)
    order = [c.request_id for c in sorted(run.completions, key=lambda c: c.finish_time)]
    assert order == ["r50"] + [f"r{n}" for n in sorted(lengths[1:])]


def test_serving_env_steps_on_a_vllm_profile():
    pytest.importorskip("gymnasium")
    from rtlm_adapt.envs import ServingEnv

    env = ServingEnv(profile="vllm-cpu-smollm2-135m", secondary_profile=None, n_requests=20)
    env.reset(seed=0)
    assert isinstance(env.loop._lanes[0].executor, EngineExecutor)
    done, steps = False, 0
    while not done and steps < 1000:
        _, reward, done, _, info = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
        assert math.isfinite(reward)
        steps += 1
    assert done and info["completed"] == 20


def test_simulate_on_a_small_cache_reports_preemptions(alpaca_file, tmp_path, capsys):
    from rtlm_adapt.cli import main

    cost = StepCost.load("vllm-cpu-smollm2-135m")
    small = StepCost.from_dict(
        {**json.loads(cost.to_json()), "name": "small-kv", "max_batch_size": 16,
         "engine": {"max_num_seqs": 16, "kv_cache_tokens": 4096, "block_size": 16}}
    )  # fmt: skip
    profile = tmp_path / "small-kv.json"
    small.save(profile)
    out = tmp_path / "sim.json"
    args = ["simulate", "--prompts", str(alpaca_file), "--requests", "150", "--tokenizer",
            "words", "--profile", str(profile), "--secondary-profile", "none", "--load", "1.0",
            "--policies", "fcfs,oracle-sjf", "--json", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "preemptions in the engine" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert all(p["completed"] == 150 for p in data["policies"].values())
    assert data["policies"]["fcfs"]["preemptions"] > 0


def test_profile_engine_vllm_refits_the_packaged_cpu_profile(tmp_path, capsys):
    """``profile --engine vllm --from-run`` on section 7.1's recorded run gives the packaged
    vLLM-CPU profile's coefficients (which were rounded from it)."""
    from conftest import data_dir

    from rtlm_adapt.cli import main

    run = Path(__file__).resolve().parents[1] / "benchmarks/results/gateway_vllm_load0.9.json"
    if data_dir() is None or not (data_dir() / "alpaca_eval").exists():
        pytest.skip("the AlpacaEval data is not present")
    out = tmp_path / "fit.json"
    assert main(["profile", "--engine", "vllm", "--from-run", str(run), "--out", str(out)]) == 0
    fitted, packaged = StepCost.load(out), StepCost.load("vllm-cpu-smollm2-135m")
    for key in ("decode_s_base", "prefill_s_base", "prefill_s_per_token"):
        assert getattr(fitted, key) == pytest.approx(getattr(packaged, key), rel=2e-3)
    assert fitted.engine == packaged.engine
    bad = tmp_path / "hf.json"
    bad.write_text(json.dumps({"policies": {}}))
    assert main(["profile", "--engine", "vllm", "--from-run", str(bad), "--out", str(out)]) != 0
    assert "not a serve-bench --engine vllm run" in capsys.readouterr().err


def test_cancelling_a_request_in_the_engine_aborts_it_and_frees_its_blocks():
    """Through the serving loop: a request waiting in the engine and one running are cancelled;
    they end as cancelled, their blocks come back, the others finish."""
    from rtlm_adapt.controller import AdaptiveController
    from rtlm_adapt.serving.loop import ServingLoop

    cost = cost_with(EngineSpec(max_num_seqs=2, kv_cache_tokens=4096), max_batch_size=4)
    ex = EngineExecutor("primary", cost)
    ctl = AdaptiveController("fcfs", profiles={"primary": cost})
    loop = ServingLoop(ctl, ex)
    lengths = [200, 400, 50, 50]
    loop.add_requests([make_request(f"r{i}", 0.0, n, deadline=1e3) for i, n in enumerate(lengths)])
    loop.advance(0.5)  # r0 and r1 run (2 seats); r2 and r3 wait in the engine's queue
    assert [s.request.id for s in ex.scheduler.waiting] == ["r2", "r3"]
    assert [s.request.id for s in ex.scheduler.running] == ["r1"]  # r0 ends in this fused step
    held = ex.scheduler.kv.num_blocks - ex.scheduler.kv.free_blocks
    assert loop.cancel("r1") and loop.cancel("r3")
    loop.advance(0.6)  # the loop aborts r1 in the engine: its blocks come back at once
    assert ex.scheduler.kv.num_blocks - ex.scheduler.kv.free_blocks < held
    loop.advance(math.inf)
    ended = {c.request_id: c for c in loop.result.completions}
    assert {rid for rid, c in ended.items() if c.error} == {"r1", "r3"}
    assert (ended["r0"].output_tokens, ended["r2"].output_tokens) == (200, 50)
    assert ex.running() == 0 and ex.scheduler.kv.free_blocks == ex.scheduler.kv.num_blocks
