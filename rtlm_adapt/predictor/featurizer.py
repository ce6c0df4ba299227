"""Prompt -> :class:`~rtlm_adapt.predictor.features.PromptFeatures`, once per request.

The uncertainty features and score (:class:`rtlm_adapt.uncertainty.UncertaintyScorer`), the
hashed words and word pairs (:func:`rtlm_adapt.prior.lexical_features`) and, on the ``encoder``
tier, the prompt's embedding with the prior's embedding features. The dense features are
standardized here, once, by the prior's fixed scaling, so that predicting and learning read them
as they are.

>>> from rtlm_adapt.prior import LengthPrior
>>> featurizer = PromptFeaturizer(LengthPrior.packaged("lexical"))
>>> f = featurizer.features("Write a poem about the sea")
>>> len(f.hashed), f["open_ended"], 0.0 < f.uncertainty < 1.0
(13, 2.0, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rtlm_adapt.predictor.features import PromptFeatures
from rtlm_adapt.predictor.scaling import PriorScaling, ScaledFeatures
from rtlm_adapt.prior import HASH_BITS, LengthPrior, lexical_features
from rtlm_adapt.uncertainty import UncertaintyScorer

__all__ = ["PromptFeaturizer", "prior_scaling"]

_SCORER = UncertaintyScorer()  # for prompts without precomputed uncertainty features


def prior_scaling(prior: LengthPrior | None, clip: float = 4.0) -> PriorScaling:
    """The fixed standardization of ``prior``'s dense features (none without a prior); their
    weights follow the ``2**HASH_BITS`` hashed buckets'."""
    dense = prior.dense if prior is not None else ()
    return PriorScaling(
        tuple(d[0] for d in dense),
        tuple(d[1] for d in dense),
        tuple(d[2] for d in dense),
        clip,
        1 << HASH_BITS,
    )


class PromptFeaturizer:
    """Makes the features a length predictor with ``prior`` reads.

    ``scaling``: the residual model's standardization (default: the prior's, clipped at 4);
    ``encoder``: on the encoder tier, an object with ``encode(list[str]) -> array`` (default: the
    encoder the prior was fitted on, created on first use, see :meth:`get_encoder`).
    """

    def __init__(
        self,
        prior: LengthPrior | None,
        scaling: PriorScaling | None = None,
        encoder: Any = None,
    ) -> None:
        self.prior = prior
        self.scaling = scaling if scaling is not None else prior_scaling(prior)
        self.encoder = encoder

    @property
    def tier(self) -> str:
        """``encoder`` when the prior has an embedding head, else ``lexical``."""
        return "encoder" if self.prior is not None and self.prior.has_encoder else "lexical"

    def features(
        self,
        prompt: str,
        base: Mapping[str, float] | None = None,
        embedding: np.ndarray | None = None,
    ) -> PromptFeatures:
        """All features of ``prompt``, as one record.

        ``base`` (the uncertainty features, as the controller computes them; default: computed
        here, with the ``uncertainty`` score) is extended with the hashed words and, on the
        encoder tier, the embedding features (computing the embedding at batch 1 unless
        ``embedding`` is given; use :meth:`features_many` to batch).
        """
        if base is None:
            base = _SCORER.features(prompt)
            base["uncertainty"] = _SCORER.score(base)
        hashed = lexical_features(prompt)
        buckets = np.fromiter(hashed, np.intp, len(hashed))
        if self.tier != "encoder":
            names, values = (
                tuple(base),
                np.fromiter(base.values(), np.float64, len(base)),
            )
            return PromptFeatures(
                names, values, buckets, scaled=self._scaled(names, values, buckets)
            )
        prior: LengthPrior = self.prior  # type: ignore[assignment]
        if embedding is None:
            embedding = self.get_encoder().encode([prompt], batch_size=1)[0]
        dense = {**base, **prior.embedding_features(embedding)}
        names, values = (
            tuple(dense),
            np.fromiter(dense.values(), np.float64, len(dense)),
        )
        return PromptFeatures(
            names,
            values,
            buckets,
            # standardised (and unit-length) when the prior stores a standardisation
            prior.transform(np.asarray(embedding, np.float32).ravel()),
            prior.predict({**dense, **hashed}),
            self._scaled(names, values, buckets),
        )

    def features_many(self, prompts: list[str], batch_size: int = 32) -> list[PromptFeatures]:
        """:meth:`features` for many prompts, embedding them in batches on the encoder tier."""
        embs: Any = [None] * len(prompts)
        if self.tier == "encoder" and prompts:
            embs = self.get_encoder().encode(prompts, batch_size=batch_size)
        return [self.features(p, embedding=e) for p, e in zip(prompts, embs, strict=True)]

    def get_encoder(self) -> Any:
        """The encoder of the encoder tier (made on first use: the one the prior was fitted on)."""
        if self.encoder is None:
            from rtlm_adapt.encoder import make_encoder

            name, kwargs = "minilm", {"max_tokens": 128}
            if self.prior is not None:
                name = self.prior.encoder_name
                kwargs = dict(self.prior.meta.get("encoder_kwargs", {}))
                if name == "minilm":
                    kwargs = {"max_tokens": int(self.prior.meta.get("encoder_max_tokens", 128))}
            self.encoder = make_encoder(name, **kwargs)
        return self.encoder

    def _scaled(
        self, names: tuple[Any, ...], values: np.ndarray, buckets: np.ndarray
    ) -> ScaledFeatures | None:
        """The features standardized for the residual model (None if not all finite)."""
        if not np.isfinite(values).all():
            return None
        return self.scaling.scale(names, values, buckets)
