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
   ``rtlm-adapt profile --from-run`` fits a profile to (``rtlm_adapt.serving.step_fit``).
4. Optionally (``calibrate``), before each policy, a short real FCFS run on other arrivals
   whose steps are fitted to a profile (:func:`calibrated_profile`): the simulator replay then
   charges what the machine costs *now* (a shared host's speed drifts by tens of percent over
   an afternoon, far more than the 15% the fidelity check allows).
5. Optionally (``isolate``), each policy in a process of its own (a fresh interpreter, model
   load and warm-up), so that no policy inherits the state an earlier one left behind.

The controller predicts lengths with its default pretrained predictor, which has never seen the
served model's outputs; requests carry no true length (oracle policies are refused).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rtlm_adapt.data import PromptSample
from rtlm_adapt.experiment import (
    Workload,
    _PrecomputedFeatures,
    build_workload,
    capacity_rps,
    run_policy,
    workload_features,
)
from rtlm_adapt.metrics import Summary, summarize, summary_json
from rtlm_adapt.predictor import LengthPredictor
from rtlm_adapt.request import TRUE_LENGTH_KEY, Completion, Request
from rtlm_adapt.serving.profile import StepCost
from rtlm_adapt.serving.step_fit import STEP_COLUMNS

#: ``--model`` names that are not paths or hub ids.
PACKAGED_PROFILES = {"smollm2": ("smollm2-135m-cpu2-hf", "smollm2-135m-cpu2-hf-secondary")}


def load_executor(model: str, *, name: str = "primary", max_batch_size: int = 8, **kwargs: Any):
    """An HFExecutor for ``model``: ``tiny`` (random tiny Llama, for tests), ``smollm2`` (the
    packaged default) or a local path / hub id."""
    from rtlm_adapt.serving.hf import HFExecutor

    if model == "tiny":
        return HFExecutor.tiny_random(name=name, max_batch_size=max_batch_size, **kwargs)
    return HFExecutor.from_pretrained(model, name=name, max_batch_size=max_batch_size, **kwargs)


def sibling_executor(executor, *, name: str, max_batch_size: int):
    """A second executor sharing ``executor``'s weights (read-only) with its own KV caches and
    its own tokenizer copy (tokenizers are not safe to share across threads)."""
    return type(executor)(
        executor.model,
        copy.deepcopy(executor.tokenizer),
        name=name,
        max_batch_size=max_batch_size,
        device=executor.device,
        dtype=executor.dtype,
        max_context=executor.max_context,
    )


