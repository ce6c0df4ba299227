"""Reliability: accounting with reasons, cancellation, shutdown, executor faults, persistence,
hostile input and concurrency."""

import asyncio
import collections
import os
import threading
import time

import numpy as np
import pytest
from conftest import make_request

from rtlm_adapt import Completion, Knobs, Request
from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.policies import FixedPolicy
from rtlm_adapt.request import TRUE_LENGTH_KEY, ControllerClosedError, QueueFullError
from rtlm_adapt.serving.base import ExecutorState, StepResult
from rtlm_adapt.serving.faults import FaultyExecutor
from rtlm_adapt.serving.frontend import AsyncServer
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.sim import SimulatedExecutor

COST = StepCost("t", decode_s_base=0.02, decode_s_per_seq=0.004, decode_s_per_ctx_token=0.0,
                prefill_s_base=0.01, prefill_s_per_token=1e-4, max_batch_size=8)


def workload(n=400, seed=0, rate=12.0):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    lengths = np.maximum(1, rng.lognormal(3.0, 1.0, n).astype(int))
    return [make_request(f"r{i}", float(t), int(k), deadline=float(t) + 10.0)
            for i, (t, k) in enumerate(zip(arrivals, lengths, strict=True))]


def make_loop(policy="heuristic", fault_rate=0.0, garbage_rate=0.0, secondary=True, **kw):
    ctl = AdaptiveController(policy, profiles={"p": COST, "s": COST})
    p = FaultyExecutor(SimulatedExecutor("p", COST), fault_rate, garbage_rate, seed=1)
    s = FaultyExecutor(SimulatedExecutor("s", COST), fault_rate, garbage_rate, seed=2)
    return ctl, ServingLoop(ctl, p, s if secondary else None, **kw)


def ends_once(completions, requests):
    counts = collections.Counter(c.request_id for c in completions)
    assert set(counts) == {r.id for r in requests}, "a request was lost"
    assert max(counts.values()) == 1, "a request ended twice"


def reasons(completions):
    return collections.Counter(c.error.split(":")[0] for c in completions if c.error)


def state(now, running=0, cap=8, role="primary"):
    return ExecutorState(role, role, running, cap, now)


# -- accounting, cancellation, shutdown ------------------------------------------------------------
def test_rejections_and_closed_controller_are_counted_with_reasons():
    ctl = AdaptiveController("fcfs", max_queue=3)
    for i in range(5):
        try:
            ctl.submit(make_request(f"r{i}", 0.0, 5))
        except QueueFullError:
            pass
    ctl.close()
    with pytest.raises(ControllerClosedError):
        ctl.submit(make_request("late", 0.0, 5))
    s = ctl.stats()
    assert (s.submitted, s.queued, s.failed) == (6, 3, 3)
    assert s.failures["rejected"] == 2 and s.failures["shutdown"] == 1 and s.balanced
    assert [r.id for r in ctl.fail_queued("shutdown")] == ["r0", "r1", "r2"]
    assert ctl.stats().failures["shutdown"] == 4 and ctl.stats().balanced


def test_cancel_queued_and_running_requests_through_the_loop():
    ctl, loop = make_loop("fcfs", secondary=False)
    reqs = workload(60, rate=50.0)
    loop.add_requests(reqs)
    loop.advance(0.5)
    running = [rid for rid in loop._lanes[0].inflight][:3]
    queued = [r.id for r in reqs if r.id not in loop._lanes[0].inflight
              and r.arrival_time <= 0.5][-2:]
    assert running and queued
    for rid in running + queued:
        assert loop.cancel(rid)
    assert not loop.cancel("nobody")
    loop.advance(float("inf"))
    ends_once(loop.result.completions, reqs)
    by_id = {c.request_id: c for c in loop.result.completions}
    assert all(by_id[rid].error.startswith("cancelled") for rid in running + queued)
    s = ctl.stats()
    assert s.balanced and s.failures["cancelled"] == 5 and s.finished == len(reqs) - 5


