"""Study: how well the lexical predictor ranks the requests that wait together, against how the
gateway's ``rtlm_prediction_kendall_tau`` reads.

The scheduler compares predictions of requests that wait at the same time, made within seconds of
each other. The gateway's metric computes Kendall tau over its last 256 finished requests, whose
predictions were made at different times: while the predictor's level moves (from its ShareGPT
prior to the served lengths), that mixes predictions from different levels and reads lower than
the ranking the queue sees. Here, on the gateway benchmark's workload (AlpacaEval prompts with
phi-2's lengths capped at 512, random 300-prompt runs), each prompt is predicted at its arrival and
learned 10 requests later (about the queue's depth at load 0.9), and tau is taken both ways:
over the whole run, and within consecutive windows of 20 requests (averaged).

    python benchmarks/studies/ranking_within_queue.py
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from scipy.stats import kendalltau

from rtlm_adapt.data import TokenCounter, load_prompts
from rtlm_adapt.predictor import LengthPredictor


def online_predictions(samples, learn: bool, lag: int, **predictor_options) -> list[float]:
    """Each sample's prediction at its arrival; it is learned ``lag`` arrivals later."""
    predictor = LengthPredictor.pretrained("lexical", **predictor_options)
    features = predictor.features_many([s.prompt for s in samples])
    predictions = []
    for i, f in enumerate(features):
        predictions.append(predictor.predict_one(f).length)
        if learn and i >= lag:
            predictor.learn_one(features[i - lag], samples[i - lag].response_tokens)
    return predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--lag", type=int, default=10)
    args = parser.parse_args()
    counter = TokenCounter.resolve("smollm2")
    samples = [
        dataclasses.replace(s, response_tokens=max(1, min(s.response_tokens, 512)))
        for s in load_prompts("alpaca:phi-2", tokenizer=counter, seed=0)
    ]
    rows = {
        "prior only": {"learn": False},
        "online (default)": {"learn": True},
        "online, learning_rate 0.05": {"learn": True, "learning_rate": 0.05},
        "online, learning_rate 0.1": {"learn": True, "learning_rate": 0.1},
    }
    print(f"{'predictor':28s} {'tau, whole run':>15s} {'tau, windows of ' + str(args.window):>20s}")
    for name, options in rows.items():
        whole, windowed = [], []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            run = [samples[i] for i in rng.choice(len(samples), args.requests, replace=False)]
            pred = online_predictions(run, lag=args.lag, **options)
            true = [s.response_tokens for s in run]
            whole.append(kendalltau(pred, true).statistic)
            w = args.window
            taus = [kendalltau(pred[j : j + w], true[j : j + w]).statistic
                    for j in range(0, len(run), w)]  # fmt: skip
            windowed.append(float(np.nanmean(taus)))
        print(f"{name:28s} {np.mean(whole):15.3f} {np.mean(windowed):20.3f}")


if __name__ == "__main__":
    main()
