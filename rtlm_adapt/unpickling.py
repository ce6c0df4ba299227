r"""Reading state files that older versions wrote: classes that moved, and classes that are gone.

A state file is a pickle, and a pickle names each object's class by where it lived when the file
was written. When a class moves, old files still name its old home; :data:`MOVED_CLASSES` says
where each one lives now, and :func:`loads` finds it there. A class that is gone (nothing here
can stand in for it) makes :func:`loads` raise :class:`OlderStateFileError`, whose message says
what the file is, why it cannot be read and how to rebuild it.

Moved so far: the encoder tier's classes, when the predictor became a package of small parts
(``rtlm_adapt.encoder_tier`` is gone). ``EncoderLengthPredictor`` is now a
:class:`~rtlm_adapt.predictor.LengthPredictor` with an embedding model, and its saved fields
are the same, so an old encoder-tier predictor loads and predicts as it did.

>>> import pickle
>>> loads(pickle.dumps({"n": 3}), source="demo.bin", what="a demo file", rebuild="")
{'n': 3}
>>> old = b"crtlm_adapt.encoder_tier\nEmbeddingRef\n."  # a pickled class, long gone
>>> try:
...     loads(old, source="old.bin", what="a demo file", rebuild="Make it again.")
... except OlderStateFileError as exc:
...     print(exc)  # doctest: +NORMALIZE_WHITESPACE
'old.bin' is a demo file written by an older rtlm-adapt, before the predictor redesign
(rtlm_adapt.predictor became a package): it names rtlm_adapt.encoder_tier.EmbeddingRef, which
this version no longer has, so it cannot be loaded. Make it again.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

#: Where classes that older state files name live now: (module, name) -> (module, name).
MOVED_CLASSES: dict[tuple[str, str], tuple[str, str]] = {
    ("rtlm_adapt.encoder_tier", "EmbeddingResidualModel"): (
        "rtlm_adapt.predictor.embedding",
        "EmbeddingResidualModel",
    ),
    ("rtlm_adapt.encoder_tier", "EncoderLengthPredictor"): (
        "rtlm_adapt.predictor.length",
        "LengthPredictor",
    ),
}

#: Modules older versions had, each with the change that removed it (what an old file predates).
REMOVED_MODULES: dict[str, str] = {
    "rtlm_adapt.encoder_tier": "the predictor redesign (rtlm_adapt.predictor became a package)",
}


class OlderStateFileError(ValueError):
    """A state file from an older rtlm-adapt names a class this version no longer has."""


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: str, what: str, rebuild: str) -> None:
        super().__init__(io.BytesIO(data))
        self._source, self._what, self._rebuild = source, what, rebuild

    def find_class(self, module: str, name: str) -> Any:
        module, name = MOVED_CLASSES.get((module, name), (module, name))
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            if module.partition(".")[0] != "rtlm_adapt":
                raise  # another package's class: not ours to explain
            change = REMOVED_MODULES.get(module)
            since = f", before {change}" if change else ""
            raise OlderStateFileError(
                f"{self._source!r} is {self._what} written by an older rtlm-adapt{since}: it "
                f"names {module}.{name}, which this version no longer has, so it cannot be "
                f"loaded. {self._rebuild}".rstrip()
            ) from None


def loads(data: bytes, *, source: str, what: str, rebuild: str) -> Any:
    """``pickle.loads(data)``, finding moved classes at their new home.

    ``source`` (the file), ``what`` (what kind of file it is) and ``rebuild`` (how to make it
    again) word the :class:`OlderStateFileError` raised if the data names a class that is gone.
    Only load files you wrote yourself: unpickling runs code from the file.
    """
    return _Unpickler(data, source, what, rebuild).load()
