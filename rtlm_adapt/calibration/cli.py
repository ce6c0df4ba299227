"""``rtlm-adapt profile``: write a StepCost JSON profile, measured on a real executor or fitted to
the steps a serve-bench run recorded (``--from-run``). Argument parsing lives in the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtlm_adapt.calibration.step_cost import StepCost

if TYPE_CHECKING:
    from rtlm_adapt.calibration.engine_fit import CapacityProbe

#: ``--model`` labels written into a measured profile.
MODEL_LABELS = {
    "smollm2": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)",
    "tiny": "tiny random Llama (tests)",
}


def run_from_args(args: Any) -> int:
    """Measure ``args.model`` (default smollm2), or fit ``args.from_run``; write ``args.out``."""
    if getattr(args, "engine", "hf") == "vllm":
        cost = measure_vllm(args) if getattr(args, "measure", False) else fit_vllm_run(args)
    else:
        cost = fit_from_run(args) if args.from_run else measure(args)
    cost.save(args.out)
    print(cost.to_json())
    return 0


def measure(args: Any) -> StepCost:
    """Profile a real executor with the profiler's synthetic inputs."""
    from rtlm_adapt.serving.factory import check_model

    model = args.model or "smollm2"
    check_model(model)  # before torch loads: a bad name fails in a second
    import torch

    from rtlm_adapt.calibration.profiler import profile_executor
    from rtlm_adapt.serving.factory import load_executor

    if args.threads:
        torch.set_num_threads(args.threads)  # before any work: torch fixes its pool early
    executor = load_executor(model, name="profiled", max_batch_size=args.max_batch_size)
    return profile_executor(
        executor,
        prompt_lengths=parse_ints(args.prompt_lengths),
        batch_sizes=parse_ints(args.batch_sizes),
        context_lengths=parse_ints(args.context_lengths),
        repeats=args.repeats,
        name=args.name or _stem(args.out),
        model=f"{MODEL_LABELS.get(model, model)}, HFExecutor on {executor.device}",
        max_batch_size=args.max_batch_size,
        kv_token_budget=args.kv_token_budget,
        note=args.note,
    )


def fit_from_run(args: Any) -> StepCost:
    """Fit the steps of a serve-bench run (``--policy``: one policy's run, default all pooled;
    ``--executor``; ``--base``: the profile whose batch cap, padding and unexercised terms are
    kept, default the run's own; ``--target``: ``cycle``, the step with the loop's work between
    steps, or ``step``)."""
    from rtlm_adapt.calibration.step_fit import fit_step_cost, run_profile, run_steps

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
        name=args.name or _stem(args.out),
        source=f"serve-bench run {args.from_run} ({when}), policy {policies}, "
        f"executor {args.executor}, target {args.target}",
    )
    if args.note:
        cost = dataclasses.replace(cost, source=f"{cost.source}. {args.note}")
    return cost


def probe_of_run(payload: dict[str, Any], label: str = "the run") -> CapacityProbe:
    """The capacity probe a ``serve-bench --engine vllm`` run (its JSON, ``payload``) measured
    before its policies ran, on the prompts it drew for it."""
    import numpy as np

    from rtlm_adapt.calibration.engine_fit import probe_from_run
    from rtlm_adapt.data import TokenCounter, load_prompts

    if payload.get("engine") != "vllm" or "capacity" not in payload:
        raise ValueError(f"{label} is not a serve-bench --engine vllm run")
    # the probe's prompts, as serve-bench drew them (runs before 2026-12-05 noon kept no seed
    # or tokenizer: they used 0 and smollm2)
    seed, tokenizer = payload.get("seed", 0), payload.get("tokenizer", "smollm2")
    limit = max(2000, payload["requests"]) if payload["prompts"] == "sharegpt" else None
    samples = load_prompts(
        payload["prompts"], tokenizer=TokenCounter.resolve(tokenizer), limit=limit, seed=seed
    )
    calibration = [samples[i] for i in np.random.default_rng(seed + 1).permutation(len(samples))]
    return probe_from_run(payload, calibration)


