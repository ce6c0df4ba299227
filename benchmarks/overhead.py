"""Controller overhead per request, and uncertainty scoring per prompt.

Controller cost per request = submit (priority key, predictor.predict_one, latency model) + its
share of scheduling decisions (next_batch handing it out) + on_finish (predictor.learn_one),
measured with ``--queued`` requests waiting, prompt scoring excluded (every prompt scored up
front; each request gets a copy of its prompt's features). Also reported: the same calls when each
prompt is scored just before its submit (untimed), as in a serving loop, where the scoring's own
work pushes the controller's data out of the CPU caches.
Uncertainty cost = UncertaintyScorer.score_prompt on each AlpacaEval prompt.

    python benchmarks/overhead.py --json overhead.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import numpy as np

from rtlm_adapt import Completion, Request
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.data import TokenCounter, load_prompts
from rtlm_adapt.predictor import LengthPredictor
from rtlm_adapt.serving.base import ExecutorState


def controller_costs(
    prompts: list[str],
    lengths: list[int],
    queued: int,
    n: int,
    policy: str,
    predictor: str,
    setup=None,
    record: np.ndarray | None = None,
    times: np.ndarray | None = None,
    fresh: bool = False,
):
    # "lexical": the default (ShareGPT prior over hashed words + uncertainty features);
    # "uncertainty-only": a predictor on the ~19 uncertainty features alone (cheaper, ranks worse)
    ctl = AdaptiveController(
        policy, predictor=LengthPredictor() if predictor == "uncertainty-only" else None
    )

    # Prompt scoring happens upstream (and is measured separately): the uncertainty features
    # and score, plus the predictor's own prompt features (hashed words on the lexical tier).
    # ``fresh``: scored as each request arrives (untimed), as a serving loop does; else scored
    # once per prompt up front and copied.
    def score(p: str) -> dict:
        f, u = ctl.scorer.score_prompt(p)
        f["uncertainty"] = u
        return ctl.predictor.features(p, base=f) if predictor == "lexical" else f

    feats = [score(p) for p in prompts]
    state = ExecutorState("primary", "primary", 0, 1, 0.0)
    ctl.next_batch(state)  # register the executor, run the first policy epoch
    if setup is not None:
        setup(ctl)

    def request(i: int, now: float) -> Request:
        j = i % len(prompts)
        return Request(f"r{i}", prompts[j], now, deadline=now + 30.0, prompt_tokens=64)

    now = 0.0
    for i in range(queued):
        ctl.submit(request(i, now), _own(feats[i % len(feats)]))
    costs = np.empty((n, 3))  # submit, next_batch, on_finish
    gc.disable()
    for k in range(n):
        i = queued + k
        now += 0.01
        req = request(i, now)
        # the scoring (or copy) is the caller's, not the controller's, cost
        f = score(prompts[i % len(prompts)]) if fresh else _own(feats[i % len(feats)])
        state = ExecutorState("primary", "primary", 0, 1, now)
        # time the controller's three calls, not the loop's own work (the executor state and
        # the Completion are the loop's objects)
        t0 = time.perf_counter()
        ctl.submit(req, f)
        t01 = time.perf_counter()
        batch = ctl.next_batch(state)
        t1 = time.perf_counter()
        done = batch[0]
        completion = Completion(
            done.id,
            lengths[i % len(lengths)],
            done.arrival_time,
            now,
            now,
            "primary",
            prompt_tokens=64,
            deadline=done.deadline,
        )
        t2 = time.perf_counter()
        ctl.on_finish(completion)
        t3 = time.perf_counter()
        costs[k] = (t01 - t0, t1 - t01, t3 - t2)
        if record is not None:
            record[k] = times
    gc.enable()
    assert len(ctl) == queued and ctl.stats().balanced
    return costs * 1e6  # per request: submit, next_batch, on_finish (sum = the total)


def _own(features):
    """The request's own features: a copy of a dict (the controller may add keys to it); an
    immutable record (the predictor's PromptFeatures) as it is."""
    return dict(features) if isinstance(features, dict) else features


def predictor_share(
    prompts: list[str], lengths: list[int], queued: int, n: int, policy: str, predictor: str
) -> np.ndarray:
    """The predictor's predict_one and learn_one as the controller calls them, per request.

    A separate run with the two methods wrapped in timers (the wrapper's own cost stays out of
    these figures, but would inflate the controller's, so they come from another run).
    """
    times = np.zeros(2)
    real: dict = {}

    def wrap(ctl: AdaptiveController) -> None:
        pred = ctl.predictor
        real["predict"], real["learn"] = pred.predict_one, pred.learn_one

        def predict_one(f):
            t = time.perf_counter()
            out = real["predict"](f)
            times[0] = time.perf_counter() - t
            return out

        def learn_one(f, y):
            t = time.perf_counter()
            out = real["learn"](f, y)
            times[1] = time.perf_counter() - t
            return out

        pred.predict_one, pred.learn_one = predict_one, learn_one

    out = np.empty((n, 2))
    controller_costs(
        prompts, lengths, queued, n, policy, predictor, setup=wrap, record=out, times=times
    )
    return out * 1e6


def scoring_costs(prompts: list[str], repeats: int) -> np.ndarray:
    from rtlm_adapt.uncertainty import UncertaintyScorer

    scorer = UncertaintyScorer()
    out = []
    for _ in range(repeats):
        for p in prompts:
            t0 = time.perf_counter()
            scorer.score_prompt(p)
            out.append(time.perf_counter() - t0)
    return np.array(out) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="alpaca:gpt4_1106_preview")
    ap.add_argument("--queued", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=5, help="repeat; report the median run")
    ap.add_argument("--policy", default="heuristic")
    ap.add_argument("--predictor", choices=("lexical", "uncertainty-only"), default="lexical")
    ap.add_argument("--json")
    args = ap.parse_args()

    samples = load_prompts(args.prompts, tokenizer=TokenCounter.words())
    prompts = [s.prompt for s in samples]
    lengths = [s.response_tokens for s in samples]
    # This machine's speed swings between runs (shared host): measure several times and
    # report the median run, with every run's p50 kept in the JSON.
    runs = []
    for _ in range(args.runs):
        ctl_us = controller_costs(
            prompts, lengths, args.queued, args.requests, args.policy, args.predictor
        )
        # the same with each prompt scored right before its submit (see controller_costs)
        fresh_us = controller_costs(
            prompts, lengths, args.queued, args.requests, args.policy, args.predictor, fresh=True
        ).sum(axis=1)
        unc_us = scoring_costs(prompts, repeats=3)
        # where the time goes: the predictor's calls inside submit and on_finish (own run)
        share = predictor_share(
            prompts, lengths, args.queued, args.requests, args.policy, args.predictor
        )
        total = ctl_us.sum(axis=1)
        runs.append(
            {
                "controller_us_p50": float(np.percentile(total, 50)),
                "controller_us_p99": float(np.percentile(total, 99)),
                "controller_scored_just_before_us_p50": float(np.percentile(fresh_us, 50)),
                "controller_us_mean": float(total.mean()),
                "submit_us_p50": float(np.percentile(ctl_us[:, 0], 50)),
                "next_batch_us_p50": float(np.percentile(ctl_us[:, 1], 50)),
                "on_finish_us_p50": float(np.percentile(ctl_us[:, 2], 50)),
                "predict_one_us_p50": float(np.percentile(share[:, 0], 50)),
                "learn_one_us_p50": float(np.percentile(share[:, 1], 50)),
                "uncertainty_us_p50": float(np.percentile(unc_us, 50)),
                "uncertainty_us_p99": float(np.percentile(unc_us, 99)),
            }
        )

    def median_of(key: str) -> float:
        return float(np.median([r[key] for r in runs]))

    keys = [k for k in runs[0] if not k.startswith("uncertainty")]
    result = {
        **{k: median_of(k) for k in keys},
        "uncertainty_us_p50": median_of("uncertainty_us_p50"),
        "uncertainty_us_p99": median_of("uncertainty_us_p99"),
        "runs": runs,
        "queued": args.queued,
        "requests": args.requests,
        "policy": args.policy,
        "predictor": args.predictor,
        "prompts": args.prompts,
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(
        f"median of {args.runs} runs; controller p50 per run: "
        + ", ".join(f"{r['controller_us_p50']:.1f}" for r in runs)
    )
    print(f"{'what':<34}{'p50 us':>10}{'p99 us':>10}")
    print(
        f"{'controller per request':<34}{result['controller_us_p50']:>10.1f}"
        f"{result['controller_us_p99']:>10.1f}"
    )
    for name, key in (
        ("  (prompt scored just before submit)", "controller_scored_just_before_us_p50"),
        ("  submit", "submit_us_p50"),
        ("    of which predict_one", "predict_one_us_p50"),
        ("  next_batch", "next_batch_us_p50"),
        ("  on_finish", "on_finish_us_p50"),
        ("    of which learn_one", "learn_one_us_p50"),
    ):
        print(f"{name:<34}{result[key]:>10.1f}")
    print(
        f"{'uncertainty scoring per prompt':<34}{result['uncertainty_us_p50']:>10.1f}"
        f"{result['uncertainty_us_p99']:>10.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
