"""How the length predictor reads a request's features: a checked record, then the residual
model's :class:`~rtlm_adapt.predictor.residual.Row`.

A record made by the featurizer carries its row already (standardized once, by the prior's
scaling); the dense features the prior does not know (the encoder tier's ``emb_prior`` and
``pc0``..., or a caller's own) are standardized by their running statistics at every read.

>>> from rtlm_adapt.predictor.featurizer import prior_scaling
>>> from rtlm_adapt.predictor.scaling import FeatureScaler
>>> reader = RowReader(prior_scaling(None), FeatureScaler())
>>> row, emb, layout = reader.read(as_record({"words": 3.0, 17: 1.0}, "predict_one"))
>>> row.idx.tolist(), row.norm2, layout.new
([17], 2.0, [(0, 'words')])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from scipy.linalg.blas import ddot

from rtlm_adapt.predictor.features import PromptFeatures
from rtlm_adapt.predictor.residual import Row
from rtlm_adapt.predictor.scaling import FeatureScaler, FeatureStats, PriorScaling

__all__ = ["Layout", "RowReader", "as_record", "finite_part"]

# Layouts remembered per tuple of feature names (callers' dicts may each have their own).
_MAX_LAYOUTS = 64


class Layout(NamedTuple):
    """Where the dense features the prior does not know go, for records with one tuple of
    names: ``(index in dense, stats)`` with running scaling; ``(index, name)`` not seen yet;
    the index of ``emb_prior`` (-1 without); how many features the scaler had then."""

    running: list[tuple[int, FeatureStats]]
    new: list[tuple[int, Any]]
    emb_at: int
    n_stats: int

    def values_to_learn(self, record: PromptFeatures) -> dict[Any, float]:
        """``record``'s values of the features with running (or no) scaling yet."""
        at = sorted([i for i, _ in self.running] + [i for i, _ in self.new])
        return {record.names[i]: float(record.dense[i]) for i in at}


class RowReader:
    """Reads records into rows for the residual model with ``scaling`` and ``scaler``."""

    def __init__(self, scaling: PriorScaling, scaler: FeatureScaler) -> None:
        self.scaling = scaling
        self.scaler = scaler
        self._layouts: dict[tuple[Any, ...], Layout] = {}

    def read(self, record: PromptFeatures) -> tuple[Row, float, Layout | None]:
        """The row for ``record``, its ``emb_prior`` (0 without) and, unless every dense
        feature is the prior's, the layout of the others."""
        scaled = record.scaled
        scaling = self.scaling
        if scaled is None or not (scaled.scaling is scaling or scaled.scaling == scaling):
            scaled = scaling.scale(record.names, record.dense, record.hashed)
        if scaled.complete:  # the prior's dense features and hashed words: the common case
            return Row(scaled.idx, scaled.x, scaled.norm2), 0.0, None
        layout = self.layout(record.names)
        dense = record.dense
        running = [(st, float(dense[i])) for i, st in layout.running]
        emb = float(dense[layout.emb_at]) if layout.emb_at >= 0 else 0.0
        return Row(scaled.idx, scaled.x, scaled.norm2, running), emb, layout

    def layout(self, names: tuple[Any, ...]) -> Layout:
        """Where the dense features named ``names`` that the prior does not know go."""
        stats = self.scaler.stats
        layout = self._layouts.get(names)
        if layout is not None and layout.n_stats == len(stats):
            return layout
        running, new = [], []
        for i, name in enumerate(names):
            st = stats.get(name)
            if st is None:
                new.append((i, name))  # no weight yet; gets a scaler when learnt from
            elif not st.fixed:
                running.append((i, st))
        emb_at = names.index("emb_prior") if "emb_prior" in names else -1
        layout = Layout(running, new, emb_at, len(stats))
        if len(self._layouts) >= _MAX_LAYOUTS:
            self._layouts.clear()
        self._layouts[names] = layout
        return layout


def as_record(features: Mapping[Any, float], method: str) -> PromptFeatures | None:
    """``features`` as a record, or None if a value is not a finite number; TypeError naming
    ``LengthPredictor.<method>`` if they are not a mapping."""
    if features.__class__ is PromptFeatures:
        record: PromptFeatures = features  # type: ignore[assignment]
        if record.scaled is not None:  # made only of finite values
            return record
        dense = record.dense
        # ddot(d, d) is finite only if every value is; inf or overflow: check each
        if len(dense) and not math.isfinite(ddot(dense, dense)):
            if not np.isfinite(dense).all():
                return None
        return record
    if not isinstance(features, Mapping):
        raise TypeError(
            f"LengthPredictor.{method} takes a features mapping (LengthPredictor.features"
            f"(prompt) or UncertaintyScorer.features(prompt)), got {type(features).__name__}"
        )
    # One C-level sum catches any NaN/inf (they propagate) and non-numbers (TypeError).
    try:
        if not math.isfinite(sum(features.values())):
            return None
        return PromptFeatures.from_mapping(features)
    except (TypeError, OverflowError, ValueError):
        return None


def finite_part(features: Mapping[Any, float]) -> PromptFeatures:
    """The finite numbers among ``features`` (what a prediction uses when some are not)."""
    if features.__class__ is PromptFeatures:
        record: PromptFeatures = features  # type: ignore[assignment]
        keep = np.isfinite(record.dense)
        names = tuple(n for n, k in zip(record.names, keep.tolist(), strict=True) if k)
        return PromptFeatures(
            names, record.dense[keep], record.hashed, record.embedding, record.prior_log
        )
    return PromptFeatures.from_mapping(
        {
            k: v
            for k, v in features.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
    )
