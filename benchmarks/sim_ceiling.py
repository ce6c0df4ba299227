"""The serve-bench workload in the calibrated simulator, with SmolLM2's own response lengths.

Builds exactly the workload ``rtlm-adapt serve-bench`` builds for the same flags (prompts,
requests, load, seed, arrivals, slo, max tokens, primary profile), gives every request the
length SmolLM2 generated for it, and simulates policies on it: what they can give on this
workload under the profile's costs. ``oracle-sjf`` (true lengths) is the ceiling of any
length-based reordering.

Lengths come from a serve-bench JSON's per-request records (``--lengths-from RUN.json``,
the first policy's run) or are generated here (``--generate``: greedy, batch 16, saved to
``--lengths-out``).

``--fidelity RUN.json``: instead, replay each policy of a serve-bench run (its own lengths,
its secondary if it used one) with ``--sim-profile`` and compare with the run's per-request
response times: the fidelity the run would have had with that profile. With ``--fit-from
RUN2.json`` and/or ``--fit-policy NAME``, the simulated profiles are instead fitted to the steps
a run took (``fit_step_cost``; RUN2, or the --fidelity run itself, and only NAME's run of it):
``--fidelity RUN.json --fit-policy fcfs`` fits on the fcfs run, so every other policy's
fidelity is out of sample (``--fit-target``: ``cycle``, each step with the loop's work
until the next, or ``step``, the executor's step alone). The fit keeps the batch cap, padding
and unexercised terms of ``--sim-profile`` (default ``--profile``) and ``--secondary-profile``.
``--calibrated`` replays each policy with the profile fitted to its own calibration run
(``serve-bench --calibrate N``). In every replay the controller starts from the profile the run
served with (its JSON's ``profiles``), as the real controller did, whatever the simulated
executor charges.

Usage::

    python benchmarks/sim_ceiling.py --lengths-from benchmarks/results/serve_bench_smollm2.json
    python benchmarks/sim_ceiling.py --generate --threads 1 --lengths-out /tmp/lengths.json
    python benchmarks/sim_ceiling.py --fidelity RUN.json --sim-profile quiet.json
    python benchmarks/sim_ceiling.py --fidelity RUN.json --fit-policy fcfs
    python benchmarks/sim_ceiling.py --fidelity RUN.json --calibrated
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.calibration.step_fit import fit_step_cost, run_steps
from rtlm_adapt.cli.arguments import load_samples
from rtlm_adapt.experiment import run_policy
from rtlm_adapt.request import TRUE_LENGTH_KEY, Completion
from rtlm_adapt.serve_bench import workload_from_args
from rtlm_adapt.sim_fidelity import fidelity, replay_length


def generate_lengths(workload, model: str, threads: int, max_batch: int) -> dict[str, int]:
    """Greedy output tokens per request id, served as a burst."""
    import torch

    from rtlm_adapt.serving.factory import load_executor

    torch.set_num_threads(threads)
    ex = load_executor(model, name="gen", max_batch_size=max_batch)
    queue = [dataclasses.replace(r, arrival_time=0.0, deadline=None) for r in workload.requests]
    out: dict[str, int] = {}
    while queue or ex.running():
        free = ex.max_batch_size - ex.running()
        if free and queue:
            ex.admit(queue[:free], 0.0)
            del queue[:free]
        for c in ex.step(0.0).finished:
            out[c.request_id] = c.output_tokens
            print(f"{len(out)}/{len(workload.requests)}", file=sys.stderr, end="\r")
    return out


def fitted_profiles(args, payload, primary: StepCost, secondary: StepCost | None):
    """``--fit-from``/``--fit-policy``: the profiles fitted to a run's steps (primary, and the
    secondary where the run recorded enough of its steps), and a description of the fit."""
    path = args.fit_from or args.fidelity
    source = payload if path == args.fidelity else json.loads(Path(path).read_text())
    what = f"serve-bench run {path}, policy {args.fit_policy or 'all pooled'}"
    what += f", target {args.fit_target}"
    primary = fit_step_cost(
        run_steps(source, policy=args.fit_policy, executor="primary", target=args.fit_target),
        primary,
        name=f"{primary.name}-fitted",
        source=f"{what}, executor primary",
    )
    if secondary is not None:
        try:
            rows = run_steps(
                source, policy=args.fit_policy, executor="secondary", target=args.fit_target
            )
            secondary = fit_step_cost(
                rows, secondary, name=f"{secondary.name}-fitted", source=f"{what}, secondary"
            )
        except ValueError as exc:
            print(f"secondary profile not fitted ({exc}): {secondary.name}", file=sys.stderr)
    print(
        f"fitted to {what}: {primary.extra['steps']} primary steps, "
        f"mean relative error {primary.extra['fit_mean_rel_err']:.3f}",
        file=sys.stderr,
    )
    fit = {"from": path, "policy": args.fit_policy, "target": args.fit_target}
    return primary, secondary, fit


def fidelity_of_run(args, workload) -> None:
    """Replay every policy of a serve-bench run with ``--sim-profile`` (or profiles fitted to
    a run's steps); print the fidelity."""
    payload = json.loads(Path(args.fidelity).read_text())
    sim_cost = StepCost.load(args.sim_profile or args.profile)
    used_secondary = payload["executor"]["secondary_threads"] > 0
    secondary = StepCost.load(args.secondary_profile) if used_secondary else None
    fit = None
    if args.fit_from or args.fit_policy:
        sim_cost, secondary, fit = fitted_profiles(args, payload, sim_cost, secondary)
    # The replayed controller starts from the profile the real one served with (recorded in the
    # run), whatever the simulated executor charges: a heuristic's knobs depend on it.
    served = payload.get("profiles", {})
    controller = {k: StepCost.from_dict(v) for k, v in served.items()} or None
    out = {}
    for name, figures in payload["policies"].items():
        policy_cost = sim_cost
        if args.calibrated:
            if "calibration" not in figures:
                raise SystemExit(f"{args.fidelity}: policy {name!r} has no calibration run")
            policy_cost = StepCost.from_dict(figures["calibration"]["profile"])
        real = [
            Completion(r["id"], r["output_tokens"], 0.0, 0.0, r["response_time_s"], "x")
            for r in figures["requests"]
            if r["error"] is None
        ]
        lengths = {c.request_id: replay_length(c, args.max_tokens) for c in real}
        requests = [
            dataclasses.replace(r, metadata={**r.metadata, TRUE_LENGTH_KEY: lengths[r.id]})
            for r in workload.requests
            if r.id in lengths
        ]
        replay = dataclasses.replace(workload, requests=requests)
        sim = run_policy(
            name,
            replay,
            primary_cost=policy_cost,
            secondary_cost=secondary,
            controller_profiles=controller,
        )
        out[name] = fidelity(sim.completions, real)
        f = out[name]
        f["profile"] = policy_cost.name
        if fit is not None:
            # in sample: the policy's own steps were among those fitted
            f["in_sample"] = (args.fit_from or args.fidelity) == args.fidelity and (
                args.fit_policy in (None, name)
            )
        print(
            f"{name}{' (in sample)' if f.get('in_sample') else ''}: "
            f"sim/real mean RT {f['mean_rt_ratio_sim_over_real']:.3f} "
            f"(sim {f['sim_mean_rt_s']:.1f}s, real {f['real_mean_rt_s']:.1f}s), "
            f"Spearman {f['spearman']:.3f}, n={f['n']}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "run": args.fidelity,
                    "profile": sim_cost.name,
                    "fit": fit,
                    "fitted_profile": dataclasses.asdict(sim_cost) if fit else None,
                    "fidelity": out,
                },
                indent=2,
            )
            + "\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default="alpaca:gpt4_1106_preview")
    parser.add_argument("--tokenizer", default="smollm2")
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--load", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arrivals", default="poisson")
    parser.add_argument("--slo", default="0.7:2,0.3:10")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--profile", default="smollm2-135m-cpu2-hf", help="workload + sim costs")
    parser.add_argument("--sim-profile", help="simulate with this profile instead")
    parser.add_argument("--secondary-profile", default="smollm2-135m-cpu2-hf-secondary")
    parser.add_argument("--policies", default="fcfs,heuristic,heuristic-local,oracle-sjf")
    parser.add_argument("--lengths-from", help="serve-bench JSON with per-request records")
    parser.add_argument("--lengths", help="JSON {request id: output tokens}")
    parser.add_argument("--generate", action="store_true")
    parser.add_argument("--lengths-out")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fidelity", help="serve-bench JSON: replay its policies, compare")
    parser.add_argument("--fit-from", help="with --fidelity: fit the sim profiles to this run")
    parser.add_argument(
        "--fit-policy", help="with --fidelity: fit to this policy's steps only (default: all)"
    )
    parser.add_argument(
        "--fit-target",
        choices=("cycle", "step"),
        default="cycle",
        help="fit each step's cycle (with the loop's work between steps) or the step alone",
    )
    parser.add_argument(
        "--calibrated",
        action="store_true",
        help="with --fidelity: replay each policy with its own calibration profile "
        "(serve-bench --calibrate)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    if (args.fit_from or args.fit_policy or args.calibrated) and not args.fidelity:
        parser.error("--fit-from, --fit-policy and --calibrated go with --fidelity")
    if args.calibrated and (args.fit_from or args.fit_policy):
        parser.error("--calibrated replays each policy's own calibration: no --fit-*")

    samples, _ = load_samples(args)
    cost = StepCost.load(args.profile)
    workload = workload_from_args(args, samples, cost)
    if args.fidelity:
        fidelity_of_run(args, workload)
        return
    if args.lengths_from:
        payload = json.loads(Path(args.lengths_from).read_text())
        first = next(iter(payload["policies"].values()))
        lengths = {r["id"]: r["output_tokens"] for r in first["requests"]}
    elif args.lengths:
        lengths = json.loads(Path(args.lengths).read_text())
    elif args.generate:
        lengths = generate_lengths(workload, args.model, args.threads, cost.max_batch_size)
        if args.lengths_out:
            Path(args.lengths_out).write_text(json.dumps(lengths, indent=1) + "\n")
    else:
        parser.error("give --lengths-from, --lengths or --generate")

    def replayed(rid: str) -> int:
        c = Completion(rid, lengths[rid], 0.0, 0.0, 0.0, "x")
        return replay_length(c, args.max_tokens)

    requests = [
        dataclasses.replace(r, metadata={**r.metadata, TRUE_LENGTH_KEY: replayed(r.id)})
        for r in workload.requests
    ]
    replay = dataclasses.replace(workload, requests=requests)
    sim_cost = StepCost.load(args.sim_profile) if args.sim_profile else cost
    secondary = None if args.secondary_profile == "none" else StepCost.load(args.secondary_profile)
    results = {}
    for name in [p.strip() for p in args.policies.split(",") if p.strip()]:
        run = run_policy(name, replay, primary_cost=sim_cost, secondary_cost=secondary)
        s = run.summary
        offloaded = sum(1 for c in run.completions if c.executor == "secondary")
        results[name] = {
            "mean_rt_s": s.mean_rt_s,
            "p99_rt_s": s.p99_rt_s,
            "throughput_rps": s.throughput_rps,
            "deadline_miss_rate": s.deadline_miss_rate,
            "offloaded": offloaded,
        }
    base = results.get("fcfs", {}).get("mean_rt_s")
    for name, r in results.items():
        if base:
            r["mean_rt_over_fcfs"] = r["mean_rt_s"] / base
        print(
            f"{name:16s} mean {r['mean_rt_s']:7.2f}s  p99 {r['p99_rt_s']:7.2f}s  "
            f"x FCFS {r.get('mean_rt_over_fcfs', float('nan')):.3f}  "
            f"misses {r['deadline_miss_rate']:.1%}  offloaded {r['offloaded']}"
        )
    mean_len = sum(lengths.values()) / len(lengths)
    print(f"workload: {workload.description}; mean SmolLM2 length {mean_len:.1f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "workload": workload.description,
                    "profile": sim_cost.name,
                    "mean_output_tokens": mean_len,
                    "policies": results,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