@pytest.mark.parametrize("drain", [True, False])
def test_graceful_shutdown_drains_or_fails_what_is_left(drain):
    ctl, loop = make_loop("heuristic")
    reqs = workload(200, rate=40.0)
    loop.add_requests(reqs)
    loop.advance(2.0)
    res = loop.shutdown(drain=drain)
    ends_once(res.completions, reqs)
    s = ctl.stats()
    assert s.balanced and s.queued == s.running == 0 and loop.done
    r = reasons(res.completions)
    assert r["shutdown"] > 0  # arrivals after t=2 never got in
    if drain:
        assert s.finished == len(reqs) - r["shutdown"]
    else:
        assert s.finished < len(reqs) - sum(1 for q in reqs if q.arrival_time > 2.0)


# -- executor faults -------------------------------------------------------------------------------
def test_injected_faults_and_garbage_never_lose_or_duplicate_a_request():
    ctl, loop = make_loop("heuristic", fault_rate=0.05, garbage_rate=0.05, step_timeout_s=20.0)
    reqs = workload(1500, rate=20.0)
    res = loop.run(reqs)
    ends_once(res.completions, reqs)
    s = ctl.stats()
    assert s.balanced and s.finished == res.completed and s.failed == res.failed
    assert res.faults > 0 and res.garbage > 0 and res.retries > 0
    assert set(reasons(res.completions)) <= {"executor_failure", "timed_out"}
    # learning saw only the successes
    assert ctl.predictor.n_learned == s.finished
    by_id = {r.id: r for r in reqs}
    for c in res.completions:
        if c.ok:
            assert c.output_tokens == by_id[c.request_id].true_output_tokens


def test_a_failing_executor_hands_its_requests_to_the_other_one():
    ctl = AdaptiveController("fcfs", profiles={"p": COST, "s": COST})
    broken = FaultyExecutor(SimulatedExecutor("p", COST), fault_rate=1.0, kinds=("raise",))
    loop = ServingLoop(ctl, broken, SimulatedExecutor("s", COST))
    reqs = workload(100)
    res = loop.run(reqs)
    ends_once(res.completions, reqs)
    assert all(c.ok and c.executor == "s" for c in res.completions)
    assert res.retries == len(reqs)


def test_retries_are_bounded_then_the_error_is_reported():
    ctl = AdaptiveController("fcfs", profiles={"p": COST})
    broken = FaultyExecutor(SimulatedExecutor("p", COST), fault_rate=1.0, kinds=("raise_after",))
    loop = ServingLoop(ctl, broken, max_retries=2)
    reqs = workload(20)
    res = loop.run(reqs)
    ends_once(res.completions, reqs)
    assert all(c.error.startswith("executor_failure") and "InjectedFault" in c.error
               for c in res.completions)
    assert ctl.stats().failures["executor_failure"] == 20 and ctl.predictor.n_learned == 0


def test_virtual_hang_times_out_and_moves_to_the_other_executor():
    ctl = AdaptiveController("fcfs", profiles={"p": COST, "s": COST})
    hung = FaultyExecutor(SimulatedExecutor("p", COST), fault_rate=1.0, kinds=("hang",))
    loop = ServingLoop(ctl, hung, SimulatedExecutor("s", COST), step_timeout_s=5.0, max_retries=1)
    reqs = workload(30)
    res = loop.run(reqs)
    ends_once(res.completions, reqs)
    assert all(c.ok and c.executor == "s" for c in res.completions)
    assert ctl.latency["p"].n_learned == 0  # hung timings are not learned


