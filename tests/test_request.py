import math

import pytest

from rtlm_adapt import Completion, Knobs, Request


@pytest.mark.parametrize(
    "kwargs, exc, field",
    [
        ({"prompt": ""}, ValueError, "prompt"),
        ({"prompt": "   \n"}, ValueError, "prompt"),
        ({"prompt": 42}, ValueError, "prompt"),
        ({"arrival_time": -1.0}, ValueError, "arrival_time"),
        ({"arrival_time": math.nan}, ValueError, "arrival_time"),
        ({"arrival_time": "now"}, TypeError, "arrival_time"),
        ({"deadline": math.nan}, ValueError, "deadline"),
        ({"arrival_time": 5.0, "deadline": 4.0}, ValueError, "deadline"),
        ({"max_tokens": 0}, ValueError, "max_tokens"),
        ({"max_tokens": 2.5}, TypeError, "max_tokens"),
        ({"id": ""}, TypeError, "id"),
        ({"id": 7}, TypeError, "id"),
        ({"prompt_tokens": 0}, ValueError, "prompt_tokens"),
        ({"metadata": [1]}, TypeError, "metadata"),
    ],
)
def test_bad_request_fields_name_the_field(kwargs, exc, field):
    base = {"id": "r1", "prompt": "hello", "arrival_time": 1.0}
    base.update(kwargs)
    with pytest.raises(exc, match=field):
        Request(**base)


def test_request_slack_and_true_length():
    r = Request("a", "x y", 1.0, deadline=3.0, metadata={"true_output_tokens": 12})
    assert r.slack(2.5) == pytest.approx(0.5)
    assert r.true_output_tokens == 12
    assert Request("b", "x", 0.0).slack(10.0) == math.inf


def test_completion_validation_and_derived_fields():
    c = Completion(
        "a", 5, arrival_time=1.0, start_time=2.0, finish_time=4.0, executor="e", deadline=3.5
    )
    assert c.response_time == pytest.approx(3.0)
    assert c.missed_deadline and c.ok
    with pytest.raises(ValueError, match="output_tokens"):
        Completion("a", -1, 0.0, 0.0, 1.0, "e")
    with pytest.raises(ValueError, match="finish_time"):
        Completion("a", 1, 0.0, 2.0, 1.0, "e")
    with pytest.raises(ValueError, match="start_time"):
        Completion("a", 1, 0.0, math.nan, 1.0, "e")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"length_weight": math.nan}, "length_weight"),
        ({"wait_weight": math.inf}, "wait_weight"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"offload_threshold": 0}, "offload_threshold"),
        ({"max_wait_s": -1.0}, "max_wait_s"),
    ],
)
def test_bad_knobs_name_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        Knobs(**kwargs)
