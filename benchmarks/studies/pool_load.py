"""The observed load behind a gateway with two backends: the pool's, or the first backend's.

    python benchmarks/studies/pool_load.py --json benchmarks/results/pool_load.json

All of a gateway's backends serve the controller's one queue, yet until session 19 the
observation's ``load`` was the arrival rate over the first backend's capacity alone: with two
backends at 0.6 each a policy read 1.2. The heuristic reads the load twice (it consolidates
batches to the knee below 0.8 without a secondary, and offloads the longer half of the queue
above 0.8 rather than its tail), and a learned policy reads it as a feature. The load is now the
pool's (``observer.observe``).

The cells are the held-out grid's prompts x traces at caps 4 and 16, at loads 0.5, 0.7 and 0.9
per backend, served on two identical primaries, alone and beside the grid's CPU secondary.
Each is served under the heuristic and the packaged model (guarded), reading the pool's load
(as built) and the first backend's (the old observation, patched in).

Ratios: mean response time reading the pool's load over reading the first's, same policy, same
requests. SIMULATED (virtual time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.envs.episodes import shared_scorer
from rtlm_adapt.envs.scenarios import Scenario, scenario_cost
from rtlm_adapt.executor_models import ExecutorModels
from rtlm_adapt.experiment import engine_priorities
from rtlm_adapt.policies import make_policy
from rtlm_adapt.policies.ppo_train import (
    DEFAULT_PROFILE,
    HELD_OUT_ARRIVALS,
    HELD_OUT_PROMPTS,
    HELD_OUT_SEED,
    scenario_cases,
)
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.simulated import simulated_executor

POLICIES = ("heuristic", "ppo")
BACKENDS = ("backend-a", "backend-b")
SECONDARY = StepCost.load("smollm2-135m-cpu2-secondary")  # the grid's (ppo_train.run_summary)
LOADS = (0.5, 0.7, 0.9)
CAPS = (4, 16)
POOL = ExecutorModels.primaries


def first_backend_only(on: bool) -> None:
    """Patch ExecutorModels.primaries as the observation read it before session 19: the first
    primary alone (``on``), or restore it."""
    ExecutorModels.primaries = (lambda self: [self.states[self.primary]]) if on else POOL


def serve(policy_name: str, case, secondary: bool) -> float:
    """Mean response time of one window served on two identical primaries."""
    cost = scenario_cost(case.scenario, DEFAULT_PROFILE)
    profiles = {**dict.fromkeys(BACKENDS, cost), "secondary": SECONDARY}
    ctl = AdaptiveController(make_policy(policy_name), epoch_s=5.0, scorer=shared_scorer(),
                             profiles=profiles)
    priority_of = engine_priorities(ctl)
    backends = [simulated_executor(b, cost, priority_of=priority_of,
                                   max_batch_size=case.scenario.max_batch) for b in BACKENDS]
    second = simulated_executor("secondary", SECONDARY, priority_of=priority_of) if secondary \
        else None
    completions = ServingLoop(ctl, backends, second).run(case.workload.requests).completions
    return float(np.mean([c.response_time for c in completions]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    rows = []
    t0 = time.perf_counter()
    cells = itertools.product(HELD_OUT_PROMPTS, HELD_OUT_ARRIVALS, LOADS, CAPS, (False, True))
    for i, (prompts, arrivals, load, cap, secondary) in enumerate(cells):
        # twice the load of one backend: each of the two runs at ``load``
        scenario = Scenario(prompts, arrivals, 2 * load, cap, secondary)
        case = scenario_cases([scenario], 1, {"n_requests": args.requests},
                              seed=HELD_OUT_SEED + 200 + i)[0]
        row = {"cell": f"{prompts} | {arrivals} | {load:g} per backend | cap {cap} | "
                       + ("+secondary" if secondary else "alone")}
        for policy in POLICIES:
            first_backend_only(True)
            old = serve(policy, case, secondary)
            first_backend_only(False)
            new = serve(policy, case, secondary)
            row[policy] = {"pool_s": new, "first_s": old, "ratio": new / old}
        rows.append(row)
        print(f"{row['cell']:<64} " + "  ".join(
            f"{p} {row[p]['ratio']:.3f} ({row[p]['first_s']:.1f} -> {row[p]['pool_s']:.1f} s)"
            for p in POLICIES), flush=True)

    summary = {}
    print()
    print(f"{'policy':<10}{'cells':<12}{'mean ratio':>11}{'best':>7}{'worst':>7}")
    for policy in POLICIES:
        for side in ("alone", "+secondary", "all"):
            ratios = [r[policy]["ratio"] for r in rows if side == "all" or r["cell"].endswith(side)]
            summary[f"{policy} {side}"] = {"mean_ratio": float(np.mean(ratios)),
                                           "best": float(min(ratios)), "worst": float(max(ratios))}
            s = summary[f"{policy} {side}"]
            print(f"{policy:<10}{side:<12}{s['mean_ratio']:>11.3f}{s['best']:>7.3f}"
                  f"{s['worst']:>7.3f}")
    print(f"({len(rows)} windows of {args.requests} requests, {time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "backends": 2, "rows": rows,
                       "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
