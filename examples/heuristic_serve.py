"""The no-training path: serve a real workload with the RT-LM heuristic and print the table.

    python examples/heuristic_serve.py --load 0.9 --requests 500

The heuristic derives every knob from the live observation (no model to train, no gymnasium);
FCFS and oracle SJF run on the same requests for reference.
"""

from __future__ import annotations

import argparse

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import load_prompts
from rtlm_adapt.experiment import build_workload, run_policy
from rtlm_adapt.metrics import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a real workload with the RT-LM heuristic.")
    parser.add_argument("--prompts", default="alpaca:gpt4_1106_preview")
    parser.add_argument("--arrivals", default="azure-conv")
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    primary = StepCost.load("smollm2-135m-cpu2")
    secondary = StepCost.load("smollm2-135m-cpu2-secondary")
    samples = load_prompts(args.prompts)
    workload = build_workload(samples, arrivals=args.arrivals, load=args.load, n=args.requests,
                              seed=args.seed, cost=primary)
    print(workload.description)
    results = {
        name: run_policy(name, workload, primary_cost=primary, secondary_cost=secondary).summary
        for name in ("fcfs", "heuristic", "oracle-sjf")
    }
    print(format_table(results))


if __name__ == "__main__":
    main()
