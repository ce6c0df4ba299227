"""Failure reasons are typed: an enum whose values are the labels users see, refusals that carry
their reason, and a loop that tells a shutdown from a full queue by the exception's type."""

import pytest
from conftest import make_request

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.persistence import decode_state
from rtlm_adapt.request import (
    FAILURE_REASONS,
    Completion,
    ControllerClosedError,
    FailureReason,
    QueueFullError,
    RequestRefused,
)
from rtlm_adapt.serving.base import ExecutorState
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.sim import SimulatedExecutor

COST = StepCost.default()


def test_reason_values_are_the_labels_users_see():
    assert [r.value for r in FAILURE_REASONS] == [
        "rejected",
        "timed_out",
        "executor_failure",
        "cancelled",
        "shutdown",
    ]
    for reason in FAILURE_REASONS:
        assert str(reason) == f"{reason}" == reason.value
        assert {reason.value: 1}[reason] == 1  # counters keyed by the plain text find it
    assert FailureReason.TIMED_OUT.error("slow") == "timed_out: slow"


def test_a_completion_keeps_its_reason_or_takes_it_from_its_text_once():
    typed = Completion("a", 0, 0.0, 1.0, 1.0, "p", error="gone", failure=FailureReason.CANCELLED)
    assert typed.failure is FailureReason.CANCELLED
    texts = {"timed_out: slow": "timed_out", "CUDA error": "executor_failure", "aborted": None}
    for text, expected in texts.items():
        failure = Completion("a", 0, 0.0, 1.0, 1.0, "p", error=text).failure
        assert failure == (expected or "executor_failure")
    assert Completion("a", 3, 0.0, 1.0, 1.0, "p").failure is None


def test_refusals_carry_their_reason():
    assert issubclass(QueueFullError, RequestRefused) and issubclass(
        ControllerClosedError, RuntimeError
    )
    assert QueueFullError.reason is FailureReason.REJECTED
    assert ControllerClosedError.reason is FailureReason.SHUTDOWN


def test_the_controller_counts_the_completions_reason_not_its_text():
    ctl = AdaptiveController("fcfs")
    ctl.submit(make_request("a", 0.0, 5))
    ctl.next_batch(ExecutorState("p", "primary", 0, 4, now=0.0))
    text = "shutdown: but the executor says otherwise"
    ctl.on_finish(
        Completion("a", 0, 0.0, 0.0, 1.0, "p", error=text, failure=FailureReason.CANCELLED)
    )
    assert ctl.stats().failures["cancelled"] == 1 and ctl.stats().failures["shutdown"] == 0


def test_unknown_reasons_are_refused():
    ctl = AdaptiveController("fcfs")
    with pytest.raises(ValueError, match="unknown failure reason"):
        ctl.fail_queued("bored")


class _QuietlyClosed(AdaptiveController):
    """Refuses every submit as closed, with a message that never says 'shut down'."""

    def submit(self, request, features=None):
        raise ControllerClosedError("not taking requests")


def test_the_loop_tells_shutdown_from_a_full_queue_by_type_not_text():
    full = AdaptiveController("fcfs", max_queue=1)
    loop = ServingLoop(full, SimulatedExecutor("p", COST))
    loop.add_requests([make_request("a", 0.0, 5), make_request("b", 0.0, 5)])
    loop.advance(0.0)
    closed = ServingLoop(_QuietlyClosed("fcfs"), SimulatedExecutor("p", COST))
    closed.add_requests([make_request("c", 0.0, 5)])
    closed.advance(0.0)
    refused = [c for c in loop.result.completions + closed.result.completions if c.error]
    assert {c.request_id: c.failure for c in refused} == {
        "b": FailureReason.REJECTED,
        "c": FailureReason.SHUTDOWN,
    }
    assert refused[1].error == "shutdown: not taking requests"


def test_the_state_file_keeps_its_layout():
    """A state file is a plain dict whose layout (format version 1) old files share."""
    state = decode_state(AdaptiveController("fcfs").state_bytes())
    assert set(state) == {
        "kind",
        "policy",
        "predictor",
        "scorer",
        "profiles",
        "latency",
        "knobs",
        "external_knobs",
        "config",
        "counters",
        "signals",
    }
    assert set(state["config"]) == {"epoch_s", "batching", "max_queue", "reference_batch"}
    assert set(state["counters"]) == {"submitted", "finished", "failed", "failures", "in_flight"}
    assert set(state["counters"]["failures"]) == {r.value for r in FAILURE_REASONS}
    assert set(state["signals"]) == {
        "arrival_rate",
        "service_ewma",
        "length_ewma",
        "response_ewma",
        "miss_ewma",
        "step_ewma",
    }
