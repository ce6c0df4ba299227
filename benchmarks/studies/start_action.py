"""Study (SIMULATED): PPO's start point, chosen on the training space alone, per regime (issue 17).

Session 14 warm-started PPO at the best constant action of ``knob_ceiling.py --family action3``,
which was chosen on ``ppo_eval.py``'s held-out grid: the grid that then judged it. This chooses
the start where only training may look: episodes drawn from the training space
(``ppo_train.TRAIN_SCENARIOS``, both cost profiles, with and without a secondary executor; trace
windows training never draws, a seed that neither the training callback (10,000), checkpoint
validation (30,000) nor the held-out grid (20,000) uses).

The choice is made **per regime**, with and without a secondary executor: without one the
offload entry does nothing, so the best action there is about the weights and the batch cap,
and a single action for both regimes is a compromise neither needs (the observation says which
regime it is: ``has_secondary``). Every format-3 constant action of a grid (``knob_ceiling.py``'s
``action3`` values, widened) runs on every episode of its regime (actions that come to the same
knobs in an episode run once there). An action is ranked by its mean response time over the
heuristic's, averaged over the regime's episodes, among those whose mean deadline-miss rate is
at most the heuristic's + 1 point (issue 17's tolerance).

    python benchmarks/studies/start_action.py --episodes 200 \\
        --json benchmarks/results/start_action.json     # about 15 minutes on one core

``ppo_train.best_constant_action`` reads the ``--json`` (``best`` per regime) for
``examples/train_ppo.py --initial-action``. ``--offload-sweep`` then runs the chosen
with-secondary action with each offload entry, per primary cost profile: where offloading
everything pays and where it loses (a CPU secondary beside the fast engine model of vLLM).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from knob_ceiling import (
    ACTION3_BATCH,
    ACTION3_OFFLOAD,
    ACTION3_UNCERTAINTY,
    ACTION3_WAIT,
    ConstantAction,
)

from rtlm_adapt.policies.action_space import LogKnobsActionMap
from rtlm_adapt.policies.ppo import REGIMES, regime_for
from rtlm_adapt.policies.ppo_train import TrainConfig, run_case, training_eval_cases

CHOICE_SEED = 40_000
MISS_TOLERANCE = 0.01  # issue 17: no more than 1 point of deadline misses above the heuristic


#: knob_ceiling's action3 values, with no uncertainty weight and almost no aging added: without
#: a secondary the weights are all an action sets, so their grid is worth widening.
UNCERTAINTY = (-1.0, *ACTION3_UNCERTAINTY)  # uncertainty weight 0, 0.5, 1, 2
WAIT = (-1.0, *ACTION3_WAIT)  # aging 0.001, ~0.01, 0.05, 0.25


def grid() -> list[tuple[float, ...]]:
    """Length weight 1, no slack weight, the rest over the values above (288 actions)."""
    return [(1.0, u, w, -1.0, b, o) for u in UNCERTAINTY for w in WAIT
            for b in ACTION3_BATCH for o in ACTION3_OFFLOAD]


def knobs_key(action: tuple[float, ...], cap: int, secondary: bool) -> str:
    """What ``action`` runs as in an episode: equal keys, equal schedules."""
    knobs = LogKnobsActionMap().to_knobs(action, cap)
    return repr(knobs if secondary else knobs.replace(offload_threshold=math.inf))


def run_regime(cases: list[Any], actions: list[tuple[float, ...]]) -> dict[str, Any]:
    """Per action: mean RT ratio to the heuristic and miss difference, over ``cases``."""
    env: dict[str, Any] = {}
    heuristic = [run_case("heuristic", c, env) for c in cases]
    per_action: dict[tuple[float, ...], list[tuple[float, float]]] = {a: [] for a in actions}
    for case, (h_rt, h_miss) in zip(cases, heuristic, strict=True):
        sc = case.scenario
        done: dict[str, tuple[float, float]] = {}
        for a in actions:
            key = knobs_key(a, sc.max_batch, sc.secondary)
            if key not in done:
                rt, miss = run_case(lambda a=a: ConstantAction(a, LogKnobsActionMap()), case, env)
                done[key] = (rt / h_rt, miss - h_miss)
            per_action[a].append(done[key])
    rows = []
    for a, results in per_action.items():
        ratios, misses = np.array(results).T
        rows.append({"action": list(a), "mean_ratio": float(ratios.mean()),
                     "worst_ratio": float(ratios.max()), "miss_diff": float(misses.mean())})
    rows.sort(key=lambda r: r["mean_ratio"])
    allowed = [r for r in rows if r["miss_diff"] <= MISS_TOLERANCE]
    return {"episodes": len(cases), "best": (allowed or rows)[0], "top": rows[:10],
            "heuristic_mean_rt_s": float(np.mean([rt for rt, _ in heuristic]))}


def offload_sweep(cases: list[Any], action: list[float]) -> dict[str, dict[str, float]]:
    """``action`` with each offload entry: mean RT over the heuristic's per primary profile."""
    out: dict[str, dict[str, float]] = {}
    for profile in sorted({c.scenario.profile for c in cases}):
        mine = [c for c in cases if c.scenario.profile == profile]
        heuristic = [run_case("heuristic", c, {})[0] for c in mine]
        row = out[f"{profile} ({len(mine)} episodes)"] = {}
        for entry in (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0):
            a = (*action[:5], entry)
            rts = [run_case(lambda a=a: ConstantAction(a, LogKnobsActionMap()), c, {})[0]
                   for c in mine]
            row[f"{entry:+.2f}"] = float(np.mean(np.divide(rts, heuristic)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=200,
                        help="training-space episodes drawn (both regimes together)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--offload-sweep", action="store_true",
                        help="with --json's results already there: only the offload sweep")
    args = parser.parse_args()
    started = time.time()
    cases = training_eval_cases(TrainConfig(eval_episodes=args.episodes), seed=CHOICE_SEED)
    if args.offload_sweep:
        out = json.loads(Path(args.json).read_text())
        chosen = out["regimes"]["with_secondary"]["best"]["action"]
        sweep = out["offload_sweep"] = offload_sweep([c for c in cases if c.scenario.secondary],
                                                     chosen)
        for profile, row in sweep.items():
            print(profile, " ".join(f"{k}: {v:.3f}" for k, v in row.items()))
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        return
    out: dict[str, Any] = {"command": " ".join(sys.argv), "seed": CHOICE_SEED,
                           "episodes": args.episodes, "regimes": {}}
    for regime in REGIMES:
        mine = [c for c in cases if regime_for(c.scenario.secondary) == regime]
        out["regimes"][regime] = result = run_regime(mine, grid())
        print(f"{regime} ({len(mine)} episodes; heuristic mean RT "
              f"{result['heuristic_mean_rt_s']:.1f} s):")
        for row in result["top"]:
            action = " ".join(f"{x:+.2f}" for x in row["action"])
            print(f"  {action}  RT/heuristic {row['mean_ratio']:.3f} (worst "
                  f"{row['worst_ratio']:.3f}), misses {100 * row['miss_diff']:+.1f} pt")
        print(f"  chosen: {result['best']['action']}")
    out["elapsed_s"] = time.time() - started
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
