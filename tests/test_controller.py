import math

import pytest
from conftest import make_request

from rtlm_adapt import Completion, Knobs, Request
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.policies import FixedPolicy
from rtlm_adapt.request import QueueFullError
from rtlm_adapt.serving.base import ExecutorState, StepResult


def state(now, running=0, cap=8, role="primary", name=None):
    return ExecutorState(name or role, role, running, cap, now)


def finish(ctl, req, now, tokens=None, error=None, executor="primary"):
    ctl.on_finish(
        Completion(
            req.id,
            tokens if tokens is not None else req.true_output_tokens,
            req.arrival_time,
            req.arrival_time,
            now,
            executor,
            deadline=req.deadline,
            error=error,
        )
    )


def test_oracle_sjf_hands_out_shortest_first():
    ctl = AdaptiveController("oracle-sjf")
    for i, n in enumerate([50, 5, 20, 400, 1]):
        ctl.submit(make_request(f"r{i}", 0.0, n))
    batch = ctl.next_batch(state(0.0, cap=3))
    assert [r.id for r in batch] == ["r4", "r1", "r2"]
    assert [r.id for r in ctl.next_batch(state(0.0, running=3, cap=5))] == ["r0", "r3"]


def test_fcfs_respects_arrival_order_and_batch_cap():
    ctl = AdaptiveController("fcfs")
    for i in range(10):
        ctl.submit(make_request(f"r{i}", float(i), 10 * (10 - i)))
    assert [r.id for r in ctl.next_batch(state(10.0, running=6, cap=8))] == ["r0", "r1"]
    assert ctl.next_batch(state(10.0, running=8, cap=8)) == []


def test_hard_aging_bound_beats_a_stream_of_short_requests():
    ctl = AdaptiveController(FixedPolicy("sjf-aged", Knobs(max_wait_s=5.0), length_source="oracle"))
    ctl.submit(make_request("long", 0.0, 1000))
    started = None
    for t in range(1, 20):
        ctl.submit(make_request(f"s{t}", float(t), 2))
        batch = ctl.next_batch(state(float(t), cap=1))
        for r in batch:
            if r.id == "long":
                started = t
            finish(ctl, r, float(t))
    assert started == 5  # waited exactly the bound, although shorter requests kept coming


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_aged_requests_go_first_whatever_the_order_of_arrivals(batching):
    # The controller skips looking at the oldest request until one can have aged; out-of-order
    # arrivals, requests put back by consolidation and knob changes must not delay an aged one.
    import random

    rng = random.Random(3)
    ctl = AdaptiveController(
        FixedPolicy("sjf-aged", Knobs(max_wait_s=5.0), length_source="oracle"), batching=batching
    )
    waiting: dict[str, float] = {}
    now = 0.0
    for i in range(400):
        now += rng.uniform(0.0, 0.5)
        arrival = max(0.0, now - (rng.uniform(0.0, 8.0) if rng.random() < 0.1 else 0.0))
        ctl.submit(make_request(f"r{i}", arrival, rng.choice([1, 5, 50, 500])))
        waiting[f"r{i}"] = arrival
        if i % 50 == 0:
            ctl.set_knobs(Knobs(max_wait_s=rng.choice([3.0, 5.0, 8.0])))
        if rng.random() < 0.9:  # the queue stays short: aged requests are mostly late arrivals
            bound = ctl.knobs.max_wait_s
            aged = sorted((a, r) for r, a in waiting.items() if now - a >= bound)
            batch = ctl.next_batch(state(now, cap=1))
            got = [r.id for r in batch]
            # every aged request (up to the room) goes first, oldest first (a static batch
            # is then filled by length around its first request)
            n = 1 if batching == "static" else len(got)
            assert got[: min(n, len(aged))] == [r for _, r in aged][:n]
            for r in batch:
                del waiting[r.id]
                finish(ctl, r, now)


def test_secondary_only_takes_offload_eligible_requests():
    ctl = AdaptiveController(
        FixedPolicy("p", Knobs(offload_threshold=100.0), length_source="oracle")
    )
    ctl.set_knobs(Knobs(offload_threshold=100.0))
    for i, n in enumerate([10, 500, 20, 900]):
        ctl.submit(make_request(f"r{i}", 0.0, n))
    # the threshold applies to the length the policy ranks by (true lengths here)
    sec = ctl.next_batch(state(0.0, cap=4, role="secondary"))
    assert sorted(r.id for r in sec) == ["r1", "r3"]
    assert [r.id for r in ctl.next_batch(state(0.0, cap=4))] == ["r0", "r2"]


