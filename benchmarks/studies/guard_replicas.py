"""The shadow guard behind a gateway with two backends: replays on both, or on the first alone.

    python benchmarks/studies/guard_replicas.py --json benchmarks/results/guard_replicas.json

A gateway with several backends reports each as a primary. Until session 19 a shadow replay
served the window on the first of them only, so with two backends it replayed twice the load on
half the seats: both policies were judged in an overload the deployment was not in. The replay
now serves every primary (``ShadowSetup.more_primaries``).

The cells are the held-out grid's (``ppo_eval.py``), prompts x traces x loads at caps 4 and 16,
here with two identical primaries beside the grid's CPU secondary: each cell's arrivals come at
twice its load of one primary, so each backend runs at the cell's load. (Without a secondary the
packaged model sets the heuristic's knobs, so there is nothing to judge.) Per cell and window:

- ``heuristic``;
- ``unguarded``: the packaged model alone;
- ``guarded``: the packaged model with the library's guard (replays on both primaries);
- ``guarded-first``: the same with replays on the first primary alone (patched in here).

Ratios are each run's mean response time over the heuristic's, on the same requests. The
heuristic's run is also replayed whole (``shadow.replay``) on both primaries and on the first
alone: how closely each reproduces the run it replays.
SIMULATED (virtual time).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.envs.episodes import shared_scorer
from rtlm_adapt.envs.scenarios import scenario_cost
from rtlm_adapt.experiment import engine_priorities
from rtlm_adapt.policies import make_policy
from rtlm_adapt.policies.ppo_train import (
    DEFAULT_PROFILE,
    HELD_OUT_SEED,
    held_out_cells,
    scenario_cases,
)
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.simulated import simulated_executor
from rtlm_adapt.shadow import ShadowSetup, replay
from rtlm_adapt.traffic import TrafficLog

VARIANTS = ("heuristic", "unguarded", "guarded", "guarded-first")
BACKENDS = ("backend-a", "backend-b")
SECONDARY = StepCost.default_secondary()  # the grid's (ppo_train.run_summary)


def first_primary_only() -> None:
    """Patch ShadowSetup.of as it was before session 19: the first primary alone."""
    of = ShadowSetup.of.__func__

    def first_only(cls, controller):
        setup = of(cls, controller)
        return None if setup is None else replace(setup, more_primaries=())

    ShadowSetup.of = classmethod(first_only)


def serve(variant: str, case) -> dict[str, float]:
    """One window served on two identical primaries under ``variant``."""
    name = {"heuristic": "heuristic", "unguarded": "ppo-unguarded"}.get(variant, "ppo")
    policy = make_policy(name)
    cost = scenario_cost(case.scenario, DEFAULT_PROFILE)
    ctl = AdaptiveController(policy, epoch_s=5.0, scorer=shared_scorer(),
                             profiles={**dict.fromkeys(BACKENDS, cost), "secondary": SECONDARY})
    priority_of = engine_priorities(ctl)
    backends = [simulated_executor(b, cost, priority_of=priority_of,
                                   max_batch_size=case.scenario.max_batch) for b in BACKENDS]
    secondary = simulated_executor("secondary", SECONDARY, priority_of=priority_of)
    if variant == "heuristic":  # kept to replay the whole window afterwards
        ctl.watch_traffic(TrafficLog(capacity=len(case.workload.requests)))
    completions = ServingLoop(ctl, backends, secondary).run(case.workload.requests).completions
    guard = getattr(policy, "guard", None)
    figures = guard.metrics() if guard is not None else {}
    if variant == "heuristic":
        # how closely a replay of the whole run reproduces it, on both primaries and on one
        setup, window = ShadowSetup.of(ctl), ctl.traffic.window()
        first = replace(setup, more_primaries=())
        for key, where in (("replay_both_s", setup), ("replay_first_s", first)):
            figures[key] = replay(window, make_policy("heuristic"), where).mean_response_s
    return {"mean_rt_s": float(np.mean([c.response_time for c in completions])),
            **{k: v for k, v in figures.items() if k.startswith("replay_")},
            "handbacks": figures.get("handbacks", 0.0), "trials": figures.get("trials", 0.0),
            # the last judgement's replays: learned over heuristic (what the guard weighs)
            "shadow_ratio": figures.get("shadow_ratio", float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    original_of = ShadowSetup.of
    rows = []
    t0 = time.perf_counter()
    for i, (cell, _) in enumerate(held_out_cells(0, args.requests, caps=(4, 16))):
        # twice the cell's load of one primary: each of the two runs at the cell's load
        two = replace(cell, load=2 * cell.load)
        cases = scenario_cases([two], args.windows, {"n_requests": args.requests},
                               seed=HELD_OUT_SEED + 100 + i)
        for w, case in enumerate(cases):
            row = {"cell": cell.label().replace("cap", "2 primaries, cap"), "window": w}
            for variant in VARIANTS:
                ShadowSetup.of = original_of
                if variant == "guarded-first":
                    first_primary_only()
                row[variant] = serve(variant, case)
            ShadowSetup.of = original_of
            heur = row["heuristic"]["mean_rt_s"]
            row["ratios"] = {v: row[v]["mean_rt_s"] / heur for v in VARIANTS[1:]}
            rows.append(row)
            fidelity = (row["heuristic"]["replay_both_s"] / heur,
                        row["heuristic"]["replay_first_s"] / heur)
            row["replay_over_live"] = {"both": fidelity[0], "first": fidelity[1]}
            print(f"{row['cell']:<66} w{w} heuristic {heur:6.1f} s (replayed: "
                  f"{fidelity[0]:.3f}x on both, {fidelity[1]:.2f}x on the first)  "
                  + "  ".join(f"{v} {row['ratios'][v]:.3f} ({row[v]['handbacks']:.0f} hb, "
                              f"shadow {row[v]['shadow_ratio']:.3f})"
                              for v in VARIANTS[1:]), flush=True)
    summary = {v: {"mean_ratio": float(np.mean([r["ratios"][v] for r in rows])),
                   "worst_ratio": float(np.max([r["ratios"][v] for r in rows])),
                   "cells_past_2pct": int(sum(r["ratios"][v] > 1.02 for r in rows)),
                   "windows_handed_back": int(sum(r[v]["handbacks"] > 0 for r in rows))}
               for v in VARIANTS[1:]}
    print()
    print(f"{'variant':<15}{'mean ratio':>11}{'worst':>8}{'past 2%':>9}{'handed back':>13}")
    for v, s in summary.items():
        print(f"{v:<15}{s['mean_ratio']:>11.3f}{s['worst_ratio']:>8.3f}"
              f"{s['cells_past_2pct']:>9}{s['windows_handed_back']:>13}")
    both = [r["replay_over_live"]["both"] for r in rows]
    first = [r["replay_over_live"]["first"] for r in rows]
    print(f"the heuristic's run replayed, over the live run: {min(both):.3f}-{max(both):.3f}x "
          f"on both primaries, {min(first):.2f}-{max(first):.2f}x on the first alone")
    print(f"({len(rows)} windows of {args.requests} requests, {time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "windows": args.windows, "backends": 2,
                       "rows": rows, "summary": summary,
                       "replay_over_live": {"both": [min(both), max(both)],
                                            "first": [min(first), max(first)]}}, f, indent=1)


if __name__ == "__main__":
    main()
