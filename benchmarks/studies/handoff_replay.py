"""Study: does the API server's hand-off explain how the in-flight cap moves real vLLM runs?

Session 11 found two things the engine model's replay did not show: with the gateway's in-flight
cap equal to the seats, a freed seat stays empty while the next request travels through vLLM's
API server (admission to first token 119 ms live, 51 ms replayed); with the cap above the seats,
requests already in vLLM's queue take a freed seat before the gateway's better newcomer arrives,
so oracle-sjf gained much less at cap 6 than at cap 4. Both come from one delay: a request
reaches vLLM's scheduler some time after the gateway sends it (``EngineSpec.handoff_s``).

This replays recorded ``serve-bench --engine vllm --compare-sim`` runs with several hand-offs
and prints, per run and policy, the real and replayed means, their ratio, and each policy's mean
over ``direct``'s, real and replayed: a hand-off that explains the runs makes the replayed
ratios move with the cap as the real ones do.

    python benchmarks/studies/handoff_replay.py --handoffs-ms 0,40,70,100 \\
        benchmarks/results/gateway_vllm_inflight4_session11.json ... --json OUT.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _vllm_run import rebuild_run, replay_recorded
from gateway_vs_replay import completions

from rtlm_adapt.engines.vllm_replay import DEFAULT_ENGINE_PROFILE, DIRECT


def replay_run(path: str, handoffs_s: list[float], profile: str) -> dict[float, Any]:
    """Per hand-off, per policy: real and replayed mean response time (repeats pooled)."""
    real = json.loads(Path(path).read_text())
    chosen, _, requests = rebuild_run(real)
    results = {name: [completions(rows) for rows in repeats]
               for name, repeats in real["completions"].items()}  # fmt: skip
    return {h: replay_at(real, chosen, requests, results, h, profile) for h in handoffs_s}


def replay_at(real, chosen, requests, results, handoff_s: float, profile: str) -> dict[str, Any]:
    figures = replay_recorded(real, chosen, requests, results, profile=profile, handoff_s=handoff_s)
    return {
        name: {"real_s": f["real_mean_rt_s"], "sim_s": f["sim_mean_rt_s"],
               "spearman": f["spearman"]}
        for name, f in figures.items()
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="serve-bench --engine vllm JSON files")
    parser.add_argument("--handoffs-ms", default="0,40,70,100")
    parser.add_argument("--profile", default=DEFAULT_ENGINE_PROFILE)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    handoffs = [float(x) / 1000 for x in args.handoffs_ms.split(",")]
    out: dict[str, Any] = {"profile": args.profile, "runs": {}}
    print(
        "run (cap)                                  policy       real s  | per hand-off ms:"
        " sim s (sim/real), mean/direct real -> sim"
    )
    for path in args.runs:
        per_handoff = replay_run(path, handoffs, args.profile)
        cap = json.loads(Path(path).read_text()).get("max_inflight")
        out["runs"][path] = {
            "max_inflight": cap,
            "by_handoff_ms": {round(h * 1000): f for h, f in per_handoff.items()},
        }
        first = per_handoff[handoffs[0]]
        for name in first:
            cells = []
            for h, figures in per_handoff.items():
                f, d = figures[name], figures.get(DIRECT)
                rel = (f"{f['real_s'] / d['real_s']:.3f}->{f['sim_s'] / d['sim_s']:.3f}"
                       if d else "")  # fmt: skip
                cells.append(f"{h * 1000:.0f}: {f['sim_s']:.2f} ({f['sim_s'] / f['real_s']:.3f})"
                             f" {rel}")  # fmt: skip
            print(f"{Path(path).stem[:40]:40s} ({cap}) {name:11s} {first[name]['real_s']:6.2f}  | "
                  + " | ".join(cells))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
