"""RealTimeLoop on a tiny random model: wall-clock arrivals, concurrent executors, faults."""

from __future__ import annotations

import copy
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from rtlm_adapt.controller import AdaptiveController  # noqa: E402
from rtlm_adapt.request import Request  # noqa: E402
from rtlm_adapt.serving.hf import HFExecutor  # noqa: E402
from rtlm_adapt.serving.realtime import RealTimeLoop  # noqa: E402

PROMPTS = ["Name one prime.", "Why is the sky blue?", "Write a haiku about the sea.", "Hello"]


def _requests(n: int, gap: float = 0.01, max_tokens: int = 10) -> list[Request]:
    return [
        Request(str(i), PROMPTS[i % len(PROMPTS)], arrival_time=gap * i, max_tokens=max_tokens + i)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny():
    return HFExecutor.tiny_random(name="primary", max_batch_size=4)


def _pair(tiny, secondary: bool = True):
    primary = HFExecutor(tiny.model, tiny.tokenizer, name="primary", max_batch_size=4)
    if not secondary:
        return primary, None
    other = HFExecutor(
        tiny.model, copy.deepcopy(tiny.tokenizer), name="secondary", max_batch_size=2
    )
    return primary, other


def _check_all_ended(result, requests):
    ids = [c.request_id for c in result.completions]
    assert sorted(ids) == sorted(r.id for r in requests)  # each exactly once
    assert result.completed + result.failed == len(requests)


@pytest.mark.parametrize("policy", ["fcfs", "heuristic"])
def test_realtime_loop_finishes_every_request(tiny, policy):
    primary, secondary = _pair(tiny)
    requests = _requests(12)
    loop = RealTimeLoop(
        AdaptiveController(policy), primary, secondary, threads={"primary": 1, "secondary": 1}
    )
    t0 = time.perf_counter()
    result = loop.run(requests)
    wall = time.perf_counter() - t0
    _check_all_ended(result, requests)
    assert result.failed == 0 and loop.done
    by_id = {r.id: r for r in requests}
    for c in result.completions:
        # served in real time: nothing starts before it arrived, output lengths honoured
        assert c.start_time >= by_id[c.request_id].arrival_time - 1e-6
        assert c.finish_time >= c.start_time
        assert 0 < c.output_tokens <= by_id[c.request_id].max_tokens
    # the clock is the wall clock: the last arrival is at 0.11 s, the run ends after it
    assert max(c.finish_time for c in result.completions) >= 0.11
    assert max(c.finish_time for c in result.completions) <= wall + 0.05
    assert primary.running() == 0 and (secondary is None or secondary.running() == 0)


def test_advance_is_resumable(tiny):
    primary, _ = _pair(tiny, secondary=False)
    requests = _requests(6, gap=0.05)
    loop = RealTimeLoop(AdaptiveController("fcfs"), primary)
    loop.add_requests(requests)
    assert loop.advance(0.1) is False
    assert 0.1 <= loop.now < 1.0
    assert loop.advance(float("inf")) is True
    _check_all_ended(loop.result, requests)


class _FaultyModel:
    """Wraps a model; its ``fail_at``-th forward raises (mid-batch, after some decode steps)."""

    def __init__(self, model, fail_at: int) -> None:
        self.model, self.calls, self.fail_at = model, 0, fail_at
        self.config = model.config
        self.generation_config = model.generation_config
        self.forward = model.forward

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected fault")
        return self.model(*args, **kwargs)

    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self


def test_model_raising_mid_batch_ends_every_request(tiny):
    faulty = _FaultyModel(tiny.model, fail_at=6)
    primary = HFExecutor(faulty, tiny.tokenizer, name="primary", max_batch_size=4)
    requests = _requests(10, gap=0.005)
    loop = RealTimeLoop(AdaptiveController("fcfs"), primary)
    result = loop.run(requests)
    _check_all_ended(result, requests)
    errors = [c for c in result.completions if c.error is not None]
    assert errors and all("injected fault" in c.error for c in errors)
    assert result.completed >= 1  # the executor serves again after the fault
    assert primary.running() == 0


class _Raising:
    """An executor whose ``step`` raises once (not a model error: the call itself fails)."""

    def __init__(self, inner, *, sleep_s: float = 0.0) -> None:
        self.inner, self.name, self.max_batch_size = inner, inner.name, inner.max_batch_size
        self.sleep_s, self.fired = sleep_s, False

    def running(self):
        return self.inner.running()

    def running_ids(self):
        return self.inner.running_ids()

    def admit(self, requests, now):
        self.inner.admit(requests, now)

    def abort(self, request_id, now):
        return self.inner.abort(request_id, now)

    def step(self, now, until=float("inf")):
        if not self.fired and self.inner.running():
            self.fired = True
            if self.sleep_s:
                time.sleep(self.sleep_s)  # a hang
            else:
                raise RuntimeError("step blew up")
        return self.inner.step(now, until)


@pytest.mark.parametrize("sleep_s", [0.0, 0.6])
def test_step_fault_or_hang_retries_on_the_other_executor(tiny, sleep_s):
    primary, secondary = _pair(tiny)
    requests = _requests(6, gap=0.0)
    loop = RealTimeLoop(
        AdaptiveController("fcfs"),
        _Raising(primary, sleep_s=sleep_s),
        secondary,
        wall_timeout_s=0.3 if sleep_s else None,
    )
    result = loop.run(requests)
    _check_all_ended(result, requests)
    assert result.faults >= 1 and result.retries >= 1
    assert result.failed == 0  # every faulted request succeeded on its retry
    assert any(c.executor == "secondary" for c in result.completions)


def test_cancel_while_a_step_is_in_flight(tiny):
    primary, _ = _pair(tiny, secondary=False)
    requests = _requests(3, gap=0.0, max_tokens=40)
    loop = RealTimeLoop(AdaptiveController("fcfs"), primary)
    loop.add_requests(requests)
    loop.advance(0.02)
    assert loop.cancel("0")
    loop.advance(float("inf"))
    _check_all_ended(loop.result, requests)
    cancelled = [c for c in loop.result.completions if c.request_id == "0"]
    assert cancelled[0].error is not None and "cancel" in cancelled[0].error
    assert primary.running() == 0
