"""ArrivalScore: what the controller works out for a request when it arrives, before it queues:
its prompt's features and uncertainty, its predicted output length, its prompt length.

:meth:`AdaptiveController.score <rtlm_adapt.controller.AdaptiveController.score>` computes it
with :func:`score_arrival`; a replay of recorded traffic (:mod:`rtlm_adapt.shadow`) hands back
the score each request got live instead.

>>> from rtlm_adapt.predictor import LengthPredictor
>>> from rtlm_adapt.request import Request
>>> from rtlm_adapt.uncertainty import UncertaintyScorer
>>> scorer, predictor = UncertaintyScorer(), LengthPredictor.pretrained()
>>> request = Request("a", "Write a long story about the sea.", 0.0)
>>> score = score_arrival(request, prompt_features(request.prompt, scorer, predictor),
...                       scorer=scorer, predictor=predictor)
>>> 0.0 <= score.uncertainty <= 1.0, score.prediction.length >= 1, score.prompt_tokens >= 1
(True, True, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rtlm_adapt.predictor import LengthPrediction, LengthPredictor
from rtlm_adapt.request import Request
from rtlm_adapt.uncertainty import UncertaintyScorer


@dataclass(frozen=True, slots=True)
class ArrivalScore:
    """A request as scored at arrival."""

    #: The prompt's features, as the predictor saw them (it learns from them at the finish).
    features: Mapping[Any, float]
    #: The prompt's uncertainty score (0..1).
    uncertainty: float
    prediction: LengthPrediction
    #: The prompt's length in tokens (the request's own count, or the estimate from its text).
    prompt_tokens: int


def prompt_features(
    prompt: str, scorer: UncertaintyScorer, predictor: LengthPredictor
) -> Mapping[Any, float]:
    """The uncertainty features of ``prompt``, its score, and what the predictor adds
    (hashed words, an embedding)."""
    features = scorer.features(prompt)
    features["uncertainty"] = scorer.score(features)  # first: the predictor reads it
    extend = getattr(predictor, "features", None)
    return extend(prompt, base=features) if callable(extend) else features


def score_arrival(
    request: Request, features: Mapping[Any, float], *, scorer: UncertaintyScorer,
    predictor: LengthPredictor,
) -> ArrivalScore:
    """``request`` scored from ``features`` (an uncertainty score missing from them, as when
    they were computed upstream without one, is added)."""
    uncertainty = features.get("uncertainty")
    if uncertainty is None:
        uncertainty = features["uncertainty"] = scorer.score(features)
    prompt_tokens = request.prompt_tokens or max(1, int(features.get("prompt_tokens_est", 1)))
    return ArrivalScore(features, uncertainty, predictor.predict_one(features), prompt_tokens)
