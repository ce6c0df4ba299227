"""Study: the heuristic's hard aging bound, 20 x service time (before 2026-12-05) vs
max(8 x service time, 3 x recent response time) (after), in the simulator.

Two costs: a 4-slot engine whose step barely grows with the batch (vLLM-CPU-like: 29 ms + 0.7 ms
per sequence, as measured through vLLM's API here) and the packaged HF profile (16 slots).
Heuristic without a secondary executor (same hardware as FCFS). Prints mean and p99 as ratios to
FCFS, averaged over seeds, and writes --json.

    python benchmarks/studies/aging_bound.py --json benchmarks/results/aging_bound.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import TokenCounter, load_prompts
from rtlm_adapt.experiment import build_workload, run_policy
from rtlm_adapt.policies import registry
from rtlm_adapt.policies.heuristic import RTLMHeuristic

VLLM_LIKE = StepCost(name="vllm-cpu-like", decode_s_base=0.029, decode_s_per_seq=0.0007,
                     decode_s_per_ctx_token=1e-6, prefill_s_base=0.01,
                     prefill_s_per_token=0.0002, max_batch_size=4)  # fmt: skip
CELLS = [("vllm-like", "alpaca:phi-2", 0.7), ("vllm-like", "alpaca:phi-2", 0.9),
         ("vllm-like", "alpaca:phi-2", 1.1), ("vllm-like", "alpaca:gpt4_1106_preview", 0.9),
         ("vllm-like", "sharegpt", 0.9), ("hf", "alpaca:gpt4_1106_preview", 0.9),
         ("hf", "alpaca:gpt4_1106_preview", 1.0), ("hf", "sharegpt", 0.9)]  # fmt: skip
POLICIES = ["fcfs", "oracle-sjf", "bound-20svc", "bound-8svc-3resp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--json")
    args = parser.parse_args()
    registry.POLICIES["bound-20svc"] = lambda: RTLMHeuristic(
        name="bound-20svc", offload=False, max_wait_factor=20.0, max_wait_response_factor=0.0
    )
    registry.POLICIES["bound-8svc-3resp"] = lambda: RTLMHeuristic(
        name="bound-8svc-3resp", offload=False
    )
    counter = TokenCounter.resolve("smollm2")
    out = []
    for cost_name, prompts, load in CELLS:
        cost = VLLM_LIKE if cost_name == "vllm-like" else StepCost.load("smollm2-135m-cpu2")
        samples = load_prompts(prompts, tokenizer=counter, seed=0,
                               limit=2000 if prompts == "sharegpt" else None)  # fmt: skip
        samples = [dataclasses.replace(s, response_tokens=min(s.response_tokens, 512))
                   for s in samples]  # fmt: skip
        runs: dict[str, list[tuple[float, float]]] = {p: [] for p in POLICIES}
        for seed in range(args.seeds):
            workload = build_workload(samples, arrivals="azure-conv", load=load,
                                      n=args.requests, seed=seed, slo="0.7:2,0.3:10",
                                      cost=cost, batching="continuous")  # fmt: skip
            for policy in POLICIES:
                s = run_policy(policy, workload, primary_cost=cost).summary
                runs[policy].append((s.mean_rt_s, s.p99_rt_s))
        cell = {"cost": cost_name, "prompts": prompts, "load": load}
        for policy in POLICIES[1:]:
            pairs = zip(runs[policy], runs["fcfs"], strict=True)
            ratios = [(m / fm, p / fp) for (m, p), (fm, fp) in pairs]
            cell[policy] = {"mean_x_fcfs": statistics.mean(r[0] for r in ratios),
                            "p99_x_fcfs": statistics.mean(r[1] for r in ratios)}  # fmt: skip
        out.append(cell)
        print(f"{cost_name:9s} {prompts:26s} load {load}: " + "  ".join(
            f"{p} mean {cell[p]['mean_x_fcfs']:.3f} p99 {cell[p]['p99_x_fcfs']:.3f}"
            for p in POLICIES[1:]))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": out, "seeds": args.seeds}, indent=2))


if __name__ == "__main__":
    main()
