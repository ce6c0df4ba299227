"""benchmarks/preemption_ceiling.py's simulator agrees with the library's without preemption."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.request import TRUE_LENGTH_KEY, Request

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "preemption_ceiling.py"


@pytest.fixture(scope="module")
def pc():
    spec = importlib.util.spec_from_file_location("preemption_ceiling", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["preemption_ceiling"] = module
    spec.loader.exec_module(module)
    return module


def _requests(n=60, seed=3):
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(2.0, n))
    return [
        Request(str(i), f"prompt number {i} about topic {i % 7}", float(t), max_tokens=256,
                prompt_tokens=int(rng.integers(10, 200)),
                metadata={TRUE_LENGTH_KEY: int(rng.integers(1, 256))})
        for i, t in enumerate(times)
    ]


@pytest.mark.parametrize("profile", ["smollm2-135m-cpu2-hf", "smollm2-135m-cpu2"])
def test_non_preemptive_matches_library(pc, profile):
    cost = StepCost.load(profile)
    reqs = _requests()
    membership = pc.Membership(cost.join_s, cost.leave_s, 0.0)
    check = pc.library_check(reqs, cost, pc.to_jobs(reqs), membership)
    for name, row in check.items():
        assert row["ratio"] == pytest.approx(1.0, abs=0.01), (name, row)


def test_preemption_is_charged(pc):
    cost = StepCost.load("smollm2-135m-cpu2-hf")
    jobs = pc.to_jobs(_requests())
    membership = pc.Membership(cost.join_s, cost.leave_s, 6e-6)
    rem = pc.remaining_fn("oracle", pc.residual_fn([j.target for j in jobs]))
    small = pc.srpt("srpt-c2", rem, eff_cap=2)
    pause = pc.simulate(jobs, cost, small, mode="pause", membership=membership)
    recompute = pc.simulate(jobs, cost, small, mode="recompute", membership=membership)
    assert pause["preemptions"] > 0
    assert len(pause["rt"]) == len(jobs)
    # re-prefilling costs more than copying a row back
    assert recompute["mean_rt_s"] > pause["mean_rt_s"]
