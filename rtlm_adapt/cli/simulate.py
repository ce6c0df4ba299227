"""``rtlm-adapt simulate``: policies on the same real workload, simulated executors, one table.

The rows up to ``heuristic-local`` run on one primary executor: equal hardware. A policy that also
served requests on the secondary executor is labelled so (:data:`MORE_HARDWARE`): offloading is
more hardware, not a better schedule.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Collection
from pathlib import Path

from rtlm_adapt.cli.arguments import add_encoder_arg, add_workload_args, load_samples, tier_spec
from rtlm_adapt.metrics import Summary, summary_json

HELP = "compare policies on a real workload, simulated executors"

#: The row label of a policy that served requests on the secondary executor as well.
MORE_HARDWARE = " (+ secondary executor: more hardware)"
#: The policy the ratio column compares with.
RATIO_BASELINE = "fcfs"

_RATIO_LEGEND = """\
x fcfs                mean response time / FCFS's on the same requests; lower is better
                      (below 1 beats FCFS)"""
_MORE_HARDWARE_LEGEND = """\
rows marked "+ secondary executor" also served requests on the secondary executor: more
hardware than the other rows, which use the primary alone"""


def legend(ratio: bool = True, more_hardware: bool = True) -> str:
    """What each column of :func:`comparison_table` means, and which way is better.

    >>> print(legend(ratio=False, more_hardware=False).splitlines()[0])
    mean s, p50 s, p99 s  response time (arrival to last token): mean, median, 99th percentile;
    """
    lines = [
        "mean s, p50 s, p99 s  response time (arrival to last token): mean, median, 99th "
        "percentile;",
        "                      lower is better",
        *([_RATIO_LEGEND] if ratio else []),
        "miss %                requests that missed their deadline; lower is better",
        "thr rps               finished requests per second; higher is better (equal when all "
        "keep up)",
        "good rps              requests per second that met their deadline; higher is better",
        "done, fail            requests completed and failed",
        *([_MORE_HARDWARE_LEGEND] if more_hardware else []),
    ]
    return "\n".join(lines)


def comparison_table(
    rows: dict[str, Summary],
    more_hardware: Collection[str] = (),
    baseline: str = RATIO_BASELINE,
) -> str:
    """One row per policy, each mean response time also as a ratio to ``baseline``'s.

    Policies in ``more_hardware`` are labelled with :data:`MORE_HARDWARE`. The ratio column is
    left out when ``baseline`` is not among the rows; :func:`legend` explains the columns.
    """
    ratio = baseline in rows
    labels = {name: name + (MORE_HARDWARE if name in more_hardware else "") for name in rows}
    w = max([22, *(len(label) + 2 for label in labels.values())])  # long names keep alignment
    header = (
        f"{'policy':<{w}}{'mean s':>9}"
        + (f"{'x ' + baseline:>8}" if ratio else "")
        + f"{'p50 s':>9}{'p99 s':>9}{'miss %':>8}{'thr rps':>9}{'good rps':>9}{'done':>7}"
        f"{'fail':>6}"
    )
    lines = [header, "-" * len(header)]
    for name, s in rows.items():
        lines.append(
            f"{labels[name]:<{w}}{s.mean_rt_s:>9.2f}"
            + (f"{s.mean_rt_s / rows[baseline].mean_rt_s:>8.2f}" if ratio else "")
            + f"{s.p50_rt_s:>9.2f}{s.p99_rt_s:>9.2f}{100 * s.deadline_miss_rate:>8.1f}"
            f"{s.throughput_rps:>9.3f}{s.goodput_rps:>9.3f}{s.completed:>7d}{s.failed:>6d}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run every policy on one workload and print the table (and ``--json``)."""
    from tqdm import tqdm

    from rtlm_adapt.calibration.step_cost import StepCost
    from rtlm_adapt.experiment import build_workload, run_policy
    from rtlm_adapt.policies import make_policy

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        raise ValueError("--policies is empty")
    for name in policies:
        make_policy(name)  # fail fast on an unknown name, before loading data
    tier = tier_spec(args)  # and on an unknown encoder
    primary = StepCost.load(args.profile)
    secondary = None if args.secondary_profile == "none" else StepCost.load(args.secondary_profile)

    t0 = time.perf_counter()
    samples, counter = load_samples(args)
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
    results = {}
    preemptions: dict[str, int] = {}  # the engine model's (profiles with an engine block)
    more_hardware = set()
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
            tier=tier,
        )
        results[name] = run.summary
        preemptions[name] = run.preemptions
        if any(c.executor == "secondary" for c in run.completions):
            more_hardware.add(name)
    bar.close()
    print(f"workload: {workload.description}, seed={args.seed}")
    print(f"prompts: {args.prompts} ({len(samples)} samples), lengths in {counter.kind} tokens")
    print(
        f"executors: primary {primary.name}; secondary "
        f"{secondary.name if secondary else 'none'} (used only by rows marked so)\n"
    )
    print(comparison_table(results, more_hardware))
    if primary.engine is not None:
        counts = ", ".join(f"{name} {n}" for name, n in preemptions.items())
        print(f"preemptions in the engine (KV cache full, recomputed): {counts}")
    print()
    print(legend(ratio=RATIO_BASELINE in results, more_hardware=bool(more_hardware)))
    elapsed = time.perf_counter() - t0
    print(
        f"({elapsed:.1f}s; batching={args.batching}, profile={primary.name}, "
        f"secondary={secondary.name if secondary else 'none'})",
        file=sys.stderr,
    )
    if args.json:
        payload = {
            "policies": {
                name: {
                    **summary_json(s),
                    **({"preemptions": preemptions[name]} if primary.engine is not None else {}),
                }
                for name, s in results.items()
            },
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workload_args(parser)
    parser.add_argument(
        "--policies",
        default="fcfs,sjf-prompt,oracle-sjf,heuristic-local,heuristic",
        help="comma-separated policy names (fcfs, sjf-prompt, sjf, oracle-sjf, heuristic-local "
        "and the baselines use the primary executor alone; heuristic also offloads to the "
        "secondary; NAME+oracle ranks by true lengths; ppo the packaged learned policy, "
        "ppo:PATH a trained one, both guarded by shadow replays against the heuristic; "
        "ppo-interleaved[:PATH] guarded by interleaved live trials; ppo-unguarded[:PATH] "
        "without a guard)",
    )
    parser.add_argument("--batching", choices=("continuous", "static"), default="continuous")
    parser.add_argument("--profile", default="smollm2-135m-cpu2", help="primary cost profile")
    parser.add_argument(
        "--secondary-profile",
        default="smollm2-135m-cpu2-secondary",
        help="secondary executor's cost profile for offloading, or 'none'",
    )
    parser.add_argument(
        "--tier",
        choices=("lexical", "encoder"),
        default="lexical",
        help="length predictor tier: lexical (microseconds) or encoder (adds prompt embeddings, "
        "see --encoder)",
    )
    add_encoder_arg(parser)
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
