"""The encoder tier's online embedding model (rtlm_adapt/predictor/embedding.py), without torch.

Embeddings are synthetic unit vectors passed to ``features(..., embedding=...)``, so these tests
need neither the encoder weights nor torch; the real-data figures are in
benchmarks/predictor_eval.py (BENCHMARKS.md section 3).
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest

from rtlm_adapt.predictor import EmbeddingResidualModel, LengthPredictor
from rtlm_adapt.predictor.evaluation import kendall_tau
from rtlm_adapt.prior import LengthPrior

DIM = 384


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _clustered_stream(n: int, seed: int, n_clusters: int = 8):
    """Prompts with the SAME text whose embeddings fall in clusters; each cluster has its own
    log-length level (what a served model does with kinds of prompts). Only the embedding can
    tell them apart."""
    rng = np.random.default_rng(seed)
    centers = _unit(np.random.default_rng(99).normal(size=(n_clusters, DIM)))
    levels = np.linspace(2.5, 6.5, n_clusters)
    c = rng.integers(0, n_clusters, size=n)
    emb = _unit(centers[c] + 0.35 * rng.normal(size=(n, DIM)) / math.sqrt(DIM) * 8)
    lengths = np.exp(levels[c] + rng.normal(0, 0.3, size=n))
    return emb, lengths


@pytest.fixture(scope="module")
def prior() -> LengthPrior:
    return LengthPrior.packaged("encoder")


def _held_out_tau(p: LengthPredictor, emb, lengths, n_train: int) -> float:
    feats = [p.features("Tell me about this.", embedding=e) for e in emb]
    for f, y in zip(feats[:n_train], lengths[:n_train], strict=True):
        assert p.learn_one(f, y)
    preds = [p.predict_one(f).length for f in feats[n_train:]]
    return kendall_tau(preds, lengths[n_train:])


def test_pretrained_encoder_tier_is_the_encoder_predictor() -> None:
    assert LengthPredictor.pretrained("encoder").embedding_model is not None
    assert LengthPredictor.pretrained("lexical").embedding_model is None


def test_embedding_model_learns_clusters_and_a_direction() -> None:
    rng = np.random.default_rng(0)
    centers = _unit(rng.normal(size=(2, 16)))
    m = EmbeddingResidualModel(dim=16, k=5, solve_every=5)
    assert m.predict_one(centers[0]) == 0.0  # nothing learnt yet
    for _ in range(40):
        m.learn_one(_unit(centers[0] + 0.05 * rng.normal(size=16)), 1.0)
        m.learn_one(_unit(centers[1] + 0.05 * rng.normal(size=16)), -1.0)
    # Centred: the mean residual (0 here) is the offset's job; the clusters get +-.
    assert m.predict_one(centers[0]) > 0.5 and m.predict_one(centers[1]) < -0.5
    # Garbage is ignored, not learnt.
    m.learn_one(np.full(16, np.nan, np.float32), 1.0)
    m.learn_one(centers[0], float("inf"))
    m.learn_one(np.ones(3, np.float32), 1.0)
    assert m.n_learned == 80


def test_the_embedding_model_improves_the_held_out_ranking(prior) -> None:
    emb, lengths = _clustered_stream(800, seed=1)
    with_model = _held_out_tau(LengthPredictor.from_prior(prior), emb, lengths, 600)
    off = EmbeddingResidualModel(knn_weight=0.0, ridge_weight=0.0)
    without = _held_out_tau(
        LengthPredictor.from_prior(prior, embedding_model=off), emb, lengths, 600
    )
    assert with_model > 0.6
    assert with_model > without + 0.1, (with_model, without)


def test_conformal_window_holds_the_whole_predictions_residual(prior) -> None:
    emb, lengths = _clustered_stream(300, seed=2)
    p = LengthPredictor.from_prior(prior)
    feats = [p.features("Tell me about this.", embedding=e) for e in emb]
    for f, y in zip(feats[:250], lengths[:250], strict=True):
        p.learn_one(f, y)
    f, y = feats[250], lengths[250]
    before = math.log1p(p.predict_one(f).length)  # includes the embedding term
    assert p.embedding_model.predict_one(f.embedding) != 0.0
    p.learn_one(f, y)
    assert p.interval.fifo[-1] == pytest.approx(math.log1p(y) - before, abs=1e-9)


def test_intervals_stay_calibrated_with_the_embedding_model(prior) -> None:
    emb, lengths = _clustered_stream(1500, seed=3)
    p = LengthPredictor.from_prior(prior)
    feats = [p.features("Tell me about this.", embedding=e) for e in emb]
    for f, y in zip(feats[:1000], lengths[:1000], strict=True):
        p.learn_one(f, y)
    preds = [p.predict_one(f) for f in feats[1000:]]
    cover = np.mean([q.low <= y <= q.high for q, y in zip(preds, lengths[1000:], strict=True)])
    assert 0.85 <= cover <= 0.95


@pytest.mark.parametrize("bad", [0, 10**9, float("nan")])
def test_absurd_lengths_move_later_predictions_by_at_most_5_percent(prior, bad, caplog) -> None:
    emb, lengths = _clustered_stream(400, seed=4)
    p = LengthPredictor.from_prior(prior)
    feats = [p.features("Tell me about this.", embedding=e) for e in emb]
    for f, y in zip(feats[:300], lengths[:300], strict=True):
        p.learn_one(f, y)
    probe = feats[300:]
    before = np.array([p.predict_one(f).length for f in probe])
    q = copy.deepcopy(p)
    with caplog.at_level(logging.WARNING, logger="rtlm_adapt.predictor"):
        q.learn_one(probe[0], bad)  # the worst case: the probed prompt itself
    assert caplog.records
    after = np.array([q.predict_one(f).length for f in probe])
    assert np.max(np.abs(after / before - 1.0)) <= 0.05


def test_save_load_and_pickled_features_keep_the_embedding(prior, tmp_path) -> None:
    emb, lengths = _clustered_stream(200, seed=5)
    p = LengthPredictor.from_prior(prior)
    feats = [p.features("Tell me about this.", embedding=e) for e in emb]
    for f, y in zip(feats[:150], lengths[:150], strict=True):
        p.learn_one(f, y)
    p.save(tmp_path / "enc.pkl")
    q = LengthPredictor.load(tmp_path / "enc.pkl")
    assert q.embedding_model is not None
    copies = pickle.loads(pickle.dumps(feats[150:]))
    assert copies[0] == feats[150] and copies[0].embedding is not None
    assert [q.predict_one(f) for f in copies] == [p.predict_one(f) for f in feats[150:]]
    for f, g, y in zip(feats[150:], copies, lengths[150:], strict=True):
        p.learn_one(f, y)
        q.learn_one(g, y)
    assert [q.predict_one(f) for f in copies] == [p.predict_one(f) for f in feats[150:]]


def test_features_without_an_embedding_fall_back_to_the_linear_parts(prior) -> None:
    p = LengthPredictor.from_prior(prior)
    emb, lengths = _clustered_stream(100, seed=6)
    for e, y in zip(emb, lengths, strict=True):
        p.learn_one(p.features("Tell me about this.", embedding=e), y)
    lexical_dict = LengthPredictor.pretrained("lexical").features("Write a poem about rain.")
    assert lexical_dict.embedding is None
    assert p.predict_one(lexical_dict).length >= 1.0
    assert p.learn_one(lexical_dict, 120)


def test_encoder_tier_with_given_embeddings_does_not_import_torch() -> None:
    code = (
        "import sys, numpy as np, rtlm_adapt.predictor as P;"
        "p = P.LengthPredictor.pretrained('encoder');"
        "e = np.ones(384, np.float32) / np.sqrt(384);"
        "f = p.features('hi there', embedding=e); p.predict_one(f); p.learn_one(f, 40);"
        "print('torch' in sys.modules or 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_controller_feeds_finished_requests_to_the_embedding_model(prior) -> None:
    """Through the controller (features precomputed upstream, as a front end would): every
    finished request joins the embedding memory, and the learnt clusters order the queue."""
    from rtlm_adapt import Completion, Request
    from rtlm_adapt.controller import AdaptiveController
    from rtlm_adapt.serving.base import ExecutorState

    emb, lengths = _clustered_stream(400, seed=7)
    p = LengthPredictor.from_prior(prior)
    ctl = AdaptiveController("sjf", predictor=p)
    feats = [p.features("Tell me about this.", embedding=e) for e in emb]
    for i in range(300):
        ctl.submit(Request(f"r{i}", "Tell me about this.", float(i)), features=feats[i])
        (req,) = ctl.next_batch(ExecutorState("primary", "primary", 0, 1, float(i)))
        ctl.on_finish(Completion(req.id, int(lengths[i]), float(i), float(i), i + 0.5, "primary"))
    assert p.embedding_model.n_learned == 300 and p.n_learned == 300
    # Queue 100 unseen requests at once: shortest-predicted-first must follow the true lengths.
    for i in range(300, 400):
        ctl.submit(Request(f"r{i}", "Tell me about this.", 400.0), features=feats[i])
    order = [r.id for r in ctl.next_batch(ExecutorState("primary", "primary", 0, 100, 400.0))]
    served = [lengths[int(rid[1:])] for rid in order]
    assert kendall_tau(np.arange(len(served)), served) > 0.5
