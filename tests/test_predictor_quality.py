"""Quality of the length predictor on real data: ranking, calibration, drift, robustness, cost.

Real AlpacaEval outputs (../shared/data/alpaca_eval/) where present; skipped with a reason
otherwise. Lexical tier only (the encoder tier needs torch and minutes of CPU: see
benchmarks/predictor_eval.py).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import alpaca_samples

from rtlm_adapt.predictor import LengthPredictor
from rtlm_adapt.predictor.evaluation import REQUIRED_KEYS, evaluate, kendall_tau
from rtlm_adapt.prior import LengthPrior, lexical_features


@pytest.fixture(scope="module")
def gpt4():
    return alpaca_samples("gpt4_1106_preview")


@pytest.fixture(scope="module")
def llama():
    return alpaca_samples("llama-2-7b-chat-hf")


@pytest.fixture(scope="module")
def gpt4_eval(gpt4):
    return evaluate(gpt4, tier="lexical", holdout_fraction=0.25, seed=0)


def test_packaged_prior_ranks_on_request_one(gpt4) -> None:
    p = LengthPredictor.pretrained("lexical")
    preds = [p.predict_one(p.features(s.prompt)).length for s in gpt4]
    assert p.n_learned == 0
    assert kendall_tau(preds, [s.response_tokens for s in gpt4]) > 0.25


def test_lexical_tier_ranks_held_out_prompts(gpt4_eval) -> None:
    assert set(REQUIRED_KEYS) <= set(gpt4_eval)
    assert gpt4_eval["n_test"] == 201
    # Measured 0.37 (issue target: median >= 0.30 over the 16 models; see the benchmark).
    assert gpt4_eval["kendall_tau"] >= 0.30
    # The online stream must not make the prior worse.
    assert gpt4_eval["kendall_tau"] >= gpt4_eval["prior_kendall_tau"] - 0.02


def test_intervals_are_calibrated_on_held_out_prompts(gpt4_eval) -> None:
    assert 0.85 <= gpt4_eval["interval_coverage"] <= 0.95  # target 0.87-0.93; 201 prompts


def test_recovers_from_a_served_model_switch(gpt4, llama) -> None:
    """400 requests with gpt4's lengths, then llama's: MAE over the next 200 vs steady state."""
    g = {s.id: s for s in gpt4}
    ll = {s.id: s for s in llama}
    ids = sorted(set(g) & set(ll), key=int)
    order = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))][:600]
    prior = LengthPrior.packaged("lexical")
    feats = {i: LengthPredictor(prior=prior).features(g[i].prompt) for i in order}
    maes = {}
    for name, first in (("switch", g), ("steady", ll)):
        p = LengthPredictor(prior=prior)
        errs = []
        for k, i in enumerate(order):
            y = (first if k < 400 else ll)[i].response_tokens
            errs.append(abs(p.predict_one(feats[i]).length - y))
            p.learn_one(feats[i], y)
        maes[name] = float(np.mean(errs[400:]))
    assert maes["switch"] <= 1.15 * maes["steady"], maes


def test_adwin_jumps_the_offset_on_a_level_shift() -> None:
    rng = np.random.default_rng(1)
    p = LengthPredictor(prior_length=100.0)
    for _ in range(300):
        p.learn_one({"x": float(rng.random())}, float(np.exp(4.6 + rng.normal(0, 0.5))))
    for _ in range(150):
        p.learn_one({"x": float(rng.random())}, float(np.exp(6.0 + rng.normal(0, 0.5))))
    assert p.n_drifts >= 1
    assert p.predict_one({"x": 0.5}).length == pytest.approx(math.exp(6.0), rel=0.25)


@pytest.mark.parametrize("bad", [0, 10**9, float("nan")])
def test_absurd_lengths_move_later_predictions_by_at_most_5_percent(gpt4, bad, caplog) -> None:
    p = LengthPredictor.pretrained("lexical")
    feats = [p.features(s.prompt) for s in gpt4[:400]]
    for f, s in zip(feats[:300], gpt4[:300], strict=True):
        p.learn_one(f, s.response_tokens)
    probe = feats[300:]
    before = np.array([p.predict_one(f).length for f in probe])
    q = copy.deepcopy(p)
    # The worst case: the absurd length arrives for a prompt that is also probed.
    with caplog.at_level(logging.WARNING, logger="rtlm_adapt.predictor"):
        accepted = q.learn_one(probe[0], bad)
    assert caplog.records, "an absurd length must be logged"
    if not accepted:
        assert q.n_learned == p.n_learned
    after = np.array([q.predict_one(f).length for f in probe])
    assert np.max(np.abs(after / before - 1.0)) <= 0.05


def test_predict_remaining_grows_with_the_tokens_generated(gpt4) -> None:
    p = LengthPredictor.pretrained("lexical")
    for s in gpt4[:300]:
        p.learn_one(p.features(s.prompt), s.response_tokens)
    f = p.features(gpt4[400].prompt)
    fresh = p.predict_one(f)
    assert p.predict_remaining(f, 0) == fresh
    totals = [g + p.predict_remaining(f, g).length for g in (10, 100, 1000, 5000)]
    assert all(b >= a for a, b in zip(totals, totals[1:], strict=False))
    for g in (10, 500, 20000):
        r = p.predict_remaining(f, g)
        assert 1.0 <= r.low <= r.length <= r.high
    # Conditional on having run long, a request is expected to run longer than the fresh median.
    assert 1000 + p.predict_remaining(f, 1000).length > fresh.length


def test_predict_remaining_is_calibrated_in_flight(gpt4) -> None:
    p = LengthPredictor.pretrained("lexical")
    train, test = gpt4[:600], gpt4[600:]
    for s in train:
        p.learn_one(p.features(s.prompt), s.response_tokens)
    hits = total = 0
    for s in test:
        g = s.response_tokens // 2
        if g < 1:
            continue
        r = p.predict_remaining(p.features(s.prompt), g)
        hits += r.low <= s.response_tokens - g <= r.high
        total += 1
    assert hits / total >= 0.75  # 90% target; the conditional tail is estimated from few points


def test_prior_round_trip_and_garbage(tmp_path) -> None:
    prior = LengthPrior.packaged("lexical")
    path = tmp_path / "p.npz"
    prior.save(path)
    again = LengthPrior.load(path)
    f = {**lexical_features("Write a poem about cats"), "uncertainty": 0.7}
    assert again.predict(f) == pytest.approx(prior.predict(f), abs=1e-5)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a readable LengthPrior"):
        LengthPrior.load(bad)
    p = LengthPredictor(prior=prior)
    p.learn_one(f, 300)
    p.save(tmp_path / "lp.pkl")
    q = LengthPredictor.load(tmp_path / "lp.pkl")
    assert q.predict_one(f) == p.predict_one(f)


def test_lexical_tier_does_not_import_torch() -> None:
    code = (
        "import sys, rtlm_adapt, rtlm_adapt.predictor as P, rtlm_adapt.predictor.evaluation;"
        "p = P.LengthPredictor.pretrained('lexical'); p.predict_one(p.features('hi there'));"
        "print('torch' in sys.modules or 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_predict_eval_cli_writes_the_json(tmp_path) -> None:
    from rtlm_adapt.cli import main

    rows = [
        {
            "id": i,
            "instruction": ("Explain " if i % 2 else "Name ") + f"thing {i}",
            "output": "word " * (5 + 40 * (i % 2) + i % 7),
        }
        for i in range(60)
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    rc = main(
        [
            "predict-eval",
            "--prompts",
            str(prompts),
            "--tier",
            "lexical",
            "--holdout-fraction",
            "0.25",
            "--seed",
            "3",
            "--tokenizer",
            "words",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(REQUIRED_KEYS) <= set(result)
    assert result["n_test"] == 15 and result["kendall_tau"] > 0.3