def test_duplicate_and_unknown_ids_and_queue_limit():
    ctl = AdaptiveController("fcfs", max_queue=2)
    r = make_request("a", 0.0, 3)
    ctl.submit(r)
    with pytest.raises(ValueError, match="duplicate request id 'a'"):
        ctl.submit(make_request("a", 0.1, 3))
    ctl.submit(make_request("b", 0.0, 3))
    with pytest.raises(QueueFullError, match="queue is full"):
        ctl.submit(make_request("c", 0.0, 3))
    with pytest.raises(ValueError, match="not running"):
        finish(ctl, make_request("zz", 0.0, 3), 1.0)
    with pytest.raises(TypeError, match="Request"):
        ctl.submit({"id": "x"})
    with pytest.raises(ValueError, match="unknown policy"):
        AdaptiveController("round-robin")


@pytest.mark.parametrize(
    "fields, message",
    [
        (("gpu", "Primary", 0, 8, 0.0), "role must be 'primary' or 'secondary', got 'Primary'"),
        (("gpu", "primary", -1, 8, 0.0), "running must be >= 0, got -1"),
        (("gpu", "primary", 0, 0, 0.0), "max_batch_size must be >= 1, got 0"),
        (("gpu", "primary", "2", 8, 0.0), "running must be an int, got str"),
        (("gpu", "primary", 0, 8, math.nan), "now must be a finite time, got nan"),
        (("", "primary", 0, 8, 0.0), "name must be a non-empty string"),
        (("gpu", "secondary", 0, 8, 0.0, -5), "running_context_tokens must be >= 0"),
    ],
)
def test_executor_state_names_its_bad_field(fields, message):
    # a typo in the role would otherwise make the primary take only offloadable requests
    with pytest.raises((ValueError, TypeError), match=f"ExecutorState.{message}"):
        ExecutorState(*fields)


def test_wrong_argument_types_are_named():
    ctl = AdaptiveController("fcfs")
    ctl.submit(make_request("a", 0.0, 3))
    with pytest.raises(TypeError, match="next_batch\\(\\) takes an ExecutorState, got str"):
        ctl.next_batch("primary")
    (req,) = ctl.next_batch(state(0.0))
    with pytest.raises(TypeError, match="on_finish\\(\\) takes a Completion, got str"):
        ctl.on_finish(req.id)
    with pytest.raises(TypeError, match="on_step\\(\\) takes a StepResult, got dict"):
        ctl.on_step("primary", {"duration_s": 1.0})
    finish(ctl, req, 1.0)  # the request was not lost by the bad calls
    assert ctl.stats().finished == 1


def test_finished_requests_teach_the_predictor_and_stats_add_up():
    ctl = AdaptiveController("heuristic")
    reqs = [make_request(f"r{i}", 0.0, 30) for i in range(6)]
    for r in reqs:
        ctl.submit(r)
    batch = ctl.next_batch(state(0.0, cap=4))
    assert len(batch) == 4
    before = ctl.predictor.n_learned
    finish(ctl, batch[0], 1.0)
    finish(ctl, batch[1], 1.0, error="executor failed")
    assert ctl.predictor.n_learned == before + 1
    s = ctl.stats()
    assert (s.submitted, s.queued, s.running, s.finished, s.failed) == (6, 2, 2, 1, 1)
    assert s.balanced
    assert ctl.cancel(ctl.next_batch(state(1.0, cap=8))[0].id) is None  # running: not cancellable
    assert ctl.stats().balanced


def test_cancel_a_queued_request():
    ctl = AdaptiveController("fcfs")
    ctl.submit(make_request("a", 0.0, 3))
    assert ctl.cancel("a").id == "a"
    assert len(ctl) == 0 and ctl.stats().balanced and ctl.stats().failed == 1


def test_static_consolidation_groups_similar_predicted_lengths():
    ctl = AdaptiveController("oracle-sjf", batching="static")
    ctl.policy.consolidate = True
    for i, n in enumerate([10, 11, 500, 12, 480, 13, 520, 9]):
        ctl.submit(make_request(f"r{i}", 0.0, n))
    first = ctl.next_batch(state(0.0, cap=4))
    assert sorted(r.true_output_tokens for r in first) == [9, 10, 11, 12]


