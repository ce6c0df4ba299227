"""Tests for the online per-executor latency model."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.latency import LatencyModel

COEFS = (
    "decode_s_base",
    "decode_s_per_seq",
    "decode_s_per_ctx_token",
    "prefill_s_base",
    "prefill_s_per_token",
)

PRIOR = StepCost("prior", 0.045, 0.025, 2e-5, 0.12, 0.0028, max_batch_size=16)
# A "different machine": every coefficient off by a different factor.
TRUE = StepCost("true", 0.030, 0.040, 1.2e-5, 0.20, 0.0015, max_batch_size=16)


def _fused_duration(cost: StepCost, b: int, ctx: int, pre: int, k: int) -> float:
    """Exact duration of k fused iterations: context grows by b each, prefill in the first."""
    return sum(cost.step_time(b, ctx + b * i, pre if i == 0 else 0) for i in range(k))


def _workload(rng: random.Random) -> tuple[int, int, int, int]:
    """A serving-like step: contexts scale with the batch, prefills come and go, some fusing."""
    b = rng.randint(1, 16)
    ctx = b * rng.randint(20, 600)
    pre = rng.choice([0, 0, 0, rng.randint(10, 800)])
    k = 1 if pre or rng.random() < 0.5 else rng.randint(2, 8)
    return b, ctx, pre, k


def _feed(model, cost, rng, n, noise=0.05, outlier_rate=0.0) -> None:
    for _ in range(n):
        b, ctx, pre, k = _workload(rng)
        d = _fused_duration(cost, b, ctx, pre, k) * (1.0 + rng.gauss(0.0, noise))
        if rng.random() < outlier_rate:
            d *= 10.0  # a GC pause or a preempted step
        assert model.learn_step(b, ctx, pre, max(d, 0.0), iterations=k)


def _rel_errors(est: StepCost, true: StepCost) -> dict[str, float]:
    return {k: abs(getattr(est, k) / getattr(true, k) - 1.0) for k in COEFS}


def test_starts_at_the_prior() -> None:
    m = LatencyModel(PRIOR)
    for args in [(1, 0, 0), (8, 2000, 0), (16, 9000, 300)]:
        assert m.step_time(*args) == pytest.approx(PRIOR.step_time(*args), rel=1e-9)
    c = m.coefficients()
    for k in COEFS:
        assert getattr(c, k) == pytest.approx(getattr(PRIOR, k), rel=1e-9)
    assert m.n_learned == 0


def test_first_observations_do_not_swing_it_wildly() -> None:
    m = LatencyModel(PRIOR)
    # one step that looks 3x slower than the prior predicts
    m.learn_step(8, 2000, 0, 3.0 * PRIOR.step_time(8, 2000))
    for args in [(1, 0, 0), (16, 9000, 300), (4, 100, 50)]:
        ratio = m.step_time(*args) / PRIOR.step_time(*args)
        assert 0.5 < ratio < 3.0, (args, ratio)


def test_recovers_known_coefficients_from_noisy_steps() -> None:
    m = LatencyModel(PRIOR)
    _feed(m, TRUE, random.Random(0), 3000)
    errs = _rel_errors(m.coefficients(), TRUE)
    assert max(errs.values()) < 0.15, errs
    rng = random.Random(1)
    for _ in range(200):
        b, ctx, pre, _ = _workload(rng)
        assert m.step_time(b, ctx, pre) == pytest.approx(TRUE.step_time(b, ctx, pre), rel=0.05)


def test_fused_iterations_are_averaged_correctly() -> None:
    """Noise-free fused calls only: the fit must be (nearly) exact."""
    m = LatencyModel(PRIOR, forgetting=1.0)
    rng = random.Random(2)
    for _ in range(2000):
        b, ctx = rng.randint(1, 16), rng.randint(0, 8000)
        pre = rng.choice([0, rng.randint(1, 500)])
        k = rng.randint(1, 12)
        m.learn_step(b, ctx, pre, _fused_duration(TRUE, b, ctx, pre, k), iterations=k)
    errs = _rel_errors(m.coefficients(), TRUE)
    assert max(errs.values()) < 0.01, errs


@pytest.mark.parametrize("forgetting, steps", [(0.995, 500), (0.99, 300)])
def test_tracks_a_twofold_slowdown(forgetting: float, steps: int) -> None:
    """Memory is about 1 / (1 - forgetting) steps: after 2.5 memories the fit is within 10%."""
    m = LatencyModel(PRIOR, forgetting=forgetting)
    rng = random.Random(3)
    _feed(m, TRUE, rng, 1500)
    slow = StepCost("slow", *(2.0 * getattr(TRUE, k) for k in COEFS), max_batch_size=16)
    probe = [(1, 100, 0), (8, 2400, 0), (16, 6000, 400), (4, 800, 200)]
    _feed(m, slow, rng, steps // 5)
    # part way: clearly moving, not yet there
    assert all(m.step_time(*a) > 1.2 * TRUE.step_time(*a) for a in probe)
    _feed(m, slow, rng, steps - steps // 5)
    for args in probe:
        assert m.step_time(*args) == pytest.approx(slow.step_time(*args), rel=0.10), args


def test_robust_to_rare_outliers() -> None:
    m = LatencyModel(PRIOR)
    _feed(m, TRUE, random.Random(4), 3000, outlier_rate=0.01)
    rng = random.Random(5)
    for _ in range(100):
        b, ctx, pre, _ = _workload(rng)
        assert m.step_time(b, ctx, pre) == pytest.approx(TRUE.step_time(b, ctx, pre), rel=0.08)


def test_no_wind_up_in_unexcited_directions() -> None:
    """Thousands of identical steps (batch 16, no prefill) then a prefill step: still sane."""
    m = LatencyModel(PRIOR)
    rng = random.Random(6)
    for _ in range(5000):
        d = TRUE.step_time(16, 4000) * (1.0 + rng.gauss(0.0, 0.05))
        m.learn_step(16, 4000, 0, d)
    assert np.all(np.diag(m._P) <= m._p_max * (1 + 1e-9))
    assert m.step_time(16, 4000) == pytest.approx(TRUE.step_time(16, 4000), rel=0.03)
    m.learn_step(16, 4000, 300, TRUE.step_time(16, 4000, 300))
    for args in [(16, 4000, 300), (1, 100, 0), (16, 4000, 0)]:
        ratio = m.step_time(*args) / TRUE.step_time(*args)
        assert 0.5 < ratio < 2.0, (args, ratio)


@pytest.mark.parametrize(
    "args",
    [
        (4, 100, 0, float("nan")),
        (4, 100, 0, float("inf")),
        (4, 100, 0, -0.01),
        (4, 100, 0, 1e6),
        (4, 100, 0, "0.1"),
        (4, 100, 0, None),
        (0, 100, 0, 0.1),
        (-1, 100, 0, 0.1),
        (4, -5, 0, 0.1),
        (4, 100, -1, 0.1),
        (4.5, 100, 0, 0.1),
        (True, 100, 0, 0.1),
        (4, float("nan"), 0, 0.1),
    ],
)
def test_rejects_garbage(args, caplog) -> None:
    m = LatencyModel(PRIOR)
    _feed(m, TRUE, random.Random(7), 200)
    before = m.coefficients()
    with caplog.at_level(logging.WARNING, logger="rtlm_adapt.latency"):
        assert m.learn_step(*args) is False
    assert "rejected" in caplog.text
    assert m.coefficients() == before
    assert m.n_learned == 200


def test_rejects_bad_iterations() -> None:
    m = LatencyModel(PRIOR)
    assert m.learn_step(4, 100, 0, 0.1, iterations=0) is False
    assert m.learn_step(4, 100, 0, 0.1, iterations=2.0) is False
    assert m.learn_step(4, 100, 0, 0.1, iterations=np.int64(2)) is True


def test_coefficients_stay_non_negative_and_form_a_valid_profile(tmp_path) -> None:
    # the truth has no context cost at all: noise must not drive it negative
    true = StepCost("free-ctx", 0.02, 0.01, 0.0, 0.05, 0.001, max_batch_size=16)
    m = LatencyModel(PRIOR)
    _feed(m, true, random.Random(8), 2000, noise=0.2)
    c = m.coefficients()
    assert all(getattr(c, k) >= 0.0 for k in COEFS)
    assert c.name == PRIOR.name and c.max_batch_size == PRIOR.max_batch_size
    assert "online" in c.source
    c.save(tmp_path / "p.json")
    assert StepCost.load(tmp_path / "p.json") == c


def test_service_time_matches_the_isolated_formula_and_grows_with_load() -> None:
    m = LatencyModel(PRIOR)
    for p, n in [(10, 1), (100, 50), (1000, 300)]:
        assert m.service_time(p, n) == pytest.approx(PRIOR.isolated_service_time(p, n), rel=1e-9)
    assert m.service_time(100, 50, batch_size=8) > m.service_time(100, 50, batch_size=1)
    assert m.service_time(100, 80.5) > m.service_time(100, 50.0)
    assert m.service_time(100, 0.0) == m.service_time(100, 1)  # at least one token
    assert math.isfinite(m.service_time(0, 1))


@pytest.mark.parametrize(
    "kwargs",
    [{"forgetting": 0.0}, {"forgetting": 1.5}, {"prior_rel_std": 0}, {"noise_rel_std": -1}],
)
def test_invalid_configuration_raises(kwargs) -> None:
    with pytest.raises(ValueError):
        LatencyModel(PRIOR, **kwargs)