def quick_profile(executor, *, name: str, max_batch_size: int, threads: int | None = None):
    """A small profile of ``executor`` (seconds on a tiny model; a minute or two on SmolLM2)."""
    import torch

    from rtlm_adapt.serving.profiler import profile_executor

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return profile_executor(
            executor,
            prompt_lengths=(16, 64, 256),
            batch_sizes=sorted({1, 2, max(1, max_batch_size // 2), max_batch_size}),
            context_lengths=(64, 256),
            repeats=2,
            name=name,
            model=f"quick profile of {getattr(executor, 'name', 'executor')}",
            max_batch_size=max_batch_size,
        )
    finally:
        torch.set_num_threads(before)


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
class RealRun:
    name: str
    summary: Summary
    completions: list[Completion]
    offloaded: int
    #: per executor: steps, busy seconds, real step time / the profile's prediction, batch
    step_check: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    #: per executor: every single-iteration step, a tuple in ``STEP_COLUMNS`` order (what a
    #: profile can be fitted to: ``rtlm-adapt profile --from-run``)
    steps: dict[str, list[tuple]] = dataclasses.field(default_factory=dict)


def run_real_policy(
    policy: str,
    workload: Workload,
    primary,
    secondary=None,
    *,
    profiles: dict[str, StepCost],
    threads: dict[str, int] | None = None,
    tier: str = "lexical",
    wall_timeout_s: float | None = 120.0,
    on_completion: Callable[[Completion], None] | None = None,
) -> RealRun:
    """Serve ``workload`` in real time under ``policy``; every request ends (checked)."""
    from rtlm_adapt.serving.realtime import RealTimeLoop

    controller = _PrecomputedFeatures(
        policy,
        profiles=profiles,
        batching="continuous",
        predictor=LengthPredictor.pretrained(tier),
        features=workload_features(workload, tier),
    )
    loop = RealTimeLoop(
        controller,
        primary,
        secondary,
        threads=threads,
        wall_timeout_s=wall_timeout_s,
        on_completion=on_completion,
    )
    checks: dict[str, list[float]] = {name: [0.0, 0.0, 0, 0] for name in profiles}
    seen: dict[str, set[str]] = {name: set() for name in profiles}
    left: dict[str, int] = {name: 0 for name in profiles}
    steps: dict[str, list[tuple]] = {name: [] for name in profiles}
    origin = time.perf_counter()
    on_step = controller.on_step

    def record(name: str, step) -> None:
        # real step seconds vs what the profile predicts for the same batch, context, prefill
        # and membership changes (joiners: first seen in this step; leavers: ended in the last)
        if name in checks and step.iterations == 1:
            cost = profiles[name]
            joins = len(set(step.new_tokens) - seen[name])
            seen[name].update(step.new_tokens)
            attended = step.attended_tokens or step.context_tokens
            ctx = attended if cost.padded_context else step.context_tokens
            steps[name].append(
                (
                    step.batch_size,
                    step.context_tokens,
                    attended,
                    step.prefill_tokens,
                    joins,
                    left[name],
                    step.duration_s,
                    time.perf_counter() - origin,  # when the loop took the result
                )
            )
            c = checks[name]
            c[0] += step.duration_s
            c[1] += cost.step_time(
                step.batch_size, ctx, step.prefill_tokens, joins=joins, leaves=left[name]
            )
            c[2] += 1
            c[3] += step.batch_size
            left[name] = len(step.finished)
        on_step(name, step)

    controller.on_step = record
    executors = {"primary": primary, "secondary": secondary}
    stats_before = {
        name: dict(ex.batch_stats) for name, ex in executors.items() if hasattr(ex, "batch_stats")
    }
    result = loop.run(workload.requests)
    step_check = {
        name: {
            "steps": int(c[2]),
            "real_over_profile": c[0] / c[1] if c[1] else float("nan"),
            "busy_s": c[0],
            "mean_batch": c[3] / c[2] if c[2] else 0.0,
        }
        for name, c in checks.items()
    }
    for name, before in stats_before.items():
        # batch-cache membership work: in-place joins/leaves and full rebuilds in this run
        after = executors[name].batch_stats
        step_check.setdefault(name, {}).update({k: after[k] - before[k] for k in before})
    ids = {c.request_id for c in result.completions}
    if len(result.completions) != len(workload.requests) or ids != {
        r.id for r in workload.requests
    }:
        raise RuntimeError(
            f"{policy}: {len(result.completions)} completions for {len(workload.requests)} requests"
        )
    offloaded = sum(1 for c in result.completions if secondary and c.executor == secondary.name)
    return RealRun(
        policy, summarize(result.completions), result.completions, offloaded, step_check, steps
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
    _warm_up(primary, secondary, spec.threads)
    return primary, secondary


def calibrated_profile(calibration: RealRun, base: StepCost) -> StepCost:
    """``base``'s form fitted to the primary's steps in ``calibration`` (timed by their cycles
    through the loop, as ``rtlm-adapt profile --from-run`` does by default)."""
    from rtlm_adapt.serving.step_fit import fit_step_cost, run_steps

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


def replay_length(completion: Completion, max_tokens: int) -> int:
    """The simulated length that costs what the real request cost.

    HFExecutor samples a request's first token in its prefill and one more per decode step,
    (the first decode runs in the prefill's step), and a request that stops on EOS samples
    the EOS token too. So a request that sampled S tokens took S - 1 real steps; the simulator
    runs one iteration per token, the prefill in the first: S - 1 simulated iterations.
    """
    n = completion.output_tokens
    sampled = n if n >= max_tokens else n + 1  # + the EOS token it stopped on
    return max(1, sampled - 1)


def sim_replay(
    policy: str,
    workload: Workload,
    real: Sequence[Completion],
    *,
    primary_cost: StepCost,
    secondary_cost: StepCost | None,
    max_tokens: int,
    tier: str = "lexical",
    controller_cost: StepCost | None = None,
) -> list[Completion]:
    """The workload through the simulator, each request with its real generated length.

    ``controller_cost``: the primary profile the real run's controller started from, when the
    simulated executor charges another (a calibrated one): the replayed controller must
    believe what the real one believed, or its decisions (a heuristic's batch cap) differ."""
    lengths = {c.request_id: replay_length(c, max_tokens) for c in real}
    requests = [
        dataclasses.replace(r, metadata={**r.metadata, TRUE_LENGTH_KEY: lengths[r.id]})
        for r in workload.requests
    ]
    replay = dataclasses.replace(workload, requests=requests)
    run = run_policy(
        policy,
        replay,
        primary_cost=primary_cost,
        secondary_cost=secondary_cost,
        tier=tier,
        controller_profiles=None if controller_cost is None else {"primary": controller_cost},
    )
    return run.completions


def fidelity(sim: Sequence[Completion], real: Sequence[Completion]) -> dict[str, float]:
    """Mean response time ratio sim / real and Spearman correlation of per-request times
    (over the requests that succeeded in both)."""
    from scipy.stats import spearmanr

    sim_rt = {c.request_id: c.response_time for c in sim if c.error is None}
    real_rt = {c.request_id: c.response_time for c in real if c.error is None}
    common = sorted(set(sim_rt) & set(real_rt))
    if not common:
        return {"mean_rt_ratio_sim_over_real": float("nan"), "spearman": float("nan"), "n": 0}
    s = np.array([sim_rt[i] for i in common])
    r = np.array([real_rt[i] for i in common])
    rho = spearmanr(s, r).statistic if len(common) > 2 else float("nan")
    return {
        "mean_rt_ratio_sim_over_real": float(s.mean() / r.mean()),
        "spearman": float(rho),
        "n": len(common),
        "sim_mean_rt_s": float(s.mean()),
        "real_mean_rt_s": float(r.mean()),
    }


def request_records(completions: Sequence[Completion]) -> list[dict[str, Any]]:
    """Per request (in id order): output tokens, response time, executor, error; enough to
    replay the run through another profile later (``replay_json``)."""
    return [
        {
            "id": c.request_id,
            "output_tokens": c.output_tokens,
            "response_time_s": round(c.response_time, 4),
            "executor": c.executor,
            "error": c.error,
        }
        for c in sorted(completions, key=lambda c: c.request_id)
    ]


def step_records(steps: dict[str, list[tuple]]) -> dict[str, dict[str, list]]:
    """Per executor: the recorded steps as ``{"columns": STEP_COLUMNS, "rows": [...]}``
    (seconds to the microsecond)."""
    return {
        name: {
            "columns": list(STEP_COLUMNS),
            "rows": [[*row[:-2], round(row[-2], 6), round(row[-1], 6)] for row in rows],
        }
        for name, rows in steps.items()
    }


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


def machine_load() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- command-line entry points (argument parsing lives in rtlm_adapt.cli) ------------------------


def cmd_profile(args) -> int:
    """``rtlm-adapt profile``: measure a real executor (or fit a serve-bench run's steps,
    ``--from-run``), write its StepCost JSON."""
    if args.from_run:
        return cmd_profile_from_run(args)
    import torch

    from rtlm_adapt.serving.profiler import profile_executor

    args.model = args.model or "smollm2"
    if args.threads:
        torch.set_num_threads(args.threads)  # before any work: torch fixes its pool early
    executor = load_executor(args.model, name="profiled", max_batch_size=args.max_batch_size)
    label = {
        "smollm2": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)",
        "tiny": "tiny random Llama (tests)",
    }.get(args.model, args.model)
    cost = profile_executor(
        executor,
        prompt_lengths=_ints(args.prompt_lengths),
        batch_sizes=_ints(args.batch_sizes),
        context_lengths=_ints(args.context_lengths),
        repeats=args.repeats,
        name=args.name or os.path.splitext(os.path.basename(args.out))[0],
        model=f"{label}, HFExecutor on {executor.device}",
        max_batch_size=args.max_batch_size,
        kv_token_budget=args.kv_token_budget,
        note=args.note,
    )
    cost.save(args.out)
    print(cost.to_json())
    return 0


def cmd_profile_from_run(args) -> int:
    """``rtlm-adapt profile --from-run RUN.json``: fit a profile to the steps a serve-bench run
    took (``--policy``: one policy's run, default all pooled; ``--executor``; ``--base``: the
    profile whose batch cap, padding and unexercised terms are kept, default the run's own;
    ``--target``: ``cycle``, the step with the loop's work between steps, or ``step``)."""
    import json
    from pathlib import Path

    from rtlm_adapt.serving.step_fit import fit_step_cost, run_profile, run_steps

    if args.model:
        raise ValueError("--from-run fits a recorded run: it takes no --model")
    try:
        payload = json.loads(Path(args.from_run).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{args.from_run} is not valid JSON: {exc}") from exc
    rows = run_steps(payload, policy=args.policy, executor=args.executor, target=args.target)
    base = StepCost.load(args.base) if args.base else run_profile(payload, args.executor)
    when = payload.get("started_at_utc", "unknown date")
    policies = args.policy or "+".join(payload["policies"])
    cost = fit_step_cost(
        rows,
        base,
        name=args.name or os.path.splitext(os.path.basename(args.out))[0],
        source=f"serve-bench run {args.from_run} ({when}), policy {policies}, "
        f"executor {args.executor}, target {args.target}",
    )
    if args.note:
        cost = dataclasses.replace(cost, source=f"{cost.source}. {args.note}")
    cost.save(args.out)
    print(cost.to_json())
    return 0


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def cmd_serve_bench(args, samples: Sequence[PromptSample], counter_kind: str) -> int:
    """``rtlm-adapt serve-bench``: the policies on the real executor (see the module doc)."""
    import datetime as dt
    import json
    import sys
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from rtlm_adapt.metrics import format_table
    from rtlm_adapt.policies import make_policy
    from rtlm_adapt.serving.profiler import machine_description

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        raise ValueError("--policies is empty")
    for name in policies:
        policy = make_policy(name)
        if getattr(policy, "length_source", "") == "oracle" or name.startswith("oracle"):
            raise ValueError(
                f"policy {name!r} needs true lengths, which a real model only knows afterwards"
            )
    load_before = machine_load()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    packaged = PACKAGED_PROFILES.get(args.model)
    t0 = time.perf_counter()

    # executors and their cost profiles
    if args.profile != "auto":
        primary_cost = StepCost.load(args.profile)
    elif packaged:
        primary_cost = StepCost.load(packaged[0])
    else:
        primary_cost = None
    primary = load_executor(
        args.model,
        name="primary",
        max_batch_size=args.max_batch_size or (primary_cost.max_batch_size if primary_cost else 8),
    )
    if primary_cost is None:
        print("profiling the primary executor (quick)...", file=sys.stderr)
        primary_cost = quick_profile(
            primary, name=f"{args.model}-quick", max_batch_size=primary.max_batch_size
        )
    secondary = secondary_cost = None
    secondary_threads, secondary_reason = secondary_threads_for(args.secondary_threads, threads)
    print(f"secondary executor: {secondary_threads} threads ({secondary_reason})", file=sys.stderr)
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
        _warm_up(primary, secondary, thread_map)

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
        # the profile served with and, with --calibrate, each policy's calibrated one; the
        # calibrated replay (the machine's cost now) is the one reported as sim_fidelity
        by_profile: dict[str, dict[str, dict]] = {"served": {}, "calibrated": {}}
        sim_results = {}
        for name, run in runs.items():
            costs = {"served": primary_cost, "calibrated": served[name].calibrated}
            for which, cost in costs.items():
                if cost is None:
                    continue
                sim = sim_replay(
                    name,
                    workload,
                    run.completions,
                    primary_cost=cost,
                    secondary_cost=secondary_cost if secondary is not None else None,
                    max_tokens=args.max_tokens,
                    tier=args.tier,
                    controller_cost=primary_cost,  # what the real run's controller started from
                )
                by_profile[which][name] = {**fidelity(sim, run.completions), "profile": cost.name}
                sim_results[name] = summarize(sim)
        fid = by_profile["calibrated"] or by_profile["served"]
        payload["sim_fidelity"] = fid
        payload["sim_fidelity_by_profile"] = {k: v for k, v in by_profile.items() if v}
        payload["sim_policies"] = {n: summary_json(s) for n, s in sim_results.items()}
        which = "each policy's own calibrated profile" if by_profile["calibrated"] else "served"
        print(f"simulator replay with the real lengths ({which}):")
        print(format_table(sim_results))
        for which, per_policy in payload["sim_fidelity_by_profile"].items():
            for name, f in per_policy.items():
                print(
                    f"fidelity {name} ({which} profile {f['profile']}): mean RT sim/real "
                    f"{f['mean_rt_ratio_sim_over_real']:.3f}, Spearman {f['spearman']:.3f} "
                    f"(n={f['n']})"
                )
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
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


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


def _warm_up(primary, secondary, threads: dict[str, int]) -> None:
    """A few short requests on each executor (first calls allocate and tune)."""
    import torch

    for ex in (primary, secondary):
        if ex is None:
            continue
        torch.set_num_threads(threads.get(ex.name, torch.get_num_threads()))
        ex.admit(
            [
                Request(f"warm-{ex.name}-{i}", "Hello there!" * (i + 1), 0.0, max_tokens=4)
                for i in range(min(2, ex.max_batch_size))
            ],
            0.0,
        )
        while ex.running():
            ex.step(0.0)
    torch.set_num_threads(threads["primary"])
