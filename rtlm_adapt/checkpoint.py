"""ControllerCheckpoint: everything an :class:`~rtlm_adapt.controller.AdaptiveController` learned
online, as typed records, and their on-disk layout.

The file is a :mod:`rtlm_adapt.persistence` envelope (checksummed, versioned, written atomically)
around a plain dict: ``kind``, ``policy``, ``predictor``, ``scorer``, ``profiles``, ``latency``,
``knobs``, ``external_knobs`` and three dicts, ``config``, ``counters`` and ``signals``. Queued and
running requests are not saved: a restart loses them, and :meth:`ControllerCheckpoint.from_state`
counts them as failed with reason ``shutdown``.

>>> from rtlm_adapt.predictor import LengthPredictor
>>> from rtlm_adapt.uncertainty import UncertaintyScorer
>>> saved = ControllerCheckpoint(
...     policy="fcfs", predictor=LengthPredictor.pretrained(), scorer=UncertaintyScorer(),
...     profiles={}, latency={}, knobs=Knobs(), external_knobs=False,
...     config=ControllerConfig(epoch_s=1.0, batching="continuous", max_queue=None,
...                             reference_batch=8),
...     counts=RequestCounts(submitted=3, finished=1, failures={"rejected": 1}),
...     in_flight=1, signals=ServingSignals())
>>> restored = ControllerCheckpoint.from_state(saved.to_state(), "<demo>")
>>> restored.counts.failures["shutdown"], restored.in_flight  # the live one died in the restart
(1, 0)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from rtlm_adapt.accounting import RequestCounts
from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.knobs import Knobs, Policy
from rtlm_adapt.latency import LatencyModel
from rtlm_adapt.persistence import decode_state, encode_state, read_state, write_bytes_atomic
from rtlm_adapt.predictor import LengthPredictor
from rtlm_adapt.request import FailureReason
from rtlm_adapt.signals import ServingSignals
from rtlm_adapt.uncertainty import UncertaintyScorer

logger = logging.getLogger(__name__)

#: The ``kind`` a controller's state file carries (persistence checks it on load).
STATE_KIND = "rtlm_adapt.AdaptiveController"
#: How to make a controller's state file again that this version cannot read.
REBUILD = (
    "Rebuild it: start a new AdaptiveController with the same policy and predictor tier "
    "(predictor=LengthPredictor.pretrained(TIER)); it learns online again from its first "
    "requests. To skip that warm-up, re-fit the predictor on your logged requests first "
    "(learn_one(predictor.features(prompt), true_length) for each). Then save() it again."
)


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """The controller's construction settings that a restart keeps."""

    epoch_s: float
    batching: str
    max_queue: int | None
    reference_batch: int


