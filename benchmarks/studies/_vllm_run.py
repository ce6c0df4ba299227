"""A ``serve-bench --engine vllm`` run's requests rebuilt from its JSON, for the studies that
replay a real run on the engine model.

The workload is rebuilt as serve-bench built it (same prompts, seed, dataset lengths capped at
``max_tokens``, arrivals at ``load`` of the measured capacity) and checked against the mean
length and arrival rate the run recorded, so a study cannot silently replay other requests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import PromptSample, TokenCounter, load_prompts
from rtlm_adapt.engines.vllm_bench import BenchRequest, build_requests
from rtlm_adapt.engines.vllm_replay import (
    compare_on_engine,
    decode_s_per_token,
    matched_pace,
    pooled_sim_pace,
)
from rtlm_adapt.request import Completion


def rebuild_run(
    real: Mapping[str, Any], seed: int | None = None
) -> tuple[list[PromptSample], list[int], list[BenchRequest]]:
    """The run's prompt samples, their lengths (what each request generated: ``max_tokens`` with
    ``ignore_eos``) and its requests. Given another ``seed``, the same kind of workload drawn
    as serve-bench would with that seed (a sample the real run never served)."""
    samples = load_prompts(real["prompts"], tokenizer=TokenCounter.resolve("smollm2"), seed=0)
    own_seed = real.get("seed", 0)  # runs before session 9 kept no seed: 0
    n, seed = real["requests"], own_seed if seed is None else seed
    idx = np.random.default_rng(seed).choice(len(samples), size=n, replace=n > len(samples))
    chosen = [samples[i] for i in idx]
    lengths = [max(1, min(s.response_tokens, real["max_tokens"])) for s in chosen]
    capacity = real["capacity"]
    mean_len = float(np.mean(lengths))
    rate = real["load"] * capacity["tokens_per_s"] / mean_len
    if seed == own_seed:
        assert abs(mean_len - real["mean_true_tokens"]) < 1e-6, "not the run's requests"
        assert abs(rate - real["arrival_rate_rps"]) < 1e-9, "not the run's arrival rate"
    requests = build_requests(chosen, lengths, rate=rate, arrivals=real["arrivals"], seed=seed,
                              slo="0.7:2,0.3:10",
                              mean_service_s=mean_len * capacity["alone_s_per_token"],
                              max_tokens=real["max_tokens"], dataset_lengths=True)  # fmt: skip
    return chosen, lengths, requests


def replay_recorded(
    real: Mapping[str, Any],
    chosen: list[PromptSample],
    requests: list[BenchRequest],
    results: Mapping[str, list[list[Completion]]],
    *,
    profile: str | StepCost,
    handoff_s: float | None = None,
) -> dict[str, dict[str, float]]:
    """``compare_on_engine`` on a rebuilt run, with the run's seats, in-flight cap and KV cache:
    per policy, the sim/real figures."""
    kv = real.get("kv_cache") or {}
    return compare_on_engine(
        requests,
        [s.prompt_tokens for s in chosen],
        results,
        profile=profile,
        max_num_seqs=real["max_num_seqs"],
        max_inflight=real.get("max_inflight"),
        kv_blocks=kv.get("blocks"),
        block_size=kv.get("block_size"),
        handoff_s=handoff_s,
    )


def at_run_pace(
    real: Mapping[str, Any],
    chosen: list[PromptSample],
    requests: list[BenchRequest],
    results: Mapping[str, list[list[Completion]]],
    profile: str | StepCost,
) -> StepCost:
    """``profile`` slowed until the replay's decode time per token, over every policy's
    requests, is the run's own (``vllm_replay.matched_pace``; what ``--compare-sim`` writes as
    ``sim_fidelity_run_pace``)."""
    real_pace = decode_s_per_token([c for runs in results.values() for r in runs for c in r])

    def pace_of(cost: StepCost) -> float:
        return pooled_sim_pace(replay_recorded(real, chosen, requests, results, profile=cost))

    base = profile if isinstance(profile, StepCost) else StepCost.load(profile)
    return matched_pace(base, pace_of, real_pace)
