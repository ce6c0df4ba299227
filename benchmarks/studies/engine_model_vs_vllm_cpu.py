"""Study: BENCHMARKS.md 7.1's vLLM-CPU run (2026-12-05, 300 requests x 2 repeats per policy)
rebuilt request for request and served by the simulator's engine model with the
vllm-cpu-smollm2-135m profile, against the real run's pooled figures.

The run kept no per-request timings, so this compares aggregates only (mean, p50, p99); the
per-request fidelity (Spearman) needs a new run with ``serve-bench --engine vllm --compare-sim``.
The workload is rebuilt as ``serve-bench --engine vllm`` built it (same seed, prompts, dataset
lengths capped at 512, azure-conv arrivals at 0.9 of the measured 121 tok/s); the script checks
the mean length and the arrival rate against the recorded ones.

    python benchmarks/studies/engine_model_vs_vllm_cpu.py
"""

from __future__ import annotations

import json
from pathlib import Path

from _vllm_run import rebuild_run

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.engines.vllm_replay import engine_profile, replay, replay_requests
from rtlm_adapt.request import Completion

RUN = Path(__file__).resolve().parents[1] / "results" / "gateway_vllm_load0.9.json"


def main() -> None:
    real = json.loads(RUN.read_text())
    chosen, lengths, bench = rebuild_run(real)
    # with ignore_eos, the real engine generated exactly each request's max_tokens
    made = [Completion(r.id, n, 0.0, 0.0, 1.0, "vllm") for r, n in zip(bench, lengths, strict=True)]
    requests = replay_requests([r.id for r in bench], [r.prompt for r in bench],
                               [s.prompt_tokens for s in chosen], [r.arrival_s for r in bench],
                               [r.deadline_s for r in bench], made)  # fmt: skip
    cost = engine_profile(StepCost.load("vllm-cpu-smollm2-135m"), max_num_seqs=real["max_num_seqs"])
    print(f"{'policy':11s} {'sim mean':>8s} {'real':>6s} {'ratio':>6s}  {'sim p50':>7s} "
          f"{'real':>6s}  {'sim p99':>7s} {'real':>6s}  preemptions")  # fmt: skip
    for policy in real["policies"]:
        run = replay(policy, requests, cost)
        s, r = run.summary, real["policies"][policy]
        print(f"{policy:11s} {s.mean_rt_s:8.2f} {r['mean_rt_s']:6.2f} "
              f"{s.mean_rt_s / r['mean_rt_s']:6.3f}  {s.p50_rt_s:7.2f} {r['p50_rt_s']:6.2f}  "
              f"{s.p99_rt_s:7.2f} {r['p99_rt_s']:6.2f}  {run.preemptions}")  # fmt: skip


if __name__ == "__main__":
    main()
