"""Study (SIMULATED): a run's checkpoints on the training space, split by deployment (issue 17).

``ppo_train.validate_checkpoints`` ranks checkpoints by one mean over the training space. This
splits the same validation episodes (the training space's held-out windows, seed 30,000) by what
the deployment is: the primary's cost profile (the transformers executor's batch model or the
engine model of vLLM) and whether a secondary executor exists. It shows *where* a policy gains
or loses against the heuristic: a constant action that offloads everything wins beside a
secondary as fast as the primary and loses beside the fast engine, which a learned policy can
only tell apart by the secondary's slowdown (observation format 4).

    python benchmarks/studies/ppo_by_deployment.py runs/ppo24 \\
        checkpoints/ppo_0_steps.zip checkpoints/ppo_300000_steps.zip --json OUT.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from rtlm_adapt.policies.ppo_train import Validation


def by_deployment(run: Path, models: list[str], episodes: int) -> dict[str, Any]:
    """Per model and deployment (profile, +secondary): episodes and mean RT ratio."""
    validation = Validation.of_run(run, episodes)  # validate_checkpoints' seed
    out: dict[str, Any] = {}
    for model in models:
        groups: dict[str, list[float]] = {}
        for case, ratio in zip(validation.cases, validation.ratios(run / model), strict=True):
            sc = case.scenario
            key = sc.profile + (" +secondary" if sc.secondary else "")
            groups.setdefault(key, []).append(ratio)
        ratios = [r for rs in groups.values() for r in rs]
        out[model] = {"all": float(np.mean(ratios)),
                      **{k: {"episodes": len(v), "rt_over_heuristic": float(np.mean(v))}
                         for k, v in sorted(groups.items())}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a training run's folder")
    parser.add_argument("models", nargs="+", help="model files in it (checkpoints/...zip)")
    parser.add_argument("--episodes", type=int, default=96)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    out = by_deployment(Path(args.run), args.models, args.episodes)
    for model, figures in out.items():
        cells = ", ".join(f"{k} {v['rt_over_heuristic']:.3f} (n={v['episodes']})"
                          for k, v in figures.items() if k != "all")
        print(f"{model}: all {figures['all']:.3f}; {cells}")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "episodes": args.episodes,
                                               "models": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
