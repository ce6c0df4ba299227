"""Property-based tests: random interleavings of submit / schedule / finish / fail / cancel /
abort / save / load keep the accounting exact, and the hard aging bound is honoured."""

import collections
import math

import numpy as np
from conftest import make_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rtlm_adapt import Completion, Knobs
from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.policies import FixedPolicy
from rtlm_adapt.request import QueueFullError
from rtlm_adapt.serving.base import ExecutorState
from rtlm_adapt.serving.faults import FaultyExecutor
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.sim import SimulatedExecutor

COST = StepCost("t", decode_s_base=0.02, decode_s_per_seq=0.004, decode_s_per_ctx_token=0.0,
                prefill_s_base=0.01, prefill_s_per_token=1e-4, max_batch_size=4)

MAX_WAIT = 3.0


class ControllerMachine(RuleBasedStateMachine):
    """A model of which requests are live, checked against the controller after every step."""

    def __init__(self):
        super().__init__()
        # shortest-first with a hard aging bound: the adversarial case for starvation
        policy = FixedPolicy("sjf-aged", Knobs(max_wait_s=MAX_WAIT), length_source="oracle")
        self.ctl = AdaptiveController(policy, max_queue=12)
        self.now = 0.0
        self.n = 0
        self.queued: dict[str, float] = {}  # id -> arrival
        self.running: set[str] = set()
        self.ended: set[str] = set()
        self.base_submitted = 0  # counters carried over by load()
        self.base_ended = 0
        self.rejected = 0

    # -- rules -----------------------------------------------------------------------------------
    @rule(length=st.integers(1, 2000), dt=st.floats(0.0, 2.0))
    def submit(self, length, dt):
        self.now += dt
        rid = f"r{self.n}"
        self.n += 1
        try:
            self.ctl.submit(make_request(rid, self.now, length))
        except QueueFullError:
            self.rejected += 1
            self.ended.add(rid)
            return
        self.queued[rid] = self.now

    @rule(room=st.integers(1, 4), dt=st.floats(0.0, 2.0), role=st.sampled_from(["p", "s"]))
    def schedule(self, room, dt, role):
        self.now += dt
        state = ExecutorState(role, "primary" if role == "p" else "secondary", 0, room, self.now)
        overdue = sorted(
            (arr, int(rid[1:]), rid) for rid, arr in self.queued.items()
            if self.now - arr >= MAX_WAIT
        )
        batch = [r.id for r in self.ctl.next_batch(state)]
        for rid in batch:
            assert rid in self.queued, f"{rid} handed out but not waiting"
            del self.queued[rid]
            self.running.add(rid)
        if role == "p":
            # the aging bound: overdue requests go first, oldest first, before anyone else
            expected = [rid for _, _, rid in overdue][: len(batch)]
            assert batch[: len(expected)] == expected
            if len(overdue) <= room:
                assert all(self.now - a < MAX_WAIT for a in self.queued.values()), "starved"

    @precondition(lambda self: self.running)
    @rule(data=st.data(), error=st.sampled_from([None, None, "executor_failure: boom",
                                                  "timed_out: slow", "weird text"]))
    def finish(self, data, error):
        rid = data.draw(st.sampled_from(sorted(self.running)))
        self.ctl.on_finish(Completion(rid, 5, 0.0, 0.0, self.now, "p", error=error))
        self.running.discard(rid)
        self.ended.add(rid)

    @precondition(lambda self: self.queued or self.running)
    @rule(data=st.data())
    def cancel(self, data):
        rid = data.draw(st.sampled_from(sorted(self.queued) + sorted(self.running)))
        got = self.ctl.cancel(rid)
        if rid in self.queued:
            assert got is not None and got.id == rid
            del self.queued[rid]
            self.ended.add(rid)
        else:
            assert got is None  # running: marked; the loop aborts it (rule abort_marked)
            assert self.ctl.cancel(rid) is None  # idempotent

    @rule()
    def abort_marked(self):
        for rid in self.ctl.take_cancellations():
            assert rid in self.running
            self.ctl.on_finish(Completion(rid, 0, 0.0, 0.0, self.now, "p", error="cancelled: x"))
            self.running.discard(rid)
            self.ended.add(rid)

    @rule()
    def save_and_load(self):
        data = self.ctl.state_bytes()
        probe = {"prompt_tokens_est": 12.0, "uncertainty": 0.3}
        before = self.ctl.predictor.predict_one(dict(probe))
        self.ctl = AdaptiveController.from_state_bytes(data)
        assert self.ctl.predictor.predict_one(dict(probe)) == before
        # live requests die with the old process: counted as shutdown failures
        self.ended |= set(self.queued) | self.running
        self.queued.clear()
        self.running.clear()

    @rule()
    def damaged_load_is_refused(self):
        data = self.ctl.state_bytes()
        try:
            AdaptiveController.from_state_bytes(data[: len(data) // 2])
        except ValueError:
            return
        raise AssertionError("a truncated state loaded")

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def accounting_balances(self):
        s = self.ctl.stats()
        assert s.balanced
        assert s.queued == len(self.queued) and s.running == len(self.running)
        assert s.submitted == self.n
        assert s.finished + s.failed == len(self.ended)
        assert s.failures["rejected"] == self.rejected
        assert not (set(self.queued) & self.running & self.ended)
        assert math.isfinite(self.now)


TestControllerMachine = ControllerMachine.TestCase
TestControllerMachine.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    fault_rate=st.floats(0.0, 0.3),
    garbage_rate=st.floats(0.0, 0.3),
    retries=st.integers(0, 2),
    cancel_every=st.integers(3, 50),
    drain=st.booleans(),
)
def test_loop_ends_every_request_exactly_once(seed, fault_rate, garbage_rate, retries,
                                              cancel_every, drain):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(0.1, 120))
    reqs = [make_request(f"r{i}", float(t), int(rng.integers(1, 300)))
            for i, t in enumerate(arrivals)]
    ctl = AdaptiveController("heuristic", max_queue=40)
    loop = ServingLoop(
        ctl,
        FaultyExecutor(SimulatedExecutor("p", COST), fault_rate, garbage_rate, seed=seed),
        FaultyExecutor(SimulatedExecutor("s", COST), fault_rate, garbage_rate, seed=seed + 1),
        max_retries=retries, step_timeout_s=20.0,
    )
    loop.add_requests(reqs)
    t = 0.0
    while not loop.advance(t) and t < arrivals[-1] / 2:
        t += 0.5
        for r in reqs[:: cancel_every]:
            loop.cancel(r.id)
    loop.shutdown(drain=drain)
    counts = collections.Counter(c.request_id for c in loop.result.completions)
    assert set(counts) == {r.id for r in reqs} and max(counts.values()) == 1
    s = ctl.stats()
    assert s.balanced and s.queued == s.running == 0
    assert s.finished == loop.result.completed
    assert s.submitted == len(reqs)
    assert s.finished + s.failed == loop.result.completed + loop.result.failed
