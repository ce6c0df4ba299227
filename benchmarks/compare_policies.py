"""Policy comparison on real data, simulated executors: the table behind BENCHMARKS.md.

For each batching mode and load, every policy serves the same workload (AlpacaEval prompts with
one model's real response lengths in SmolLM2 tokens, Azure-conv arrival windows rescaled to the
load, deadlines independent of length); several seeds (arrival windows); figures are ratios to
FCFS in the same run, averaged over seeds.

    python benchmarks/compare_policies.py --json benchmarks/results/policies.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import TokenCounter, load_prompts
from rtlm_adapt.experiment import build_workload, run_policy

POLICIES = (
    "fcfs,sjf-prompt,sjf,oracle-sjf,heuristic-local+oracle,heuristic-local,heuristic+oracle,heuristic"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="alpaca:gpt4_1106_preview")
    ap.add_argument("--arrivals", default="azure-conv")
    ap.add_argument("--loads", default="0.5,0.7,0.9,1.0")
    ap.add_argument("--batching", default="continuous,static")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--json")
    args = ap.parse_args()

    samples = load_prompts(args.prompts, tokenizer=TokenCounter.default())
    primary, secondary = StepCost.default(), StepCost.default_secondary()
    policies = args.policies.split(",")
    out: dict = {
        "rows": [],
        "args": vars(args),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} python {platform.python_version()}",
        "profile": primary.name,
        "secondary_profile": secondary.name,
    }
    t0 = time.perf_counter()
    for batching in args.batching.split(","):
        for load in [float(x) for x in args.loads.split(",")]:
            per_policy: dict[str, list] = {p: [] for p in policies}
            for seed in range(args.seeds):
                wl = build_workload(
                    samples,
                    arrivals=args.arrivals,
                    load=load,
                    n=args.requests,
                    seed=seed,
                    cost=primary,
                    batching=batching,
                )
                for p in policies:
                    run = run_policy(
                        p, wl, batching=batching, primary_cost=primary, secondary_cost=secondary
                    )
                    per_policy[p].append(run.summary)
            base = per_policy["fcfs"]
            print(f"\n{batching}, load {load}  (ratios to FCFS, mean over {args.seeds} seeds)")
            print(
                f"{'policy':<24}{'mean':>8}{'p99':>8}{'miss':>8}{'thr':>8}"
                f"{'mean s':>9}{'p99 s':>9}{'miss %':>8}"
            )
            for p in policies:
                ss = per_policy[p]
                row = {
                    "batching": batching,
                    "load": load,
                    "policy": p,
                    "mean_rt_ratio": float(
                        np.mean([s.mean_rt_s / b.mean_rt_s for s, b in zip(ss, base, strict=True)])
                    ),
                    "p99_rt_ratio": float(
                        np.mean([s.p99_rt_s / b.p99_rt_s for s, b in zip(ss, base, strict=True)])
                    ),
                    "miss_ratio": float(
                        np.mean(
                            [
                                (s.deadline_miss_rate + 1e-9) / (b.deadline_miss_rate + 1e-9)
                                for s, b in zip(ss, base, strict=True)
                            ]
                        )
                    ),
                    "throughput_ratio": float(
                        np.mean(
                            [
                                s.throughput_rps / b.throughput_rps
                                for s, b in zip(ss, base, strict=True)
                            ]
                        )
                    ),
                    "mean_rt_s": float(np.mean([s.mean_rt_s for s in ss])),
                    "p99_rt_s": float(np.mean([s.p99_rt_s for s in ss])),
                    "deadline_miss_rate": float(np.mean([s.deadline_miss_rate for s in ss])),
                }
                out["rows"].append(row)
                print(
                    f"{p:<24}{row['mean_rt_ratio']:>8.3f}{row['p99_rt_ratio']:>8.3f}"
                    f"{row['miss_ratio']:>8.3f}{row['throughput_ratio']:>8.3f}"
                    f"{row['mean_rt_s']:>9.1f}{row['p99_rt_s']:>9.1f}"
                    f"{100 * row['deadline_miss_rate']:>8.1f}"
                )
    out["elapsed_s"] = time.perf_counter() - t0
    print(f"\n({out['elapsed_s']:.0f}s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
