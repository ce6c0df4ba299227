"""Study (SIMULATED): the heuristic with the lexical or the encoder predictor, on the engine model.

Draws a real run's kind of workload (its prompts, dataset lengths, arrivals and offered rate;
``--seeds`` draw other samples the same way) and serves it on the engine model of vLLM with the
gateway's in-flight cap and hand-off: ``direct``, ``oracle-sjf`` and the heuristic predicting with
each tier. Prints each one's mean and p99 over direct's, per draw and pooled.

    python benchmarks/studies/tier_replay.py \\
        benchmarks/results/gateway_vllm_load0.9_session11.json --cap 6 --handoff-ms 40
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from inflight_cap_scan import figures, workload

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.engines.vllm_replay import (
    DEFAULT_ENGINE_PROFILE,
    NO_CAP,
    engine_profile,
    template_in_prompts,
)
from rtlm_adapt.experiment import Workload, run_policy

#: (label, policy, predictor tier)
RUNS = (("oracle-sjf", "oracle-sjf", "lexical"), ("heuristic", "heuristic", "lexical"),
        ("heuristic@encoder", "heuristic", "encoder"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a serve-bench --engine vllm JSON (the workload's setup)")
    parser.add_argument("--cap", type=int, default=6, help="the gateway's in-flight cap")
    parser.add_argument("--handoff-ms", type=float, default=40.0)
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    parser.add_argument("--profile", default=DEFAULT_ENGINE_PROFILE)
    args = parser.parse_args()
    real = json.loads(Path(args.run).read_text())
    base, template = template_in_prompts(StepCost.load(args.profile))
    cost = engine_profile(base, max_num_seqs=real["max_num_seqs"], max_inflight=args.cap,
                          handoff_s=args.handoff_ms / 1000)  # fmt: skip
    ratios: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in RUNS}
    for seed in (int(s) for s in args.seeds.split(",")):
        work = Workload(workload(real, seed, template), 1.0, 1.0, 1.0, 1.0, f"seed {seed}")
        direct = figures(run_policy("fcfs", work, primary_cost=dataclasses.replace(
            cost, max_batch_size=NO_CAP)).completions)  # fmt: skip
        cells = []
        for label, policy, tier in RUNS:
            f = figures(run_policy(policy, work, primary_cost=cost, tier=tier).completions)
            ratios[label].append((f["mean_s"] / direct["mean_s"], f["p99_s"] / direct["p99_s"]))
            cells.append(f"{label} {ratios[label][-1][0]:.3f} (p99 {ratios[label][-1][1]:.3f})")
        print(f"seed {seed}: " + ", ".join(cells), flush=True)
    print(f"pooled over {len(ratios['heuristic'])} draws (mean / direct, p99 / direct):")
    for label, values in ratios.items():
        mean, p99 = np.mean(values, axis=0)
        print(f"  {label:18s} {mean:.3f}  {p99:.3f}")


if __name__ == "__main__":
    main()
