"""Equivalence of the fast predictor with the reference implementation it replaced.

``_Reference`` below is the pure-Python LengthPredictor as it was before the prepared-form /
numpy rewrite (its predict, learn, scaler, interval and drift code verbatim; features, files
and the encoder left out). Replaying real AlpacaEval prompts through both must give the same
predictions to 1e-9 (relative): only the order of floating-point sums differs. A state saved
in the old file layout (format version 1) must load and keep learning identically.
"""

from __future__ import annotations

import bisect
import copy
import logging
import math
import pickle
import random
from collections import deque
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

import pytest
from conftest import alpaca_samples
from river import drift

from rtlm_adapt.predictor import (
    _LOG_MAX,
    HASH_BITS,
    MAX_TRUE_LENGTH,
    PREPARED_KEY,
    LengthPrediction,
    LengthPredictor,
    LengthPrior,
)

logger = logging.getLogger("rtlm_adapt.predictor")


def _finite_only(features: Mapping[Any, float]) -> dict[Any, float]:
    return {
        k: v
        for k, v in features.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class _Reference:
    """LengthPredictor before the rewrite (verbatim algorithm)."""

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
        # Hashed-bucket weights, prior and online correction in ONE list: predict_one does one
        # list index per word (the hot loop; ~100 words per prompt).
        self._hw: list[float] = (
            list(prior.hash_weights) if prior is not None else [0.0] * (1 << HASH_BITS)
        )
        # One record per dense feature: [count, mean, M2, 1/std, weight, fixed]. Features the
        # prior knows keep the prior's standardization (fixed=1; weight = prior + online);
        # others get running (Welford) statistics. 1/std is cached so predict does no sqrt.
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

    def predict_one(self, features: Mapping[Any, float]) -> LengthPrediction:
        if not self._finite_features(features):
            logger.warning("LengthPredictor: non-finite feature values treated as missing")
            features = _finite_only(features)
        y = self._clip_log(self._predict_log(features))
        low_off, high_off = self._interval_offsets()
        length = max(1.0, math.expm1(y))
        low = min(length, max(1.0, math.expm1(self._clip_log(y + low_off))))
        high = max(length, math.expm1(self._clip_log(y + high_off)))
        return LengthPrediction(length=length, low=low, high=high)

    def predict_remaining(
        self, features: Mapping[Any, float], generated_tokens: float
    ) -> LengthPrediction:
        g = float(generated_tokens) if math.isfinite(generated_tokens) else 0.0
        g = max(0.0, g)
        if g < 1.0:
            return self.predict_one(features)
        if not self._finite_features(features):
            features = _finite_only(features)
        y = self._clip_log(self._predict_log(features))
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

        if true_length < 1:
            logger.warning("LengthPredictor: true_length=%r clipped to 1", true_length)
        y = math.log1p(max(1.0, float(true_length)))
        # Score before learning so the residual is out-of-sample (prequential calibration).
        pred = self._base + self._offset + features.get("emb_prior", 0.0)
        stats, hw = self._stats, self._hw
        clip = self.feature_clip
        z: list[tuple[list[float], float]] = []
        hashed: list[int] = []
        norm2 = 1.0  # the offset's "feature"
        for k, v in features.items():
            if k.__class__ is int:
                pred += hw[k]
                hashed.append(k)
                continue
            st = stats.get(k)
            if st is not None:
                zv = (v - st[1]) * st[3]
                zv = zv if -clip <= zv <= clip else (clip if zv > 0 else -clip)
                pred += st[4] * zv
                norm2 += zv * zv
                z.append((st, zv))
        norm2 += len(hashed)
        residual = y - self._clip_log(pred)
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
        for st, zv in z:
            st[4] += step * zv
        for k in hashed:
            hw[k] += step
        self._offset += self.intercept_lr * r
        self._update_scaler(features)
        self._push_residual(residual)
        self._check_drift(r)
        self._n_learned += 1
        return True

    def _predict_log(self, features: Mapping[Any, float]) -> float:
        s = self._base + self._offset + features.get("emb_prior", 0.0)
        stats, hw = self._stats, self._hw
        clip = self.feature_clip
        for k, v in features.items():
            if k.__class__ is int:
                s += hw[k]
                continue
            st = stats.get(k)
            if st is not None:  # a feature never seen in training has no weight to apply
                zv = (v - st[1]) * st[3]
                s += st[4] * (zv if -clip <= zv <= clip else (clip if zv > 0 else -clip))
        return s

    def _check_drift(self, r: float) -> None:
        adwin = self._adwin
        if adwin is None:
            return
        before = adwin.estimation
        adwin.update(r)
        if adwin.drift_detected:
            # ADWIN dropped the old part of its window; its estimate is now the mean residual
            # since the change. Jump the offset by it instead of waiting for the slow steps, and
            # shift the calibration window the same way (those residuals were measured against
            # the old level) keeping only the recent ones.
            shift = adwin.estimation
            self._offset += shift
            keep = list(self._resid_fifo)[-int(min(adwin.width, self.window)) :]
            self._resid_fifo = deque(x - shift for x in keep)
            self._resid_sorted = sorted(self._resid_fifo)
            self.n_drifts += 1
            logger.info(
                "LengthPredictor: drift in residuals (mean %.2f -> %.2f); offset moved by %.2f",
                before,
                shift,
                shift,
            )
            # Restart the detector on the corrected residuals.
            self._adwin = drift.ADWIN(delta=self.drift_delta)

    @staticmethod
    def _clip_log(y: float) -> float:
        # Keeps expm1 from overflowing if the weights ever run away.
        return 0.0 if y < 0.0 else (_LOG_MAX if y > _LOG_MAX else y)

    @staticmethod
    def _finite_features(features: Mapping[Any, float]) -> bool:
        # One C-level sum catches any NaN/inf (they propagate) and non-numbers (TypeError)
        # far cheaper than a per-value isfinite loop.
        try:
            return math.isfinite(sum(features.values()))
        except (TypeError, OverflowError, ValueError):
            return False

    def _update_scaler(self, features: Mapping[Any, float]) -> None:
        stats = self._stats
        for key, value in features.items():
            if key.__class__ is int:
                continue
            st = stats.get(key)
            if st is None:
                st = stats[key] = [0, 0.0, 0.0, 0.0, 0.0, 0]
            elif st[5]:
                continue  # the prior's standardization, kept so its weights stay valid
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


_SCORERS: dict[type, Any] = {}


def _close(a: LengthPrediction, b: LengthPrediction, rel: float = 1e-9) -> bool:
    return all(
        math.isclose(x, y, rel_tol=rel, abs_tol=0.0)
        for x, y in ((a.length, b.length), (a.low, b.low), (a.high, b.high))
    )


def _plain(features: Mapping[Any, float]) -> dict[Any, float]:
    return {k: v for k, v in features.items() if k != PREPARED_KEY}


@pytest.fixture(scope="module")
def stream():
    """2,400 (prompt features, length) steps: GPT-4's answers, then Llama-2's made 6x longer
    (a served-model switch that ADWIN detects)."""
    gpt4, llama = alpaca_samples("gpt4_1106_preview"), alpaca_samples("llama-2-7b-chat-hf")
    p = LengthPredictor.pretrained("lexical")
    feats = {s.prompt: p.features(s.prompt) for s in gpt4}
    rng = random.Random(0)
    out = []
    for samples, n, scale in ((gpt4, 1200, 1), (llama, 1200, 6)):
        by_prompt = [s for s in samples if s.prompt in feats]
        for _ in range(n):
            s = rng.choice(by_prompt)
            out.append((feats[s.prompt], s.response_tokens * scale))
    return out


def test_replays_real_prompts_like_the_reference(stream) -> None:
    """Controller-like: predict at submit, learn at finish out of order, copies of the dicts."""
    p = LengthPredictor.pretrained("lexical")
    ref = _Reference(prior=LengthPrior.packaged("lexical"))
    rng = random.Random(1)
    pending: list[tuple[dict, dict, int]] = []
    n_checked = 0
    for i, (f, length) in enumerate(stream):
        mine, theirs = dict(f), _plain(f)  # the caller's copy, as benchmarks/overhead.py does
        assert _close(p.predict_one(mine), ref.predict_one(theirs)), i
        pending.append((mine, theirs, length))
        while len(pending) > 20 or (pending and i == len(stream) - 1):
            a, b, y = pending.pop(rng.randrange(len(pending)))
            if rng.random() < 0.2:
                for g in (0, 5, 50, 400):
                    assert _close(p.predict_remaining(a, g), ref.predict_remaining(b, g))
            assert p.learn_one(a, y) is ref.learn_one(b, y) is True
            n_checked += 1
    assert n_checked == len(stream)
    assert p.n_learned == ref._n_learned == len(stream)
    assert p.n_drifts == ref.n_drifts >= 1  # the switch to Llama-2 is detected by both
    probe = [f for f, _ in stream[:200]]
    for f in probe:
        assert _close(p.predict_one(f), ref.predict_one(_plain(f)))


def _synthetic(n: int, seed: int, extra: bool) -> list[tuple[dict[Any, float], float]]:
    rng = random.Random(seed)
    names = [d[0] for d in LengthPrior.packaged("lexical").dense]
    out = []
    for _ in range(n):
        f: dict[Any, float] = {name: rng.uniform(0.0, 3.0) for name in names}
        if rng.random() < 0.3:
            del f[rng.choice(names)]
        f.update(dict.fromkeys(rng.sample(range(1 << HASH_BITS), rng.randint(0, 40)), 1.0))
        if extra:
            f["novel"] = rng.gauss(0.0, 1.0)
            if rng.random() < 0.5:
                f[f"rare_{rng.randint(0, 30)}"] = rng.uniform(0.0, 10.0)
        y = math.exp(2.0 + f.get("n_lines", 1.0) + rng.gauss(0.0, 0.5))
        out.append((f, y))
    return out


@pytest.mark.parametrize("prior", [True, False])
@pytest.mark.parametrize("extra", [False, True])
def test_other_feature_shapes_match_the_reference(prior: bool, extra: bool) -> None:
    """Dicts not made by features(): missing, unseen and running-scaled features, no prior."""
    kwargs = {"prior": LengthPrior.packaged("lexical")} if prior else {}
    p, ref = LengthPredictor(**kwargs), _Reference(**kwargs)
    data = _synthetic(1500, seed=3, extra=extra)
    for i, (f, y) in enumerate(data):
        assert _close(p.predict_one(f), ref.predict_one(f)), i
        if i % 7 == 0:
            f["n_lines"] = f.get("n_lines", 0.0) + 1.0  # changed between predict and learn
        assert p.learn_one(f, y) is ref.learn_one(f, y) is True
    for f, _ in _synthetic(200, seed=4, extra=True):
        assert _close(p.predict_one(f), ref.predict_one(f))
        assert _close(p.predict_remaining(f, 30), ref.predict_remaining(f, 30))
    assert _close(p.predict_one({}), ref.predict_one({}))


def test_bad_inputs_match_the_reference(caplog) -> None:
    p = LengthPredictor.pretrained("lexical")
    ref = _Reference(prior=LengthPrior.packaged("lexical"))
    data = _synthetic(300, seed=5, extra=False)
    for f, y in data[:200]:
        p.learn_one(f, y)
        ref.learn_one(f, y)
    f = dict(data[200][0], n_lines=float("nan"), log_prompt_tokens=float("inf"))
    with caplog.at_level(logging.WARNING, logger="rtlm_adapt.predictor"):
        assert _close(p.predict_one(f), ref.predict_one(f))
    assert "non-finite feature values treated as missing" in caplog.text
    for bad in (dict(f), {**data[0][0], "n_lines": "x"}, {**data[0][0], "n_lines": None}):
        assert p.learn_one(bad, 10.0) is ref.learn_one(bad, 10.0) is False
    for bad_length in (float("nan"), -1.0, MAX_TRUE_LENGTH + 1, True, "3", None):
        assert p.learn_one(data[0][0], bad_length) is ref.learn_one(data[0][0], bad_length)
    assert p.learn_one(data[1][0], 0) is ref.learn_one(data[1][0], 0) is True  # clipped to 1
    assert p.learn_one(data[2][0], 10**6) is ref.learn_one(data[2][0], 10**6) is True
    for g, _ in data[200:]:
        assert _close(p.predict_one(g), ref.predict_one(g))


def test_a_file_in_the_old_layout_loads_and_keeps_learning(tmp_path) -> None:
    ref = _Reference(prior=LengthPrior.packaged("lexical"))
    data = _synthetic(700, seed=6, extra=True)
    for f, y in data[:400]:
        ref.learn_one(f, y)
    state = dict(ref.__dict__)
    state["encoder"] = None
    envelope = {"format": "rtlm_adapt.LengthPredictor", "version": 1, "state": state}
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps(envelope, protocol=pickle.HIGHEST_PROTOCOL))
    p = LengthPredictor.load(path)
    assert p.n_learned == 400
    for f, y in data[400:]:
        assert _close(p.predict_one(f), ref.predict_one(f))
        assert p.learn_one(f, y) and ref.learn_one(f, y)
    # and what the new code saves is the old layout again (old code can read it)
    p.save(path)
    saved = pickle.loads(path.read_bytes())["state"]
    assert set(saved) == set(ref.__dict__)
    assert len(saved["_hw"]) == 1 << HASH_BITS
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(saved["_hw"], ref._hw, strict=True))
    for name, st in ref._stats.items():
        assert saved["_stats"][name][:4] == pytest.approx(st[:4], rel=1e-9)
        assert saved["_stats"][name][4] == pytest.approx(st[4], rel=1e-9, abs=1e-12)


