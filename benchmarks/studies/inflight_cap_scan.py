"""Study (SIMULATED): the gateway's in-flight cap above vLLM's seats, on the engine model.

The gateway sends at most ``--max-inflight`` requests to a vLLM server with ``max_num_seqs``
seats; the rest wait in the gateway's queue, where the controller orders them and its hard aging
bound acts. Above the seats, vLLM's own priority queue holds the extra requests: the ordering
then happens inside vLLM on the static priorities the gateway sent, and the hard bound cannot act
there. Real runs (BENCHMARKS 7.1, session 11) gave the heuristic 0.889x direct's mean at cap 4,
0.842-0.867x at 6 and 0.762x at 64, with its p99 at 1.32x, 1.06-1.21x and 2.25x.

This replays a real run's kind of workload (its prompts, dataset lengths, arrivals and offered
rate; other seeds draw other samples the same way) on the engine model for each cap and policy,
with and without an API-server hand-off (``EngineSpec.handoff_s``), and prints each policy's mean,
p99 and deadline-miss rate against ``direct`` (pooled over the seeds).

    python benchmarks/studies/inflight_cap_scan.py \\
        benchmarks/results/gateway_vllm_load0.9_session11.json \\
        --caps 4,5,6,8,12,16,64 --handoffs-ms 0,40 --seeds 0,1,2,3 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from _vllm_run import rebuild_run

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.engines.vllm_replay import (
    DEFAULT_ENGINE_PROFILE,
    DIRECT,
    engine_profile,
    replay,
    template_in_prompts,
)
from rtlm_adapt.request import TRUE_LENGTH_KEY, Completion, Request


def workload(real: dict[str, Any], seed: int, template: int) -> list[Request]:
    """The run's kind of requests drawn with ``seed``, each generating its dataset length."""
    chosen, lengths, bench = rebuild_run(real, seed=seed)
    return [
        Request(id=b.id, prompt=b.prompt, arrival_time=b.arrival_s, deadline=b.deadline_s,
                max_tokens=n, prompt_tokens=s.prompt_tokens + template,
                metadata={TRUE_LENGTH_KEY: n})
        for s, n, b in zip(chosen, lengths, bench, strict=True)
    ]  # fmt: skip


def figures(completions: list[Completion]) -> dict[str, float]:
    rt = np.array([c.response_time for c in completions])
    missed = [c.deadline is not None and c.finish_time > c.deadline for c in completions]
    return {"mean_s": float(rt.mean()), "p99_s": float(np.quantile(rt, 0.99)),
            "miss": float(np.mean(missed))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a serve-bench --engine vllm JSON (the workload's setup)")
    parser.add_argument("--caps", default="4,5,6,8,12,16,64")
    parser.add_argument("--handoffs-ms", default="0,40")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--policies", default="fcfs,heuristic,oracle-sjf")
    parser.add_argument("--profile", default=DEFAULT_ENGINE_PROFILE)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    real = json.loads(Path(args.run).read_text())
    caps = [int(c) for c in args.caps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    base, template = template_in_prompts(StepCost.load(args.profile))
    requests = {seed: workload(real, seed, template) for seed in seeds}
    seats = real["max_num_seqs"]
    rows: list[dict[str, Any]] = []
    print(f"{seats} seats, load {real['load']}, seeds {seeds}; ratios to direct (pooled means)")
    print("hand-off  cap  policy       mean/direct  p99/direct  misses (direct)")
    for handoff_ms in (float(h) for h in args.handoffs_ms.split(",")):
        def cost(cap: int, handoff_ms: float = handoff_ms) -> StepCost:
            return engine_profile(base, max_num_seqs=seats, max_inflight=cap,
                                  handoff_s=handoff_ms / 1000)  # fmt: skip

        direct = [figures(replay(DIRECT, requests[s], cost(seats)).completions) for s in seeds]
        d_mean, d_p99 = (np.mean([f[k] for f in direct]) for k in ("mean_s", "p99_s"))
        d_miss = np.mean([f["miss"] for f in direct])
        for cap in caps:
            for policy in args.policies.split(","):
                runs = [figures(replay(policy, requests[s], cost(cap)).completions) for s in seeds]
                mean, p99 = (np.mean([f[k] for f in runs]) for k in ("mean_s", "p99_s"))
                miss = np.mean([f["miss"] for f in runs])
                rows.append({"handoff_ms": handoff_ms, "cap": cap, "policy": policy,
                             "mean_vs_direct": mean / d_mean, "p99_vs_direct": p99 / d_p99,
                             "miss": miss, "direct_miss": d_miss, "per_seed": runs,
                             "direct_per_seed": direct})  # fmt: skip
                print(f"{handoff_ms:6.0f}  {cap:4d}  {policy:11s}  {mean / d_mean:10.3f}"
                      f"  {p99 / d_p99:10.3f}  {miss:5.1%} ({d_miss:5.1%})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "seeds": seeds,
                                               "profile": args.profile, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
