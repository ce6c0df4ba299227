"""Study (SIMULATED replays of real runs): how much of the engine model's error is the pace?

``serve-bench --engine vllm --compare-sim`` replays a real run on the engine model with the
packaged vLLM-CPU profile (a 31.8 ms decode step, measured once). The real engine's pace moves
between runs on this shared machine (29.5-31.5 ms per token), and near saturation a few percent
of pace moves the waits by tens of percent. This replays recorded runs with these step costs:

- ``packaged``: the profile ``--compare-sim`` uses;
- ``probe``: fitted to the run's own capacity probe before its policies ran
  (``rtlm-adapt profile --engine vllm --from-run``): what a run could know beforehand;
- ``probe+slope``: as ``probe``, with the packaged profile's cost per running sequence kept;
- ``scaled``: the packaged profile with every cost scaled by one factor, so that it delivers
  the run's probe's saturated rate: the shape measured once, the pace from the run's own probe;
- ``+intercept``: a measured profile (``--measure``) with the API server's own time per request
  (its prefill intercept, ``extra``) charged to the step that prefills it;
- ``pace``: the packaged profile with its decode step scaled to the time per token the run's
  requests actually took (all its policies pooled; the step with every seat full, each
  sequence halfway through a mean answer): the scheduler model alone, given the pace;
- ``matched``: the packaged profile slowed until the replay's own time per token equals the
  run's (``vllm_replay.matched_pace``, what ``--compare-sim`` writes as
  ``sim_fidelity_run_pace``): as ``pace``, but at the batches the replay actually runs.

and prints each policy's sim/real mean response time under each. Runs with ``--lengths
dataset`` and per-request records only (the rebuild needs the dataset's lengths). ``--profile``
is the packaged profile (``vllm-cpu-smollm2-135m-16`` for a 16-seat run).

    python benchmarks/studies/pace_replay.py benchmarks/results/gateway_vllm_*session1[123].json \\
        --json benchmarks/results/pace_replay.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _vllm_run import at_run_pace, rebuild_run, replay_recorded
from gateway_vs_replay import completions

from rtlm_adapt.calibration.cli import fit_vllm_run, probe_of_run
from rtlm_adapt.calibration.engine_fit import CapacityProbe, fit_engine_profile
from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.engines.vllm_replay import (
    DEFAULT_ENGINE_PROFILE,
    slowed,
)

STEP_COSTS = ("packaged", "probe", "probe+slope", "scaled", "+intercept", "pace", "matched")


def scale_to_probe(cost: StepCost, probe: CapacityProbe) -> StepCost:
    """``cost`` with every step and prefill term scaled by one factor, so that the probe's
    saturated closed loop (``probe.slots`` decodes, each halfway through a mean answer, plus each
    request's prefill spread over its answer) delivers the tokens per second it measured."""
    template = int(cost.extra.get("chat_template_tokens_assumed", 0))
    context = template + probe.prompt_tokens_mean + probe.answer_tokens_mean / 2
    step_s = (cost.decode_s_base + cost.decode_s_per_seq * probe.slots
              + cost.decode_s_per_ctx_token * probe.slots * context)  # fmt: skip
    prefill_s = cost.prefill_s_base + cost.prefill_s_per_token * probe.prompt_tokens_mean
    per_token_s = step_s / probe.slots + prefill_s / probe.answer_tokens_mean
    factor = 1 / (probe.saturated_tokens_per_s * per_token_s)
    return dataclasses.replace(slowed(cost, factor), name="scaled")


def step_costs(
    path: str, real: dict[str, Any], folder: Path, profile: str, context_per_seq: float
) -> dict[str, str]:
    """The profiles for this run, as files ``compare_on_engine`` can load (no ``probe`` where
    the run's probe does not solve to a positive step and prefill cost)."""
    packaged = StepCost.load(profile)
    per_token_s = np.mean([p["decode_ms_per_token"] for p in real["policies"].values()]) / 1000
    seats = real["max_num_seqs"]
    step_s = (packaged.decode_s_base + packaged.decode_s_per_seq * seats
              + packaged.decode_s_per_ctx_token * seats * context_per_seq)  # fmt: skip
    scale = float(per_token_s / step_s)
    pace = dataclasses.replace(
        packaged,
        name="pace",
        decode_s_base=packaged.decode_s_base * scale,
        decode_s_per_seq=packaged.decode_s_per_seq * scale,
        decode_s_per_ctx_token=packaged.decode_s_per_ctx_token * scale,
    )
    costs = {"pace": pace}
    args = argparse.Namespace(from_run=path, base=profile, name="probe-fit", out="probe", note="")
    try:
        costs["probe"] = fit_vllm_run(args)
    except ValueError as exc:
        print(f"{Path(path).stem}: no probe fit ({exc})")
    probe = probe_of_run(real, path)
    if "prefill_intercept_s" in packaged.extra:  # a measured profile: charge the API server's time
        costs["+intercept"] = dataclasses.replace(
            packaged, name="+intercept",
            prefill_s_base=packaged.prefill_s_base + packaged.extra["prefill_intercept_s"])
    costs["scaled"] = scale_to_probe(packaged, probe)
    try:
        costs["probe+slope"] = fit_engine_profile(
            probe, packaged, name="probe+slope", source="study",
            decode_s_per_seq=packaged.decode_s_per_seq)  # the packaged slope per sequence
    except ValueError as exc:
        print(f"{Path(path).stem}: no probe+slope fit ({exc})")
    files = {"packaged": profile}
    for name, cost in costs.items():
        files[name] = str(folder / f"{Path(path).stem}-{name}.json")
        cost.save(files[name])
    return files


def replay_run(path: str, folder: Path, profile: str) -> dict[str, Any]:
    real = json.loads(Path(path).read_text())
    chosen, lengths, requests = rebuild_run(real)
    template = StepCost.load(profile).extra.get("chat_template_tokens_assumed", 0)
    context = np.mean([s.prompt_tokens for s in chosen]) + template + np.mean(lengths) / 2
    results = {name: [completions(rows) for rows in repeats]
               for name, repeats in real["completions"].items()}  # fmt: skip
    files = step_costs(path, real, folder, profile, float(context))
    # the packaged profile slowed until the replay's own decode pace is the run's (what
    # --compare-sim writes as sim_fidelity_run_pace)
    matched = at_run_pace(real, chosen, requests, results, profile)
    files["matched"] = str(folder / f"{Path(path).stem}-matched.json")
    matched.save(files["matched"])
    out: dict[str, Any] = {
        "max_inflight": real.get("max_inflight") or real["max_num_seqs"],
        "decode_s": {k: StepCost.load(f).decode_s_base for k, f in files.items()},
        "policies": {},
    }
    for cost_name, file in files.items():
        figures = replay_recorded(real, chosen, requests, results, profile=file)
        for policy, f in figures.items():
            cell = out["policies"].setdefault(policy, {"real_s": f["real_mean_rt_s"]})
            cell[cost_name] = {"sim_over_real": f["mean_rt_ratio_sim_over_real"],
                               "spearman": f["spearman"]}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="serve-bench --engine vllm JSON files")
    parser.add_argument("--profile", default=DEFAULT_ENGINE_PROFILE, help="the packaged profile")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    out: dict[str, Any] = {"profile": args.profile, "runs": {}}
    print(f"{'run':44s} cap policy       real s  decode ms (packaged/probe/pace) -> sim/real")
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.runs:
            real = json.loads(Path(path).read_text())
            if real.get("lengths", "dataset") != "dataset" or "completions" not in real:
                print(f"{Path(path).stem:44s} skipped: other lengths or no per-request records")
                continue
            run = out["runs"][path] = replay_run(path, Path(tmp), args.profile)
            ms = "/".join(_ms(run["decode_s"].get(k)) for k in STEP_COSTS)
            for policy, cell in run["policies"].items():
                ratios = "  ".join(_ratio(cell.get(k)) for k in STEP_COSTS)
                print(f"{Path(path).stem[:44]:44s} {run['max_inflight']:3d} {policy:11s} "
                      f"{cell['real_s']:6.2f}  {ms:16s} -> {ratios}")  # fmt: skip
    within = {k: [abs(c[k]["sim_over_real"] - 1) <= 0.15 for r in out["runs"].values()
                  for c in r["policies"].values() if k in c] for k in STEP_COSTS}  # fmt: skip
    out["within_15pct"] = {k: f"{sum(v)}/{len(v)}" for k, v in within.items()}
    print("sim/real within 15%:", ", ".join(f"{k} {v}" for k, v in out["within_15pct"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _ratio(cell: dict[str, float] | None) -> str:
    return "  -  " if cell is None else f"{cell['sim_over_real']:.3f}"


if __name__ == "__main__":
    main()
