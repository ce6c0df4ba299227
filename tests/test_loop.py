import numpy as np
import pytest
from conftest import make_request

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.metrics import summarize
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.sim import SimulatedExecutor

COST = StepCost(
    "t",
    decode_s_base=0.02,
    decode_s_per_seq=0.004,
    decode_s_per_ctx_token=0.0,
    prefill_s_base=0.01,
    prefill_s_per_token=1e-4,
    max_batch_size=4,
)
SLOW = StepCost(
    "s",
    decode_s_base=0.05,
    decode_s_per_seq=0.01,
    decode_s_per_ctx_token=0.0,
    prefill_s_base=0.02,
    prefill_s_per_token=2e-4,
    max_batch_size=2,
)


def workload(n=300, seed=0, rate=6.0):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    lengths = np.maximum(1, rng.lognormal(3.0, 1.2, n).astype(int))
    return [
        make_request(f"r{i}", float(t), int(n_), deadline=float(t) + 5.0)
        for i, (t, n_) in enumerate(zip(arrivals, lengths, strict=True))
    ]


def run(policy, reqs, batching="continuous", secondary=False):
    ctl = AdaptiveController(
        policy, batching=batching, profiles={"primary": COST, "secondary": SLOW}
    )
    loop = ServingLoop(
        ctl,
        SimulatedExecutor("primary", COST, batching=batching),
        SimulatedExecutor("secondary", SLOW, batching=batching) if secondary else None,
        batching=batching,
    )
    res = loop.run(reqs)
    return ctl, res


@pytest.mark.parametrize("batching", ["continuous", "static"])
@pytest.mark.parametrize("policy", ["fcfs", "oracle-sjf", "heuristic", "sjf-prompt"])
def test_every_request_completes_exactly_once(policy, batching):
    reqs = workload()
    ctl, res = run(policy, reqs, batching, secondary=True)
    ids = [c.request_id for c in res.completions]
    assert sorted(ids) == sorted(r.id for r in reqs)
    by_id = {r.id: r for r in reqs}
    for c in res.completions:
        assert c.output_tokens == by_id[c.request_id].true_output_tokens
        assert c.arrival_time <= c.start_time <= c.finish_time
    assert ctl.stats().balanced and ctl.stats().finished == len(reqs)


def test_shortest_first_beats_fcfs_on_heavy_tailed_lengths():
    reqs = workload(n=600, rate=9.0)
    fcfs = summarize(run("fcfs", reqs)[1].completions)
    sjf = summarize(run("oracle-sjf", reqs)[1].completions)
    assert sjf.mean_rt_s < 0.9 * fcfs.mean_rt_s


def test_offloading_uses_the_secondary_under_load():
    reqs = workload(n=400, rate=12.0)
    _, res = run("heuristic+oracle", reqs, secondary=True)
    on_secondary = [c for c in res.completions if c.executor == "secondary"]
    assert on_secondary, "the heuristic never offloaded under overload"
    _, res_fcfs = run("fcfs", reqs, secondary=True)
    assert all(c.executor == "primary" for c in res_fcfs.completions)


def test_advance_in_epochs_matches_one_run():
    reqs = workload(n=200)
    _, whole = run("heuristic+oracle", reqs)
    ctl = AdaptiveController("heuristic+oracle", profiles={"primary": COST})
    loop = ServingLoop(ctl, SimulatedExecutor("primary", COST))
    loop.add_requests(reqs)
    t = 0.0
    while not loop.advance(t):
        t += 0.5
    a = sorted((c.request_id, round(c.finish_time, 9)) for c in whole.completions)
    b = sorted((c.request_id, round(c.finish_time, 9)) for c in loop.result.completions)
    assert len(a) == len(b)
    assert np.mean([x[1] for x in a]) == pytest.approx(np.mean([x[1] for x in b]), rel=0.05)


def test_same_seed_same_result():
    reqs = workload(n=150)
    a = run("heuristic", reqs)[1].completions
    b = run("heuristic", reqs)[1].completions
    assert [(c.request_id, c.finish_time) for c in a] == [(c.request_id, c.finish_time) for c in b]


def test_unknown_batching_mode_is_rejected():
    with pytest.raises(ValueError, match="batching"):
        ServingLoop(AdaptiveController("fcfs"), SimulatedExecutor("p", COST), batching="dynamic")


def test_add_requests_checks_every_request_even_from_a_generator():
    loop = ServingLoop(AdaptiveController("fcfs"), SimulatedExecutor("p", COST))
    loop.advance(1.0)
    early = make_request("early", 0.5, 3)
    with pytest.raises(ValueError, match="'early' arrives at 0.5, before the loop's time 1.0"):
        loop.add_requests(r for r in [early])  # a generator used to skip the check
    with pytest.raises(TypeError, match="add_requests\\(\\) takes Requests, got str"):
        loop.add_requests(["r0"])
    loop.add_requests(r for r in workload(5, rate=1.0) if r.arrival_time >= 1.0)
    result = loop.run()
    assert len(result.completions) == sum(r.arrival_time >= 1.0 for r in workload(5, rate=1.0))
