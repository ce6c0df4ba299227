"""Evaluate the length predictor on real prompts: prior + prequential stream, then held-out.

The protocol behind ``rtlm-adapt predict-eval``: split the samples BY PROMPT ID (the same prompt
never appears on both sides), start from the packaged prior of the tier, stream the training part
once in a seeded random order (predict, then learn: the prequential score), then score the
held-out part without learning.

>>> from rtlm_adapt.data import PromptSample
>>> s = [PromptSample(str(i), "Write " + "word " * i, 10 + 5 * i, i, "demo") for i in range(40)]
>>> r = evaluate(s, tier="lexical", holdout_fraction=0.25, seed=0)
>>> sorted(k for k in r if k in REQUIRED_KEYS) == sorted(REQUIRED_KEYS)
True
>>> r["n_test"], r["n_train"]
(10, 30)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rtlm_adapt.predictor import LengthPredictor

__all__ = ["REQUIRED_KEYS", "evaluate", "split_by_prompt", "kendall_tau", "spearman"]

REQUIRED_KEYS = (
    "kendall_tau",
    "spearman",
    "mae_tokens",
    "interval_coverage",
    "predict_us_p50",
    "learn_us_p50",
)


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b (ties handled); nan for fewer than two points.

    >>> kendall_tau([1, 2, 3], [10, 20, 30])
    1.0
    """
    from scipy.stats import kendalltau

    if len(a) < 2:
        return float("nan")
    return float(kendalltau(a, b).statistic)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho; nan for fewer than two points.

    >>> spearman([1, 2, 3], [3, 2, 1])
    -1.0
    """
    from scipy.stats import spearmanr

    if len(a) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def split_by_prompt(ids: Sequence[str], holdout_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: True for samples whose prompt id is held out.

    >>> split_by_prompt(["a", "b", "a", "c"], 0.34, 0).tolist().count(True) in (1, 2)
    True
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")
    unique = sorted(set(ids))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unique))
    n_out = max(1, round(holdout_fraction * len(unique)))
    held = {unique[i] for i in order[:n_out]}
    return np.array([i in held for i in ids])


def evaluate(
    samples: Sequence[Any],
    tier: str = "lexical",
    holdout_fraction: float = 0.25,
    seed: int = 0,
    predictor: LengthPredictor | None = None,
    embeddings: np.ndarray | None = None,
    coverage: float = 0.9,
    encoder: str | None = None,
) -> dict[str, Any]:
    """Prior + prequential stream over the training prompts, then score the held-out ones.

    Parameters
    ----------
    samples
        Objects with ``id``, ``prompt`` and ``response_tokens`` (:class:`PromptSample`).
    tier
        ``lexical`` or ``encoder`` (needs the optional encoder dependencies).
    predictor
        Start from this predictor instead of the tier's packaged prior (it is trained in place).
    embeddings
        Precomputed prompt embeddings, one row per sample (encoder tier; the encoder's raw
        output); else computed (cached).
    encoder
        Encoder tier: the encoder's name (:data:`rtlm_adapt.encoder.ENCODERS`; default MiniLM),
        which picks its packaged prior.

    Returns
    -------
    dict
        :data:`REQUIRED_KEYS` plus ``n_train``, ``n_test``, ``prequential_mae_tokens``,
        ``prior_kendall_tau`` (the prior alone on the held-out part), ``features_us_p50``.
    """
    if len(samples) < 4:
        raise ValueError(f"need at least 4 samples, got {len(samples)}")
    if predictor is None:
        predictor = LengthPredictor.pretrained(tier, encoder=encoder, coverage=coverage)
    mask = split_by_prompt([str(s.id) for s in samples], holdout_fraction, seed)
    prompts = [s.prompt for s in samples]
    lengths = np.array([float(s.response_tokens) for s in samples])

    if predictor.tier == "encoder" and embeddings is None:
        from rtlm_adapt.encoder import cached_encode

        minilm = predictor.prior.encoder_name == "minilm"  # type: ignore[union-attr]
        embeddings = cached_encode(
            predictor.get_encoder(), prompts, batch_size=32 if minilm else 16
        )
    feat_ns = []
    feats = []
    for i, p in enumerate(prompts):
        t = time.perf_counter_ns()
        f = predictor.features(p, embedding=None if embeddings is None else embeddings[i])
        feat_ns.append(time.perf_counter_ns() - t)
        feats.append(f)

    train = np.flatnonzero(~mask)
    test = np.flatnonzero(mask)
    prior_only = [predictor.predict_one(feats[i]).length for i in test]
    rng = np.random.default_rng(seed + 1)
    predict_ns, learn_ns, preq_err = [], [], []
    for i in rng.permutation(train):
        t0 = time.perf_counter_ns()
        pred = predictor.predict_one(feats[i])
        t1 = time.perf_counter_ns()
        predictor.learn_one(feats[i], lengths[i])
        t2 = time.perf_counter_ns()
        predict_ns.append(t1 - t0)
        learn_ns.append(t2 - t1)
        preq_err.append(abs(pred.length - lengths[i]))

    preds = [predictor.predict_one(feats[i]) for i in test]
    pl = np.array([p.length for p in preds])
    truth = lengths[test]
    covered = np.mean([p.low <= y <= p.high for p, y in zip(preds, truth, strict=True)])
    return {
        "kendall_tau": kendall_tau(pl, truth),
        "spearman": spearman(pl, truth),
        "mae_tokens": float(np.mean(np.abs(pl - truth))),
        "interval_coverage": float(covered),
        "predict_us_p50": _p50_us(predict_ns),
        "learn_us_p50": _p50_us(learn_ns),
        "features_us_p50": _p50_us(feat_ns),
        "prior_kendall_tau": kendall_tau(prior_only, truth),
        "prequential_mae_tokens": float(np.mean(preq_err)) if preq_err else float("nan"),
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "tier": predictor.tier,
        "encoder": predictor.prior.encoder_name if predictor.tier == "encoder" else None,
        "coverage_target": predictor.coverage,
        "n_drifts": predictor.n_drifts,
    }


def _p50_us(ns: Sequence[int]) -> float:
    return float(np.median(ns)) / 1e3 if len(ns) else math.nan
