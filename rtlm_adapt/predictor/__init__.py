"""The output-length predictor, composed river-style from small online parts.

* :mod:`~rtlm_adapt.predictor.features` -- :class:`PromptFeatures`, one request's features
* :mod:`~rtlm_adapt.predictor.featurizer` -- prompt -> :class:`PromptFeatures`, once per request
* :mod:`~rtlm_adapt.predictor.length` -- :class:`LengthPredictor`, the composition
* :mod:`~rtlm_adapt.predictor.rows` -- how it reads a record (validation, the residual row)
* :mod:`~rtlm_adapt.predictor.offset` -- the per-deployment offset with drift detection
* :mod:`~rtlm_adapt.predictor.residual` -- the normalised-LMS residual model
* :mod:`~rtlm_adapt.predictor.scaling` -- feature standardization (Welford)
* :mod:`~rtlm_adapt.predictor.conformal` -- the conformal interval
* :mod:`~rtlm_adapt.predictor.embedding` -- the encoder tier's embedding residual model
* :mod:`~rtlm_adapt.predictor.state` -- the saved form (format version 1)
* :mod:`~rtlm_adapt.predictor.evaluation` -- ``rtlm-adapt predict-eval``: ranking and calibration
  on real prompts (not imported here)

The offline prior is :class:`rtlm_adapt.prior.LengthPrior`; its names stay importable from here.
"""

from rtlm_adapt.predictor.embedding import EmbeddingResidualModel
from rtlm_adapt.predictor.features import PromptFeatures
from rtlm_adapt.predictor.length import (
    MAX_TRUE_LENGTH,
    LengthPrediction,
    LengthPredictor,
)
from rtlm_adapt.prior import (
    HASH_BITS,
    PRIOR_FILES,
    LengthPrior,
    lexical_features,
    prior_file,
    split_tier,
)

__all__ = [
    "HASH_BITS",
    "MAX_TRUE_LENGTH",
    "PRIOR_FILES",
    "EmbeddingResidualModel",
    "LengthPrediction",
    "LengthPredictor",
    "LengthPrior",
    "PromptFeatures",
    "lexical_features",
    "prior_file",
    "split_tier",
]
