"""Study (SIMULATED replays of a real run): other policies on a recorded vLLM run's requests.

``serve-bench --engine vllm`` runs a few policies on the real engine, each for minutes. This asks
what other policies would have done with the very same requests (prompts, arrivals, the lengths
vLLM generated), on the engine model at the run's own pace: the packaged profile slowed until
the replay's decode time per token equals the run's (``vllm_replay.matched_pace``, what
``--compare-sim`` writes as ``sim_fidelity_run_pace``), with the run's seats, in-flight cap and
KV cache. Each policy is replayed on every repeat's lengths; the figure is its mean response
time over all repeats, and its ratio to ``--reference`` in the same replay. The recorded
policies' real means are printed beside theirs, to read the replay's error against.

    python benchmarks/studies/policy_replay.py \\
        benchmarks/results/gateway_vllm_ppo_vs_heuristic_session14.json \\
        --policies heuristic,ppo,ppo-unguarded,ppo:OLD.npz --json OUT.json

Runs with ``--lengths dataset`` and per-request records only (the rebuild needs the dataset's
lengths). Names are ``make_policy``'s (``ppo:PATH``, ``ppo-unguarded:PATH``, ...). The pace is
matched on the recorded policies' replays, and a recorded ``ppo`` replays as the model packaged
*now*: after the packaged model changes, give the old one as ``ppo:PATH`` to compare.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _vllm_run import at_run_pace, rebuild_run, replay_recorded
from gateway_vs_replay import completions

from rtlm_adapt.engines.vllm_replay import (
    DEFAULT_ENGINE_PROFILE,
)


def replay_policies(path: str, policies: list[str], profile: str) -> dict[str, Any]:
    """Per policy, its replayed mean response time on the run's requests at the run's pace."""
    real = json.loads(Path(path).read_text())
    if real.get("lengths", "dataset") != "dataset" or "completions" not in real:
        raise ValueError(f"{path}: needs a --lengths dataset run with per-request records")
    chosen, _, requests = rebuild_run(real)
    recorded = {name: [completions(rows) for rows in repeats]
                for name, repeats in real["completions"].items()}  # fmt: skip
    cost = at_run_pace(real, chosen, requests, recorded, profile)
    lengths = next(iter(recorded.values()))  # every policy served the same lengths
    figures = replay_recorded(real, chosen, requests, dict.fromkeys(policies, lengths),
                              profile=cost)
    return {
        "run": path,
        "slowed_by": cost.extra.get("slowed_by"),
        "real_mean_rt_s": {n: real["policies"][n]["mean_rt_s"] for n in real["policies"]},
        "sim_mean_rt_s": {n: f["sim_mean_rt_s"] for n, f in figures.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a serve-bench --engine vllm JSON")
    parser.add_argument("--policies", required=True, help="comma-separated policy names")
    parser.add_argument("--reference", default="heuristic", help="the ratios' denominator")
    parser.add_argument("--profile", default=DEFAULT_ENGINE_PROFILE, help="the packaged profile")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.reference not in names:
        names.insert(0, args.reference)
    out = replay_policies(args.run, names, args.profile)
    sim = out["sim_mean_rt_s"]
    out["ratio_to_reference"] = {n: sim[n] / sim[args.reference] for n in names}
    print(f"{Path(args.run).name}: replayed at the run's pace (profile slowed by "
          f"{out['slowed_by']:.3f})")
    print(f"{'policy':40s} sim mean s  / {args.reference}   real mean s")
    for n in names:
        real = out["real_mean_rt_s"].get(n)
        print(f"{n:40s} {sim[n]:10.3f}  {out['ratio_to_reference'][n]:8.3f}   "
              + (f"{real:.3f}" if real is not None else "-"))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
