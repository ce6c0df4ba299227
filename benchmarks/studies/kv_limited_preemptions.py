"""Study: a KV-limited ``serve-bench --engine vllm --kv-blocks N --compare-sim`` run's requests
rebuilt and replayed on the engine model, to see what moves the simulated preemption count
against vLLM's (``engine_preemptions``).

The workload is rebuilt as serve-bench built it (same seed, prompts, dataset lengths, arrivals;
checked against the recorded mean length and arrival rate); each variant replays every policy
on the server's KV cache (``kv_cache`` in the JSON, less vLLM's null block).

    python benchmarks/studies/kv_limited_preemptions.py benchmarks/results/RUN.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from _vllm_run import at_run_pace, rebuild_run, replay_recorded
from gateway_vs_replay import completions

from rtlm_adapt.calibration.cli import fit_vllm_run
from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.engines.vllm_replay import (
    engine_profile,
    replay,
    replay_requests,
    slowed,
    template_in_prompts,
)
from rtlm_adapt.request import Completion


def main(path: str) -> None:
    real = json.loads(Path(path).read_text())
    chosen, lengths, bench = rebuild_run(real)
    capacity = real["capacity"]
    made = [Completion(r.id, k, 0.0, 0.0, 1.0, "vllm") for r, k in zip(bench, lengths, strict=True)]
    kv = real["kv_cache"]
    base = engine_profile(StepCost.load("vllm-cpu-smollm2-135m"), max_num_seqs=real["max_num_seqs"],
                          kv_blocks=kv["blocks"], block_size=kv["block_size"])  # fmt: skip
    prompt_tokens = [s.prompt_tokens for s in chosen]
    with_template, template = template_in_prompts(base)
    # the run's own probe: a request alone took this many times the profile's time per token
    slower = capacity["alone_s_per_token"] / base.extra["alone_s_per_token"]
    per_repeat = {p: sum(v) / len(v) for p, v in real["engine_preemptions"].items()}
    variants = {
        "prompt only in KV": (base, prompt_tokens),
        # the chat template's tokens hold KV too (what --compare-sim does)
        "+ template in KV": (with_template, [t + template for t in prompt_tokens]),
        f"+ template, steps x{slower:.2f} (the run's alone pace)": (
            slowed(with_template, slower),
            [t + template for t in prompt_tokens],
        ),
        # ENGINES.md's 32-prompt batch took about 100 ms a step against 32 ms alone: about
        # 2.2 ms more per running sequence, which the 4-slot profile (flat step) leaves out
        f"+ template, steps x{slower:.2f}, + 2.2 ms per running sequence": (
            dataclasses.replace(slowed(with_template, slower), decode_s_per_seq=0.0022),
            [t + template for t in prompt_tokens],
        ),
    }
    # the profile fitted to the run's own capacity probe (what --compare-sim writes as
    # sim_fidelity_probe_fit), on the server's KV cache: at 16 seats it charges the pace a full
    # engine really keeps (BENCHMARKS.md 9.5)
    fit_args = argparse.Namespace(from_run=path, base="vllm-cpu-smollm2-135m", name="probe-fit",
                                  out="probe-fit", note="")  # fmt: skip
    try:
        fitted = engine_profile(fit_vllm_run(fit_args), max_num_seqs=real["max_num_seqs"],
                                kv_blocks=kv["blocks"], block_size=kv["block_size"])  # fmt: skip
        fitted_template, _ = template_in_prompts(fitted)
        variants["+ template, fitted to the run's probe"] = (
            fitted_template, [t + template for t in prompt_tokens])
    except ValueError as exc:
        print(f"no probe fit: {exc}")
    # the step measured at 16 seats (BENCHMARKS.md 9.3: it grows with the batch and the context)
    measured = engine_profile(StepCost.load("vllm-cpu-smollm2-135m-16"),
                              max_num_seqs=real["max_num_seqs"], kv_blocks=kv["blocks"],
                              block_size=kv["block_size"])  # fmt: skip
    measured_template, _ = template_in_prompts(measured)
    variants["+ template, the measured 16-seat step"] = (
        measured_template, [t + template for t in prompt_tokens])
    variants[f"+ template, the measured 16-seat step x{slower:.2f}"] = (
        slowed(measured_template, slower), [t + template for t in prompt_tokens])
    # ... with the API server's own time per request (the step probe's prefill intercept) charged
    # to the step that prefills it
    intercept = dataclasses.replace(
        measured_template,
        prefill_s_base=measured_template.prefill_s_base + measured.extra["prefill_intercept_s"])
    variants["+ template, the measured 16-seat step, + the API server's time per request"] = (
        intercept, [t + template for t in prompt_tokens])
    # ... with the admission cost measured into a running batch (admission_cost.py), instead
    admission = json.loads((Path(__file__).parents[1] / "results/admission_cost.json").read_text())
    fit = admission["fit"]
    admitted = dataclasses.replace(measured_template, prefill_s_base=fit["intercept_s"],
                                   prefill_s_per_token=fit["per_prompt_token_s"])  # fmt: skip
    variants["+ template, the measured 16-seat step, + the measured admission cost"] = (
        admitted, [t + template for t in prompt_tokens])
    real_rt = {p: round(v["mean_rt_s"], 2) for p, v in real["policies"].items()}
    # per repeat: every repeat serves the same requests, and the replay serves them once
    print(f"real (vLLM): preemptions per repeat {per_repeat}"
          f", mean RT s {real_rt}")  # fmt: skip
    for label, (cost, tokens) in variants.items():
        requests = replay_requests([r.id for r in bench], [r.prompt for r in bench], tokens,
                                   [r.arrival_s for r in bench], [r.deadline_s for r in bench],
                                   made)  # fmt: skip
        counts = {}
        for policy in real["engine_preemptions"]:
            run = replay(policy, requests, cost)
            counts[policy] = (run.preemptions, round(run.summary.mean_rt_s, 2))
        print(f"{label}: (preemptions, mean RT s) {counts}")

    if "completions" in real:
        replay_at_run_pace(real, chosen, bench, per_repeat)


def replay_at_run_pace(real: dict, chosen: list, bench: list,
                       real_per_repeat: dict[str, float]) -> None:
    """The replay ``--compare-sim`` writes as ``sim_fidelity_run_pace``: each profile slowed
    until the replay's decode time per token is the run's own, on the run's own requests."""
    results = {name: [completions(rows) for rows in repeats]
               for name, repeats in real["completions"].items()}  # fmt: skip
    for profile in ("vllm-cpu-smollm2-135m", "vllm-cpu-smollm2-135m-16"):
        matched = at_run_pace(real, chosen, bench, results, profile)
        figures = replay_recorded(real, chosen, bench, results, profile=matched)
        cells = {
            policy: (round(f["mean_rt_ratio_sim_over_real"], 3), round(f["spearman"], 3),
                     f["sim_preemptions"] / len(real["completions"][policy]),
                     real_per_repeat[policy])
            for policy, f in figures.items()
        }  # fmt: skip
        print(f"{profile} at the run's pace (x{matched.extra['slowed_by']:.2f}): (sim/real mean RT,"
              f" Spearman, sim preemptions, real preemptions, per repeat) {cells}")


if __name__ == "__main__":
    main(sys.argv[1])