def test_wall_clock_hang_is_abandoned_and_served_elsewhere():
    ctl = AdaptiveController("fcfs", profiles={"p": COST, "s": COST})
    hung = FaultyExecutor(SimulatedExecutor("p", COST), fault_rate=1.0, kinds=("hang",),
                          hang_wall_s=0.3)
    loop = ServingLoop(ctl, hung, SimulatedExecutor("s", COST), wall_timeout_s=0.05)
    reqs = workload(30)
    t0 = time.perf_counter()
    res = loop.run(reqs)
    ends_once(res.completions, reqs)
    assert sum(c.ok for c in res.completions) == len(reqs)
    assert time.perf_counter() - t0 < 10.0


class LyingExecutor(SimulatedExecutor):
    """Reports finished requests it never had, twice, and silently drops one."""

    def step(self, now, until=float("inf")):
        result = super().step(now, until)
        if result.finished:
            c = result.finished[0]
            result.finished += [c, Completion("ghost", 3, 0.0, 0.0, 1.0, self.name)]
        if len(self._slots) > 1 and not getattr(self, "_dropped", False):
            self._dropped = True
            del self._slots[0]  # lost without a word
        return result


def test_unknown_duplicate_and_lost_requests_are_handled():
    ctl = AdaptiveController("fcfs", profiles={"p": COST})
    loop = ServingLoop(ctl, LyingExecutor("p", COST), max_retries=1)
    reqs = workload(50, rate=40.0)
    res = loop.run(reqs)
    ends_once(res.completions, reqs)
    assert res.dropped > 0 and all(c.ok for c in res.completions)  # the lost one was retried
    assert ctl.stats().balanced


def test_garbage_step_result_is_not_learned():
    ctl = AdaptiveController("fcfs", profiles={"p": COST})
    ctl.next_batch(state(0.0))
    before = ctl.latency["primary"].n_learned
    ctl.on_step("primary", StepResult(float("nan"), 1, 1))
    assert ctl.latency["primary"].n_learned == before


# -- persistence ----------------------------------------------------------------------
def trained_controller(n=300):
    ctl = AdaptiveController("heuristic", profiles={"p": COST})
    loop = ServingLoop(ctl, SimulatedExecutor("p", COST))
    loop.run(workload(n))
    return ctl


PROMPTS = ["Write a long story about the sea.", "Name one prime.", "Explain TCP in depth.",
           "Translate 'bonjour' to English."]


def test_save_load_roundtrip_predicts_identically(tmp_path):
    ctl = trained_controller()
    path = tmp_path / "ctl.state"
    ctl.save(path)
    assert os.listdir(tmp_path) == ["ctl.state"]  # no temp file left behind
    back = AdaptiveController.load(path)
    for p in PROMPTS:
        f = ctl.scorer.features(p)
        f["uncertainty"] = ctl.scorer.score(f)
        assert back.predictor.predict_one(dict(f)) == ctl.predictor.predict_one(dict(f))
    for name, model in ctl.latency.items():
        assert back.latency[name].coefficients() == model.coefficients()
    assert back.knobs == ctl.knobs and back.stats() == ctl.stats()
    assert back.predictor.n_learned == ctl.predictor.n_learned > 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "version", "empty", "foreign"])
def test_damaged_state_files_give_a_clear_error(tmp_path, damage):
    path = tmp_path / "ctl.state"
    trained_controller(50).save(path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0xFF
    elif damage == "version":
        data[8:12] = (99).to_bytes(4, "big")
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"#!/bin/sh\necho not a state file\n" * 3)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated|corrupted|version|not an rtlm_adapt"):
        AdaptiveController.load(path)


def test_autosave_every_n_requests_and_in_flight_counted_as_shutdown(tmp_path):
    path = tmp_path / "auto.state"
    ctl = AdaptiveController("fcfs", autosave_path=path, autosave_every=10)
    for i in range(25):
        ctl.submit(make_request(f"r{i}", 0.0, 5))
    for r in ctl.next_batch(state(0.0, cap=25)):
        if r.id != "r24":
            ctl.on_finish(Completion(r.id, 5, 0.0, 0.0, 1.0, "primary"))
    back = AdaptiveController.load(path)
    s = back.stats()
    # saved after the 20th end: 20 finished, 5 still live -> counted as shut down on restart
    assert (s.finished, s.failures["shutdown"], s.submitted) == (20, 5, 25) and s.balanced


