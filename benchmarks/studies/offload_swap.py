"""Is it the offload threshold? The packaged PPO policy with the heuristic's threshold swapped in.

    python benchmarks/studies/offload_swap.py --caps 4 --json benchmarks/results/offload_swap.json

On the held-out grid's cells with the engine model of vLLM as the primary and the CPU secondary
beside it (``ppo_eval.py --profile vllm-cpu-smollm2-135m``), the packaged model loses to the
heuristic in the 4-seat cells. Per cell this serves the same windows with the heuristic, the
learned actor alone (``ppo-unguarded``) and the actor with one knob replaced by the heuristic's
choice at the same observation: the offload threshold. Where the swap brings the actor level
with the heuristic, the threshold is what it got wrong. It also reports the median threshold
each one chose while requests waited (inf: nothing offloaded). SIMULATED, in virtual time.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from rtlm_adapt.knobs import Knobs
from rtlm_adapt.observation import Observation
from rtlm_adapt.policies import make_policy
from rtlm_adapt.policies.heuristic import RTLMHeuristic
from rtlm_adapt.policies.ppo_train import held_out_cells, run_case


class ThresholdRecorder:
    """Wraps a policy; records the offload thresholds both it and the heuristic would set while
    requests wait, and, with ``swap``, sets the heuristic's instead of its own."""

    def __init__(self, policy: object, swap: bool) -> None:
        self.policy, self.swap, self.heuristic = policy, swap, RTLMHeuristic()
        self.name = getattr(policy, "name", "ppo")
        self.own: list[float] = []
        self.heuristics: list[float] = []

    def __getattr__(self, attr: str) -> object:  # length_source, consolidate, ...
        return getattr(self.policy, attr)

    def decide(self, obs: Observation) -> Knobs:
        knobs = self.policy.decide(obs)
        theirs = self.heuristic.decide(obs).offload_threshold
        if obs.queue_length > 0:
            self.own.append(knobs.offload_threshold)
            self.heuristics.append(theirs)
        return replace(knobs, offload_threshold=theirs) if self.swap else knobs


def median(values: list[float]) -> float:
    return float(np.median(values)) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", default="4,16,64", help="primary batch caps")
    parser.add_argument("--profile", default="vllm-cpu-smollm2-135m")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    caps = [int(c) for c in args.caps.split(",")]
    rows = []
    print("| cell | ppo / heuristic | with the heuristic's threshold | ppo's median threshold "
          "| the heuristic's |\n|---|---|---|---|---|")
    # ppo_eval.py's cells and windows
    for cell, cases in held_out_cells(args.windows, 100, caps=caps, profile=args.profile):
        heuristic = np.mean([run_case("heuristic", c, {})[0] for c in cases])
        result = {"cell": cell.label()}
        for label, swap in (("ppo", False), ("ppo_heuristic_threshold", True)):
            recorders = [ThresholdRecorder(make_policy("ppo-unguarded"), swap) for _ in cases]
            rt = np.mean([run_case(r, c, {})[0] for r, c in zip(recorders, cases, strict=True)])
            result[label] = float(rt / heuristic)
            if not swap:
                result["ppo_median_threshold"] = median([t for r in recorders for t in r.own])
                result["heuristic_median_threshold"] = median(
                    [t for r in recorders for t in r.heuristics])
        rows.append(result)
        print(f"| {result['cell']} | {result['ppo']:.3f} | {result['ppo_heuristic_threshold']:.3f}"
              f" | {result['ppo_median_threshold']:.0f} | "
              f"{result['heuristic_median_threshold']:.0f} |", flush=True)
    summary = {k: float(np.mean([r[k] for r in rows])) for k in ("ppo", "ppo_heuristic_threshold")}
    print(f"mean over {len(rows)} cells: ppo {summary['ppo']:.3f}, with the heuristic's "
          f"threshold {summary['ppo_heuristic_threshold']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": rows, "mean": summary,
                                               "profile": args.profile}, indent=1) + "\n")


if __name__ == "__main__":
    main()
