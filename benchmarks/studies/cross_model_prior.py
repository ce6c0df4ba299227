"""Would a prior fitted on one's own logs of OTHER models rank a new model's lengths better?

For each AlpacaEval model and split seed (25% of prompts held out, as predictor_eval.py): a ridge
on the encoder tier's prompt representation (the prior's standardised embedding), fitted on the
TRAINING prompts to the mean log length the other 15 models gave them, scored by Kendall tau on
the model's held-out prompts; then the same plus a ridge on the model's own training residuals.
The held-out prompts are never fitted on. Compare with the encoder tier (ShareGPT prior + online
stream) in BENCHMARKS.md section 3.

    python benchmarks/studies/cross_model_prior.py --json benchmarks/results/cross_model_prior.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rtlm_adapt.data import TokenCounter, alpaca_models, load_prompts
from rtlm_adapt.encoder import cached_encode
from rtlm_adapt.predictor import LengthPredictor
from rtlm_adapt.predictor.evaluation import kendall_tau, split_by_prompt


def ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge weights for ``x`` whose last column is the (unpenalised) intercept."""
    reg = alpha * np.eye(x.shape[1])
    reg[-1, -1] = 0.0
    return np.linalg.solve(x.T @ x + reg, x.T @ y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", default="smollm2-l16,minilm")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--alpha", type=float, default=30.0, help="ridge penalty of the prior")
    ap.add_argument("--resid-alpha", type=float, default=100.0, help="of the residual ridge")
    ap.add_argument("--json")
    args = ap.parse_args()

    counter = TokenCounter.default()
    models = alpaca_models()
    samples = {m: {s.id: s for s in load_prompts(f"alpaca:{m}", tokenizer=counter)} for m in models}
    ids = sorted(samples[models[0]], key=int)
    prompts = [samples[models[0]][i].prompt for i in ids]
    y = np.array(
        [
            [np.log1p(samples[m][i].response_tokens) if i in samples[m] else np.nan for m in models]
            for i in ids
        ]
    )
    out: dict = {}
    for name in args.encoders.split(","):
        predictor = LengthPredictor.pretrained("encoder", encoder=name)
        emb = cached_encode(predictor.get_encoder(), prompts, batch_size=16)
        x = predictor.prior.transform(emb).astype(np.float64)
        x = np.hstack([x, np.ones((len(x), 1))])
        out[name] = {}
        for seed in [int(s) for s in args.seeds.split(",")]:
            held = split_by_prompt(ids, 0.25, seed)
            prior_taus, both_taus = [], []
            for j in range(len(models)):
                others = [k for k in range(len(models)) if k != j]
                target = np.nanmean(y[:, others], axis=1)
                prior = x @ ridge(x[~held], target[~held], args.alpha)
                test = held & ~np.isnan(y[:, j])
                train = ~held & ~np.isnan(y[:, j])
                prior_taus.append(kendall_tau(prior[test], y[test, j]))
                resid = ridge(x[train], y[train, j] - prior[train], args.resid_alpha)
                both_taus.append(kendall_tau((prior + x @ resid)[test], y[test, j]))
            out[name][str(seed)] = {
                "prior_median_tau": float(np.median(prior_taus)),
                "prior_plus_own_residual_median_tau": float(np.median(both_taus)),
                "per_model_prior": dict(zip(models, map(float, prior_taus), strict=True)),
            }
            print(
                f"{name:12s} seed {seed}: other models' prior {np.median(prior_taus):.3f}, "
                f"+ own residual ridge {np.median(both_taus):.3f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
