"""Tests for the online output-length predictor."""

from __future__ import annotations

import logging
import math
import pickle
import random

import numpy as np
import pytest

from rtlm_adapt.predictor import LengthPrediction, LengthPredictor


def _stream(n: int, seed: int, n_noise: int = 18) -> list[tuple[dict[str, float], float]]:
    """Length depends on one feature (log-linearly) plus log-normal noise; the rest is noise.

    ``prompt_tokens_est`` has a very different scale from the others on purpose, to exercise the
    standardization.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        f = {f"noise_{i}": rng.gauss(0.0, 1.0) for i in range(n_noise)}
        f["prompt_tokens_est"] = rng.lognormvariate(4.0, 1.0)
        f["signal"] = rng.uniform(0.0, 1.0)
        length = max(1.0, round(math.exp(1.0 + 5.0 * f["signal"] + rng.gauss(0.0, 0.3))))
        out.append((f, length))
    return out


def _kendall_tau(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a), np.asarray(b)
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), k=1)
    return float((sx[iu] * sy[iu]).sum() / len(iu[0]))


def _mae(p: LengthPredictor, data: list[tuple[dict[str, float], float]]) -> float:
    return float(np.mean([abs(p.predict_one(f).length - y) for f, y in data]))


def test_first_prediction_is_the_prior_with_a_wide_interval() -> None:
    p = LengthPredictor(prior_length=200.0)
    pred = p.predict_one({"a": 1.0, "b": 2.0})
    assert isinstance(pred, LengthPrediction)
    assert pred.length == pytest.approx(200.0)
    assert 1.0 <= pred.low < pred.length < pred.high
    assert pred.high / pred.low > 10.0  # uncalibrated: deliberately wide
    assert p.n_learned == 0


def test_learns_a_length_signal() -> None:
    train, held_out = _stream(2000, seed=1), _stream(400, seed=2)
    p = LengthPredictor(prior_length=200.0)
    mae_before = _mae(p, held_out)
    for f, y in train:
        assert p.learn_one(f, y)
    assert p.n_learned == 2000
    mae_after = _mae(p, held_out)
    assert mae_after < 0.35 * mae_before, (mae_before, mae_after)
    preds = [p.predict_one(f).length for f, _ in held_out]
    tau = _kendall_tau(preds, [y for _, y in held_out])
    assert tau > 0.7, tau


@pytest.mark.parametrize("coverage", [0.8, 0.9])
def test_intervals_cover_the_requested_fraction(coverage: float) -> None:
    p = LengthPredictor(coverage=coverage)
    for f, y in _stream(3000, seed=3):
        p.learn_one(f, y)
    held_out = _stream(2000, seed=4)
    preds = [p.predict_one(f) for f, _ in held_out]
    hit = np.mean([pr.low <= y <= pr.high for pr, (_, y) in zip(preds, held_out, strict=True)])
    assert coverage - 0.05 <= hit <= coverage + 0.05, hit
    assert all(1.0 <= pr.low <= pr.length <= pr.high for pr in preds)


@pytest.mark.parametrize(
    "bad_length", [float("nan"), float("inf"), -float("inf"), -1.0, 10**6 + 1, "12", None, True]
)
def test_rejected_lengths_leave_the_model_unchanged(bad_length, caplog) -> None:
    p = LengthPredictor()
    data = _stream(300, seed=5)
    for f, y in data[:200]:
        p.learn_one(f, y)
    probe = [f for f, _ in data[200:]]
    before = [p.predict_one(f) for f in probe]
    with caplog.at_level(logging.WARNING, logger="rtlm_adapt.predictor"):
        assert p.learn_one(data[0][0], bad_length) is False
    assert "rejected" in caplog.text
    assert [p.predict_one(f) for f in probe] == before
    assert p.n_learned == 200


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf"), "x", None])
def test_rejected_features_leave_the_model_unchanged(bad_value) -> None:
    p = LengthPredictor()
    data = _stream(300, seed=6)
    for f, y in data[:200]:
        p.learn_one(f, y)
    probe = [f for f, _ in data[200:]]
    before = [p.predict_one(f) for f in probe]
    bad = dict(data[0][0], signal=bad_value)
    assert p.learn_one(bad, 50.0) is False
    assert [p.predict_one(f) for f in probe] == before
    assert p.n_learned == 200


def test_bad_features_at_predict_time_still_give_a_finite_answer() -> None:
    p = LengthPredictor()
    for f, y in _stream(300, seed=7):
        p.learn_one(f, y)
    f = dict(_stream(1, seed=8)[0][0], signal=float("nan"), prompt_tokens_est=float("inf"))
    pred = p.predict_one(f)
    assert all(math.isfinite(v) and v >= 1.0 for v in (pred.length, pred.low, pred.high))
    # unseen features and an empty dict are fine too
    assert p.predict_one({"never_seen": 3.0}).length >= 1.0
    assert p.predict_one({}).length >= 1.0


def test_zero_length_is_clipped_to_one() -> None:
    p = LengthPredictor(prior_length=1.0)
    for _ in range(500):
        assert p.learn_one({"a": 1.0}, 0)
    pred = p.predict_one({"a": 1.0})
    assert pred.length == pytest.approx(1.0, abs=0.05)
    assert pred.low == 1.0


def test_adapts_to_a_level_shift() -> None:
    """The intercept learns fast enough that a wrong prior is forgotten within a few hundred."""
    p = LengthPredictor(prior_length=1000.0)
    rng = random.Random(9)
    for _ in range(500):
        p.learn_one({"x": rng.random()}, math.exp(3.0 + rng.gauss(0.0, 0.2)))
    assert p.predict_one({"x": 0.5}).length == pytest.approx(math.exp(3.0), rel=0.2)


def test_save_load_round_trip(tmp_path) -> None:
    p = LengthPredictor(coverage=0.8, prior_length=50.0)
    data = _stream(600, seed=10)
    for f, y in data[:500]:
        p.learn_one(f, y)
    path = tmp_path / "lp.pkl"
    p.save(path)
    q = LengthPredictor.load(path)
    probe = [f for f, _ in data[500:]]
    assert [q.predict_one(f) for f in probe] == [p.predict_one(f) for f in probe]
    assert q.n_learned == p.n_learned and q.coverage == 0.8
    # both keep learning identically
    for f, y in data[500:]:
        p.learn_one(f, y)
        q.learn_one(f, y)
    assert [q.predict_one(f) for f in probe] == [p.predict_one(f) for f in probe]


def test_load_rejects_wrong_or_corrupted_files(tmp_path) -> None:
    p = LengthPredictor()
    good = tmp_path / "good.pkl"
    p.save(good)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[:40])
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x00not a pickle at all")
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"format": "something.else", "version": 1, "state": {}}))
    future = tmp_path / "future.pkl"
    future.write_bytes(pickle.dumps({"format": "rtlm_adapt.LengthPredictor", "version": 99}))
    partial = tmp_path / "partial.pkl"
    partial.write_bytes(
        pickle.dumps({"format": "rtlm_adapt.LengthPredictor", "version": 1, "state": {"x": 1}})
    )
    for path, msg in [
        (truncated, "not a readable"),
        (garbage, "not a readable"),
        (other, "wrong format"),
        (future, "version 99"),
        (partial, "incomplete"),
    ]:
        with pytest.raises(ValueError, match=msg):
            LengthPredictor.load(path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"coverage": 0.0},
        {"coverage": 1.0},
        {"prior_length": 0.5},
        {"prior_length": float("nan")},
        {"learning_rate": -0.1},
        {"window": 1},
        {"min_residuals": 1000, "window": 500},
    ],
)
def test_invalid_configuration_raises(kwargs) -> None:
    with pytest.raises(ValueError):
        LengthPredictor(**kwargs)


def test_wrong_argument_types_and_counts_are_named() -> None:
    p = LengthPredictor(prior_length=100.0)
    for bad in ("Write an essay", None, ["a", "list"]):
        with pytest.raises(TypeError, match="predict_one takes a features mapping"):
            p.predict_one(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="learn_one takes a features mapping"):
            p.learn_one(bad, 10)  # type: ignore[arg-type]
    for bad in (-3, float("nan"), float("inf"), "12", None):
        with pytest.raises(ValueError, match="generated_tokens must be a finite number >= 0"):
            p.predict_remaining({}, bad)  # type: ignore[arg-type]
    assert p.n_learned == 0  # nothing was learnt from the bad calls


def test_works_with_the_uncertainty_scorer_features() -> None:
    uncertainty = pytest.importorskip("rtlm_adapt.uncertainty")
    scorer = uncertainty.UncertaintyScorer()
    p = LengthPredictor()
    prompts = [
        ("Name one prime number.", 5),
        ("Write a long essay about the history of Rome, with many details.", 900),
        ("Translate 'hello' into French.", 4),
        ("Explain, step by step, how a transformer language model works.", 600),
    ]
    for _ in range(50):
        for prompt, length in prompts:
            assert p.learn_one(scorer.features(prompt), length)
    short = p.predict_one(scorer.features("Name one even number.")).length
    long_ = p.predict_one(scorer.features("Write a long essay about the history of Greece.")).length
    assert short < long_