@dataclass(slots=True)
class ControllerCheckpoint:
    """A controller's learned state (see the module docstring)."""

    policy: Policy | str
    predictor: LengthPredictor
    scorer: UncertaintyScorer
    profiles: Mapping[str, StepCost]
    latency: dict[str, LatencyModel]
    knobs: Knobs
    #: Knobs set from outside (``set_knobs(hold=True)``) that suspend the policy.
    external_knobs: bool
    config: ControllerConfig
    counts: RequestCounts
    #: Requests queued or running when the state was taken (they do not survive a restart).
    in_flight: int
    signals: ServingSignals

    def to_state(self) -> dict[str, Any]:
        """The dict written to disk."""
        return {
            "kind": STATE_KIND,
            "policy": self.policy,
            "predictor": self.predictor,
            "scorer": self.scorer,
            "profiles": self.profiles,
            "latency": self.latency,
            "knobs": self.knobs,
            "external_knobs": self.external_knobs,
            "config": asdict(self.config),
            "counters": {
                "submitted": self.counts.submitted,
                "finished": self.counts.finished,
                "failed": self.counts.failed,
                "failures": dict(self.counts.failures),
                "in_flight": self.in_flight,
            },
            "signals": self.signals.as_dict(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str) -> ControllerCheckpoint:
        """The checkpoint in a dict read from disk, the requests that were live counted as
        shut down. Raises ValueError naming ``source`` if anything is missing or mistyped."""
        try:
            predictor, latency, knobs = state["predictor"], state["latency"], state["knobs"]
            if not isinstance(predictor, LengthPredictor):
                raise TypeError("predictor is not a LengthPredictor")
            if not isinstance(knobs, Knobs):
                raise TypeError("knobs are not Knobs")
            if not isinstance(latency, dict) or not all(
                isinstance(m, LatencyModel) for m in latency.values()
            ):
                raise TypeError("latency is not a dict of LatencyModel")
            counters = state["counters"]
            counts = RequestCounts(
                submitted=int(counters["submitted"]),
                finished=int(counters["finished"]),
                failures=counters["failures"],
            )
            counts.failures[FailureReason.SHUTDOWN.value] += int(counters["in_flight"])
            saved = state["signals"]
            # a signal added since the file was written starts from its default
            signals = {name: float(saved[name]) for name in ServingSignals.SAVED
                       if name in saved}
            return cls(
                policy=state["policy"],
                predictor=predictor,
                scorer=state["scorer"],
                profiles=state["profiles"],
                latency=dict(latency),
                knobs=knobs,
                external_knobs=bool(state["external_knobs"]),
                config=ControllerConfig(**state["config"]),
                counts=counts,
                in_flight=0,
                signals=ServingSignals(**signals),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{source!r} holds an incomplete controller state: {exc!r}") from exc


_Restorable = TypeVar("_Restorable", bound="Checkpointed")


class Checkpointed:
    """Saving and loading, for a class whose learned state is a :class:`ControllerCheckpoint`.

    The class gives :meth:`checkpoint` and :meth:`restore`, and a re-entrant ``_lock`` under
    which its state does not change; this adds files (:meth:`save`, :meth:`load`), bytes
    (:meth:`state_bytes`, :meth:`from_state_bytes`) and a periodic save (``autosave_path``,
    every ``autosave_every`` ended requests).
    """

    _lock: threading.RLock
    autosave_path: str | Path | None
    autosave_every: int
    _ended_since_save: int

    def _init_autosave(self, path: str | Path | None, every: int) -> None:
        self.autosave_path = path
        self.autosave_every = every
        self._ended_since_save = 0

    def _autosave_after_end(self) -> None:
        """A request ended (called under the lock): save if ``autosave_every`` have since the
        last save. Amortized: one save (milliseconds) per ``autosave_every`` requests."""
        self._ended_since_save += 1
        if self.autosave_path is None or self._ended_since_save < self.autosave_every:
            return
        self._ended_since_save = 0
        try:
            self.save(self.autosave_path)
        except OSError:  # a failing disk must not take the serving path down with it
            logger.exception("autosave to %s failed", self.autosave_path)

    def checkpoint(self) -> ControllerCheckpoint:
        """The learned state (live objects: serialize it under ``_lock``)."""
        raise NotImplementedError

    @classmethod
    def restore(
        cls: type[_Restorable],
        checkpoint: ControllerCheckpoint,
        *,
        autosave_path: str | Path | None = None,
        autosave_every: int = 1000,
    ) -> _Restorable:
        """An instance that continues from ``checkpoint``."""
        raise NotImplementedError

    def state_bytes(self) -> bytes:
        """The learned state as file bytes (see :meth:`save`)."""
        with self._lock:  # serialized under the lock: the live objects do not change meanwhile
            return encode_state(self.checkpoint().to_state())

    def save(self, path: str | Path) -> None:
        """Write everything learned online to ``path``, atomically (temp file, fsync, rename).

        Saved: the policy, the length predictor, the uncertainty scorer, the latency models,
        the knobs and the counters. Not saved: queued and running requests (a restart loses
        them; :meth:`load` counts them as failed with reason ``shutdown``). The state is
        serialized under the lock and written outside it.
        """
        write_bytes_atomic(path, self.state_bytes())

    @classmethod
    def load(
        cls: type[_Restorable],
        path: str | Path,
        *,
        autosave_path: str | Path | None = None,
        autosave_every: int = 1000,
    ) -> _Restorable:
        """An instance restored from a :meth:`save` file.

        Raises ValueError if the file is truncated, corrupted, of another format version or
        incomplete; nothing is half-loaded (the instance is built only from a fully checked
        state). Only load files you wrote yourself: the state is a pickle.
        """
        state = read_state(path, kind=STATE_KIND, rebuild=REBUILD)
        return cls.restore(
            ControllerCheckpoint.from_state(state, str(path)),
            autosave_path=autosave_path,
            autosave_every=autosave_every,
        )

    @classmethod
    def from_state_bytes(cls: type[_Restorable], data: bytes) -> _Restorable:
        """Like :meth:`load`, from :meth:`state_bytes` output."""
        state = decode_state(data, kind=STATE_KIND, rebuild=REBUILD)
        return cls.restore(ControllerCheckpoint.from_state(state, "<bytes>"))
