"""scripts/fit_prior.py's encoder-head helpers: out-of-fold lexical residuals and the CV choice
of alpha (the script fits the packaged priors; it is not part of the wheel)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from rtlm_adapt.predictor.evaluation import kendall_tau

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from fit_prior import (  # noqa: E402
    _lexical_predictions,
    fit_encoder,
    fit_lexical,
    out_of_fold_lexical,
    select_alpha,
)


def _memorisable(n: int = 300, seed: int = 0):
    """Prompts that share no words with each other (a unique token each): a lexical model can
    only memorise them, so its in-sample predictions rank them and honest ones cannot."""
    rng = np.random.default_rng(seed)
    prompts = [f"qz{i}x{rng.integers(1 << 30)}" for i in range(n)]
    lengths = np.exp(rng.uniform(2, 7, size=n))
    return prompts, lengths


def test_out_of_fold_predictions_do_not_see_their_own_prompt() -> None:
    prompts, lengths = _memorisable()
    prior = fit_lexical(prompts, lengths, damp=0.3)
    in_sample = _lexical_predictions(prior, prompts)
    oof = out_of_fold_lexical(prompts, lengths, prompts, damp=0.3, k=5)
    assert kendall_tau(in_sample, lengths) > 0.5  # memorised
    assert abs(kendall_tau(oof, lengths)) < 0.15  # nothing to learn from the other folds


def test_select_alpha_picks_the_penalty_that_generalises() -> None:
    # As many dimensions as training rows per fold: an unpenalised fit interpolates the noise.
    rng = np.random.default_rng(1)
    n, d = 150, 120
    e = rng.normal(size=(n, d))
    signal = e @ rng.normal(size=d) / np.sqrt(d)
    lengths = np.expm1(4.0 + signal + rng.normal(0, 0.7, size=n))
    base = np.full(n, 4.0)
    alpha, cv = select_alpha(e, lengths, base, [1e-9, 30.0], k=5)
    assert set(cv) == {1e-9, 30.0}
    assert alpha == 30.0 and cv[30.0] > cv[1e-9] + 0.05, cv

    prior = fit_encoder(
        fit_lexical(["a b"] * 10, np.full(10, 50.0)),
        ["p"] * n,
        lengths,
        e,
        alpha=alpha,
        n_components=4,
        base=base,
    )
    head = e @ prior.emb_weights.astype(np.float64)
    assert kendall_tau(head, lengths) > 0.3
