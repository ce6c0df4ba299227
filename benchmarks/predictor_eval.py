"""Length-predictor quality on AlpacaEval: per-model table, references, drift recovery, costs.

For each of the 16 AlpacaEval models (../shared/data/alpaca_eval/): split the 805 prompts by id
(25% held out, seed S), start from the packaged ShareGPT prior of the tier, stream the training
prompts once (predict, then learn), and score the held-out prompts (Kendall tau, coverage of the
90% interval, MAE). Next to it, the issue's three references on the same split:

* ``ref_lexical_river``: river ``StandardScaler | LinearRegression`` on the uncertainty features,
  one online pass over the training prompts (log1p target), no prior;
* ``ref_ridge_minilm``: ridge on all-MiniLM-L6-v2 embeddings fitted offline on the training
  prompts of that model (needs the encoder);
* ``ref_other_models``: the mean log length the OTHER 15 models gave for the same prompt (an upper
  reference: the prompt carries most of the signal).

And one diagnostic that is NOT a predictor (it sees the held-out answers):

* ``diag_ridge_minilm_all_labels``: ridge (alpha 1) on the embeddings fitted on ALL of the model's
  prompts, the held-out ones included, scored on the held-out ones: how far any linear function of
  all-MiniLM-L6-v2 embeddings can rank this model's lengths at all.

Drift: 400 requests answered with gpt4_1106_preview's lengths, then llama-2-7b-chat-hf's; the MAE
over the 200 requests after the switch against the same 200 requests when the stream was
llama-2-7b-chat-hf's all along (steady state); averaged over seeds; plotted to a PNG.

Usage::

    python benchmarks/predictor_eval.py   # -> benchmarks/results/predictor_eval.json, *.png
    python benchmarks/predictor_eval.py --tiers lexical   # no encoder dependencies
    # the encoder tier with another encoder (rtlm_adapt.encoder.ENCODERS) and its own prior;
    # -> benchmarks/results/predictor_eval_smollm2-l16.json (the references then use that
    # encoder's prior-standardised features: ref_ridge_smollm2-l16, diag_ridge_smollm2-l16_...)
    python benchmarks/predictor_eval.py --tiers encoder --encoder smollm2-l16 --extra-seeds 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from rtlm_adapt.data import TokenCounter, alpaca_models, load_prompts
from rtlm_adapt.predictor import LengthPredictor
from rtlm_adapt.predictor.evaluation import evaluate, kendall_tau, split_by_prompt


def _lengths_by_id(models: list[str], counter: TokenCounter) -> dict[str, dict[str, float]]:
    return {
        m: {s.id: float(s.response_tokens) for s in load_prompts(f"alpaca:{m}", tokenizer=counter)}
        for m in models
    }


def ref_lexical_river(samples, mask, seed: int) -> float:
    from river import linear_model, optim, preprocessing

    from rtlm_adapt.uncertainty import UncertaintyScorer

    sc = UncertaintyScorer()
    model = preprocessing.StandardScaler() | linear_model.LinearRegression(
        optimizer=optim.SGD(0.01), intercept_lr=0.05
    )
    feats = [sc.features(s.prompt) for s in samples]
    rng = np.random.default_rng(seed + 1)
    for i in rng.permutation(np.flatnonzero(~mask)):
        model.learn_one(feats[i], float(np.log1p(samples[i].response_tokens)))
    test = np.flatnonzero(mask)
    return kendall_tau([model.predict_one(feats[i]) for i in test],
                       [samples[i].response_tokens for i in test])


def ref_ridge_minilm(samples, mask, emb_by_id: dict[str, np.ndarray], alpha: float = 3.0) -> float:
    x = np.stack([emb_by_id[s.id] for s in samples]).astype(np.float64)
    y = np.log1p([s.response_tokens for s in samples])
    tr, te = ~mask, mask
    mu, ym = x[tr].mean(0), y[tr].mean()
    xc = x[tr] - mu
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y[tr] - ym))
    pred = (x[te] - mu) @ w
    return kendall_tau(pred, y[te])


def diag_ridge_all_labels(samples, mask, emb_by_id: dict[str, np.ndarray],
                          alpha: float = 1.0) -> float:
    x = np.stack([emb_by_id[s.id] for s in samples]).astype(np.float64)
    y = np.log1p([s.response_tokens for s in samples])
    mu, ym = x.mean(0), y.mean()
    xc = x - mu
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - ym))
    return kendall_tau(xc[mask] @ w, y[mask])


def ref_other_models(samples, mask, model: str, lengths: dict[str, dict[str, float]]) -> float:
    test = [s for s, m in zip(samples, mask, strict=True) if m]
    pred = [
        np.mean([np.log1p(lengths[o][s.id]) for o in lengths if o != model and s.id in lengths[o]])
        for s in test
    ]
    return kendall_tau(pred, [s.response_tokens for s in test])


def drift_run(tier: str, lengths, prompts_by_id, emb_by_id, seeds, before: str, after: str,
              n_before: int = 400, n_after: int = 200, encoder: str | None = None):
    """Per-request absolute errors: switch run and steady-state run (same prompts)."""
    ids = sorted(set(lengths[before]) & set(lengths[after]), key=int)
    switch_err, steady_err, drifts = [], [], []
    for seed in seeds:
        order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
        order = order[: n_before + n_after]
        runs = {}
        for name, first in (("switch", before), ("steady", after)):
            p = LengthPredictor.pretrained(
                tier, encoder=encoder if tier == "encoder" else None)
            errs = []
            for k, pid in enumerate(order):
                f = p.features(prompts_by_id[pid], embedding=emb_by_id.get(pid))
                y = lengths[first if k < n_before else after][pid]
                errs.append(abs(p.predict_one(f).length - y))
                p.learn_one(f, y)
            runs[name] = (errs, p.n_drifts)
        switch_err.append(runs["switch"][0])
        steady_err.append(runs["steady"][0])
        drifts.append(runs["switch"][1])
    return np.array(switch_err), np.array(steady_err), drifts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiers", default="lexical,encoder")
    ap.add_argument("--encoder", default="minilm",
                    help="the encoder tier's encoder (rtlm_adapt.encoder.ENCODERS); another than "
                         "minilm writes predictor_eval_NAME.json / predictor_drift_mae_NAME.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout-fraction", type=float, default=0.25)
    ap.add_argument("--json", default=None,
                    help="default benchmarks/results/predictor_eval.json (minilm), else "
                         "predictor_eval_NAME.json")
    ap.add_argument("--png", default=None)
    ap.add_argument("--drift-seeds", type=int, default=5)
    ap.add_argument("--drift-before", default="gpt4_1106_preview")
    ap.add_argument("--drift-after", default="llama-2-7b-chat-hf")
    ap.add_argument("--extra-seeds", default="",
                    help="other split seeds (e.g. 1,2) for which only the tiers' median Kendall "
                         "tau is computed: how much the figure moves with the held-out set")
    ap.add_argument("--no-drift", action="store_true", help="skip the drift runs")
    args = ap.parse_args(argv)
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    from rtlm_adapt.encoder import check_encoder_name

    encoder = check_encoder_name(args.encoder)
    suffix = "" if encoder == "minilm" else f"_{encoder}"
    if args.json is None:
        args.json = f"benchmarks/results/predictor_eval{suffix}.json"
    if args.png is None:
        args.png = f"benchmarks/results/predictor_drift_mae{suffix}.png"
    ref_name = encoder  # names the ridge reference columns
    enc_name = None if encoder == "minilm" else encoder

    t0 = time.perf_counter()
    counter = TokenCounter.default()
    models = alpaca_models()
    lengths = _lengths_by_id(models, counter)
    prompts_by_id = {
        s.id: s.prompt for s in load_prompts(f"alpaca:{models[0]}", tokenizer=counter)
    }
    emb_by_id: dict[str, np.ndarray] = {}
    emb_cost: dict[str, float] = {}
    ref_by_id: dict[str, np.ndarray] = {}  # what the ridge references see
    if "encoder" in tiers:
        from rtlm_adapt.encoder import cached_encode

        enc_pred = LengthPredictor.pretrained("encoder", encoder=enc_name)
        enc = enc_pred.get_encoder()
        ids = sorted(prompts_by_id, key=int)
        t_enc = time.perf_counter()
        embs = cached_encode(enc, [prompts_by_id[i] for i in ids],
                             batch_size=32 if encoder == "minilm" else 16)
        emb_cost["embed_all_s_or_cache"] = time.perf_counter() - t_enc
        emb_by_id = dict(zip(ids, embs, strict=True))
        # MiniLM's embeddings as they are (unit vectors); another encoder's as the tier sees them
        # (standardised with the prior's mean/std, unit length)
        ref_by_id = dict(zip(ids, enc_pred.prior.transform(embs), strict=True))
        probe = [prompts_by_id[i] for i in ids[:64]]
        enc.encode(probe[:2])  # load weights before timing
        import torch

        emb_cost["torch_threads"] = torch.get_num_threads()
        for bs in (1, 16, 32) if encoder == "minilm" else (1, 16):
            t = time.perf_counter()
            n = 16 if bs == 1 else 64
            enc.encode(probe[:n], batch_size=bs)
            emb_cost[f"embed_ms_per_prompt_batch{bs}"] = (time.perf_counter() - t) / n * 1e3

    rows: dict[str, dict[str, float]] = {}
    for m in models:
        samples = load_prompts(f"alpaca:{m}", tokenizer=counter)
        mask = split_by_prompt([s.id for s in samples], args.holdout_fraction, args.seed)
        row: dict[str, float] = {}
        for tier in tiers:
            embs = np.stack([emb_by_id[s.id] for s in samples]) if tier == "encoder" else None
            r = evaluate(samples, tier=tier, holdout_fraction=args.holdout_fraction,
                         seed=args.seed, embeddings=embs,
                         encoder=enc_name if tier == "encoder" else None)
            for k in ("kendall_tau", "interval_coverage", "mae_tokens", "prior_kendall_tau",
                      "predict_us_p50", "learn_us_p50", "features_us_p50"):
                row[f"{tier}_{k}"] = r[k]
        row["ref_lexical_river"] = ref_lexical_river(samples, mask, args.seed)
        if ref_by_id:
            row[f"ref_ridge_{ref_name}"] = ref_ridge_minilm(samples, mask, ref_by_id)
            row[f"diag_ridge_{ref_name}_all_labels"] = diag_ridge_all_labels(samples, mask,
                                                                             ref_by_id)
        row["ref_other_models"] = ref_other_models(samples, mask, m, lengths)
        rows[m] = row
        print(m, {k: round(v, 3) for k, v in row.items() if "tau" in k or k.startswith("ref")},
              file=sys.stderr, flush=True)

    cols = [f"{t}_kendall_tau" for t in tiers] + [f"{t}_interval_coverage" for t in tiers]
    cols += [c for c in ("ref_lexical_river", f"ref_ridge_{ref_name}", "ref_other_models",
                         f"diag_ridge_{ref_name}_all_labels")
             if c in next(iter(rows.values()))]
    short = {c: c.replace("_kendall_tau", " tau").replace("_interval_coverage", " cov")
             .replace("ref_", "ref ")
             .replace(f"diag_ridge_{ref_name}_all_labels", "diag all-labels")
             for c in cols}
    print(f"{'model':28s}" + "".join(f"{short[c]:>19s}" for c in cols))
    for m, row in rows.items():
        print(f"{m:28s}" + "".join(f"{row[c]:19.3f}" for c in cols))
    medians = {c: float(np.median([r[c] for r in rows.values()])) for c in rows[models[0]]}
    print(f"{'MEDIAN':28s}" + "".join(f"{medians[c]:19.3f}" for c in cols))

    extra: dict[str, dict[str, float]] = {}
    for seed in [int(x) for x in args.extra_seeds.split(",") if x.strip()]:
        taus: dict[str, list[float]] = {t: [] for t in tiers}
        for m in models:
            samples = load_prompts(f"alpaca:{m}", tokenizer=counter)
            for tier in tiers:
                embs = np.stack([emb_by_id[s.id] for s in samples]) if tier == "encoder" else None
                r = evaluate(samples, tier=tier, holdout_fraction=args.holdout_fraction,
                             seed=seed, embeddings=embs,
                             encoder=enc_name if tier == "encoder" else None)
                taus[tier].append(r["kendall_tau"])
        extra[str(seed)] = {t: float(np.median(v)) for t, v in taus.items()}
        print(f"split seed {seed}: median Kendall tau {extra[str(seed)]}", flush=True)

    drift: dict[str, dict] = {}
    curves = {}
    for tier in [] if args.no_drift else tiers:
        sw, st, nd = drift_run(tier, lengths, prompts_by_id, emb_by_id,
                               range(args.drift_seeds), args.drift_before, args.drift_after,
                               encoder=enc_name)
        after_sw = float(sw[:, 400:600].mean())
        after_st = float(st[:, 400:600].mean())
        drift[tier] = {
            "mae_after_switch": after_sw,
            "mae_steady_state": after_st,
            "ratio": after_sw / after_st,
            "within_15pct": after_sw <= 1.15 * after_st,
            "drift_detections_per_run": nd,
        }
        curves[tier] = (sw.mean(0), st.mean(0))
        print(f"drift [{tier}]: MAE over the 200 requests after the switch {after_sw:.1f} vs "
              f"steady state {after_st:.1f} (ratio {after_sw / after_st:.3f}); ADWIN detections "
              f"per run {nd}")
    if args.png and curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        k = 50
        kernel = np.ones(k) / k
        for tier, (sw, st) in curves.items():
            x = np.arange(k, len(sw) + 1)
            ax.plot(x, np.convolve(sw, kernel, "valid"), label=f"{tier}: switch at 400")
            ax.plot(x, np.convolve(st, kernel, "valid"), "--",
                    label=f"{tier}: {args.drift_after} throughout")
        ax.axvline(400, color="k", lw=0.8)
        ax.set_xlabel("request")
        ax.set_ylabel(f"MAE (tokens, rolling {k})")
        ax.set_title(f"{args.drift_before} -> {args.drift_after} "
                     f"(mean of {args.drift_seeds} orders)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=120)

    payload = {
        "per_model": rows,
        "median": medians,
        "drift": drift,
        "embedding_cost": emb_cost,
        "median_kendall_tau_other_split_seeds": extra,
        "settings": {"seed": args.seed, "holdout_fraction": args.holdout_fraction,
                     "tokenizer": counter.kind, "tiers": tiers, "encoder": encoder},
        "elapsed_s": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_end": os.getloadavg(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}, {args.png} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
