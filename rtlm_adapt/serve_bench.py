"""Serve-bench: the benchmark policies on the REAL executor, and the simulator's fidelity.

What ``rtlm-adapt serve-bench`` runs:

1. The same real workload as ``simulate`` (prompts with reference responses, arrivals at
   ``load`` of the profiled capacity, deadlines), but served by :class:`HFExecutor` in real
   time (:class:`~rtlm_adapt.serving.realtime.RealTimeLoop`): arrivals at their wall-clock
   offsets, the model generating its own responses (greedy, up to ``max_tokens``).
   The capacity is computed from the profile with the reference lengths capped at
   ``max_tokens`` (the served model's lengths are unknown before the run); the load realised
   with the served model's own lengths is reported too.
2. Optionally (``compare_sim``), the very same requests replayed through the simulator with the
   profiled costs and, per request, the length the real model generated in that policy's run:
   mean response time ratio sim / real and the Spearman correlation of per-request response
   times measure how far the simulator can be trusted.
3. Every single-iteration step each executor took (``policies.NAME.steps``): what
   ``rtlm-adapt profile --from-run`` fits a profile to (``rtlm_adapt.calibration.step_fit``).
4. Optionally (``calibrate``), before each policy, a short real FCFS run on other arrivals
   whose steps are fitted to a profile (:func:`calibrated_profile`): the simulator replay then
   charges what the machine costs *now* (a shared host's speed drifts by tens of percent over
   an afternoon, far more than the 15% the fidelity check allows).
5. Optionally (``isolate``), each policy in a process of its own (a fresh interpreter, model
   load and warm-up), so that no policy inherits the state an earlier one left behind.

The controller predicts lengths with its default pretrained predictor, which has never seen the
served model's outputs; requests carry no true length (oracle policies are refused).

The parts it is built from: executors by model name (:mod:`rtlm_adapt.serving.factory`), one
policy's real run and its records (:mod:`rtlm_adapt.real_run`), the simulator replay
(:mod:`rtlm_adapt.sim_fidelity`), quick profiles (:mod:`rtlm_adapt.calibration.profiler`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rtlm_adapt.calibration.profiler import machine_load, quick_profile
from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import PromptSample
from rtlm_adapt.experiment import (
    Workload,
    build_workload,
    capacity_rps,
)
from rtlm_adapt.metrics import summarize, summary_json
from rtlm_adapt.real_run import RealRun, request_records, run_real_policy, step_records
from rtlm_adapt.request import TRUE_LENGTH_KEY, Completion
from rtlm_adapt.serving.factory import (
    PACKAGED_PROFILES,
    check_model,
    load_executor,
    sibling_executor,
    warm_up,
)
from rtlm_adapt.sim_fidelity import fidelity, sim_replay


def real_workload(
    samples: Sequence[PromptSample],
    *,
    n: int,
    load: float,
    seed: int,
    arrivals: str,
    slo: str,
    cost: StepCost,
    max_tokens: int,
) -> Workload:
    """The simulate workload for a real model: capacity from the reference lengths capped at
    ``max_tokens``; requests capped at ``max_tokens`` and stripped of their true lengths."""
    capped = [
        dataclasses.replace(s, response_tokens=max(1, min(s.response_tokens, max_tokens)))
        for s in samples
    ]
    workload = build_workload(
        capped, arrivals=arrivals, load=load, n=n, seed=seed, slo=slo, cost=cost
    )
    requests = []
    for r in workload.requests:
        meta = {k: v for k, v in r.metadata.items() if k != TRUE_LENGTH_KEY}
        requests.append(dataclasses.replace(r, max_tokens=max_tokens, metadata=meta))
    return dataclasses.replace(workload, requests=requests)


def workload_from_args(
    args: Any,
    samples: Sequence[PromptSample],
    cost: StepCost,
    *,
    n: int | None = None,
    seed: int | None = None,
) -> Workload:
    """:func:`real_workload` from serve-bench's flags (``requests``, ``load``, ``seed``,
    ``arrivals``, ``slo``, ``max_tokens``): other tools rebuild a run's exact workload with it.
    ``n`` and ``seed`` override the flags' (the calibration run's workload)."""
    return real_workload(
        samples,
        n=args.requests if n is None else n,
        load=args.load,
        seed=args.seed if seed is None else seed,
        arrivals=args.arrivals,
        slo=args.slo,
        cost=cost,
        max_tokens=args.max_tokens,
    )


@dataclass
class ServeSpec:
    """What serving one policy needs, picklable so that a fresh process can do it
    (:func:`serve_policy`)."""

    model: str
    primary_max_batch: int
    secondary_max_batch: int  # 0: no secondary executor
    threads: dict[str, int]
    profiles: dict[str, StepCost]
    workload: Workload
    tier: str = "lexical"
    wall_timeout_s: float | None = 120.0
    #: requests of a calibration run before the policy (None: no calibration)
    calibration: Workload | None = None


@dataclass
class ServedPolicy:
    run: RealRun
    #: the profile fitted to the calibration run's primary steps, and that run (or None)
    calibrated: StepCost | None = None
    calibration: RealRun | None = None


def build_executors(spec: ServeSpec):
    """The primary (and secondary, if any) executor of ``spec``, warmed up."""
    import torch

    torch.set_num_threads(spec.threads["primary"])
    primary = load_executor(spec.model, name="primary", max_batch_size=spec.primary_max_batch)
    secondary = None
    if spec.secondary_max_batch > 0:
        secondary = sibling_executor(
            primary, name="secondary", max_batch_size=spec.secondary_max_batch
        )
    warm_up(primary, secondary, spec.threads)
    return primary, secondary


def calibrated_profile(calibration: RealRun, base: StepCost) -> StepCost:
    """``base``'s form fitted to the primary's steps in ``calibration`` (timed by their cycles
    through the loop, as ``rtlm-adapt profile --from-run`` does by default)."""
    from rtlm_adapt.calibration.step_fit import fit_step_cost, run_steps

    payload = {"policies": {"calibration": {"steps": step_records(calibration.steps)}}}
    rows = run_steps(payload, policy="calibration")
    return fit_step_cost(
        rows,
        base,
        name=f"{base.name}-calibrated",
        source=f"fitted to {len(rows)} steps of a {len(calibration.completions)}-request "
        f"FCFS calibration run just before the policy, from {base.name}",
    )


def serve_policy(
    policy: str,
    spec: ServeSpec,
    executors: tuple[Any, Any] | None = None,
    on_completion: Callable[[Completion], None] | None = None,
) -> ServedPolicy:
    """Serve ``spec.workload`` under ``policy`` (after the calibration run, if any), on
    ``executors`` or on new ones (what a fresh process does: see ``--isolate``)."""
    primary, secondary = executors if executors is not None else build_executors(spec)
    serve = dict(
        profiles=spec.profiles,
        threads=spec.threads,
        tier=spec.tier,
        wall_timeout_s=spec.wall_timeout_s,
    )
    calibrated = calibration = None
    if spec.calibration is not None:
        calibration = run_real_policy("fcfs", spec.calibration, primary, secondary, **serve)
        calibrated = calibrated_profile(calibration, spec.profiles["primary"])
    run = run_real_policy(
        policy, spec.workload, primary, secondary, on_completion=on_completion, **serve
    )
    return ServedPolicy(run, calibrated, calibration)


def serve_policy_isolated(policy: str, spec: ServeSpec) -> ServedPolicy:
    """:func:`serve_policy` in a new process (spawned: a fresh interpreter, not a fork of
    this one's threads and allocator state)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(serve_policy, policy, spec).result()


def secondary_threads_for(requested: int | None, primary_threads: int) -> tuple[int, str]:
    """Torch threads of the secondary executor (0: none) and why.

    ``requested`` None means automatic: a 1-thread secondary only where the machine has a core
    the primary's threads leave free. The secondary shares the primary's weights in the same
    process, so on a machine without a spare core it only competes with the primary for the
    same cores (measured on 2 cores: total throughput 0.94x the primary alone).
    """
    if requested is not None:
        if requested < 0:
            raise ValueError(f"--secondary-threads must be >= 0, got {requested}")
        return requested, "requested" if requested else "requested: none"
    cores = os.cpu_count() or 1
    if cores > primary_threads:
        return 1, f"auto: {cores} cores, {primary_threads} used by the primary"
    return 0, f"auto: none, the primary's {primary_threads} threads use all {cores} cores"


def realised_load(workload: Workload, cost: StepCost, runs: Sequence[RealRun]) -> float:
    """The offered load with the served model's own lengths (mean over the runs)."""
    prompts = {r.id: r for r in workload.requests}
    caps = []
    for run in runs:
        samples = [
            PromptSample(
                id=c.request_id,
                prompt=prompts[c.request_id].prompt,
                response_tokens=max(1, c.output_tokens),
                prompt_tokens=c.prompt_tokens or prompts[c.request_id].prompt_tokens or 1,
                source="real",
            )
            for c in run.completions
        ]
        caps.append(capacity_rps(cost, samples, cost.max_batch_size))
    return float(workload.rate_rps / np.mean(caps)) if caps else float("nan")


@dataclass
class BenchExecutors:
    """serve-bench's executors with the cost profiles and torch threads they are served with."""

    primary: Any
    secondary: Any | None
    #: per executor; the primary's batch cap is the executor's
    profiles: dict[str, StepCost]
    #: torch threads per executor
    threads: dict[str, int]
    secondary_threads: int
    #: why the secondary has that many threads (0: none)
    secondary_reason: str

    @classmethod
    def build(cls, args: Any, threads: int) -> BenchExecutors:
        """Load ``args.model`` as the primary (and a sibling secondary where threads allow),
        with the profiles the flags name, the packaged ones, or quick profiles of their own."""
        import sys

        packaged = PACKAGED_PROFILES.get(args.model)
        if args.profile != "auto":
            primary_cost = StepCost.load(args.profile)
        elif packaged:
            primary_cost = StepCost.load(packaged[0])
        else:
            primary_cost = None
        primary = load_executor(
            args.model,
            name="primary",
            max_batch_size=args.max_batch_size
            or (primary_cost.max_batch_size if primary_cost else 8),
        )
        if primary_cost is None:
            print("profiling the primary executor (quick)...", file=sys.stderr)
            primary_cost = quick_profile(
                primary, name=f"{args.model}-quick", max_batch_size=primary.max_batch_size
            )
        secondary = secondary_cost = None
        secondary_threads, secondary_reason = secondary_threads_for(args.secondary_threads, threads)
        print(
            f"secondary executor: {secondary_threads} threads ({secondary_reason})", file=sys.stderr
        )
        if secondary_threads > 0:
            if args.secondary_profile != "auto":
                secondary_cost = StepCost.load(args.secondary_profile)
            elif packaged:
                secondary_cost = StepCost.load(packaged[1])
            secondary = sibling_executor(
                primary,
                name="secondary",
                max_batch_size=secondary_cost.max_batch_size if secondary_cost else 4,
            )
            if secondary_cost is None:
                print("profiling the secondary executor (quick)...", file=sys.stderr)
                secondary_cost = quick_profile(
                    secondary,
                    name=f"{args.model}-quick-secondary",
                    max_batch_size=secondary.max_batch_size,
                    threads=secondary_threads,
                )
        # the simulator and the controller assume the profiles' batch caps
        primary_cost = dataclasses.replace(primary_cost, max_batch_size=primary.max_batch_size)
        profiles = {"primary": primary_cost}
        thread_map = {"primary": threads}
        if secondary is not None:
            profiles["secondary"] = secondary_cost
            thread_map["secondary"] = secondary_threads
        return cls(
            primary,
            secondary,
            profiles,
            thread_map,
            secondary_threads,
            secondary_reason,
        )


# -- command-line entry points (argument parsing lives in rtlm_adapt.cli) ------------------------


def cmd_serve_bench(args, samples: Sequence[PromptSample], counter_kind: str) -> int:
    """``rtlm-adapt serve-bench``: the policies on the real executor (see the module doc)."""
    import datetime as dt
    import json
    import sys

    policies = check_args(args)  # before torch loads: a bad flag fails in seconds
    import torch
    from tqdm import tqdm

    from rtlm_adapt.calibration.profiler import machine_description
    from rtlm_adapt.metrics import format_table

    load_before = machine_load()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    bench = BenchExecutors.build(args, threads)
    primary, secondary = bench.primary, bench.secondary
    primary_cost, secondary_cost = bench.profiles["primary"], bench.profiles.get("secondary")
    profiles, thread_map = bench.profiles, bench.threads
    secondary_threads, secondary_reason = bench.secondary_threads, bench.secondary_reason

    workload = workload_from_args(args, samples, primary_cost)
    print(f"workload: {workload.description}", file=sys.stderr)
    calibration = None
    if args.calibrate:
        # other arrivals (and prompts) than the benchmark's, at the same load
        calibration = workload_from_args(
            args, samples, primary_cost, n=args.calibrate, seed=args.seed + 1
        )
    spec = ServeSpec(
        model=args.model,
        primary_max_batch=primary.max_batch_size,
        secondary_max_batch=secondary.max_batch_size if secondary is not None else 0,
        threads=thread_map,
        profiles=profiles,
        workload=workload,
        tier=args.tier,
        wall_timeout_s=args.wall_timeout,
        calibration=calibration,
    )
    if not args.isolate:
        warm_up(primary, secondary, thread_map)

    served: dict[str, ServedPolicy] = {}
    bar = tqdm(
        total=len(policies) * len(workload.requests),
        unit="req",
        disable=args.no_progress,
        file=sys.stderr,
    )
    for name in policies:
        bar.set_description(name + (" (calibrating first)" if calibration else ""))
        if args.isolate:  # progress by whole policies: the run is in another process
            served[name] = serve_policy_isolated(name, spec)
            bar.update(len(workload.requests))
        else:
            served[name] = serve_policy(
                name, spec, (primary, secondary), on_completion=lambda _c: bar.update(1)
            )
    bar.close()
    runs = {name: s.run for name, s in served.items()}
    results = {name: run.summary for name, run in runs.items()}
    print(format_table(results))

    payload: dict[str, Any] = {
        "policies": {
            name: {
                **summary_json(run.summary),
                "tokens_per_s": run.summary.tokens_per_s,
                "mean_output_tokens": float(
                    np.mean([c.output_tokens for c in run.completions if c.error is None] or [0])
                ),
                "offloaded": run.offloaded,
                "step_check": run.step_check,
                "requests": request_records(run.completions),
                "steps": step_records(run.steps),
                **_calibration_json(served[name]),
            }
            for name, run in runs.items()
        },
        # the profiles served with in full (a fit from this run's steps starts from them)
        "profiles": {name: dataclasses.asdict(cost) for name, cost in profiles.items()},
    }
    if args.compare_sim:
        payload.update(compare_sim(args, workload, served, profiles))
    elapsed = time.perf_counter() - t0
    payload["workload"] = {
        "prompts": args.prompts,
        "arrivals": args.arrivals,
        "load": args.load,
        "requests": args.requests,
        "seed": args.seed,
        "slo": args.slo,
        "max_tokens": args.max_tokens,
        "rate_rps": workload.rate_rps,
        "capacity_rps": workload.capacity_rps,
        "realised_load": realised_load(workload, primary_cost, list(runs.values())),
        "mean_isolated_service_s": workload.mean_service_s,
        "tokenizer": counter_kind,
    }
    payload["executor"] = {
        "model": args.model,
        "device": str(primary.device),
        "primary_threads": threads,
        "primary_max_batch": primary.max_batch_size,
        "secondary_threads": secondary_threads if secondary is not None else 0,
        "secondary_choice": secondary_reason,
        "cpu_count": os.cpu_count(),
        "secondary_max_batch": secondary.max_batch_size if secondary is not None else 0,
        "process_per_policy": bool(args.isolate),
    }
    payload.update(
        batching="continuous",
        tier=args.tier,
        profile=primary_cost.name,
        secondary_profile=secondary_cost.name if secondary_cost else None,
        machine=machine_description(),
        started_at_utc=started_at,
        load_average_before=load_before,
        load_average_after=machine_load(),
        elapsed_s=elapsed,
    )
    print(
        f"({elapsed:.1f}s; model={args.model}, threads={threads}, "
        f"secondary threads={secondary_threads if secondary is not None else 0}, "
        f"load average before {load_before}, after {payload['load_average_after']})",
        file=sys.stderr,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def compare_sim(
    args: Any, workload: Workload, served: dict[str, ServedPolicy], profiles: dict[str, StepCost]
) -> dict[str, Any]:
    """Each policy's real run replayed through the simulator (``--compare-sim``), with the
    profile served with and, with ``--calibrate``, the policy's calibrated one; the calibrated
    replay (the machine's cost now) is the one reported as ``sim_fidelity``. Prints the
    replay's table and the fidelity figures; returns serve-bench's JSON keys for them."""
    from rtlm_adapt.metrics import format_table

    primary_cost = profiles["primary"]
    by_profile: dict[str, dict[str, dict]] = {"served": {}, "calibrated": {}}
    sim_results = {}
    for name, policy in served.items():
        run = policy.run
        for which, cost in {"served": primary_cost, "calibrated": policy.calibrated}.items():
            if cost is None:
                continue
            sim = sim_replay(
                name,
                workload,
                run.completions,
                primary_cost=cost,
                secondary_cost=profiles.get("secondary"),
                max_tokens=args.max_tokens,
                tier=args.tier,
                controller_cost=primary_cost,  # what the real run's controller started from
            )
            by_profile[which][name] = {**fidelity(sim, run.completions), "profile": cost.name}
            sim_results[name] = summarize(sim)
    reported = {k: v for k, v in by_profile.items() if v}
    which = "each policy's own calibrated profile" if by_profile["calibrated"] else "served"
    print(f"simulator replay with the real lengths ({which}):")
    print(format_table(sim_results))
    for which, per_policy in reported.items():
        for name, f in per_policy.items():
            print(
                f"fidelity {name} ({which} profile {f['profile']}): mean RT sim/real "
                f"{f['mean_rt_ratio_sim_over_real']:.3f}, Spearman {f['spearman']:.3f} "
                f"(n={f['n']})"
            )
    return {
        "sim_fidelity": by_profile["calibrated"] or by_profile["served"],
        "sim_fidelity_by_profile": reported,
        "sim_policies": {n: summary_json(s) for n, s in sim_results.items()},
    }


def check_args(args) -> list[str]:
    """serve-bench's policies, after the checks that need no model: every policy can run on a
    real model, the model can be loaded from somewhere, and ``--json``'s folder is writable
    (created if missing), so that no mistake surfaces only after the whole run."""
    from rtlm_adapt.policies import make_policy

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        raise ValueError("--policies is empty")
    for name in policies:
        policy = make_policy(name)
        if getattr(policy, "length_source", "") == "oracle" or name.startswith("oracle"):
            raise ValueError(
                f"policy {name!r} needs true lengths, which a real model only knows afterwards"
            )
    check_model(args.model)
    if args.json:
        prepare_json_folder(args.json)
    return policies


def prepare_json_folder(path: str | Path) -> None:
    """Create ``path``'s folder if missing; ``ValueError`` where the file cannot be written."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--json {path}: cannot create its folder ({exc.strerror})") from None
    if Path(path).is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"--json {path}: cannot write a file there")


def _calibration_json(served: ServedPolicy) -> dict[str, Any]:
    """A policy's calibration run in serve-bench's JSON (nothing without one)."""
    if served.calibration is None or served.calibrated is None:
        return {}
    cal = served.calibration
    return {
        "calibration": {
            "requests": len(cal.completions),
            "mean_rt_s": cal.summary.mean_rt_s,
            "step_check": cal.step_check,
            "profile": dataclasses.asdict(served.calibrated),
        }
    }
