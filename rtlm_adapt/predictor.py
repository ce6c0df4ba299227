"""Online output-length predictor: a river linear model on log1p(length), with calibrated intervals.

The scheduler asks, for every arriving request, how many tokens the model will generate. We answer
with a point estimate and an interval that covers the true length with a requested probability,
and we learn from every completed request, so the predictor adapts to the served model and
workload without an offline training step.

Why this design:

* **log space** -- response lengths are heavy-tailed (a few tokens to thousands); a squared loss
  on ``log1p(length)`` keeps the long answers from dominating the fit and makes errors relative.
* **our own feature scaling** -- SGD needs standardized inputs, and the features (counts of
  tokens next to 0/1 flags) differ by orders of magnitude. A plain-Python running standardizer
  with clipped z-scores is cheaper than river's ``StandardScaler`` pipeline and the clipping keeps
  one outlying prompt from throwing the weights off.
* **prequential conformal intervals** -- each ``learn_one`` first scores the request it is about
  to learn from, so the residual is an honest out-of-sample error. The interval ends are
  quantiles of the recent residuals (asymmetric: length errors are skewed), which tracks the
  model as it improves or the workload drifts.

>>> p = LengthPredictor(prior_length=200.0)
>>> round(p.predict_one({"prompt_tokens_est": 12.0}).length)
200
"""

from __future__ import annotations

import bisect
import logging
import math
import pickle
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from river import linear_model, optim

logger = logging.getLogger(__name__)

#: Lengths above this are treated as garbage (a unit mix-up or a runaway counter), not data.
MAX_TRUE_LENGTH = 10**6
_LOG_MAX = math.log1p(MAX_TRUE_LENGTH)

_FORMAT = "rtlm_adapt.LengthPredictor"
_VERSION = 1


