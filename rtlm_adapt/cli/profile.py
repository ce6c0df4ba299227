"""``rtlm-adapt profile``: measure a real executor with synthetic batches (``--model``), or fit a
cost profile to the steps a serve-bench run took (``--from-run RUN.json``)."""

from __future__ import annotations

import argparse

from rtlm_adapt.cli.arguments import positive_int

HELP = "measure a real executor (or fit a serve-bench run's steps); write a cost profile"
DESCRIPTION = (
    "Measure a real executor with synthetic batches (--model), or fit the "
    "profile to the steps a serve-bench run actually took (--from-run RUN.json: "
    "non-negative least squares, slow outliers dropped; the simulator then charges what "
    "the served loop paid)."
)


def run(args: argparse.Namespace) -> int:
    """Measure or fit, write the profile JSON."""
    from rtlm_adapt.calibration.cli import run_from_args

    return run_from_args(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="smollm2 (default), tiny, or a local path/hub id: the executor measured"
    )
    parser.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="vllm: fit an engine profile (the simulator's model of vLLM's scheduler) to the "
        "capacity probe of a serve-bench --engine vllm run (--from-run; --base gives the KV "
        "cache and block size, default vllm-cpu-smollm2-135m)",
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="with --engine vllm: start a vLLM server with --max-batch-size seqs and measure "
        "its decode step against --batch-sizes and --prompt-lengths (approximate prompt "
        "tokens), and its prefill, through the API",
    )
    parser.add_argument(
        "--decode-tokens",
        type=positive_int,
        default=128,
        help="with --engine vllm --measure: tokens each probe stream generates",
    )
    parser.add_argument(
        "--fit-min-batch",
        type=positive_int,
        default=1,
        help="with --engine vllm --measure: fit the decode step on batches of at least this "
        "many (a CPU's step is flat over the first few; every point is kept in the profile)",
    )
    parser.add_argument(
        "--from-run",
        metavar="RUN.json",
        help="fit to the steps recorded in this serve-bench --json instead of measuring",
    )
    parser.add_argument("--policy", help="with --from-run: that policy's run (default: all pooled)")
    parser.add_argument(
        "--executor", default="primary", help="with --from-run: primary or secondary"
    )
    parser.add_argument(
        "--target",
        choices=("cycle", "step"),
        default="cycle",
        help="with --from-run: fit each step's cycle, i.e. the step plus the serving loop's "
        "work until the next (default: what serving pays per iteration), or the step alone",
    )
    parser.add_argument(
        "--base",
        help="with --from-run: profile whose batch cap, padded_context, KV budget and "
        "unexercised terms are kept (default: the profile the run served with)",
    )
    parser.add_argument("--out", required=True, help="profile JSON to write")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    parser.add_argument("--max-batch-size", type=positive_int, default=16)
    parser.add_argument("--kv-token-budget", type=positive_int)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--prompt-lengths", default="16,64,128,256,512")
    parser.add_argument("--context-lengths", default="64,256,512")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timings per point (min)")
    parser.add_argument("--name", help="profile name (default: from --out)")
    parser.add_argument("--note", default="", help="appended to the profile's source")
