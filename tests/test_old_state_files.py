"""State files written before the predictor redesign (rtlm_adapt/unpickling.py).

The old code kept the encoder tier in ``rtlm_adapt.encoder_tier``: an ``EncoderLengthPredictor``
subclass and its ``EmbeddingResidualModel``, both pickled by module and class name, with the
same fields as today's classes. ``old_pickling`` makes today's objects pickle under those old
names, so the bytes are what the old ``save`` wrote (checked by hand against the old code at
d95a1f7 and 32a7e5f: the old files load here and predict to the last digit as they did there).
"""

from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import pytest

from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.predictor import EmbeddingResidualModel, LengthPredictor
from rtlm_adapt.unpickling import OlderStateFileError

OLD_MODULE = "rtlm_adapt.encoder_tier"


class EncoderLengthPredictor(LengthPredictor):
    """Stands in for the old subclass: same fields, pickled under the old module's name."""


class EmbeddingRef(float):
    """Stands in for the old features value (a float carrying the embedding): nothing stands
    in for it now, so a file naming it cannot be loaded."""


@contextlib.contextmanager
def old_pickling(monkeypatch: pytest.MonkeyPatch):
    """Objects pickle as the old code wrote them: the encoder tier's classes named by the old
    module. Afterwards the old module is gone again, as it is for a user who upgraded."""
    with monkeypatch.context() as m:
        old = types.ModuleType(OLD_MODULE)
        old.EmbeddingResidualModel = EmbeddingResidualModel
        old.EncoderLengthPredictor = EncoderLengthPredictor
        old.EmbeddingRef = EmbeddingRef
        m.setitem(sys.modules, OLD_MODULE, old)
        for cls in (EmbeddingResidualModel, EncoderLengthPredictor, EmbeddingRef):
            m.setattr(cls, "__module__", OLD_MODULE)
        yield
    assert OLD_MODULE not in sys.modules


def _trained_encoder_predictor(n: int = 60):
    """An encoder-tier predictor after ``n`` finished requests, and features to probe it with."""
    p = LengthPredictor.pretrained("encoder")
    rng = np.random.default_rng(0)
    dim = p.embedding_model.dim
    emb = rng.normal(size=(n + 20, dim)).astype(np.float32)
    feats = [p.features(f"Write about topic {i}.", embedding=e) for i, e in enumerate(emb)]
    for i, f in enumerate(feats[:n]):
        p.learn_one(f, 10 + 30 * (i % 5))
    return p, feats[n:]


def _predictions(p: LengthPredictor, feats) -> list:
    return [tuple(p.predict_one(f)) for f in feats]


def test_an_old_encoder_tier_predictor_file_loads_and_predicts_as_before(monkeypatch, tmp_path):
    p, probe = _trained_encoder_predictor()
    path = tmp_path / "encoder.predictor"
    with old_pickling(monkeypatch):
        p.save(path)
    data = path.read_bytes()
    assert OLD_MODULE.encode() in data and b"rtlm_adapt.predictor.embedding" not in data

    q = LengthPredictor.load(path)
    assert type(q.embedding_model) is EmbeddingResidualModel and q.tier == "encoder"
    assert _predictions(q, probe) == _predictions(p, probe)
    for i, f in enumerate(probe[:10]):  # and it keeps learning as the original does
        p.learn_one(f, 7 + 50 * (i % 3))
        q.learn_one(f, 7 + 50 * (i % 3))
    assert q.embedding_model.n_learned == p.embedding_model.n_learned
    assert _predictions(q, probe) == _predictions(p, probe)


def test_an_old_encoder_tier_controller_file_loads(monkeypatch, tmp_path):
    p, probe = _trained_encoder_predictor()
    p.__class__ = EncoderLengthPredictor  # what the old pretrained("encoder") returned
    path = tmp_path / "encoder.controller"
    with old_pickling(monkeypatch):
        AdaptiveController("heuristic", predictor=p).save(path)
    assert b"EncoderLengthPredictor" in path.read_bytes()

    restored = AdaptiveController.load(path).predictor
    assert type(restored) is LengthPredictor
    assert type(restored.embedding_model) is EmbeddingResidualModel
    assert _predictions(restored, probe) == _predictions(p, probe)


def test_an_old_file_naming_a_class_that_is_gone_says_what_it_is_and_how_to_rebuild(
    monkeypatch, tmp_path
):
    p, _ = _trained_encoder_predictor(5)
    p.embedding_model.stray = EmbeddingRef(0.0)  # an object no mapping can bring back
    predictor_file, controller_file = tmp_path / "old.predictor", tmp_path / "old.controller"
    with old_pickling(monkeypatch):
        p.save(predictor_file)
        AdaptiveController("fcfs", predictor=p).save(controller_file)

    with pytest.raises(ValueError) as caught:  # still a ValueError, as before
        LengthPredictor.load(predictor_file)
    message = str(caught.value)
    assert isinstance(caught.value, OlderStateFileError)
    assert str(predictor_file) in message and "is a LengthPredictor file" in message
    assert "older rtlm-adapt, before the predictor redesign" in message
    assert f"{OLD_MODULE}.EmbeddingRef" in message
    assert "LengthPredictor.pretrained(TIER), re-fit it" in message

    with pytest.raises(OlderStateFileError) as caught:
        AdaptiveController.load(controller_file)
    message = str(caught.value)
    assert str(controller_file) in message and "of kind 'rtlm_adapt.AdaptiveController'" in message
    assert f"{OLD_MODULE}.EmbeddingRef" in message
    assert "start a new AdaptiveController" in message and "re-fit the predictor" in message


def test_a_class_of_another_package_that_is_missing_is_not_blamed_on_an_old_version(tmp_path):
    path = tmp_path / "foreign.predictor"
    path.write_bytes(b"cnosuchpackage\nThing\n.")
    with pytest.raises(ValueError, match="not a readable LengthPredictor file") as caught:
        LengthPredictor.load(path)
    assert not isinstance(caught.value, OlderStateFileError)


def test_a_controller_file_from_before_the_length_signal_loads(monkeypatch, tmp_path):
    from rtlm_adapt.request import Request
    from rtlm_adapt.signals import ServingSignals

    ctl = AdaptiveController("heuristic")
    for i in range(5):
        ctl.submit(Request(f"r{i}", f"Write a poem about topic {i}.", arrival_time=float(i)))
    path = tmp_path / "old.controller"
    old_saved = tuple(n for n in ServingSignals.SAVED if n != "length_ewma")
    with monkeypatch.context() as m:  # what a controller wrote before the signal existed
        m.setattr(ServingSignals, "SAVED", old_saved)
        ctl.save(path)
    restored = AdaptiveController.load(path)._signals
    assert restored.length_ewma == 0.0  # starts afresh
    assert ctl._signals.length_ewma > 0 and restored.service_ewma == ctl._signals.service_ewma
