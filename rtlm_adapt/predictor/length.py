"""Online output-length predictor: an offline prior plus online log-space corrections.

The scheduler asks, for every arriving request, how many tokens the model will generate. We answer
with a point estimate and an interval that covers the true length with a requested probability,
and we learn from every completed request, so the predictor adapts to the served model and
workload.

The prediction, in ``log1p(tokens)``, is a sum of parts, each a small online model:

* **the prior** (:class:`rtlm_adapt.prior.LengthPrior`) -- a frozen linear model fitted offline
  (ShareGPT) on hashed words and word pairs of the prompt, the uncertainty features and, on the
  ``encoder`` tier, a sentence embedding. It makes the first request's prediction useful.
  Without a prior it is the constant ``log1p(prior_length)``.
* **a per-deployment offset** (:class:`~rtlm_adapt.predictor.offset.DriftingOffset`) with drift
  detection (ADWIN).
* **a residual linear model** (:class:`~rtlm_adapt.predictor.residual.NLMSRegression`) --
  normalised LMS on the same features (standardized dense ones, see
  :mod:`~rtlm_adapt.predictor.scaling`; 0/1 hashed ones), starting from the prior's weights.
* **on the encoder tier, an embedding residual model**
  (:class:`~rtlm_adapt.predictor.embedding.EmbeddingResidualModel`) -- kNN and ridge terms over
  the finished requests' prompt embeddings.

The interval comes from :class:`~rtlm_adapt.predictor.conformal.ConformalInterval`.

Why this design:

* **log space** -- response lengths are heavy-tailed; a squared loss on ``log1p(length)`` keeps
  the long answers from dominating and makes errors relative.
* **bounded steps** -- every update uses the residual clipped to ``+-huber`` and normalised LMS
  steps, so one absurd (but accepted) length moves later predictions by a few percent at most.
* **prequential conformal intervals** -- each ``learn_one`` first scores the request it is about
  to learn from, so the residual is an honest out-of-sample error.

>>> p = LengthPredictor(prior_length=200.0)
>>> round(p.predict_one({"prompt_tokens_est": 12.0}).length)
200
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rtlm_adapt.predictor.conformal import ConformalInterval
from rtlm_adapt.predictor.embedding import EmbeddingResidualModel
from rtlm_adapt.predictor.features import PromptFeatures
from rtlm_adapt.predictor.featurizer import PromptFeaturizer
from rtlm_adapt.predictor.offset import DriftingOffset
from rtlm_adapt.predictor.residual import NLMSRegression
from rtlm_adapt.predictor.rows import RowReader, as_record, finite_part
from rtlm_adapt.predictor.scaling import FeatureScaler, PriorScaling
from rtlm_adapt.predictor.state import (
    EMBEDDING_KEY,
    envelope_bytes,
    interval_from_state,
    interval_state,
    offset_from_state,
    offset_state,
    scaler_from_state,
    state_from_envelope,
)
from rtlm_adapt.prior import HASH_BITS, LengthPrior

__all__ = ["MAX_TRUE_LENGTH", "LengthPrediction", "LengthPredictor"]

logger = logging.getLogger("rtlm_adapt.predictor")

#: Lengths above this are treated as garbage (a unit mix-up or a runaway counter), not data.
MAX_TRUE_LENGTH = 10**6
_LOG_MAX = math.log1p(MAX_TRUE_LENGTH)
_N_HASH = 1 << HASH_BITS


class LengthPrediction(NamedTuple):
    """A predicted output length in tokens, with an interval.

    Attributes
    ----------
    length
        Point estimate (>= 1); the median of the predicted length under log-space noise.
    low, high
        Interval ends (``1 <= low <= length <= high``) meant to cover the true length with the
        predictor's ``coverage`` probability.
    """

    length: float
    low: float
    high: float


class LengthPredictor:
    """Predict a request's output length from prompt features and learn from completions.

    Parameters
    ----------
    coverage
        Target probability that ``low <= true length <= high``, in (0, 1).
    prior_length
        The answer before anything is learned when there is no ``prior``.
    learning_rate
        Normalised-LMS step of the residual linear model (features standardized; unitless).
    intercept_lr
        Step of the per-deployment offset; larger so the level follows the served model quickly.
    window
        Number of recent residuals the interval is calibrated on.
    min_residuals
        Below this many residuals the interval uses ``default_log_spread`` instead.
    default_log_spread
        Assumed standard deviation of the log-length error before calibration.
    feature_clip
        Standardized features are clipped to ``[-feature_clip, feature_clip]``.
    prior
        A :class:`LengthPrior` (the fitted offline model), or None for a constant prior.
    huber
        Residuals are clipped to ``+-huber`` (log units) before any update: the bound on how far
        one completion can move the model.
    drift_delta
        ADWIN's confidence parameter on the residual stream; None turns drift detection off.
    encoder
        For the ``encoder`` tier: an object with ``encode(list[str]) -> array`` (default: the
        encoder the prior was fitted on, created on first use).
    embedding_model
        The encoder tier's :class:`EmbeddingResidualModel` (or None: none).

    Examples
    --------
    >>> import random
    >>> rng = random.Random(0)
    >>> p = LengthPredictor(coverage=0.9, prior_length=100.0)
    >>> for _ in range(2000):
    ...     f = {"words": rng.uniform(0, 1), "noise": rng.gauss(0, 1)}
    ...     _ = p.learn_one(f, math.exp(2.0 + 4.0 * f["words"]))
    >>> short, long_ = p.predict_one({"words": 0.1}), p.predict_one({"words": 0.9})
    >>> short.length < 30 < 200 < long_.length
    True
    >>> short.low <= short.length <= short.high
    True
    >>> p.learn_one({"words": 0.5}, float("nan"))  # rejected, logged, model unchanged
    False
    >>> p.n_learned
    2000

    With the packaged prior, the first prediction already ranks prompts:

    >>> q = LengthPredictor.pretrained("lexical")
    >>> essay = q.predict_one(q.features("Write a detailed essay on the French Revolution."))
    >>> word = q.predict_one(q.features("Answer in one word: what is the capital of Peru?"))
    >>> word.length < essay.length
    True
    """

    def __init__(
        self,
        coverage: float = 0.9,
        prior_length: float = 200.0,
        *,
        learning_rate: float = 0.02,
        intercept_lr: float = 0.025,
        window: int = 500,
        min_residuals: int = 30,
        default_log_spread: float = 1.0,
        feature_clip: float = 4.0,
        prior: LengthPrior | None = None,
        huber: float = 1.0,
        drift_delta: float | None = 0.002,
        encoder: Any = None,
        embedding_model: EmbeddingResidualModel | None = None,
    ) -> None:
        if not 0.0 < coverage < 1.0:
            raise ValueError(f"coverage must be in (0, 1), got {coverage!r}")
        if not (math.isfinite(prior_length) and 1.0 <= prior_length <= MAX_TRUE_LENGTH):
            raise ValueError(
                f"prior_length must be in [1, {MAX_TRUE_LENGTH}], got {prior_length!r}"
            )
        for name, value in (
            ("learning_rate", learning_rate),
            ("intercept_lr", intercept_lr),
            ("default_log_spread", default_log_spread),
            ("feature_clip", feature_clip),
            ("huber", huber),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if window < 2 or min_residuals < 1 or min_residuals > window:
            raise ValueError("need window >= 2 and 1 <= min_residuals <= window")
        if drift_delta is not None and not 0.0 < drift_delta < 1.0:
            raise ValueError(f"drift_delta must be in (0, 1) or None, got {drift_delta!r}")

        self.coverage = float(coverage)
        self.prior_length = float(prior_length)
        self.huber = float(huber)
        self.prior = prior
        #: The bias of the prediction: the prior's (or log1p(prior_length)).
        self.bias = math.log1p(self.prior_length) if prior is None else prior.bias
        self.offset = DriftingOffset(float(intercept_lr), drift_delta)
        self.scaler = FeatureScaler(prior.dense if prior is not None else ())
        hashed = prior.hash_weights if prior is not None else [0.0] * _N_HASH
        self._set_residual_model(hashed, float(learning_rate), float(feature_clip), encoder)
        self.interval = ConformalInterval(
            self.coverage, int(window), int(min_residuals), float(default_log_spread)
        )
        self.embedding_model = embedding_model
        #: Number of completions accepted by :meth:`learn_one`.
        self.n_learned = 0

    def _set_residual_model(
        self, hashed: list[float], learning_rate: float, clip: float, encoder: Any
    ) -> None:
        """The residual model, its features' scaling and the featurizer that applies it."""
        # One weight vector: the hashed buckets, then the features with the prior's (fixed)
        # standardization, whose weights start at the prior's.
        fixed = {k: st for k, st in self.scaler.stats.items() if st.fixed}
        self.scaling = PriorScaling(
            tuple(fixed),
            tuple(st.mean for st in fixed.values()),
            tuple(st.inv_std for st in fixed.values()),
            clip,
            _N_HASH,
        )
        weights = np.array(list(hashed) + [st.weight for st in fixed.values()], np.float64)
        self.residual_model = NLMSRegression(weights, learning_rate, clip)
        self.rows = RowReader(self.scaling, self.scaler)
        self.featurizer = PromptFeaturizer(self.prior, self.scaling, encoder)

    @classmethod
    def pretrained(cls, tier: str = "lexical", **kwargs: Any) -> LengthPredictor:
        """A predictor starting from the packaged ShareGPT prior of ``tier``.

        ``tier`` is ``lexical`` (prompt text only; microseconds) or ``encoder`` (adds a prompt
        embedding; needs torch and transformers). On the encoder tier ``encoder="NAME"`` picks the
        encoder (:data:`rtlm_adapt.encoder.ENCODERS`): ``"minilm"`` (default, all-MiniLM-L6-v2)
        or ``"smollm2-l16"`` (the served SmolLM2's layer-16 hidden state); ``tier="encoder:NAME"``
        says the same. An encoder OBJECT passed as ``encoder`` is used as the predictor's.

        An encoder-tier prior plugs in an :class:`EmbeddingResidualModel` sized to the prior's
        embedding head, and calibrates its interval on a ``window`` of 300 recent residuals (not
        500): this tier keeps improving over the first few hundred requests, so older residuals
        overstate its error (with 500, 90% intervals covered 0.93-0.945 of held-out AlpacaEval
        lengths for 4 of the 16 models; with 300, 0.88-0.93 for all 16).
        """
        name = kwargs.pop("encoder") if isinstance(kwargs.get("encoder"), str) else None
        return cls.from_prior(LengthPrior.packaged(tier, name), **kwargs)

    @classmethod
    def from_prior(cls, prior: LengthPrior, **kwargs: Any) -> LengthPredictor:
        """A predictor starting from ``prior``, with the encoder tier's parts when the prior has
        an embedding head (see :meth:`pretrained`); ``kwargs`` override them."""
        if prior.has_encoder:
            kwargs.setdefault("window", 300)
            if "embedding_model" not in kwargs:
                kwargs["embedding_model"] = EmbeddingResidualModel.for_prior(prior)
        return cls(prior=prior, **kwargs)

    # -- public API ------------------------------------------------------------------------
    @property
    def n_drifts(self) -> int:
        """Number of drifts the offset's detector found."""
        return self.offset.n_drifts

    @property
    def tier(self) -> str:
        """``encoder`` when the prior has an embedding head, else ``lexical``."""
        return self.featurizer.tier

    @property
    def encoder(self) -> Any:
        """The encoder tier's encoder (None until made or given)."""
        return self.featurizer.encoder

    def features(
        self,
        prompt: str,
        base: Mapping[str, float] | None = None,
        embedding: np.ndarray | None = None,
    ) -> PromptFeatures:
        """All features this predictor uses for ``prompt``, as one record (see
        :meth:`PromptFeaturizer.features`)."""
        return self.featurizer.features(prompt, base, embedding)

    def features_many(self, prompts: list[str], batch_size: int = 32) -> list[PromptFeatures]:
        """:meth:`features` for many prompts, embedding them in batches on the encoder tier."""
        return self.featurizer.features_many(prompts, batch_size)

    def get_encoder(self) -> Any:
        """The encoder of the encoder tier (made on first use: the one the prior was fitted on)."""
        return self.featurizer.get_encoder()

    def predict_one(self, features: Mapping[Any, float]) -> LengthPrediction:
        """Predict the output length for a request with these features (a
        :class:`PromptFeatures` or a ``{name: value}`` mapping).

        Non-finite feature values are treated as missing rather than raising: the scheduler
        always needs an answer.
        """
        record = as_record(features, "predict_one")
        if record is None:
            logger.warning("LengthPredictor: non-finite feature values treated as missing")
            record = finite_part(features)
        y = _clip_log(self._predict_log(record))
        low_off, high_off = self.interval.predict_one()
        length = math.expm1(y)
        length = length if length > 1.0 else 1.0
        low = math.expm1(_clip_log(y + low_off))
        low = length if low > length else (low if low > 1.0 else 1.0)  # in [1, length]
        high = math.expm1(_clip_log(y + high_off))
        return LengthPrediction(length, low, high if high > length else length)

    def predict_remaining(
        self, features: Mapping[Any, float], generated_tokens: float
    ) -> LengthPrediction:
        """Predicted tokens still to come for a request that has generated ``generated_tokens``.

        The total length is the prediction times the error distribution, conditioned on the
        total exceeding what is generated: quantiles of the recent residuals ``r`` with
        ``prediction * e**r > generated``. A request that has outlived (almost) all observed
        errors is in the tail, where lengths behave like a power law: the remaining length is
        then taken proportional to what has been generated (median 0.4x, interval 0.05x-3x).

        Examples
        --------
        >>> p = LengthPredictor(prior_length=100.0)
        >>> fresh = p.predict_remaining({}, 0)
        >>> long_run = p.predict_remaining({}, 150)
        >>> long_run.length > 0 and long_run.length + 150 > fresh.length
        True
        """
        real = isinstance(generated_tokens, numbers.Real) and not isinstance(generated_tokens, bool)
        g = float(generated_tokens) if real else math.nan
        if not 0.0 <= g < math.inf:  # a caller's count, not a model output: say it is wrong
            raise ValueError(
                f"generated_tokens must be a finite number >= 0, got {generated_tokens!r}"
            )
        if g < 1.0:
            return self.predict_one(features)
        record = as_record(features, "predict_remaining") or finite_part(features)
        y = _clip_log(self._predict_log(record))
        quantiles = self.interval.tail_quantiles(math.log1p(g) - y)
        if quantiles is not None:
            rem = [max(1.0, math.expm1(_clip_log(y + q)) - g) for q in quantiles]
        else:
            rem = [max(1.0, 0.05 * g), max(1.0, 0.4 * g), max(1.0, 3.0 * g)]
        return LengthPrediction(length=rem[1], low=min(rem[0], rem[1]), high=max(rem))

    def learn_one(self, features: Mapping[Any, float], true_length: float) -> bool:
        """Learn from a completed request; return False (and log why) if the input is rejected.

        A rejected call does not change the model. A length of 0 is clipped to 1; lengths that
        are not finite numbers in ``[0, MAX_TRUE_LENGTH]`` are rejected, and so are features with
        a value that is not a finite number.
        """
        try:
            ok_length = (
                not isinstance(true_length, bool)
                and math.isfinite(true_length)
                and 0 <= true_length <= MAX_TRUE_LENGTH
            )
        except TypeError:
            ok_length = False
        if not ok_length:
            logger.warning("LengthPredictor: rejected true_length=%r", true_length)
            return False
        record = as_record(features, "learn_one")
        if record is None:
            logger.warning(
                "LengthPredictor: rejected features with non-finite or non-numeric values"
            )
            return False
        if true_length < 1:
            logger.warning("LengthPredictor: true_length=%r clipped to 1", true_length)
        t = float(true_length)
        y = math.log1p(t if t > 1.0 else 1.0)

        # Score before learning so the residual is out-of-sample (prequential calibration).
        row, emb, layout = self.rows.read(record)
        linear = self.residual_model.predict_one(row, self.bias + self.offset.value + emb)
        residual = y - _clip_log(linear)
        c = self.huber
        r = residual if -c <= residual <= c else (c if residual > 0 else -c)
        if abs(residual) > 3.0 * c:
            logger.info(
                "LengthPredictor: outlying length %r (log-error %.1f) clipped to +-%.1f",
                true_length,
                residual,
                c,
            )
        # The embedding term (encoder tier): its value before this update.
        vec = record.embedding if self.embedding_model is not None else None
        term = None if vec is None else self.embedding_model.predict_one(vec)  # type: ignore[union-attr]

        self.residual_model.learn_one(row, r)
        drift = self.offset.learn_one(r)
        if layout is not None and (layout.running or layout.new):
            self.scaler.learn_one(layout.values_to_learn(record))
        # The conformal window holds the prequential residual of the whole prediction,
        # measured against the level after any drift.
        window_residual = residual
        if drift is not None:
            # keep the residuals since the change (this one among them), at the new level
            self.interval.shift(drift.shift, keep=min(drift.width, self.interval.window) - 1)
            window_residual = residual - drift.shift
        if term is not None:
            window_residual = window_residual - term
        self.interval.learn_one(window_residual)
        if term is not None and true_length >= 1:
            # The finished request joins the embedding model with its residual against the
            # prior, bounded like every update: at most ``huber`` from the whole prediction.
            pred = _clip_log(linear + term)
            target = pred + max(-c, min(c, y - pred))
            prior_log = record.prior_log
            if prior_log is None:
                prior_log = self.prior.predict(record)  # type: ignore[union-attr]
            self.embedding_model.learn_one(vec, target - prior_log)  # type: ignore[union-attr]
        self.n_learned += 1
        return True

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the predictor to ``path`` (a pickle inside a versioned envelope, see
        :mod:`rtlm_adapt.predictor.state`).

        Only load files you wrote yourself: unpickling runs code from the file. The encoder
        (a model) is not saved; it is recreated on first use.
        """
        state = self.__getstate__()
        state["encoder"] = None
        Path(path).write_bytes(envelope_bytes(state))

    @classmethod
    def load(cls, path: str | Path) -> LengthPredictor:
        """Read a predictor written by :meth:`save`; raise ValueError if the file is not one."""
        state = state_from_envelope(Path(path).read_bytes(), str(path))
        obj = cls.__new__(cls)
        obj.__setstate__(state)
        return obj

    def __getstate__(self) -> dict[str, Any]:
        """The saved state (format version 1, see :mod:`rtlm_adapt.predictor.state`)."""
        weights = self.residual_model.weights
        stats = {k: st.as_list() for k, st in self.scaler.stats.items()}
        for i, name in enumerate(self.scaling.names):  # a fixed feature's weight: in its record
            stats[name][4] = float(weights[_N_HASH + i])
        state = {
            "coverage": self.coverage,
            "prior_length": self.prior_length,
            "learning_rate": self.residual_model.learning_rate,
            "feature_clip": self.residual_model.clip,
            "huber": self.huber,
            "prior": self.prior,
            "encoder": self.encoder,
            "_base": self.bias,
            "_stats": stats,
            "_n_learned": self.n_learned,
            "_hw": weights[:_N_HASH].tolist(),
            **offset_state(self.offset),
            **interval_state(self.interval),
        }
        if self.embedding_model is not None:
            state[EMBEDDING_KEY] = self.embedding_model
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.coverage = state["coverage"]
        self.prior_length = state["prior_length"]
        self.huber = state["huber"]
        self.prior = state["prior"]
        self.bias = state["_base"]
        self.offset = offset_from_state(state)
        self.scaler = scaler_from_state(state)
        self._set_residual_model(
            state["_hw"],
            state["learning_rate"],
            state["feature_clip"],
            state["encoder"],
        )
        self.interval = interval_from_state(state)
        self.embedding_model = state.get(EMBEDDING_KEY)
        self.n_learned = state["_n_learned"]

    # -- internals -------------------------------------------------------------------------
    def _predict_log(self, record: PromptFeatures) -> float:
        """The prediction in log1p space (not clipped)."""
        row, emb, _ = self.rows.read(record)
        s = self.residual_model.predict_one(row, self.bias + self.offset.value + emb)
        if record.embedding is not None and self.embedding_model is not None:
            s += self.embedding_model.predict_one(record.embedding)
        return s


def _clip_log(y: float) -> float:
    # Keeps expm1 from overflowing if the weights ever run away.
    return 0.0 if y < 0.0 else (_LOG_MAX if y > _LOG_MAX else y)
