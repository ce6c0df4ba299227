"""GPU what-ifs, simulated: policies on the engine model of vLLM with the GPU profiles built from
published figures (issue 16's done-means 3). Nothing here ran on a GPU.

For each profile and load, every policy serves the same workload (ShareGPT prompts with their
real answer lengths in SmolLM2 tokens, capped at --max-tokens, Azure-conv arrivals rescaled to
the load of the profile's FCFS capacity, the usual deadlines), on one engine (no secondary:
equal hardware). Several seeds; each figure is the mean over seeds of the ratio to FCFS in the
same seed.

    python benchmarks/gpu_what_ifs.py --json benchmarks/results/gpu_what_ifs.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import time
from pathlib import Path

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import TokenCounter, load_prompts
from rtlm_adapt.experiment import build_workload, run_policy

PROFILES = ("vllm-a100-llama3-8b", "vllm-h100-llama3-8b")
POLICIES = ("fcfs", "sjf", "oracle-sjf", "heuristic")
LOADS = (0.7, 0.9, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default="sharegpt")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    limit = max(2000, args.requests) if args.prompts == "sharegpt" else None
    samples = load_prompts(args.prompts, tokenizer=TokenCounter.resolve("smollm2"), seed=0,
                           limit=limit)  # fmt: skip
    samples = [dataclasses.replace(s, response_tokens=min(s.response_tokens, args.max_tokens))
               for s in samples]  # fmt: skip
    cells = []
    for profile in PROFILES:
        cost = StepCost.load(profile)
        for load in LOADS:
            per_policy: dict[str, list[dict[str, float]]] = {p: [] for p in POLICIES}
            for seed in range(args.seeds):
                workload = build_workload(samples, arrivals="azure-conv", load=load,
                                          n=args.requests, seed=seed, cost=cost)  # fmt: skip
                runs = {p: run_policy(p, workload, primary_cost=cost) for p in POLICIES}
                base = runs["fcfs"].summary
                for p, run in runs.items():
                    s = run.summary
                    per_policy[p].append({
                        "mean_rt_s": s.mean_rt_s, "p99_rt_s": s.p99_rt_s,
                        "mean_ratio": s.mean_rt_s / base.mean_rt_s,
                        "p99_ratio": s.p99_rt_s / base.p99_rt_s,
                        "miss": s.deadline_miss_rate, "preemptions": run.preemptions,
                    })  # fmt: skip
            cell = {"profile": profile, "load": load, "policies": {
                p: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
                for p, rows in per_policy.items()
            }}  # fmt: skip
            cells.append(cell)
            row = "  ".join(
                f"{p} {f['mean_ratio']:.3f}/{f['p99_ratio']:.3f}"
                for p, f in cell["policies"].items()
                if p != "fcfs"
            )
            fcfs = cell["policies"]["fcfs"]
            print(f"{profile} load {load}: fcfs mean {fcfs['mean_rt_s']:.2f} s; {row}")
    out = {
        "what": "simulated, engine model of vLLM V1, GPU profiles from published figures",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "args": vars(args),
        "cells": cells,
        "seconds": time.perf_counter() - t0,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
