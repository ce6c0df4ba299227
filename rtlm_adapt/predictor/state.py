"""The saved form of a length predictor: format version 1, a plain dict of fields.

The file (and a pickle of the predictor, inside a controller checkpoint) holds the state in the
layout older versions wrote and read: the settings, the hashed weights as one list, one
``[count, mean, m2, 1/std, weight, fixed]`` list per dense feature (a fixed feature's weight in
its record), the ADWIN detector, the residual window, and on the encoder tier ``_emb_model``.
The parts are rebuilt from it on load. Files written before the predictor became a package name
the encoder tier's classes in ``rtlm_adapt.encoder_tier``; :mod:`rtlm_adapt.unpickling` finds
them at their new home.

>>> import io
>>> state = {"a": 1}
>>> buffer = io.BytesIO(envelope_bytes(state))
>>> state_from_envelope(buffer.getvalue(), "buffer", keys={"a"})
{'a': 1}
"""

from __future__ import annotations

import pickle
from typing import Any

from rtlm_adapt.predictor.conformal import ConformalInterval
from rtlm_adapt.predictor.offset import DriftingOffset
from rtlm_adapt.predictor.scaling import FeatureScaler, FeatureStats
from rtlm_adapt.unpickling import OlderStateFileError, loads

__all__ = [
    "EMBEDDING_KEY",
    "STATE_KEYS",
    "envelope_bytes",
    "interval_from_state",
    "interval_state",
    "offset_from_state",
    "offset_state",
    "scaler_from_state",
    "state_from_envelope",
]

FORMAT = "rtlm_adapt.LengthPredictor"
VERSION = 1
#: The keys of a saved state, plus :data:`EMBEDDING_KEY` on the encoder tier.
STATE_KEYS = frozenset(
    "coverage prior_length learning_rate intercept_lr window min_residuals default_log_spread "
    "feature_clip huber prior encoder drift_delta _adwin n_drifts _base _offset _stats "
    "_resid_fifo _resid_sorted _n_learned _q_low _q_high _z_default _hw".split()
)
EMBEDDING_KEY = "_emb_model"
#: How to make a predictor file again that this version cannot read.
REBUILD = (
    "Rebuild it: start from LengthPredictor.pretrained(TIER), re-fit it on your logged requests "
    "(learn_one(predictor.features(prompt), true_length) for each) and save() it again."
)


def envelope_bytes(state: dict[str, Any]) -> bytes:
    """The file's bytes: ``state`` in a versioned envelope, pickled."""
    envelope = {"format": FORMAT, "version": VERSION, "state": state}
    return pickle.dumps(envelope, protocol=pickle.HIGHEST_PROTOCOL)


def state_from_envelope(data: bytes, source: str, keys: frozenset[str] | set[str] = STATE_KEYS):
    """The state in file bytes written by :func:`envelope_bytes`; ValueError naming ``source``
    if they are not that."""
    try:
        envelope = loads(data, source=source, what="a LengthPredictor file", rebuild=REBUILD)
    except OlderStateFileError:
        raise
    except Exception as exc:  # pickle raises many types on garbage input
        raise ValueError(f"{source!r} is not a readable LengthPredictor file: {exc}") from exc
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise ValueError(f"{source!r} is not a LengthPredictor file (wrong format tag)")
    if envelope.get("version") != VERSION:
        raise ValueError(
            f"{source!r} has LengthPredictor format version {envelope.get('version')!r}, "
            f"this code reads version {VERSION}"
        )
    state = envelope.get("state")
    if not isinstance(state, dict) or set(state) - {EMBEDDING_KEY} != keys:
        raise ValueError(f"{source!r} has an incomplete or unknown LengthPredictor state")
    return state


def offset_state(offset: DriftingOffset) -> dict[str, Any]:
    return {
        "intercept_lr": offset.learning_rate,
        "drift_delta": offset.drift_delta,
        "_adwin": offset.adwin,
        "n_drifts": offset.n_drifts,
        "_offset": offset.value,
    }


def offset_from_state(state: dict[str, Any]) -> DriftingOffset:
    offset = DriftingOffset(state["intercept_lr"], state["drift_delta"])
    offset.value, offset.n_drifts, offset.adwin = (
        state["_offset"],
        state["n_drifts"],
        state["_adwin"],
    )
    return offset


def interval_state(interval: ConformalInterval) -> dict[str, Any]:
    return {
        "window": interval.window,
        "min_residuals": interval.min_residuals,
        "default_log_spread": interval.default_log_spread,
        "_resid_fifo": interval.fifo.copy(),
        "_resid_sorted": list(interval.sorted),
        "_q_low": interval.q_low,
        "_q_high": interval.q_high,
        "_z_default": interval.z_default,
    }


def interval_from_state(state: dict[str, Any]) -> ConformalInterval:
    interval = ConformalInterval(
        state["coverage"],
        state["window"],
        state["min_residuals"],
        state["default_log_spread"],
    )
    interval.q_low, interval.q_high = state["_q_low"], state["_q_high"]
    interval.z_default = state["_z_default"]
    interval.fifo = state["_resid_fifo"].copy()
    interval.sorted = list(state["_resid_sorted"])
    return interval


def scaler_from_state(state: dict[str, Any]) -> FeatureScaler:
    scaler = FeatureScaler()
    scaler.stats = {k: FeatureStats.from_list(v) for k, v in state["_stats"].items()}
    return scaler
