"""Study: the heuristic's share of oracle-sjf's gain on the engine model, for each AlpacaEval
model's response lengths (SIMULATED, virtual time).

The gateway benchmark's workload (``serve-bench --engine vllm``: AlpacaEval prompts, lengths in
SmolLM2 tokens capped at 512, azure-conv arrivals at load 0.9, 300 requests, the packaged
``vllm-cpu-smollm2-135m`` profile with 4 seats) with each of the 16 models' lengths in turn:
does the choice of phi-2's lengths for the done-means run favour or handicap the heuristic?

    python benchmarks/studies/heuristic_by_lengths.py --seeds 4 \
        --json benchmarks/results/heuristic_by_lengths.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import TokenCounter, find_data_dir, load_prompts
from rtlm_adapt.engines.vllm_replay import engine_profile
from rtlm_adapt.experiment import build_workload, run_policy

POLICIES = ("fcfs", "heuristic", "oracle-sjf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--json")
    args = parser.parse_args()

    models = sorted(
        p.name.removesuffix(".jsonl.gz")
        for p in (find_data_dir() / "alpaca_eval").glob("*.jsonl.gz")
    )
    cost = engine_profile(StepCost.load("vllm-cpu-smollm2-135m"), max_num_seqs=4)
    counter = TokenCounter.resolve("smollm2")
    rows = []
    print(f"load {args.load}, {args.seeds} seeds x 300 requests; mean response time x FCFS")
    print(
        f"{'lengths':28s} {'mean':>5s} {'p50':>5s} {'heuristic':>9s} {'oracle':>7s} {'share':>6s}"
    )
    for model in models:
        samples = [
            dataclasses.replace(s, response_tokens=max(1, min(s.response_tokens, 512)))
            for s in load_prompts(f"alpaca:{model}", tokenizer=counter, seed=0)
        ]
        means: dict[str, list[float]] = {p: [] for p in POLICIES}
        for seed in range(args.seeds):
            workload = build_workload(
                samples, arrivals="azure-conv", load=args.load, n=300, seed=seed, cost=cost
            )
            for policy in POLICIES:
                means[policy].append(
                    run_policy(policy, workload, primary_cost=cost).summary.mean_rt_s
                )
        ratio = {
            p: statistics.mean(a / f for a, f in zip(means[p], means["fcfs"], strict=True))
            for p in POLICIES
        }
        lengths = np.array([s.response_tokens for s in samples])
        row = {
            "lengths": model,
            "mean_tokens": float(lengths.mean()),
            "p50_tokens": float(np.median(lengths)),
            "heuristic_x_fcfs": ratio["heuristic"],
            "oracle_x_fcfs": ratio["oracle-sjf"],
            "share_of_oracle_gain": (1 - ratio["heuristic"]) / (1 - ratio["oracle-sjf"]),
        }
        rows.append(row)
        print(f"{model:28s} {row['mean_tokens']:5.0f} {row['p50_tokens']:5.0f}"
              f" {row['heuristic_x_fcfs']:9.3f} {row['oracle_x_fcfs']:7.3f}"
              f" {row['share_of_oracle_gain']:6.2f}", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