@dataclass(frozen=True, slots=True)
class LengthPrediction:
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
        The answer before anything is learned: the intercept starts at ``log1p(prior_length)``.
    learning_rate
        SGD step size for the feature weights (features are standardized, so this is unitless).
    intercept_lr
        SGD step size for the intercept; larger than ``learning_rate`` so the overall level moves
        away from a wrong prior quickly.
    window
        Number of recent residuals the interval is calibrated on.
    min_residuals
        Below this many residuals the interval uses ``default_log_spread`` instead.
    default_log_spread
        Assumed standard deviation of the log-length error before calibration (1.0 means the
        truth is routinely within a factor of e of the estimate: deliberately wide).
    feature_clip
        Standardized features are clipped to ``[-feature_clip, feature_clip]``.

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
    """

    def __init__(
        self,
        coverage: float = 0.9,
        prior_length: float = 200.0,
        *,
        learning_rate: float = 0.01,
        intercept_lr: float = 0.05,
        window: int = 500,
        min_residuals: int = 30,
        default_log_spread: float = 1.0,
        feature_clip: float = 4.0,
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
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if window < 2 or min_residuals < 1 or min_residuals > window:
            raise ValueError("need window >= 2 and 1 <= min_residuals <= window")

        self.coverage = float(coverage)
        self.prior_length = float(prior_length)
        self.window = int(window)
        self.min_residuals = int(min_residuals)
        self.default_log_spread = float(default_log_spread)
        self.feature_clip = float(feature_clip)

        # Clip the loss gradient: a log-error of 5 is already a factor of ~150, and one absurd
        # (but accepted) length must not wreck the weights learned from thousands of good ones.
        self._model = linear_model.LinearRegression(
            optimizer=optim.SGD(learning_rate),
            intercept_init=math.log1p(self.prior_length),
            intercept_lr=intercept_lr,
            clip_gradient=5.0,
        )
        # Running (Welford) feature statistics, one list per feature: [count, mean, M2, 1/std].
        # One dict lookup per feature per call; 1/std is cached so predict_one does no sqrt.
        self._stats: dict[str, list[float]] = {}
        # Recent prequential residuals in log space: arrival order (to evict) and sorted (to
        # read quantiles by index). One sorted window serves both interval ends.
        self._resid_fifo: deque[float] = deque()
        self._resid_sorted: list[float] = []
        self._n_learned = 0
        alpha = 1.0 - self.coverage
        self._q_low = alpha / 2.0
        self._q_high = 1.0 - alpha / 2.0
        self._z_default = NormalDist().inv_cdf(self._q_high) * self.default_log_spread

    # -- public API ------------------------------------------------------------------------
    @property
    def n_learned(self) -> int:
        """Number of completions accepted by :meth:`learn_one`."""
        return self._n_learned

    def predict_one(self, features: Mapping[str, float]) -> LengthPrediction:
        """Predict the output length for a request with these features.

        Non-finite feature values are treated as missing (the feature's mean) rather than
        raising: the scheduler always needs an answer.
        """
        z = self._standardize(features)
        y = self._clip_log(self._model.predict_one(z))
        low_off, high_off = self._interval_offsets()
        length = max(1.0, math.expm1(y))
        low = min(length, max(1.0, math.expm1(self._clip_log(y + low_off))))
        high = max(length, math.expm1(self._clip_log(y + high_off)))
        return LengthPrediction(length=length, low=low, high=high)

    def learn_one(self, features: Mapping[str, float], true_length: float) -> bool:
        """Learn from a completed request; return False (and log why) if the input is rejected.

        A rejected call does not change the model. A length of 0 is clipped to 1.
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
        if not self._finite_features(features):
            logger.warning(
                "LengthPredictor: rejected features with non-finite or non-numeric values"
            )
            return False

        y = math.log1p(max(1.0, float(true_length)))
        # Score before learning so the residual is out-of-sample (prequential calibration).
        # The SGD step reuses these z-scores (computed before this sample enters the feature
        # statistics): the difference is one sample's worth and it saves a second pass.
        z = self._standardize(features, check=False)
        residual = y - self._clip_log(self._model.predict_one(z))
        self._model.learn_one(z, y)
        self._update_scaler(features)
        self._push_residual(residual)
        self._n_learned += 1
        return True

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the predictor to ``path`` (a pickle inside a versioned envelope).

        Only load files you wrote yourself: unpickling runs code from the file.
        """
        envelope = {"format": _FORMAT, "version": _VERSION, "state": dict(self.__dict__)}
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
        reference = cls()
        if not isinstance(state, dict) or set(state) != set(reference.__dict__):
            raise ValueError(f"{str(path)!r} has an incomplete or unknown LengthPredictor state")
        obj = cls.__new__(cls)
        obj.__dict__.update(state)
        return obj

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _clip_log(y: float) -> float:
        # Keeps expm1 from overflowing if the weights ever run away.
        return 0.0 if y < 0.0 else (_LOG_MAX if y > _LOG_MAX else y)

    @staticmethod
    def _finite_features(features: Mapping[str, float]) -> bool:
        # One C-level sum catches any NaN/inf (they propagate) and non-numbers (TypeError)
        # far cheaper than a per-value isfinite loop.
        try:
            return math.isfinite(sum(features.values()))
        except (TypeError, OverflowError, ValueError):
            return False

    def _standardize(self, features: Mapping[str, float], check: bool = True) -> dict[str, float]:
        if check and not self._finite_features(features):
            logger.warning("LengthPredictor: non-finite feature values treated as missing")
            features = {
                k: v
                for k, v in features.items()
                if isinstance(v, (int, float)) and math.isfinite(v)
            }
        stats = self._stats
        clip = self.feature_clip
        out: dict[str, float] = {}
        for key, value in features.items():
            st = stats.get(key)
            if st is not None:  # a feature never seen in training has no weight to apply
                zv = (value - st[1]) * st[3]
                out[key] = zv if -clip <= zv <= clip else (clip if zv > 0 else -clip)
        return out

    def _update_scaler(self, features: Mapping[str, float]) -> None:
        stats = self._stats
        for key, value in features.items():
            st = stats.get(key)
            if st is None:
                st = stats[key] = [0, 0.0, 0.0, 0.0]
            n = st[0] + 1
            mu = st[1]
            delta = value - mu
            mu += delta / n
            m2 = st[2] + delta * (value - mu)
            st[0], st[1], st[2] = n, mu, m2
            var = m2 / n
            # A constant feature carries no information: scale 0 maps it to the mean.
            st[3] = 1.0 / math.sqrt(var) if var > 1e-12 else 0.0

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
