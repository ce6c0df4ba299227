import random

from rtlm_adapt.queue import QueueEntry, RequestQueue


def test_pop_order_matches_sorted_keys_with_removals():
    rng = random.Random(0)
    q = RequestQueue()
    keys = {}
    for i in range(500):
        k = rng.random()
        keys[str(i)] = k
        q.push(QueueEntry(str(i), arrival_time=i, key=k, offload=k > 0.8))
    for i in range(0, 500, 3):
        assert q.remove(str(i)) is not None
        del keys[str(i)]
    assert len(q) == len(keys)
    # offload heap only yields eligible entries, best first
    top = q.pop(offload_only=True)
    assert top.offload
    assert top.key == min(k for k in keys.values() if k > 0.8)
    del keys[top.request_id]
    out = []
    while q:
        out.append(q.pop().request_id)
    assert out == sorted(keys, key=keys.get)


def test_oldest_skips_removed_and_rekey_reorders():
    q = RequestQueue()
    for i in range(5):
        q.push(QueueEntry(str(i), arrival_time=float(i), key=float(-i)))
    q.remove("0")
    assert q.oldest().request_id == "1"
    q.rekey(lambda e: (e.arrival_time, False))  # now FCFS
    assert [q.pop().request_id for _ in range(4)] == ["1", "2", "3", "4"]


def test_duplicate_push_is_rejected():
    q = RequestQueue()
    q.push(QueueEntry("a", 0.0))
    try:
        q.push(QueueEntry("a", 1.0))
    except ValueError as exc:
        assert "'a'" in str(exc)
    else:
        raise AssertionError("duplicate id accepted")


def test_an_entry_taken_out_and_pushed_again_is_served_once():
    # The controller puts a request back (static consolidation) as the same object: the stale
    # heap items it left behind must not serve it a second time, in either heap.
    q = RequestQueue()
    for i in range(4):
        q.push(QueueEntry(str(i), arrival_time=float(i), key=float(i), offload=True))
    a = q.get("0")
    q.remove("0")
    q.push(a)  # back, with its old items still in the heaps
    b = q.pop()
    q.push(b)  # popped and pushed again
    served = []
    while q:
        served.append(q.pop(offload_only=len(served) % 2 == 0).request_id)
    assert sorted(served) == ["0", "1", "2", "3"]
    assert q.pop() is None and q.pop(offload_only=True) is None and q.oldest() is None


def test_lazy_deletion_stays_bounded_under_churn():
    q = RequestQueue()
    for i in range(10_000):
        q.push(QueueEntry(str(i), arrival_time=float(i), key=float(-i)))
        if i >= 10:
            q.pop()  # keeps the newest-keyed; the arrival heap fills with dead items
    assert len(q) == 10
    assert len(q._by_arrival) < 1000  # compacted, not 10,000
    assert q.oldest().request_id == "0"
