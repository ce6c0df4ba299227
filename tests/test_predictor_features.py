"""PromptFeatures records through the predictor: the same answers as plain dicts, immutable,
picklable; bad values; the saved state's layout (format version 1)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import pickle
import random
from typing import Any

import numpy as np
import pytest

from rtlm_adapt.predictor import (
    HASH_BITS,
    MAX_TRUE_LENGTH,
    LengthPredictor,
    LengthPrior,
    PromptFeatures,
)

PROMPTS = [
    "Write a detailed essay on the French Revolution.",
    "Name one prime number.",
    "Explain briefly how a bicycle stays upright.",
    "List 10 ideas for a birthday party, with a short reason for each.",
]


def _synthetic(n: int, seed: int, extra: bool) -> list[tuple[dict[Any, float], float]]:
    """Dicts not made by features(): missing prior features, hashed buckets, unseen features."""
    rng = random.Random(seed)
    names = [d[0] for d in LengthPrior.packaged("lexical").dense]
    out = []
    for _ in range(n):
        f: dict[Any, float] = {name: rng.uniform(0.0, 3.0) for name in names}
        if rng.random() < 0.3:
            del f[rng.choice(names)]
        f.update(dict.fromkeys(rng.sample(range(1 << HASH_BITS), rng.randint(0, 40)), 1.0))
        if extra:
            f["novel"] = rng.gauss(0.0, 1.0)
            if rng.random() < 0.5:
                f[f"rare_{rng.randint(0, 30)}"] = rng.uniform(0.0, 10.0)
        out.append((f, math.exp(2.0 + f.get("n_lines", 1.0) + rng.gauss(0.0, 0.5))))
    return out


def test_a_record_predicts_and_learns_like_its_plain_dict() -> None:
    p, q = LengthPredictor.pretrained("lexical"), LengthPredictor.pretrained("lexical")
    records = [p.features(s) for s in PROMPTS] * 50
    for i, f in enumerate(records):
        assert p.predict_one(f) == q.predict_one(dict(f))
        assert p.predict_remaining(f, 40) == q.predict_remaining(dict(f), 40)
        assert p.learn_one(f, 20 + 37 * (i % 7)) and q.learn_one(dict(f), 20 + 37 * (i % 7))
    assert [p.predict_one(f) for f in records[:4]] == [q.predict_one(f) for f in records[:4]]


def test_records_are_immutable_and_pickle_with_their_contents() -> None:
    p = LengthPredictor.pretrained("lexical")
    f = p.features(PROMPTS[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.names = ()  # type: ignore[misc]
    g = pickle.loads(pickle.dumps(f))
    assert g == f and p.predict_one(g) == p.predict_one(f)
    assert 0.0 <= f.uncertainty <= 1.0 and set(f.hashed.tolist()) <= set(f)


def test_copies_and_pickles_of_a_predictor_predict_the_same() -> None:
    p = LengthPredictor.pretrained("lexical")
    data = _synthetic(300, seed=7, extra=False)
    for f, y in data[:250]:
        p.learn_one(f, y)
    f = p.features(PROMPTS[0])
    for q in (copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert q.predict_one(f) == p.predict_one(f)
        for g, y in data[250:]:
            q.learn_one(g, y)
    for g, y in data[250:]:
        p.learn_one(g, y)
    assert copy.deepcopy(p).predict_one(f) == p.predict_one(f)
    # the features of one predictor serve another with the same prior
    other = LengthPredictor.pretrained("lexical")
    assert other.predict_one(f) == other.predict_one(dict(f))


def test_bad_values_are_missing_for_predict_and_rejected_for_learn(caplog) -> None:
    p = LengthPredictor.pretrained("lexical")
    data = _synthetic(300, seed=5, extra=True)
    for f, y in data[:200]:
        p.learn_one(f, y)
    good = data[200][0]
    f = dict(good, n_lines=float("nan"), log_prompt_tokens=float("inf"))
    finite = {k: v for k, v in f.items() if math.isfinite(v)}
    with caplog.at_level(logging.WARNING, logger="rtlm_adapt.predictor"):
        assert p.predict_one(f) == p.predict_one(finite)
    assert "non-finite feature values treated as missing" in caplog.text
    record = PromptFeatures.from_mapping(f)
    assert p.predict_one(record) == p.predict_one(finite)
    n = p.n_learned
    for bad in (f, record, {**good, "n_lines": "x"}, {**good, "n_lines": None}):
        assert p.learn_one(bad, 10.0) is False
    for bad_length in (float("nan"), -1.0, MAX_TRUE_LENGTH + 1, True, "3", None):
        assert p.learn_one(good, bad_length) is False  # type: ignore[arg-type]
    assert p.n_learned == n
    assert p.learn_one(good, 0) and p.learn_one(good, 10**6)  # 0 is clipped to 1


def test_unseen_features_get_running_scaling_and_a_weight() -> None:
    p = LengthPredictor(prior=LengthPrior.packaged("lexical"))
    for f, y in _synthetic(1500, seed=3, extra=True):
        p.predict_one(f)
        assert p.learn_one(f, y)
    novel = p.scaler.stats["novel"]
    assert not novel.fixed and novel.count == 1500 and novel.weight != 0.0
    assert novel.mean == pytest.approx(0.0, abs=0.1) and novel.inv_std == pytest.approx(1, 0.1)
    assert p.scaler.stats["n_lines"].fixed  # the prior's keep the prior's scaling


def test_saved_state_keeps_format_version_1(tmp_path) -> None:
    """What save() writes is the layout older versions wrote and read: a plain dict of fields,
    the hashed weights as one list, a [count, mean, m2, 1/std, weight, fixed] list per feature."""
    p = LengthPredictor.pretrained("lexical")
    data = _synthetic(700, seed=6, extra=True)
    for f, y in data[:400]:
        p.learn_one(f, y)
    path = tmp_path / "p.pkl"
    p.save(path)
    envelope = pickle.loads(path.read_bytes())
    state = envelope["state"]
    assert (envelope["format"], envelope["version"]) == ("rtlm_adapt.LengthPredictor", 1)
    assert set(state) == set(
        "coverage prior_length learning_rate intercept_lr window min_residuals "
        "default_log_spread feature_clip huber prior encoder drift_delta _adwin n_drifts _base "
        "_offset _stats _resid_fifo _resid_sorted _n_learned _q_low _q_high _z_default _hw".split()
    )
    assert isinstance(state["_hw"], list) and len(state["_hw"]) == 1 << HASH_BITS
    assert all(isinstance(r, list) and len(r) == 6 for r in state["_stats"].values())
    assert state["_stats"]["novel"][5] == 0 and state["_stats"]["n_lines"][5] == 1
    # a state edited as plain data loads: the weight of a prior feature lives in its record
    state["_stats"]["n_lines"][4] += 1.0
    path.write_bytes(pickle.dumps(envelope))
    q = LengthPredictor.load(path)
    probe = {"n_lines": 1000.0}  # a z-score clipped to +4
    assert q.predict_one(probe).length > p.predict_one(probe).length
    assert q.n_learned == 400
    for f, y in data[400:]:
        assert q.learn_one(f, y)


def test_hashed_buckets_out_of_range_raise_and_negative_ones_wrap() -> None:
    p = LengthPredictor()
    with pytest.raises(IndexError):
        p.predict_one({1 << HASH_BITS: 1.0})
    wrapped = PromptFeatures.from_mapping({-1: 1.0, "a": 2.0})
    assert wrapped.hashed.tolist() == [(1 << HASH_BITS) - 1]
    assert np.array_equal(wrapped.dense, [2.0])
