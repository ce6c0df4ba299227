"""The ``encoder`` tier's online part: what the served model's finished requests teach about
prompts that *look alike* (in the encoder's embedding space: all-MiniLM-L6-v2 by default, or
the served model's hidden state, standardised with the prior's per-dimension mean and std).

:class:`EncoderLengthPredictor` is the :class:`~rtlm_adapt.predictor.LengthPredictor` that
``LengthPredictor.pretrained("encoder")`` returns. On top of the shared parts (the ShareGPT prior
with its embedding head, the per-deployment offset with ADWIN, the normalised-LMS residual model,
the conformal intervals) it keeps an :class:`EmbeddingResidualModel`: the log-length residuals of
finished requests against the prior, indexed by their prompt embedding, and adds to every
prediction

* a **kNN term** -- the softmax(similarity)-weighted mean residual of the ``k`` most similar
  finished prompts (a memory of the last ``capacity`` requests), and
* a **ridge term** -- a ridge regression of the residual on the embedding, from running
  sufficient statistics (``X^T X``, ``X^T r``, forgotten at the memory's pace), re-solved every
  ``solve_every`` updates.

Both are centred (the offset carries the level) and enter with weight 0.75 each (they explain the
same residual, and so does the normalised LMS). The weights, ``k``, the temperature and the ridge
penalty were chosen by the prequential Kendall tau over the AlpacaEval models' TRAINING streams
(requests 200+ of each), not on the held-out prompts.

Why: a single online pass of a linear model over raw embeddings learns almost nothing, while the
residual structure of *this* model's answers is local in embedding space (a classification
prompt is answered in a few tokens by every model; the ShareGPT prior, fitted on ChatGPT's
answers, ranks such prompts poorly). Measured on AlpacaEval (BENCHMARKS.md section 3), the two
terms add about +0.03 median Kendall tau over the normalised LMS alone.

The prompt's embedding travels in its features dict under
:data:`~rtlm_adapt.predictor.EMBEDDING_KEY`, as an :class:`EmbeddingRef`: a float 0.0 (so the dict
still sums and compares as numbers) that carries the vector and the prior's prediction, so that
:meth:`EncoderLengthPredictor.learn_one` can add the finished request to the memory.

Nothing here imports torch: embeddings come from :class:`rtlm_adapt.encoder.PromptEncoder` (or
are passed in).

>>> import numpy as np
>>> m = EmbeddingResidualModel(dim=4, k=2)
>>> a, b = np.array([1.0, 0, 0, 0], np.float32), np.array([0, 1.0, 0, 0], np.float32)
>>> for _ in range(5):
...     m.learn(a, 1.0)
...     m.learn(b, -1.0)
>>> m.term(a) > 0 > m.term(b)
True
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from rtlm_adapt.predictor import (
    _LOG_MAX,
    EMBEDDING_KEY,
    MAX_TRUE_LENGTH,
    LengthPredictor,
)

__all__ = ["EmbeddingRef", "EmbeddingResidualModel", "EncoderLengthPredictor"]


def _make_ref(vec: Any, prior: float | None) -> EmbeddingRef:
    ref = EmbeddingRef(0.0)
    ref.vec = None if vec is None else np.asarray(vec, dtype=np.float32)
    ref.prior = prior
    return ref


class EmbeddingRef(float):
    """A prompt's embedding in a features dict: a float 0.0 carrying ``vec`` (unit, float32;
    the prior's :meth:`~rtlm_adapt.prior.LengthPrior.transform` of the encoder's output)
    and ``prior`` (the prior's log1p prediction for the dict it was made for, or None).

    It pickles and deep-copies with its vector (the embedding is data, not a cache).
    """

    __slots__ = ("vec", "prior")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_make_ref, (self.vec, self.prior))


class EmbeddingResidualModel:
    """Online model of a residual (log space) on unit-norm prompt embeddings: kNN + ridge.

    Parameters
    ----------
    dim
        Embedding size.
    capacity
        Finished requests remembered for the kNN term (a ring buffer); the ridge statistics are
        forgotten at the same pace (factor ``1 - 1/capacity`` per update).
    k, temperature
        The kNN term is ``sum_j w_j (r_j - mean r)`` over the ``k`` most similar remembered
        embeddings, ``w`` the softmax of ``temperature * cosine similarity``.
    alpha
        Ridge penalty of the ridge term (embeddings are unit vectors; intercept unpenalized).
    solve_every
        The ridge is re-solved every this many updates (and after each of the first ones).
    knn_weight, ridge_weight
        Weights of the two terms in :meth:`term`.
    """

    def __init__(
        self,
        dim: int = 384,
        capacity: int = 2000,
        k: int = 30,
        temperature: float = 10.0,
        alpha: float = 10.0,
        solve_every: int = 20,
        knn_weight: float = 0.75,
        ridge_weight: float = 0.75,
    ) -> None:
        if dim < 1 or capacity < 2 or k < 1 or solve_every < 1:
            raise ValueError("need dim >= 1, capacity >= 2, k >= 1, solve_every >= 1")
        for name, v in (("temperature", temperature), ("alpha", alpha)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        self.dim, self.capacity, self.k = int(dim), int(capacity), int(k)
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.solve_every = int(solve_every)
        self.knn_weight, self.ridge_weight = float(knn_weight), float(ridge_weight)
        self._mem = np.zeros((self.capacity, self.dim), np.float32)
        self._res = np.zeros(self.capacity)
        self._n = 0  # filled slots
        self._pos = 0  # next slot to write
        # Ridge sufficient statistics (exponentially forgotten), the last solution, pending rows.
        self._xx = np.zeros((self.dim, self.dim))
        self._xs = np.zeros(self.dim)
        self._xr = np.zeros(self.dim)
        self._rs = 0.0
        self._cnt = 0.0
        self._w = np.zeros(self.dim)
        self._mu = np.zeros(self.dim)
        self._pending: list[tuple[np.ndarray, float]] = []
        self.n_learned = 0

    def term(self, vec: np.ndarray) -> float:
        """The correction (log space) for a prompt with embedding ``vec``; 0 before any learning."""
        n = self._n
        if n == 0:
            return 0.0
        s = 0.0
        if self.knn_weight:
            res = self._res[:n]
            sims = self._mem[:n] @ vec
            k = self.k
            if k < n:
                nn = np.argpartition(sims, n - k)[n - k :]
                sims, r = sims[nn], res[nn]
            else:
                r = res
            w = np.exp(self.temperature * (sims - sims.max()))
            s += self.knn_weight * (float(w @ r) / float(w.sum()) - float(res.mean()))
        if self.ridge_weight:
            s += self.ridge_weight * float((vec - self._mu) @ self._w)
        return s

    def learn(self, vec: np.ndarray, residual: float) -> None:
        """Remember a finished request: its embedding and its residual against the prior."""
        vec = np.asarray(vec, dtype=np.float32).ravel()
        if vec.shape != (self.dim,) or not (np.isfinite(vec).all() and math.isfinite(residual)):
            return
        self._mem[self._pos] = vec
        self._res[self._pos] = residual
        self._pos = (self._pos + 1) % self.capacity
        self._n = min(self._n + 1, self.capacity)
        self._pending.append((vec, float(residual)))
        self.n_learned += 1
        if len(self._pending) >= self.solve_every or self.n_learned <= self.solve_every:
            self._solve()

    def _solve(self) -> None:
        if self._pending:
            x = np.array([v for v, _ in self._pending], dtype=np.float64)
            r = np.array([t for _, t in self._pending])
            decay = (1.0 - 1.0 / self.capacity) ** len(r)
            self._xx = decay * self._xx + x.T @ x
            self._xs = decay * self._xs + x.sum(0)
            self._xr = decay * self._xr + x.T @ r
            self._rs = decay * self._rs + float(r.sum())
            self._cnt = decay * self._cnt + len(r)
            self._pending = []
        c = self._cnt
        if c <= 0:
            return
        mu = self._xs / c
        a = self._xx - c * np.outer(mu, mu)
        a[np.diag_indices_from(a)] += self.alpha
        self._w = np.linalg.solve(a, self._xr - mu * self._rs)
        self._mu = mu.astype(np.float32)


class EncoderLengthPredictor(LengthPredictor):
    """The ``encoder`` tier: :class:`~rtlm_adapt.predictor.LengthPredictor` plus an
    :class:`EmbeddingResidualModel` over the finished requests' prompt embeddings.

    ``embedding_model`` (keyword) replaces the default :class:`EmbeddingResidualModel`; other
    arguments are :class:`~rtlm_adapt.predictor.LengthPredictor`'s, except that the conformal
    ``window`` defaults to 300 recent residuals (not 500): this tier keeps improving over the
    first few hundred requests, so older residuals overstate its error (with 500, 90% intervals
    covered 0.93-0.945 of held-out AlpacaEval lengths for 4 of the 16 models; with 300,
    0.88-0.93 for all 16). A features dict without an
    embedding (made by a lexical-tier predictor, or by hand) is predicted and learnt from as the
    lexical parts alone would.
    """

    def __init__(
        self, *args: Any, embedding_model: EmbeddingResidualModel | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("window", 300)
        super().__init__(*args, **kwargs)
        if embedding_model is None:
            # sized to the prior's embedding head; settings the prior's fit recorded (meta
            # "residual_model") override the defaults
            prior = self.prior
            settings: dict[str, Any] = {}
            if prior is not None and prior.emb_weights is not None:
                settings["dim"] = int(prior.emb_weights.size)
                settings.update(prior.meta.get("residual_model", {}))
            embedding_model = EmbeddingResidualModel(**settings)
        self._emb_model = embedding_model

    def features(
        self,
        prompt: str,
        base: Mapping[str, float] | None = None,
        embedding: np.ndarray | None = None,
    ) -> dict[Any, float]:
        """:meth:`LengthPredictor.features` plus the embedding itself (:data:`EMBEDDING_KEY`)."""
        if self.tier != "encoder":
            return super().features(prompt, base=base, embedding=embedding)
        if embedding is None:
            embedding = self._get_encoder().encode([prompt], batch_size=1)[0]
        feats = super().features(prompt, base=base, embedding=embedding)
        feats[EMBEDDING_KEY] = _make_ref(
            # standardised (and unit-length) when the prior stores a standardisation
            self.prior.transform(np.asarray(embedding, np.float32).ravel()),  # type: ignore[union-attr]
            self.prior.predict(feats),  # type: ignore[union-attr]
        )
        return feats

    def _prepare(
        self, features: Mapping[Any, float], checked: bool = False, pure: bool = False
    ) -> Any:
        prep = super()._prepare(features, checked=checked, pure=pure)
        if prep is not None:
            ref = features.get(EMBEDDING_KEY)
            prep.vec = ref.vec if ref.__class__ is EmbeddingRef else None
        return prep

    def _score(self, prep: Any) -> float:
        s = super()._score(prep)
        vec = getattr(prep, "vec", None)
        return s if vec is None else s + self._emb_model.term(vec)

    def learn_one(self, features: Mapping[Any, float], true_length: float) -> bool:
        """:meth:`LengthPredictor.learn_one`, then the finished request joins the embedding
        model (residual against the prior, bounded like every update: at most ``huber`` from
        the prediction). A length below 1 (clipped to 1 for the rest) does not join it.
        """
        ref = features.get(EMBEDDING_KEY)
        if ref.__class__ is not EmbeddingRef or ref.vec is None:
            return super().learn_one(features, true_length)
        vec = ref.vec
        term = self._emb_model.term(vec)
        pred = self._predict_log(features)  # includes the term
        ok = super().learn_one(features, true_length)  # NLMS, offset, ADWIN: without the term
        if not ok:
            return False
        # The conformal window holds the prequential residual of the WHOLE prediction: replace
        # the one just pushed (measured without the term).
        fifo, srt = self._resid_fifo, self._resid_sorted
        old = fifo.pop()
        del srt[bisect.bisect_left(srt, old)]
        self._push_residual(old - term)
        if true_length >= 1:
            y = math.log1p(min(float(true_length), MAX_TRUE_LENGTH))
            p = 0.0 if pred < 0.0 else (_LOG_MAX if pred > _LOG_MAX else pred)
            c = self.huber
            y = p + max(-c, min(c, y - p))
            prior = ref.prior
            if prior is None:
                prior = self.prior.predict(features)  # type: ignore[union-attr]
            self._emb_model.learn(vec, y - prior)
        return True
