"""Study (real vLLM): what admitting a request costs the batch already running.

The 16-seat profile measured by ``rtlm-adapt profile --engine vllm --measure`` replays 16-seat
runs 15-25% fast (BENCHMARKS.md 9.3, 9.5). Its decode step is measured with every stream started
together, and its prefill with a request alone: neither sees what a request arriving into a
running batch costs the others. This starts a vLLM server and, for each running batch and
arriving prompt, measures the decoders' step quiet and with one-token requests sent among them
(:func:`rtlm_adapt.engines.step_probe.admission_sample`), then fits the cost per admitted request
as ``a + b x prompt tokens`` and writes the 16-seat profile with that prefill charge::

    python benchmarks/studies/admission_cost.py --json benchmarks/results/admission_cost.json \\
        --profile-out admission-16.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np

from rtlm_adapt.calibration.profiler import machine_load
from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.engines.models import SMOLLM2
from rtlm_adapt.engines.step_probe import (
    FILLER_TOKENS,
    AdmissionSample,
    admission_sample,
    decode_sample,
    filler_prompt,
)
from rtlm_adapt.engines.vllm_server import VLLMServer

BASE = "vllm-cpu-smollm2-135m-16"


async def measure(url: str, model: str, args: argparse.Namespace) -> list[AdmissionSample]:
    await decode_sample(url, model, batch=1, prompt=filler_prompt(1), tokens=16)  # warm-up
    grid = [(b, p) for p in args.arrival_prompts for b in args.batches]
    samples = []
    for k in range(args.repeats):
        for batch, prompt_tokens in grid if k % 2 == 0 else grid[::-1]:
            sample = await admission_sample(
                url, model, batch=batch, prompt=filler_prompt(2), tokens=args.tokens,
                arrivals=args.arrivals,
                arrival_prompt=filler_prompt(max(1, round((prompt_tokens - 30) / FILLER_TOKENS))),
            )  # fmt: skip
            quiet_ms, with_ms = sample.quiet_step_s * 1000, sample.step_s * 1000
            print(f"batch {batch:2d}  arrival prompt {sample.prompt_tokens:4d}  step quiet "
                  f"{quiet_ms:5.1f} ms, with arrivals {with_ms:5.1f} ms -> "
                  f"{sample.per_request_s * 1000:6.1f} ms per request", flush=True)  # fmt: skip
            samples.append(sample)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seats", type=int, default=16)
    parser.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")],
                        default=[4, 8, 12, 15])  # fmt: skip
    parser.add_argument("--arrival-prompts", type=lambda t: [int(x) for x in t.split(",")],
                        default=[70, 500],
                        help="approximate tokens, chat template included")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--arrivals", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", required=True)
    parser.add_argument("--profile-out", help="write the 16-seat profile with this prefill charge")
    args = parser.parse_args()
    load_before = machine_load()
    with VLLMServer(SMOLLM2, max_num_seqs=args.seats, scheduling_policy="priority") as server:
        samples = asyncio.run(measure(server.url, server.model_name, args))
    prompts = np.array([s.prompt_tokens for s in samples], dtype=float)
    costs = np.array([s.per_request_s for s in samples])
    slope, intercept = np.polyfit(prompts, costs, 1)
    by_batch = {b: statistics.median(s.per_request_s for s in samples if s.batch == b)
                for b in args.batches}  # fmt: skip
    print(f"per admitted request: {intercept * 1000:.1f} ms + {slope * 1000:.3f} ms per prompt "
          f"token; median by batch (ms): { {b: round(v * 1000, 1) for b, v in by_batch.items()} }")
    out = {"load_average_before": load_before, "seats": args.seats, "tokens": args.tokens,
           "arrivals": args.arrivals, "samples": [dataclasses.asdict(s) | {
               "per_request_s": s.per_request_s} for s in samples],
           "fit": {"intercept_s": intercept, "per_prompt_token_s": slope},
           "median_per_request_s_by_batch": by_batch}  # fmt: skip
    Path(args.json).write_text(json.dumps(out, indent=1))
    if args.profile_out:
        base = StepCost.load(BASE)
        template = base.extra["chat_template_tokens_assumed"]
        cost = dataclasses.replace(
            base, name=Path(args.profile_out).stem,
            # the profile's convention: prompts without the template, whose tokens are in the base
            prefill_s_base=float(intercept + template * slope), prefill_s_per_token=float(slope),
            source=base.source + f" Prefill replaced by the admission cost measured by "
            f"benchmarks/studies/admission_cost.py: {intercept * 1000:.1f} ms + "
            f"{slope * 1000:.3f} ms per prompt token (template included) per admitted request.",
        )  # fmt: skip
        cost.save(args.profile_out)


if __name__ == "__main__":
    main()