def test_observation_reflects_the_queue():
    ctl = AdaptiveController("heuristic")
    ctl.next_batch(state(0.0, running=8, cap=8))
    for i in range(20):
        ctl.submit(make_request(f"r{i}", float(i) * 0.1, 50, deadline=100.0))
    obs = ctl.observe(5.0)
    assert obs.queue_length == 20
    assert obs.oldest_wait_s == pytest.approx(5.0)
    assert obs.min_slack_s == pytest.approx(95.0)
    assert obs.pred_len_mean > 0 and 0 <= obs.uncertainty_mean <= 1
    vec = obs.as_vector()
    assert len(vec) == len(obs.VECTOR_FIELDS) and all(math.isfinite(v) for v in vec)


def test_set_knobs_rekeys_the_queue():
    ctl = AdaptiveController("fcfs")
    ctl.submit(Request("slow", "Write a long essay about history.", 0.0, prompt_tokens=900))
    ctl.submit(Request("quick", "Hi?", 1.0, prompt_tokens=2))
    ctl.set_knobs(Knobs(length_weight=0.0, wait_weight=-1.0))  # newest first
    assert ctl.next_batch(state(2.0, cap=1))[0].id == "quick"


def test_next_batch_limit_hands_out_one_at_a_time_in_key_order():
    # A router that spreads requests over backends asks for one at a time.
    ctl = AdaptiveController("oracle-sjf")
    for i, n in enumerate([50, 5, 20]):
        ctl.submit(make_request(f"r{i}", 0.0, n))
    taken = [ctl.next_batch(state(0.0, running=k, cap=8), limit=1) for k in range(3)]
    assert [[r.id for r in batch] for batch in taken] == [["r1"], ["r2"], ["r0"]]
    assert ctl.next_batch(state(0.0, running=3, cap=8), limit=1) == []


def test_next_batch_limit_still_honours_the_batch_cap():
    ctl = AdaptiveController(FixedPolicy("capped", Knobs(max_batch_size=2)))
    for i in range(4):
        ctl.submit(make_request(f"r{i}", 0.0, 10))
    assert len(ctl.next_batch(state(0.0, running=0, cap=8), limit=5)) == 2
    assert ctl.next_batch(state(0.0, running=2, cap=8), limit=1) == []


def test_withdraw_counts_the_reason_and_leaves_running_requests_alone():
    ctl = AdaptiveController("fcfs")
    for i in range(3):
        ctl.submit(make_request(f"r{i}", float(i), 10))
    [running] = ctl.next_batch(state(3.0, cap=1))
    assert ctl.withdraw("r1", "rejected").id == "r1"
    assert ctl.withdraw("r1", "rejected") is None  # already gone
    assert ctl.withdraw(running.id, "rejected") is None  # running: not withdrawn
    with pytest.raises(ValueError, match="unknown failure reason"):
        ctl.withdraw("r2", "bored")
    stats = ctl.stats()
    assert stats.failures["rejected"] == 1 and stats.queued == 1 and stats.running == 1
    assert stats.balanced


def test_entry_and_work_ahead_follow_the_queue_order():
    ctl = AdaptiveController("oracle-sjf")
    for i, n in enumerate([300, 10, 100]):
        ctl.submit(make_request(f"r{i}", 0.0, n))
    entries = {rid: ctl.entry(rid) for rid in ("r0", "r1", "r2")}
    assert entries["r1"].key < entries["r2"].key < entries["r0"].key
    assert ctl.work_ahead("r1") == 0.0
    assert ctl.work_ahead("r0") == pytest.approx(entries["r1"].service_s + entries["r2"].service_s)
    [first] = ctl.next_batch(state(0.0, cap=1))
    assert ctl.entry(first.id) is entries["r1"]  # running requests are still visible
    finish(ctl, first, 1.0)
    assert ctl.entry("r1") is None and ctl.work_ahead("r1") == 0.0


def test_a_step_that_computed_nothing_teaches_no_timing(caplog):
    # An engine waiting for a request on its way in reports a step of 0 iterations.
    ctl = AdaptiveController("fcfs")
    ctl.register_executor(state(0.0))
    ctl.on_step("primary", StepResult(duration_s=0.05, iterations=0, batch_size=0))
    assert ctl.latency["primary"].n_learned == 0
    assert "rejected step" not in caplog.text
    ctl.on_step("primary", StepResult(duration_s=0.05, iterations=2, batch_size=1))
    assert ctl.latency["primary"].n_learned == 1

