"""The offline prior of output length: hashed lexical features and :class:`LengthPrior`.

:class:`LengthPrior` is a frozen linear model of ``log1p(output tokens)``, fitted offline on
public data (ShareGPT; ``python scripts/fit_prior.py``) or on a user's own logs, and
shipped as a small ``.npz`` in ``rtlm_adapt/priors/``. It makes the first request's prediction
useful; :class:`rtlm_adapt.predictor.LengthPredictor` learns the served model's corrections on
top of it, online. Its inputs are the uncertainty features, the hashed words and word pairs of
the prompt (:func:`lexical_features`) and, on the ``encoder`` tier, a prompt embedding.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

#: Hashed lexical features live in ``[0, 2**HASH_BITS)``: the ``hashed`` buckets of a
#: :class:`rtlm_adapt.predictor.PromptFeatures`, or the int keys (value 1.0) of a plain features
#: mapping, next to the str-named dense features.
HASH_BITS = 15
_HASH_MASK = (1 << HASH_BITS) - 1
_WORD_RE = re.compile(r"[a-z0-9']+")
#: Words/pairs hashed per prompt: the head of a prompt says what is asked; bounding the count
#: bounds predict/learn cost for long prompts.
_MAX_WORDS = 64
_MAX_PAIRS = 24
_TOKEN_CACHE: dict[str, int] = {}
_TOKEN_CACHE_MAX = 200_000

#: Packaged prior files per tier (in ``rtlm_adapt/priors/``); the encoder tier's is MiniLM's,
#: see :func:`prior_file` for the other encoders'.
PRIOR_FILES = {"lexical": "sharegpt_lexical.npz", "encoder": "sharegpt_encoder.npz"}


def prior_file(tier: str, encoder: str | None = None) -> str:
    """File name of the packaged prior of ``tier`` (and, on the encoder tier, ``encoder``, a
    name in :data:`rtlm_adapt.encoder.ENCODERS`; None or ``"minilm"``: MiniLM's).

    >>> prior_file("encoder"), prior_file("encoder", "smollm2-l16")
    ('sharegpt_encoder.npz', 'sharegpt_encoder_smollm2-l16.npz')
    """
    if tier not in PRIOR_FILES:
        raise ValueError(f"unknown tier {tier!r}; expected one of {sorted(PRIOR_FILES)}")
    if encoder is None or encoder == "minilm":
        return PRIOR_FILES[tier]
    from rtlm_adapt.encoder import check_encoder_name

    check_encoder_name(encoder)
    if tier != "encoder":
        raise ValueError(f"encoder={encoder!r} needs tier='encoder', got tier={tier!r}")
    return f"sharegpt_encoder_{encoder}.npz"


def split_tier(tier: str) -> tuple[str, str | None]:
    """``"encoder:NAME"`` -> ``("encoder", "NAME")``; any other tier -> ``(tier, None)``.

    >>> split_tier("encoder:smollm2-l16"), split_tier("lexical")
    (('encoder', 'smollm2-l16'), ('lexical', None))
    """
    base, sep, name = tier.partition(":")
    return (base, name) if sep else (tier, None)


def _bucket(token: str) -> int:
    # crc32 (not hash()) so buckets are stable across processes; a bounded memo makes the
    # common words a dict lookup instead of an encode + crc.
    b = _TOKEN_CACHE.get(token)
    if b is None:
        b = zlib.crc32(token.encode("utf-8", "replace")) & _HASH_MASK
        if len(_TOKEN_CACHE) < _TOKEN_CACHE_MAX:
            _TOKEN_CACHE[token] = b
    return b


def lexical_features(prompt: str) -> dict[int, float]:
    """Hashed bag of words and word pairs of ``prompt``: ``{bucket: 1.0}``.

    Lowercased words of the first ~1000 characters (at most 64 distinct words and the first 24
    word pairs), plus the first word and first pair marked as such ("^write", "^what is"): the
    opening of a prompt is the strongest cue to the kind of answer wanted.

    Examples
    --------
    >>> f = lexical_features("Write a poem about the sea")
    >>> len(f), set(f.values())
    (13, {1.0})
    >>> f == lexical_features("write a POEM about the sea!")
    True
    """
    words = _WORD_RE.findall(prompt[:1000].lower())
    if not words:
        return {}
    out: dict[int, float] = dict.fromkeys(map(_bucket, words[:_MAX_WORDS]), 1.0)
    head = words[: _MAX_PAIRS + 1]
    pairs = map(" ".join, zip(head, head[1:], strict=False))
    out.update(dict.fromkeys(map(_bucket, pairs), 1.0))
    out[_bucket("^" + words[0])] = 1.0
    if len(words) > 1:
        out[_bucket("^" + words[0] + " " + words[1])] = 1.0
    return out


class LengthPrior:
    """A frozen linear model of ``log1p(output tokens)``, fitted offline.

    ``predict(features) = bias + sum(hash_w[k] for int keys k) + sum(w_j * z_j) + emb_prior``
    where ``z_j`` is the clipped z-score of dense feature ``j`` and ``emb_prior`` is the
    embedding head's output, which :meth:`rtlm_adapt.predictor.LengthPredictor.features` puts
    among the dense features.

    Parameters
    ----------
    bias
        Intercept (log1p tokens).
    hash_weights
        Weights of the ``2**HASH_BITS`` hashed lexical buckets (or empty: no lexical part).
    dense
        ``{name: (mean, 1/std, weight)}`` for the named features.
    emb_weights, emb_pca
        Encoder tier only: the embedding head (``(d,)``) and a projection (``(k, d)``)
        whose outputs become online features ``pc0..pc{k-1}``, both on :meth:`transform`'s
        output.
    emb_mean, emb_std
        Encoder tier, optional: per-dimension standardisation of the raw embedding (for an
        encoder whose dimensions have very different scales, such as a model's hidden state);
        :meth:`transform` then returns ``(e - mean) / std`` scaled to unit length. Without them
        the embedding is used as it is (MiniLM's are unit vectors already).
    meta
        Free-form description (source, size, fit settings) kept with the file.

    Examples
    --------
    >>> prior = LengthPrior(bias=5.0, hash_weights=np.zeros(2**HASH_BITS), dense={})
    >>> prior.predict({})
    5.0
    """

    CLIP = 4.0
    # Class-level defaults: a prior pickled (inside a saved predictor) before standardisation
    # existed loads without these attributes.
    emb_mean: np.ndarray | None = None
    emb_std: np.ndarray | None = None
    _inv_std: np.ndarray | None = None

    def __init__(
        self,
        bias: float,
        hash_weights: np.ndarray,
        dense: Mapping[str, tuple[float, float, float]],
        emb_weights: np.ndarray | None = None,
        emb_pca: np.ndarray | None = None,
        meta: Mapping[str, Any] | None = None,
        emb_mean: np.ndarray | None = None,
        emb_std: np.ndarray | None = None,
    ) -> None:
        if (emb_mean is None) != (emb_std is None):
            raise ValueError("emb_mean and emb_std go together")
        hw = np.asarray(hash_weights, dtype=np.float64).ravel()
        if hw.size not in (0, 1 << HASH_BITS) or not np.isfinite(hw).all():
            raise ValueError(f"hash_weights must be empty or 2**{HASH_BITS} finite values")
        if not math.isfinite(bias):
            raise ValueError(f"bias must be finite, got {bias!r}")
        self.bias = float(bias)
        # A Python list: indexing it is ~3x faster than a numpy array from pure-Python loops.
        self.hash_weights: list[float] = hw.tolist() if hw.size else [0.0] * (1 << HASH_BITS)
        self.dense = tuple((str(k), float(m), float(s), float(w)) for k, (m, s, w) in dense.items())
        self.emb_weights = None if emb_weights is None else np.asarray(emb_weights, np.float32)
        self.emb_pca = None if emb_pca is None else np.asarray(emb_pca, np.float32)
        self.emb_mean = self.emb_std = self._inv_std = None
        if emb_mean is not None:
            mean = np.asarray(emb_mean, np.float32).ravel()
            std = np.asarray(emb_std, np.float32).ravel()
            if mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all()):
                raise ValueError("emb_mean and emb_std must be finite arrays of the same size")
            self.emb_mean, self.emb_std = mean, std
            # constant dimensions (std ~ 0) are dropped rather than blown up
            self._inv_std = np.where(std > 1e-8, 1.0 / np.maximum(std, 1e-8), 0.0).astype(
                np.float32
            )
        self.meta = dict(meta or {})

    @property
    def encoder_name(self) -> str:
        """Name of the encoder the embedding head was fitted on (``rtlm_adapt.encoder``)."""
        return str(self.meta.get("encoder_name", "minilm"))

    def transform(self, embedding: np.ndarray) -> np.ndarray:
        """The encoder's raw output -> what the head, the projection and the encoder tier's
        online model use: unchanged (float32) without standardisation, else the standardised
        vector scaled to unit length. Works on one vector or a ``(n, d)`` array.
        """
        e = np.asarray(embedding, dtype=np.float32)
        if self.emb_mean is None:
            return e
        z = (e - self.emb_mean) * self._inv_std
        norm = np.linalg.norm(z, axis=-1, keepdims=True)
        return (z / np.maximum(norm, 1e-12)).astype(np.float32)

    @property
    def has_encoder(self) -> bool:
        """Whether this prior has an embedding head (the ``encoder`` tier)."""
        return self.emb_weights is not None

    def predict(self, features: Mapping[Any, float]) -> float:
        """``log1p`` of the prior's length estimate for these features."""
        s = self.bias + features.get("emb_prior", 0.0)
        clip = self.CLIP
        for name, mu, inv_sd, w in self.dense:
            v = features.get(name)
            if v is not None:
                z = (v - mu) * inv_sd
                s += w * (z if -clip <= z <= clip else (clip if z > 0 else -clip))
        hw = self.hash_weights
        for k in features:
            if k.__class__ is int:
                s += hw[k]
        return s

    def embedding_features(self, embedding: np.ndarray) -> dict[str, float]:
        """``{"emb_prior": head output, "pc0": ..., ...}`` for one embedding (encoder tier)."""
        if self.emb_weights is None:
            return {}
        e = self.transform(np.asarray(embedding, dtype=np.float32).ravel())
        out = {"emb_prior": float(e @ self.emb_weights)}
        if self.emb_pca is not None:
            out.update({f"pc{i}": float(v) for i, v in enumerate(self.emb_pca @ e)})
        return out

    # -- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the prior as a compressed ``.npz`` (plain arrays; safe to load)."""
        names = [d[0] for d in self.dense]
        arrays: dict[str, Any] = {
            "bias": np.float64(self.bias),
            "hash_weights": np.asarray(self.hash_weights, dtype=np.float32),
            "dense_names": np.asarray(names, dtype=str),
            "dense_params": np.asarray([d[1:] for d in self.dense], dtype=np.float64).reshape(
                -1, 3
            ),
            "meta": np.asarray(json.dumps(self.meta)),
            "hash_bits": np.int64(HASH_BITS),
        }
        if self.emb_weights is not None:
            arrays["emb_weights"] = self.emb_weights
        if self.emb_pca is not None:
            arrays["emb_pca"] = self.emb_pca
        if self.emb_mean is not None:
            arrays["emb_mean"] = self.emb_mean
            arrays["emb_std"] = self.emb_std
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> LengthPrior:
        """Read a prior written by :meth:`save`; raise ValueError if the file is not one."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["hash_bits"]) != HASH_BITS:
                    raise ValueError(f"hashed with {int(z['hash_bits'])} bits, need {HASH_BITS}")
                params = z["dense_params"].reshape(-1, 3)
                dense = {str(n): tuple(p) for n, p in zip(z["dense_names"], params, strict=True)}
                return cls(
                    bias=float(z["bias"]),
                    hash_weights=z["hash_weights"],
                    dense=dense,
                    emb_weights=z["emb_weights"] if "emb_weights" in z else None,
                    emb_pca=z["emb_pca"] if "emb_pca" in z else None,
                    meta=json.loads(str(z["meta"])),
                    emb_mean=z["emb_mean"] if "emb_mean" in z else None,
                    emb_std=z["emb_std"] if "emb_std" in z else None,
                )
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{str(path)!r} is not a readable LengthPrior file: {exc}") from exc

    @classmethod
    def packaged(cls, tier: str = "lexical", encoder: str | None = None) -> LengthPrior:
        """The prior shipped in ``rtlm_adapt/priors/`` for ``tier`` (lexical or encoder) and,
        on the encoder tier, ``encoder`` (a name in :data:`rtlm_adapt.encoder.ENCODERS`;
        default MiniLM). ``tier`` may also be spelt ``"encoder:NAME"``.
        """
        tier, named = split_tier(tier)
        if named is not None:
            if encoder is not None and encoder != named:
                raise ValueError(f"tier names encoder {named!r} but encoder={encoder!r}")
            encoder = named
        name = prior_file(tier, encoder)
        ref = resources.files("rtlm_adapt.priors").joinpath(name)
        with resources.as_file(ref) as path:
            if not Path(path).is_file():
                extra = "" if encoder in (None, "minilm") else f" --encoder {encoder}"
                raise FileNotFoundError(
                    f"no packaged {tier} prior ({path}); refit it with "
                    f"python scripts/fit_prior.py --tier {tier}{extra}"
                )
            return cls.load(path)
