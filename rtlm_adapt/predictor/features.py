"""The features of one prompt, as the length predictor reads them: a typed, immutable record.

A :class:`PromptFeatures` is built once per request (by
:meth:`rtlm_adapt.predictor.LengthPredictor.features`) and handed to ``predict_one`` at arrival
and ``learn_one`` at finish. It also reads as a mapping (``{name: value}`` for the dense features,
``{bucket: 1.0}`` for the hashed words), so code that wants a plain dict can have one with
``dict(features)``.

>>> import numpy as np
>>> f = PromptFeatures(("uncertainty", "n_lines"), np.array([0.7, 2.0]), np.array([5, 9]))
>>> f["n_lines"], f[9], len(f), f.uncertainty
(2.0, 1.0, 4, 0.7)
>>> dict(f) == {"uncertainty": 0.7, "n_lines": 2.0, 5: 1.0, 9: 1.0}
True
>>> PromptFeatures.from_mapping(dict(f)) == f
True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rtlm_adapt.predictor.scaling import ScaledFeatures
from rtlm_adapt.prior import HASH_BITS

__all__ = ["PromptFeatures"]

_NO_HASHED = np.zeros(0, np.intp)
#: Hashed buckets are in ``[0, N_BUCKETS)``.
N_BUCKETS = 1 << HASH_BITS


@dataclass(frozen=True, slots=True, eq=False)
class PromptFeatures(Mapping[Any, float]):
    """A prompt's features: named dense values, hashed words and, on the encoder tier, its
    embedding.

    Attributes
    ----------
    names
        Names of the dense features (the uncertainty features and score, ``prompt_tokens_est``,
        on the encoder tier ``emb_prior`` and ``pc0``...), in the order of ``dense``.
    dense
        Their values (float64).
    hashed
        The hashed word and word-pair buckets (:func:`rtlm_adapt.prior.lexical_features`), each
        once: a bucket present means 1.0.
    embedding
        Encoder tier: the prompt's embedding as the prior transforms it (unit length, float32).
    prior_log
        Encoder tier: the prior's ``log1p`` length estimate for these features (what the
        embedding residual model learns the residual against).
    scaled
        The features as the residual model reads them, standardized once by the prior's fixed
        scaling (:class:`~rtlm_adapt.predictor.scaling.PriorScaling`); only for finite values.
        A predictor whose scaling differs standardizes them again.
    """

    names: tuple[Any, ...]
    dense: np.ndarray
    hashed: np.ndarray = field(default_factory=lambda: _NO_HASHED)
    embedding: np.ndarray | None = None
    prior_log: float | None = None
    scaled: ScaledFeatures | None = field(default=None, repr=False)

    @classmethod
    def from_mapping(cls, features: Mapping[Any, float]) -> PromptFeatures:
        """A record of a plain ``{name: value, bucket: 1.0}`` dict (int keys are buckets).

        A negative bucket counts from the end, as a list index does (a bucket named twice that
        way counts once). Raises TypeError or ValueError on a value that is not a number, and
        IndexError on a bucket out of range.
        """
        if features.__class__ is cls:
            return features  # type: ignore[return-value]
        names = tuple(k for k in features if k.__class__ is not int)
        hashed = [k for k in features if k.__class__ is int]
        dense = np.array([float(features[k]) for k in names], np.float64)
        if hashed and (min(hashed) < 0 or max(hashed) >= N_BUCKETS):
            if min(hashed) < -N_BUCKETS or max(hashed) >= N_BUCKETS:
                raise IndexError(f"hashed feature out of range: {min(hashed)}..{max(hashed)}")
            hashed = list(dict.fromkeys(k % N_BUCKETS for k in hashed))
        return cls(names, dense, np.array(hashed, np.intp) if hashed else _NO_HASHED)

    @property
    def uncertainty(self) -> float | None:
        """The uncertainty score, if the record has one."""
        return self.get("uncertainty")

    # -- the mapping view ----------------------------------------------------------------------
    def __getitem__(self, key: Any) -> float:
        if key.__class__ is int:
            if key in self.hashed:
                return 1.0
            raise KeyError(key)
        try:
            return float(self.dense[self.names.index(key)])
        except ValueError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[Any]:
        yield from self.names
        yield from self.hashed.tolist()

    def __len__(self) -> int:
        return len(self.names) + len(self.hashed)
