"""The simulate benchmark rerun with each length-predictor tier (issue 4's last "done means").

AlpacaEval gpt4_1106_preview prompts with their real response lengths (SmolLM2 tokens), Azure-conv
arrivals at load 0.9, continuous batching, 1,000 requests, the default simulated executors
(primary; a secondary for the policies that offload), as in BENCHMARKS.md section 1. For each tier
and seed (arrival window) it runs what

    rtlm-adapt simulate --prompts alpaca:gpt4_1106_preview --arrivals azure-conv --load 0.9 \\
        --requests 1000 --seed S --batching continuous --tier TIER \\
        --policies fcfs,oracle-sjf,heuristic,heuristic-local

runs, and reports, averaged over the seeds, mean and p99 response time relative to FCFS and the
fraction of oracle SJF's mean-response-time gain over FCFS a policy captures
(gain = 1 - mean/mean_FCFS; issue 4's target with the encoder tier: >= 60%, with p99 <= 2x FCFS).

Usage::

    python benchmarks/predictor_simulate.py   # -> benchmarks/results/predictor_simulate.json

The encoder tier embeds the workload's prompts once (batched, cached under
``~/.cache/rtlm_adapt/embeddings``); the online predictor of each run starts from the packaged
prior and learns from the run's finished requests only. Note: 1,000 requests draw on 805 prompts,
so some prompts repeat within a run, and a repeat's earlier length is in what the online part has
learnt (as it would be for a repeated prompt in a real deployment).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import TokenCounter, load_prompts
from rtlm_adapt.experiment import build_workload, run_policy

POLICIES = "fcfs,oracle-sjf,heuristic,heuristic-local"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="alpaca:gpt4_1106_preview")
    ap.add_argument("--arrivals", default="azure-conv")
    ap.add_argument("--load", type=float, default=0.9)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tiers", default="lexical,encoder")
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--json", default="benchmarks/results/predictor_simulate.json")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    samples = load_prompts(args.prompts, tokenizer=TokenCounter.default())
    primary, secondary = StepCost.default(), StepCost.default_secondary()
    policies = args.policies.split(",")
    rows = []
    for tier in args.tiers.split(","):
        per: dict[str, list] = {p: [] for p in policies}
        for seed in range(args.seeds):
            wl = build_workload(
                samples,
                arrivals=args.arrivals,
                load=args.load,
                n=args.requests,
                seed=seed,
                cost=primary,
                batching="continuous",
            )
            for p in policies:
                run = run_policy(
                    p,
                    wl,
                    batching="continuous",
                    primary_cost=primary,
                    secondary_cost=secondary,
                    tier=tier,
                )
                per[p].append(run.summary)
        base = per["fcfs"]
        mean_ratio = {
            p: float(np.mean([s.mean_rt_s / b.mean_rt_s for s, b in zip(ss, base, strict=True)]))
            for p, ss in per.items()
        }
        oracle_gain = 1.0 - mean_ratio.get("oracle-sjf", float("nan"))
        for p, ss in per.items():
            p99 = float(np.mean([s.p99_rt_s / b.p99_rt_s for s, b in zip(ss, base, strict=True)]))
            gain = 1.0 - mean_ratio[p]
            rows.append(
                {
                    "tier": tier,
                    "policy": p,
                    "mean_rt_ratio": mean_ratio[p],
                    "p99_rt_ratio": p99,
                    "gain": gain,
                    "fraction_of_oracle_gain": gain / oracle_gain if oracle_gain else float("nan"),
                    "mean_rt_s": float(np.mean([s.mean_rt_s for s in ss])),
                    "p99_rt_s": float(np.mean([s.p99_rt_s for s in ss])),
                    "deadline_miss_rate": float(np.mean([s.deadline_miss_rate for s in ss])),
                }
            )
    print(
        f"load {args.load}, continuous, {args.requests} requests, {args.seeds} seeds "
        "(ratios to FCFS, mean over seeds)"
    )
    print(
        "| tier | policy | mean/FCFS | share of oracle-sjf's gain | p99/FCFS | mean s | p99 s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tier']} | {r['policy']} | {r['mean_rt_ratio']:.3f} | "
            f"{100 * r['fraction_of_oracle_gain']:.0f}% | {r['p99_rt_ratio']:.3f} | "
            f"{r['mean_rt_s']:.1f} | {r['p99_rt_s']:.1f} |"
        )
    elapsed = time.perf_counter() - t0
    print(f"({elapsed:.0f}s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "rows": rows,
            "args": vars(args),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": os.getloadavg(),
            "elapsed_s": elapsed,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