# -- hostile and odd input ----------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["", "   \n\t  "])
def test_empty_and_whitespace_prompts_are_refused(prompt):
    with pytest.raises(ValueError, match="prompt"):
        Request("x", prompt, 0.0)


def test_bytes_prompt_and_bad_deadlines_are_refused():
    with pytest.raises(ValueError):
        Request("x", b"\x00\xff", 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="deadline"):
        Request("x", "hi", 5.0, deadline=1.0)
    with pytest.raises(ValueError, match="finite"):
        Request("x", "hi", 0.0, deadline=float("nan"))


def test_odd_but_valid_prompts_are_scheduled_and_served():
    odd = {
        "huge": "word " * 200_000,  # 1 MB
        "binary": "\x00\x01\x02\ufffd\x7f garbage \x1b[31m",
        "mixed": "Explique 日本語 and العربية with emoji 🤖🚀🔥 — пожалуйста?",
        "emoji": "🙂" * 500,
        "rtl": "\u202eevil override\u202c?",
    }
    ctl = AdaptiveController("heuristic", profiles={"p": COST})
    loop = ServingLoop(ctl, SimulatedExecutor("p", COST))
    reqs = [Request(k, v, 0.0, metadata={TRUE_LENGTH_KEY: 7}) for k, v in odd.items()]
    t0 = time.perf_counter()
    res = loop.run(reqs)
    assert time.perf_counter() - t0 < 2.0
    ends_once(res.completions, reqs)
    assert all(c.ok and c.output_tokens == 7 for c in res.completions)


def test_deadlines_already_past_are_still_served_first_under_edf():
    policy = FixedPolicy("edf", Knobs(length_weight=0.0, slack_weight=1.0))
    ctl = AdaptiveController(policy)
    ctl.submit(make_request("later", 0.0, 5, deadline=100.0))
    ctl.submit(make_request("overdue", 0.0, 5, deadline=0.0))
    assert [r.id for r in ctl.next_batch(state(50.0, cap=1))] == ["overdue"]


def test_flood_of_identical_prompts_and_a_burst_of_10000_with_a_queue_bound():
    ctl = AdaptiveController("heuristic", max_queue=2000)
    rejected = 0
    t0 = time.perf_counter()
    for i in range(10_000):
        try:
            ctl.submit(make_request(f"r{i}", i * 1e-4, 20))
        except QueueFullError:
            rejected += 1
    elapsed = time.perf_counter() - t0
    s = ctl.stats()
    assert len(ctl) == 2000 and rejected == 8000 and s.failures["rejected"] == 8000
    assert s.submitted == 10_000 and s.balanced
    assert elapsed < 10.0
    with pytest.raises(ValueError, match="duplicate"):
        ctl.submit(make_request("r0", 1.0, 20))
    # identical prompts are served like any others
    served = ctl.next_batch(state(1.0, cap=64))
    assert len(served) == 64


def test_loop_reports_rejections_as_failed_completions():
    ctl = AdaptiveController("fcfs", max_queue=5)
    loop = ServingLoop(ctl, SimulatedExecutor("p", COST))
    reqs = [make_request(f"r{i}", 0.0, 50) for i in range(40)]
    res = loop.run(reqs)
    ends_once(res.completions, reqs)
    assert reasons(res.completions)["rejected"] == res.rejected > 0
    assert ctl.stats().failures["rejected"] == res.rejected and ctl.stats().balanced