def test_copies_and_pickles_predict_the_same() -> None:
    p = LengthPredictor.pretrained("lexical")
    data = _synthetic(300, seed=7, extra=False)
    for f, y in data[:250]:
        p.learn_one(f, y)
    f = p.features("Write a detailed essay on the French Revolution.")
    assert isinstance(f[PREPARED_KEY], float) and f[PREPARED_KEY] == 0.0
    assert pickle.loads(pickle.dumps(f))[PREPARED_KEY].__class__ is float
    for q in (copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert q.predict_one(f) == p.predict_one(f)
        assert q.predict_one(_plain(f)) == p.predict_one(f)
        for g, y in data[250:]:
            q.learn_one(g, y)
    for g, y in data[250:]:
        p.learn_one(g, y)
    assert copy.deepcopy(p).predict_one(f) == p.predict_one(f)
    # the features of one predictor serve another with the same prior
    other = LengthPredictor.pretrained("lexical")
    assert other.predict_one(f) == other.predict_one(_plain(f))


def test_a_changed_features_dict_is_prepared_again() -> None:
    # The prepared form stored in a features dict must not outlive a change to the dict: a
    # changed dense value, an added or a removed feature each give the plain dict's prediction.
    p = LengthPredictor.pretrained("lexical")
    base = p.features("Write a detailed essay on the French Revolution.")
    name = next(k for k in base if isinstance(k, str) and k != PREPARED_KEY)
    changed = dict(base)
    changed[name] = base[name] + 5.0
    added = dict(base)
    added["an_unseen_feature"] = 3.0
    removed = dict(base)
    del removed[next(k for k in base if isinstance(k, int))]
    for f in (changed, added, removed):
        assert p.predict_one(f) == p.predict_one(_plain(f))
    assert p.predict_one(changed) != p.predict_one(base)
    # and learning from a changed dict learns what it now says, like the plain dict
    q = copy.deepcopy(p)
    p.learn_one(changed, 40.0)
    q.learn_one(_plain(changed), 40.0)
    assert p.predict_one(base) == q.predict_one(base)


def test_a_dense_feature_swapped_for_another_is_noticed() -> None:
    p = LengthPredictor.pretrained("lexical")
    base = p.features("Explain briefly how a bicycle stays upright.")
    name = next(k for k in base if isinstance(k, str) and k != PREPARED_KEY)
    swapped = dict(base)
    value = swapped.pop(name)
    swapped["another_feature"] = value  # same number of keys
    assert p.predict_one(swapped) == p.predict_one(_plain(swapped))


def test_learn_one_learns_a_predicted_request_as_it_was_predicted() -> None:
    # The controller predicts at submit and learns at finish with the same dict: the model
    # learns from the features it predicted with. A dict learnt from without a prediction is
    # read as it is now.
    base = LengthPredictor.pretrained("lexical")
    f = base.features("Write a detailed essay on the French Revolution.")
    name = next(k for k in f if isinstance(k, str) and k != PREPARED_KEY)
    p, q, r = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    predicted = dict(f)
    p.predict_one(predicted)
    predicted[name] += 5.0  # changed after the prediction: not seen
    p.learn_one(predicted, 40.0)
    q.learn_one(_plain(f), 40.0)
    unpredicted = dict(f)
    unpredicted[name] += 5.0  # never predicted: read as it is
    r.learn_one(unpredicted, 40.0)
    probe = base.features("Name one prime number.")
    assert p.predict_one(probe) == q.predict_one(probe)
    assert r.predict_one(probe) != q.predict_one(probe)


def test_copies_of_one_features_dict_are_each_learnt_as_predicted() -> None:
    # The same prompt submitted twice: two copies of one features dict share its prepared
    # form. Each copy is learnt from as it was predicted, whichever copy was predicted last.
    base = LengthPredictor.pretrained("lexical")
    f = base.features("Write a detailed essay on the French Revolution.")
    name = next(k for k in f if isinstance(k, str) and k != PREPARED_KEY)
    p, q = copy.deepcopy(base), copy.deepcopy(base)
    first, second = dict(f), dict(f)
    p.predict_one(first)
    p.predict_one(second)  # predicted after the first copy, before it finishes
    first[name] += 5.0  # changed after its prediction: learnt as predicted
    p.learn_one(first, 40.0)
    p.learn_one(second, 90.0)
    q.learn_one(_plain(f), 40.0)
    q.learn_one(_plain(f), 90.0)
    probe = base.features("Name one prime number.")
    assert p.predict_one(probe) == q.predict_one(probe)
