"""LiveRequest: what the controller knows of one request between submit and finish.

It is the request's queue entry too (a :class:`~rtlm_adapt.queue.QueueEntry`): one object per
request from submit to finish. The queue orders it by ``key`` while it waits; the controller holds
it while it runs. :meth:`AdaptiveController.entry <rtlm_adapt.controller.AdaptiveController.entry>`
hands it out, so a gateway can read the prediction, the service-time estimate and the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rtlm_adapt.arrival import ArrivalScore
from rtlm_adapt.knobs import Policy, engine_priority
from rtlm_adapt.latency import LatencyModel
from rtlm_adapt.predictor import LengthPrediction
from rtlm_adapt.queue import QueueEntry
from rtlm_adapt.request import Request


@dataclass(slots=True, eq=False, kw_only=True)
class LiveRequest(QueueEntry):
    """A submitted request that has not ended, with everything the controller scored for it."""

    request: Request
    #: The prompt's features, as the predictor saw them (it learns from them at the finish).
    features: Mapping[Any, float]
    #: The prompt's uncertainty score (0..1).
    uncertainty: float
    prediction: LengthPrediction
    prompt_tokens: int
    #: The length the priority uses (per the policy's ``length_source``).
    rank_length: float
    #: Predicted service time on the primary at the reference batch size (s).
    service_s: float
    #: The executor it runs on (None while it waits).
    executor: str | None = None

    @classmethod
    def scored(
        cls, request: Request, score: ArrivalScore, *, policy: Policy, latency: LatencyModel,
        reference_batch: int,
    ) -> LiveRequest:
        """A submitted request with its ``score``: ranked by the length the policy's
        ``length_source`` names, its service time from the primary's ``latency`` model."""
        tokens = score.prompt_tokens
        ranked_by = rank_length(policy, request, score.prediction, tokens)
        return cls(
            request.id, request.arrival_time, request=request, features=score.features,
            uncertainty=score.uncertainty, prediction=score.prediction, prompt_tokens=tokens,
            rank_length=ranked_by,
            service_s=latency.service_time(tokens, ranked_by, batch_size=reference_batch),
        )

    @property
    def engine_priority(self) -> int:
        """vLLM's ``priority`` for this request (:func:`~rtlm_adapt.knobs.engine_priority`)."""
        return engine_priority(self.key)

    def offloadable(self, threshold: float) -> bool:
        """Eligible for the secondary executor: the length it is ranked by reaches ``threshold``."""
        return self.rank_length >= threshold


def rank_length(
    policy: Policy, request: Request, prediction: LengthPrediction, prompt_tokens: int
) -> float:
    """The length ``request`` is ranked by, per the policy's ``length_source``: predicted, the
    prompt's own length, or (oracle baselines only) the true length a benchmark attached."""
    source = policy.length_source
    if source == "predicted":
        return prediction.length
    if source == "prompt":
        return float(prompt_tokens)
    true = request.true_output_tokens
    if true is None:
        raise ValueError(
            f"policy {policy.name!r} ranks by true lengths, but request {request.id!r} "
            "carries none (metadata[TRUE_LENGTH_KEY])"
        )
    return float(true)
