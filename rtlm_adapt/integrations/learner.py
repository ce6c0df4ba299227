"""The shared learner: one length predictor that every ingress replica teaches.

Design (documented choice for scale-out): **one learner, many readers**. Each ingress replica
predicts with its own copy of the predictor (microseconds, no remote call on the request path),
sends every finished request's ``(features, true length)`` to the one learner, and pulls a fresh
copy every few seconds. So the replicas share what any of them learned, and no two copies
drift apart for longer than the pull period.

Nothing learned is lost when a process dies:

- an ingress replica keeps nothing of its own: an example counts once the learner has it;
- the learner appends each batch to a journal file before it answers, and folds the journal
  into a snapshot (an atomic, checksummed state file) every ``snapshot_every`` examples; a new
  learner on the same ``state_dir`` (a restarted actor) loads the snapshot and replays the
  journal, so it resumes at the same version with the same predictor.

>>> import tempfile
>>> from rtlm_adapt.predictor import LengthPredictor
>>> folder = tempfile.mkdtemp()
>>> learner = SharedLearner(folder, LengthPredictor(prior_length=100.0))
>>> learner.learn([({"prompt_tokens_est": 5.0}, 40)] * 3)
3
>>> SharedLearner(folder).learned  # a restart: the journal is replayed
3
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rtlm_adapt.persistence import read_state, write_state
from rtlm_adapt.predictor import LengthPredictor

logger = logging.getLogger(__name__)

_KIND = "shared-learner"
#: One finished request: the features the predictor saw, and the true output length.
Example = tuple[Mapping[Any, float], int]


class SharedLearner:
    """The one predictor every replica teaches, saved as snapshot + journal under ``state_dir``.

    Parameters
    ----------
    state_dir
        Folder for ``snapshot.bin`` and ``journal.pkl`` (None: in memory only, for tests).
    predictor
        The starting predictor when ``state_dir`` holds no snapshot (default: the pretrained
        lexical tier).
    snapshot_every
        Fold the journal into a new snapshot after this many examples.
    """

    def __init__(
        self,
        state_dir: str | Path | None = None,
        predictor: LengthPredictor | None = None,
        snapshot_every: int = 500,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.snapshot_every = snapshot_every
        self.predictor = predictor
        self.learned = 0  # examples learned in total (the version of the predictor)
        self._since_snapshot = 0
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._restore()
        if self.predictor is None:
            self.predictor = LengthPredictor.pretrained()

    @property
    def snapshot_path(self) -> Path | None:
        return self.state_dir / "snapshot.bin" if self.state_dir is not None else None

    @property
    def journal_path(self) -> Path | None:
        return self.state_dir / "journal.pkl" if self.state_dir is not None else None

    def learn(self, examples: Iterable[Example]) -> int:
        """Journal, then learn, a batch of finished requests; return the new version."""
        batch = [(features, int(length)) for features, length in examples]
        if not batch:
            return self.learned
        if self.journal_path is not None:
            with open(self.journal_path, "ab") as journal:
                pickle.dump(batch, journal, protocol=pickle.HIGHEST_PROTOCOL)
        self._apply(batch)
        if self._since_snapshot >= self.snapshot_every:
            self.save()
        return self.learned

    def model(self, have: int = -1) -> tuple[int, bytes] | None:
        """The predictor pickled, with its version; None if the caller's ``have`` is current."""
        if have == self.learned:
            return None
        return self.learned, pickle.dumps(self.predictor, protocol=pickle.HIGHEST_PROTOCOL)

    def save(self) -> None:
        """Write a snapshot and empty the journal it now contains."""
        if self.snapshot_path is None or self.journal_path is None:
            return
        write_state(
            self.snapshot_path,
            {"kind": _KIND, "predictor": self.predictor, "learned": self.learned},
        )
        self.journal_path.write_bytes(b"")
        self._since_snapshot = 0

    def _apply(self, batch: list[Example]) -> None:
        for features, length in batch:
            self.predictor.learn_one(features, length)
        self.learned += len(batch)
        self._since_snapshot += len(batch)

    def _restore(self) -> None:
        snapshot, journal = self.snapshot_path, self.journal_path
        if snapshot is not None and snapshot.exists():
            state = read_state(snapshot, kind=_KIND)
            self.predictor, self.learned = state["predictor"], int(state["learned"])
        if self.predictor is None:
            self.predictor = LengthPredictor.pretrained()
        if journal is None or not journal.exists():
            return
        replayed = 0
        with open(journal, "rb") as f:
            while True:
                try:
                    batch = pickle.load(f)
                except EOFError:
                    break
                except (pickle.UnpicklingError, ValueError, AttributeError):
                    # A batch cut short as it was written: it was never acknowledged.
                    logger.warning("journal %s ends in a partial batch; ignored", journal)
                    break
                self._apply(batch)
                replayed += len(batch)
        if replayed:
            logger.info("replayed %d examples from %s", replayed, journal)


__all__ = ["Example", "SharedLearner"]