# -- concurrency ----------------------------------------------------------------------
@pytest.mark.slow  # a soak of 20,000 requests: ~4 s
def test_64_threads_and_256_asyncio_tasks_20000_requests():
    ctl = AdaptiveController("fcfs", profiles={"p": COST, "s": COST})
    loop = ServingLoop(
        ctl,
        SimulatedExecutor("p", COST, max_batch_size=64),
        SimulatedExecutor("s", COST, max_batch_size=64),
        keep_completions=False,
    )
    server = AsyncServer(loop).start()
    n_threads, per_thread = 64, 125  # 8,000 from threads
    n_tasks, per_task = 256, 46  # 11,776 from asyncio tasks ...
    extra = 20_000 - n_threads * per_thread - n_tasks * per_task  # ... and the rest
    results: list = []
    lock = threading.Lock()

    def worker(t):
        futures = [server.submit(make_request(f"t{t}-{i}", 0.0, 1 + i % 9))
                   for i in range(per_thread)]
        done = [f.result(timeout=120) for f in futures]
        with lock:
            results.extend(done)

    async def task(k, count):
        out = []
        for i in range(count):
            out.append(await server.generate(make_request(f"a{k}-{i}", 0.0, 1 + i % 7)))
        return out

    async def main():
        jobs = [task(k, per_task) for k in range(n_tasks)] + [task("x", extra)]
        return [c for chunk in await asyncio.gather(*jobs) for c in chunk]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    from_tasks = asyncio.run(main())
    for th in threads:
        th.join()
    server.stop()
    everything = results + from_tasks
    assert len(everything) == 20_000
    ids = collections.Counter(c.request_id for c in everything)
    assert len(ids) == 20_000 and max(ids.values()) == 1
    s = ctl.stats()
    assert s.submitted == s.finished == 20_000 and s.balanced and server.pending == 0
    assert loop.result.completed == 20_000 and loop.result.completions == []


def test_controller_is_safe_under_many_threads():
    ctl = AdaptiveController("fcfs")
    n_threads, per = 16, 200
    barrier = threading.Barrier(n_threads + 2)
    stop = threading.Event()

    def producer(t):
        barrier.wait()
        for i in range(per):
            ctl.submit(make_request(f"t{t}-{i}", 0.0, 3))

    def consumer(name):
        barrier.wait()
        while not stop.is_set() or len(ctl):
            for r in ctl.next_batch(ExecutorState(name, "primary", 0, 16, 0.0)):
                ctl.on_finish(Completion(r.id, 3, 0.0, 0.0, 0.1, name))

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(n_threads)]
    consumers = [threading.Thread(target=consumer, args=(f"c{k}",)) for k in range(2)]
    for th in threads + consumers:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    for th in consumers:
        th.join()
    s = ctl.stats()
    assert s.submitted == s.finished == n_threads * per and s.balanced


def test_cancelling_an_awaiting_task_cancels_the_request():
    ctl = AdaptiveController("fcfs", profiles={"p": COST})
    loop = ServingLoop(ctl, SimulatedExecutor("p", COST, max_batch_size=1))

    async def main():
        async with AsyncServer(loop, slice_s=0.01) as server:
            big = asyncio.create_task(server.generate(make_request("big", 0.0, 100_000)))
            waiting = asyncio.create_task(server.generate(make_request("w", 0.0, 5)))
            # wait until the driver thread has handed both to the controller (not a fixed
            # sleep: on a loaded machine that thread may not have run yet)
            for _ in range(500):
                if ctl.stats().submitted == 2:
                    break
                await asyncio.sleep(0.01)
            waiting.cancel()
            big.cancel()
            for t in (big, waiting):
                with pytest.raises(asyncio.CancelledError):
                    await t
    asyncio.run(main())
    s = ctl.stats()
    assert s.balanced and s.failures["cancelled"] == 2 and s.running == s.queued == 0


def test_async_server_names_a_bad_argument():
    loop = ServingLoop(AdaptiveController("fcfs"), SimulatedExecutor("gpu", StepCost.default()))
    with pytest.raises(TypeError, match="AsyncServer needs a ServingLoop, got str"):
        AsyncServer("loop")  # type: ignore[arg-type]
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="slice_s must be a finite number > 0"):
            AsyncServer(loop, slice_s=bad)
