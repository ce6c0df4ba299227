"""What an ingress replica decides per request, without Ray: prediction, priority, offload.

The ingress of the Ray Serve deployment (:mod:`~rtlm_adapt.integrations.ray_serve`) asks a
:class:`Front` for a :class:`Plan` at arrival: the prompt's features (kept to teach the learner
at the end), the predicted output tokens, the priority key (the controller's key under the
knobs, lower runs first, as an int for the engine's queue or vLLM's ``priority``) and whether
the request is offload-eligible (predicted length at or above the knobs' ``offload_threshold``).
The plan's :meth:`Plan.handle_kwargs` are the keyword arguments ``LengthAwareRouter`` reads.

>>> from rtlm_adapt.predictor import LengthPredictor
>>> front = Front(LengthPredictor(prior_length=300.0), Knobs(offload_threshold=200.0))
>>> plan = front.plan("Write a long essay about rivers.")
>>> round(plan.predicted_tokens), plan.offload
(300, True)
>>> sorted(plan.handle_kwargs())
['rtlm_offload', 'rtlm_predicted_tokens', 'rtlm_priority']
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rtlm_adapt.arrival import prompt_features
from rtlm_adapt.integrations.routing import OFFLOAD_KW, PREDICTED_TOKENS_KW, PRIORITY_KW
from rtlm_adapt.knobs import Knobs, engine_priority
from rtlm_adapt.predictor import LengthPredictor
from rtlm_adapt.uncertainty import UncertaintyScorer


@dataclass(frozen=True, slots=True)
class Plan:
    """One request's routing inputs, decided at arrival."""

    features: Mapping[Any, float]
    predicted_tokens: float
    priority: int
    offload: bool

    def handle_kwargs(self) -> dict[str, Any]:
        """The handle call's keyword arguments (the router's inputs)."""
        return {
            PREDICTED_TOKENS_KW: self.predicted_tokens,
            PRIORITY_KW: self.priority,
            OFFLOAD_KW: self.offload,
        }


class Front:
    """Predicts and keys requests with a local copy of the shared predictor.

    Parameters
    ----------
    predictor
        This replica's copy (replaced whenever a newer one is pulled from the learner).
    knobs
        The policy's knobs: priority weights and ``offload_threshold``.
    tokens_per_s
        One request's decode speed, to turn predicted tokens into the service seconds the
        priority key weighs.
    """

    def __init__(
        self, predictor: LengthPredictor, knobs: Knobs | None = None, tokens_per_s: float = 50.0
    ) -> None:
        self.predictor = predictor
        self.knobs = knobs if knobs is not None else Knobs()
        self.tokens_per_s = tokens_per_s
        self.scorer = UncertaintyScorer()

    def plan(self, prompt: str, *, deadline: float | None = None) -> Plan:
        """Score, predict and key ``prompt`` (arrival is now, on the wall clock shared by the
        replicas, so keys from different replicas compare)."""
        features = prompt_features(prompt, self.scorer, self.predictor)  # as the controller's
        uncertainty = features["uncertainty"]
        predicted = float(self.predictor.predict_one(features).length)
        key = self.knobs.priority(predicted / self.tokens_per_s, uncertainty, time.time(), deadline)
        return Plan(
            features=features,
            predicted_tokens=predicted,
            priority=engine_priority(key),
            offload=predicted >= self.knobs.offload_threshold,
        )


def openai_answer(
    kind: str, model: str, text: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """An OpenAI-shaped answer: ``kind`` is ``chat.completion`` or ``text_completion``."""
    if kind == "chat.completion":
        choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
    else:
        choice = {"text": text}
    choice.update(index=0, finish_reason="length", logprobs=None)
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:16]}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


__all__ = ["Front", "Plan", "openai_answer"]
