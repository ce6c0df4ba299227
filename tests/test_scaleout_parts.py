"""The Ray-free parts of the scale-out layer: the work book, the paced engine, the shared
learner and the front (the Ray Serve wiring is tests/test_ray_serve.py)."""

from __future__ import annotations

import asyncio
import math

import pytest

from rtlm_adapt.integrations.front import Front
from rtlm_adapt.integrations.learner import SharedLearner
from rtlm_adapt.integrations.paced_engine import PacedEngine, speed_for_rank
from rtlm_adapt.integrations.routing import WorkBook
from rtlm_adapt.knobs import Knobs
from rtlm_adapt.predictor import LengthPredictor


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_reservations_move_with_the_route_and_are_released_once():
    book = WorkBook()
    book.reserve("x", "a", 500.0, confirmed=False)  # ranked first: a
    book.reserve("x", "b", 500.0, confirmed=True)  # but routed to b
    assert book.load("a").reserved_tokens == 0 and book.load("b").reserved_tokens == 500
    assert book.release("x") and not book.release("x")
    assert book.load("b").reserved_tokens == 0 and book.holds() == 0


def test_ranking_is_by_predicted_seconds_with_each_replicas_reported_speed():
    book = WorkBook()
    book.reserve("1", "fast", 400.0, confirmed=True)
    book.reserve("2", "slow", 300.0, confirmed=True)
    assert book.rank(["fast", "slow"], offload=False) == ["slow", "fast"]
    book.report("fast", {"tokens_per_s": 400.0})  # 1 s of work
    book.report("slow", {"tokens_per_s": 100.0})  # 3 s of work
    assert book.rank(["fast", "slow"], offload=False) == ["fast", "slow"]


def test_a_replicas_report_shows_other_callers_load():
    book = WorkBook()
    book.report("a", {"outstanding_tokens": 1000.0})  # another caller's requests
    book.reserve("1", "b", 10.0, confirmed=True)
    assert book.rank(["a", "b"], offload=False)[0] == "b"


def test_long_group_first_for_offload_and_the_rest_ranked_by_work_alone():
    book = WorkBook()
    for i, replica in enumerate(["r1", "r2", "r3", "r4"]):
        book.reserve(str(i), replica, 100.0 * (i + 1), confirmed=True)
    ranked_long = book.rank(["r3", "r1", "r4", "r2"], offload=True, long_replicas=2)
    ranked_short = book.rank(["r3", "r1", "r4", "r2"], offload=False, long_replicas=2)
    assert ranked_long == ["r3", "r4", "r1", "r2"]  # the long group (r3, r4) first
    assert ranked_short == ["r1", "r2", "r3", "r4"]  # every replica by its work alone
    # No long group when it would take every replica.
    assert book.rank(["r1", "r2"], offload=True, long_replicas=2) == ["r1", "r2"]


def test_a_tentative_hold_lapses_and_a_departed_replica_is_forgotten():
    clock = FakeClock()
    book = WorkBook(tentative_ttl_s=5.0, clock=clock)
    book.reserve("never-sent", "a", 900.0, confirmed=False)
    book.reserve("sent", "b", 900.0, confirmed=True)
    clock.now = 6.0
    book.rank(["a", "b"], offload=False)
    assert book.load("a").reserved_tokens == 0 and book.load("b").reserved_tokens == 900
    book.forget(["a"])
    assert "b" not in book.loads and book.holds() == 0


def test_the_paced_engine_serves_its_queue_by_priority_and_counts_its_backlog():
    engine = PacedEngine(slots=1, tokens_per_s=2000.0)
    order: list[int] = []

    async def one(priority: int) -> None:
        await engine.generate(20, priority=priority, predicted_tokens=20.0)
        order.append(priority)

    async def scenario() -> float:
        first = asyncio.ensure_future(one(9))  # takes the slot
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(one(p)) for p in (5, 1, 3)]
        await asyncio.sleep(0)
        backlog = engine.stats()["outstanding_tokens"]
        await asyncio.gather(first, *rest)
        return backlog

    assert asyncio.run(scenario()) == 80.0
    assert order == [9, 1, 3, 5] and engine.stats()["outstanding_tokens"] == 0