def fit_vllm_run(args: Any) -> StepCost:
    """An engine profile from a ``serve-bench --engine vllm`` run's capacity probe (see
    :mod:`~rtlm_adapt.calibration.engine_fit`); ``--base`` gives the engine block (KV cache,
    block size, token budget), default the packaged vLLM-CPU profile."""
    from rtlm_adapt.calibration.engine_fit import fit_engine_profile

    if not args.from_run:
        raise ValueError("--engine vllm fits a serve-bench --engine vllm run: give --from-run")
    payload = json.loads(Path(args.from_run).read_text())
    probe = probe_of_run(payload, args.from_run)
    base = StepCost.load(args.base or "vllm-cpu-smollm2-135m")
    return fit_engine_profile(
        probe,
        base,
        name=args.name or _stem(args.out),
        source=f"fitted to the capacity probe of serve-bench --engine vllm run {args.from_run} "
        f"({payload.get('started_at', 'unknown date')}, {payload.get('model')}, "
        f"max_num_seqs {probe.slots}): a request alone and the saturated closed loop; a step "
        f"flat in the batch, prefill per prompt token plus 30 chat-template tokens; engine "
        f"block from {base.name}. {args.note}".strip(),
    )


def measure_vllm(args: Any) -> StepCost:
    """Start a vLLM server with ``--max-batch-size`` seqs and measure its steps (see
    :mod:`~rtlm_adapt.engines.step_probe`); ``--base`` gives the engine block (KV cache, block
    size, token budget), default the packaged vLLM-CPU profile."""
    import asyncio
    import datetime as dt

    from rtlm_adapt.calibration.engine_fit import fit_measured_steps
    from rtlm_adapt.calibration.profiler import machine_load
    from rtlm_adapt.engines.models import SMOLLM2
    from rtlm_adapt.engines.step_probe import FILLER_TOKENS, probe_steps
    from rtlm_adapt.engines.vllm_server import VLLMServer

    if args.from_run:
        raise ValueError("--measure measures a server: it takes no --from-run")
    slots = args.max_batch_size
    batch_sizes = parse_ints(args.batch_sizes)
    if max(batch_sizes) > slots:
        raise ValueError(f"--batch-sizes go up to {max(batch_sizes)} > --max-batch-size {slots}")
    # --prompt-lengths are approximate prompt tokens, chat template included
    prompt_repeats = sorted(
        {max(1, round((n - 30) / FILLER_TOKENS)) for n in parse_ints(args.prompt_lengths)}
    )
    model = args.model or SMOLLM2
    base = StepCost.load(args.base or "vllm-cpu-smollm2-135m")
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes")
    load_before = machine_load()
    server = VLLMServer(model, max_num_seqs=slots, scheduling_policy="priority")
    with server:
        decodes, prefills = asyncio.run(
            probe_steps(
                server.url,
                server.model_name,
                batch_sizes=batch_sizes,
                prompt_repeats=prompt_repeats,
                tokens=args.decode_tokens,
                repeats=args.repeats,
            )
        )
    return fit_measured_steps(
        decodes,
        prefills,
        base,
        name=args.name or _stem(args.out),
        slots=slots,
        min_batch=args.fit_min_batch,
        source=f"measured by rtlm-adapt profile --engine vllm --measure ({started} UTC, load "
        f"average {load_before} before): vLLM server, {model}, --max-num-seqs {slots}, "
        f"--enforce-eager; decode steps of batches {batch_sizes} at prompts of "
        f"{sorted({d.prompt_tokens for d in decodes})} tokens, {args.decode_tokens} tokens "
        f"each, x{args.repeats}, the step fitted on batches >= {args.fit_min_batch} (extra's "
        f"decode_fit_ratio_by_batch: fitted / measured per batch); prefill alone at the same "
        f"prompts; engine block from {base.name}. {args.note}".strip(),
    )


def parse_ints(text: str) -> list[int]:
    """Comma-separated integers >= 1.

    >>> parse_ints("16, 64,256")
    [16, 64, 256]
    """
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
