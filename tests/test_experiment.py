"""Experiments: the per-workload feature cache."""

from __future__ import annotations

from rtlm_adapt.experiment import Workload, workload_features
from rtlm_adapt.prior import lexical_features
from rtlm_adapt.request import Request


def _workload(prompt: str) -> Workload:
    return Workload([Request("r0", prompt, 0.0, deadline=10.0)], 1.0, 0.9, 1.0, 1.0, prompt)


def test_features_belong_to_their_own_workload_when_workloads_come_and_go() -> None:
    # Workloads built and dropped in a loop: Python reuses the memory (and id()) of a dropped
    # one, so a cache keyed by id() hands a new workload the features of an old one.
    for i in range(50):
        prompt = f"Write {i} short poems about the number {i * 7919}."
        w = _workload(prompt)
        feats = workload_features(w, "lexical")["r0"]
        hashed = {k for k in feats if isinstance(k, int)}
        assert hashed == set(lexical_features(prompt)), i
        del w, feats  # the next workload may now get this one's id


def test_features_are_computed_once_per_workload_and_tier() -> None:
    w = _workload("Explain how a bicycle stays upright.")
    assert workload_features(w, "lexical") is workload_features(w, "lexical")