def test_under_fcfs_the_paced_engine_serves_its_queue_in_arrival_order_whatever_the_priority():
    engine = PacedEngine(slots=1, tokens_per_s=2000.0, queue_order="fcfs")
    order: list[int] = []

    async def one(priority: int) -> None:
        await engine.generate(20, priority=priority, predicted_tokens=20.0)
        order.append(priority)

    async def scenario() -> None:
        first = asyncio.ensure_future(one(9))  # takes the slot
        await asyncio.sleep(0)
        rest = []
        for p in (5, 1, 3):  # arrive in this order, each awaited into the queue
            rest.append(asyncio.ensure_future(one(p)))
            await asyncio.sleep(0)
        await asyncio.gather(first, *rest)

    asyncio.run(scenario())
    assert order == [9, 5, 1, 3]  # the priority order would be [9, 1, 3, 5]
    assert engine.stats()["outstanding_tokens"] == 0
    with pytest.raises(ValueError, match="queue_order"):
        PacedEngine(queue_order="lifo")


def test_unequal_replicas_get_their_speed_by_rank_and_report_it():
    factors = (1.0, 0.5)
    assert speed_for_rank(1000.0, factors, 0) == 1000.0
    assert speed_for_rank(1000.0, factors, 1) == 500.0
    assert speed_for_rank(1000.0, factors, 2) == 1000.0  # beyond the list: the base speed
    assert speed_for_rank(1000.0, (), 1) == 1000.0
    with pytest.raises(ValueError):
        speed_for_rank(1000.0, (1.0, 0.0), 1)
    slow = PacedEngine(slots=4, tokens_per_s=speed_for_rank(1000.0, factors, 1))
    assert slow.stats()["tokens_per_s"] == 2000.0  # over all 4 slots: what the book ranks by

    async def paced() -> float:
        result = await slow.generate(50)
        return result.service_s

    assert 0.09 <= asyncio.run(paced()) < 0.2  # 50 tokens at 500/s


def test_a_cancelled_waiter_leaves_the_queue_and_the_slot_passes_on():
    engine = PacedEngine(slots=1, tokens_per_s=1000.0)

    async def scenario() -> int:
        holder = asyncio.ensure_future(engine.generate(30))
        await asyncio.sleep(0)
        waiter = asyncio.ensure_future(engine.generate(30, predicted_tokens=30.0))
        await asyncio.sleep(0)
        waiter.cancel()
        await holder
        result = await engine.generate(1)
        return result.output_tokens

    assert asyncio.run(scenario()) == 1
    assert engine.running == 0 and engine.outstanding_tokens == 0


def test_the_learner_resumes_from_snapshot_and_journal(tmp_path):
    features = {"prompt_tokens_est": 8.0}
    learner = SharedLearner(tmp_path, LengthPredictor(prior_length=100.0), snapshot_every=4)
    learner.learn([(features, 30)] * 5)  # a snapshot at 5, then the journal is emptied
    learner.learn([(features, 30)] * 2)  # journal only
    resumed = SharedLearner(tmp_path)
    assert resumed.learned == 7
    assert resumed.predictor.predict_one(features).length == pytest.approx(
        learner.predictor.predict_one(features).length
    )
    version, blob = learner.model()
    assert version == 7 and learner.model(have=7) is None and blob


def test_the_learner_ignores_a_batch_cut_short_while_written(tmp_path):
    learner = SharedLearner(tmp_path, LengthPredictor(prior_length=100.0))
    learner.learn([({"prompt_tokens_est": 3.0}, 12)])
    with open(learner.journal_path, "ab") as journal:
        journal.write(b"\x80\x05\x95garbage")  # a writer killed mid-batch
    assert SharedLearner(tmp_path).learned == 1


def test_the_front_flags_offload_by_the_knobs_threshold_and_keys_shorter_first():
    front = Front(LengthPredictor(prior_length=300.0), Knobs(offload_threshold=math.inf))
    plan = front.plan("Hi")
    assert not plan.offload and plan.handle_kwargs()["rtlm_predicted_tokens"] == pytest.approx(300)
    front.predictor.learn_one(front.plan("Say yes.").features, 2)
    for _ in range(50):
        front.predictor.learn_one(front.plan("Write a very long essay.").features, 2000)
    assert front.plan("Say yes.").priority < front.plan("Write a very long essay.").priority
