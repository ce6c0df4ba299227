"""Kill test: a worker that autosaves every N requests is SIGKILLed at random moments 20 times;
every restart loads the last good state and carries on from it.

The worker is forked from this (already warmed-up) process, so a restart costs milliseconds
instead of a fresh interpreter's imports; SIGKILL gives it no chance to clean up either way.
"""

import multiprocessing
import os
import random
import signal
import sys
import time

import pytest
from conftest import make_request

from rtlm_adapt import Completion
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.serving.base import ExecutorState

EVERY = 25


def worker(path: str, conn) -> None:
    """Load (or start) a controller, then serve forever, autosaving every EVERY requests."""
    if os.path.exists(path):
        ctl = AdaptiveController.load(path, autosave_path=path, autosave_every=EVERY)
    else:
        ctl = AdaptiveController("heuristic", autosave_path=path, autosave_every=EVERY)
    conn.send(("loaded", ctl.stats().finished))
    rng = random.Random(os.getpid())
    i = 0
    while True:
        rid = f"{os.getpid()}-{i}"
        i += 1
        req = make_request(rid, 0.0, rng.randint(1, 500), prompt=f"Question {i}: why?")
        ctl.submit(req)
        for r in ctl.next_batch(ExecutorState("p", "primary", 0, 8, 0.0)):
            ctl.on_finish(Completion(r.id, r.true_output_tokens, 0.0, 0.0, 1.0, "p"))
        finished = ctl.stats().finished
        if finished % EVERY == 0:
            conn.send(("saved", finished))  # the save inside on_finish has completed


@pytest.mark.slow  # 20 subprocesses killed: ~4 s
@pytest.mark.skipif(sys.platform != "linux", reason="needs fork and SIGKILL")
def test_sigkill_at_random_moments_always_leaves_a_loadable_last_good_state(tmp_path):
    path = str(tmp_path / "ctl.state")
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(7)
    last_saved = 0
    t0 = time.monotonic()
    for _ in range(20):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=worker, args=(path, child))
        proc.start()
        child.close()
        kind, loaded = parent.recv()
        assert kind == "loaded"
        # every restart sees the last save reported before the kill (or one that completed
        # after the report was sent but before the kill landed)
        assert last_saved <= loaded <= last_saved + EVERY
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        while parent.poll():
            try:
                kind, value = parent.recv()
            except EOFError:
                break
            if kind == "saved":
                last_saved = value
        parent.close()
        if os.path.exists(path):
            state = AdaptiveController.load(path)  # never raises: the file is always whole
            s = state.stats()
            assert s.balanced and last_saved <= s.finished <= last_saved + EVERY
            last_saved = s.finished
        leftovers = [f for f in os.listdir(tmp_path) if f != "ctl.state"]
        assert all(f.endswith(".tmp") for f in leftovers)  # only temp files of killed saves
    assert last_saved > 0
    assert time.monotonic() - t0 < 60
