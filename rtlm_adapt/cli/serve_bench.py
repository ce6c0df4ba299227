"""``rtlm-adapt serve-bench``: the policies on the REAL executor in real time
(rtlm_adapt.serve_bench), or on a vLLM server through the gateway (``--engine vllm``)."""

from __future__ import annotations

import argparse

from rtlm_adapt.cli.arguments import (
    add_encoder_arg,
    add_workload_args,
    int_at_least,
    load_samples,
    non_negative_int,
    positive_float,
    positive_int,
    tier_spec,
)

HELP = "compare policies on the REAL executor, wall-clock arrivals"


def run(args: argparse.Namespace) -> int:
    """Load the prompts, serve them under each policy, print and write the figures."""
    if args.kv_blocks is not None and args.engine != "vllm":
        raise SystemExit("error: --kv-blocks sizes vLLM's KV cache: it needs --engine vllm")
    if args.max_inflight is not None and args.engine != "vllm":
        raise SystemExit("error: --max-inflight is the gateway's cap: it needs --engine vllm")
    if args.engine == "vllm":
        from rtlm_adapt.engines.vllm_bench import cmd_serve_bench_vllm

        samples, _ = load_samples(args)
        return cmd_serve_bench_vllm(args, samples)
    from rtlm_adapt.serve_bench import cmd_serve_bench

    args.tier = tier_spec(args)  # "encoder:NAME" for --encoder NAME
    samples, counter = load_samples(args)
    return cmd_serve_bench(args, samples, counter.kind)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workload_args(parser)
    parser.set_defaults(requests=80, load=0.8, prompts="alpaca:gpt4_1106_preview")
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a local path/hub id")
    parser.add_argument("--policies", default="fcfs,heuristic", help="comma-separated policy names")
    parser.add_argument("--max-tokens", type=positive_int, default=256, help="generation cap")
    parser.add_argument("--threads", type=positive_int, help="primary's torch threads")
    parser.add_argument(
        "--secondary-threads",
        type=int,
        default=None,
        help="torch threads of the secondary executor (same weights); 0 for none "
        "(default: 1 if the machine has a core beyond the primary's threads, else none)",
    )
    parser.add_argument(
        "--max-batch-size", type=positive_int, help="primary cap (default: profile)"
    )
    parser.add_argument(
        "--profile", default="auto", help="primary cost profile (auto: packaged or measured)"
    )
    parser.add_argument("--secondary-profile", default="auto", help="secondary cost profile")
    parser.add_argument("--tier", choices=("lexical", "encoder"), default="lexical")
    add_encoder_arg(parser)
    parser.add_argument("--wall-timeout", type=positive_float, default=120.0, help="hung step (s)")
    parser.add_argument(
        "--compare-sim",
        action="store_true",
        help="replay the requests with their real lengths through the simulator: fidelity",
    )
    parser.add_argument(
        "--calibrate",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="before each policy, serve N requests (FCFS, other arrivals) and fit the "
        "simulator's profile to their steps: the replay charges the machine's cost now",
    )
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="serve each policy in a process of its own (fresh interpreter and model)",
    )
    parser.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="hf: the library's transformers executor (default); vllm: a vLLM server, policies "
        "through the gateway, plus 'direct' (no gateway) as the baseline (needs [vllm])",
    )
    parser.add_argument(
        "--max-num-seqs", type=positive_int, default=4, help="vllm: vLLM's batch size"
    )
    parser.add_argument(
        "--max-inflight",
        type=positive_int,
        default=None,
        help="vllm: the gateway's in-flight cap on vLLM (default: --max-num-seqs + 4). Above "
        "the seats, vLLM's own priority queue holds the extra requests, ordered by the priority "
        "the gateway sends, so a freed seat is filled without a round trip through the gateway",
    )
    parser.add_argument(
        "--kv-blocks",
        type=int_at_least(2),
        default=None,
        help="vllm: a KV cache of exactly N blocks (vLLM's --num-gpu-blocks-override; "
        "128-token blocks on a CPU; at least one max-model-len request must fit), for "
        "KV-limited runs; --compare-sim replays on the same capacity. Default: 2 GiB",
    )
    parser.add_argument(
        "--lengths",
        choices=("dataset", "model"),
        default="dataset",
        help="vllm: dataset = each request generates its real response length (max_tokens + "
        "ignore_eos, as vLLM's serving benchmark); model = the model decides (greedy)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=1, help="vllm: runs per policy (order alternates)"
    )
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
