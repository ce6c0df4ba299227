"""A vLLM serve-bench run replayed on the simulator's engine model: ``serve-bench --engine vllm
--compare-sim``.

Every policy's requests run again in virtual time, each generating what the real engine
generated for it (vLLM's ``completion_tokens``: its first token comes with the prefill, as in the
engine model), on a profile with an engine block whose ``max_num_seqs`` is the run's. A gateway
policy replays through the controller with the run's in-flight cap and vLLM priorities;
``direct`` replays with no cap and no priority (every request goes straight into the engine's
queue, as the clients sent it). :func:`~rtlm_adapt.sim_fidelity.fidelity` then compares the
response times request by request.

>>> from rtlm_adapt.calibration.step_cost import StepCost
>>> cost = engine_profile(StepCost.load("vllm-cpu-smollm2-135m"), max_num_seqs=16)
>>> cost.engine.max_num_seqs, cost.max_batch_size
(16, 16)
>>> small = engine_profile(cost, max_num_seqs=16, kv_blocks=20, block_size=128)
>>> small.engine.kv_cache_tokens, small.engine.block_size  # 19 usable: 1 is the null block
(2432, 128)
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import PromptSample
from rtlm_adapt.experiment import PolicyRun, Workload, run_policy
from rtlm_adapt.request import TRUE_LENGTH_KEY, Completion, Request
from rtlm_adapt.sim_fidelity import fidelity

#: The profile a replay uses unless told otherwise (measured on this project's machine).
DEFAULT_ENGINE_PROFILE = "vllm-cpu-smollm2-135m"
#: ``direct``'s in-flight cap: none (every request enters the engine at once).
NO_CAP = 1_000_000
DIRECT = "direct"


def policy_and_tier(spelling: str, tier: str) -> tuple[str, str]:
    """A serve-bench policy spelling as (policy, the gateway's predictor tier): ``NAME@TIER``
    runs policy NAME with that tier, so one run can compare tiers; a bare NAME keeps ``tier``.

    >>> policy_and_tier("heuristic@encoder", "lexical"), policy_and_tier("fcfs", "lexical")
    (('heuristic', 'encoder'), ('fcfs', 'lexical'))
    """
    name, _, own = spelling.partition("@")
    return name, own or tier


def engine_profile(
    cost: StepCost,
    *,
    max_num_seqs: int,
    kv_blocks: int | None = None,
    block_size: int | None = None,
    max_inflight: int | None = None,
    handoff_s: float | None = None,
) -> StepCost:
    """``cost`` with the run's ``max_num_seqs`` and in-flight cap (the gateway's; default
    ``max_num_seqs``; above it the engine's own queue holds the rest) and, when given, the real
    server's KV cache: ``kv_blocks`` blocks of ``block_size`` tokens (as vLLM's
    ``vllm:cache_config_info`` reports them). vLLM's block pool keeps one block back as its null
    block, so the model gets ``kv_blocks - 1`` usable blocks. ``handoff_s`` replaces the
    profile's hand-off (:class:`~rtlm_adapt.calibration.engine_spec.EngineSpec`).

    >>> cost = engine_profile(StepCost.load("vllm-cpu-smollm2-135m"), max_num_seqs=4,
    ...                       max_inflight=6)
    >>> cost.max_batch_size, cost.engine.max_num_seqs
    (6, 4)
    """
    if cost.engine is None:
        raise ValueError(f"profile {cost.name!r} has no engine block: it cannot model vLLM")
    cost = cost.with_max_batch(max_num_seqs)
    if max_inflight is not None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        cost = dataclasses.replace(cost, max_batch_size=max_inflight)
    engine = cost.engine
    if (kv_blocks is None) != (block_size is None):
        raise ValueError("give both kv_blocks and block_size, or neither")
    if kv_blocks is not None and block_size is not None:
        if kv_blocks < 2 or block_size < 1:
            raise ValueError(
                f"the real KV cache must have >= 2 blocks (one is vLLM's null block) of >= 1 "
                f"token, got {kv_blocks} blocks of {block_size}"
            )
        engine = dataclasses.replace(
            engine, kv_cache_tokens=(kv_blocks - 1) * block_size, block_size=block_size
        )
    if handoff_s is not None:
        engine = dataclasses.replace(engine, handoff_s=handoff_s)
    return dataclasses.replace(cost, engine=engine)


def template_in_prompts(cost: StepCost) -> tuple[StepCost, int]:
    """``cost`` with the chat template's tokens moved into the prompts, and how many there are.

    vLLM computes the template (SmolLM2's system prompt and role tags: 30 tokens) like any prompt
    token and keeps its KV, which counts when the cache is small. A profile fitted to a run
    (:mod:`~rtlm_adapt.calibration.engine_fit`) charges those tokens as ``prefill_s_base``
    (``chat_template_tokens_assumed`` x ``prefill_s_per_token``); that charge moves into the
    prompt, so a request's prefill time stays the same.

    >>> cost, template = template_in_prompts(StepCost.load("vllm-cpu-smollm2-135m"))
    >>> template, round(cost.prefill_s_base * 1000, 1)  # ms, the rounding of the profile left
    (30, 0.0)
    """
    template = int(cost.extra.get("chat_template_tokens_assumed", 0))
    if template <= 0:
        return cost, 0
    base = max(0.0, cost.prefill_s_base - template * cost.prefill_s_per_token)
    return dataclasses.replace(cost, prefill_s_base=base), template


def replay_requests(
    ids: Sequence[str],
    prompts: Sequence[str],
    prompt_tokens: Sequence[int],
    arrivals: Sequence[float],
    deadlines: Sequence[float],
    real: Sequence[Completion],
) -> list[Request]:
    """The run's requests, each to generate what the real engine generated (failed ones: 1)."""
    made = {c.request_id: max(1, c.output_tokens) for c in real}
    return [
        Request(
            id=rid,
            prompt=prompt,
            arrival_time=float(arrival),
            deadline=float(deadline),
            max_tokens=made.get(rid, 1),
            prompt_tokens=int(tokens),
            metadata={TRUE_LENGTH_KEY: made.get(rid, 1)},
        )
        for rid, prompt, tokens, arrival, deadline in zip(
            ids, prompts, prompt_tokens, arrivals, deadlines, strict=True
        )
    ]


def replay(
    policy: str, requests: Sequence[Request], cost: StepCost, tier: str = "lexical"
) -> PolicyRun:
    """``requests`` under ``policy`` on the engine model (``direct``: no gateway), the
    controller predicting with ``tier`` as the gateway did."""
    workload = Workload(list(requests), 1.0, 1.0, 1.0, 1.0, "vLLM replay")
    if policy == DIRECT:
        return run_policy(
            "fcfs", workload, primary_cost=dataclasses.replace(cost, max_batch_size=NO_CAP)
        )
    return run_policy(policy, workload, primary_cost=cost, tier=tier)


class BenchedRequest(Protocol):
    """What a replay needs of a serve-bench request (``vllm_bench.BenchRequest``)."""

    id: str
    prompt: str
    arrival_s: float
    deadline_s: float


def compare_on_engine(
    requests: Sequence[BenchedRequest],
    prompt_tokens: Sequence[int],
    results: Mapping[str, Sequence[Sequence[Completion]]],
    *,
    profile: str | StepCost = DEFAULT_ENGINE_PROFILE,
    max_num_seqs: int,
    kv_blocks: int | None = None,
    block_size: int | None = None,
    max_inflight: int | None = None,
    handoff_s: float | None = None,
    tier: str = "lexical",
) -> dict[str, dict[str, float]]:
    """Per policy, sim/real fidelity over its repeats (each repeat replayed on its own lengths;
    ids prefixed by the repeat, so the repeats pool into one comparison). ``kv_blocks`` and
    ``block_size``: the real server's KV cache; ``handoff_s``: the API server's hand-off
    (defaults: the profile's); ``tier``: the gateway's predictor. ``profile``: a name, a file or
    a :class:`StepCost` (one fitted to the run's capacity probe, say)."""
    cost = engine_profile(
        profile if isinstance(profile, StepCost) else StepCost.load(profile),
        max_num_seqs=max_num_seqs,
        kv_blocks=kv_blocks,
        block_size=block_size,
        max_inflight=max_inflight,
        handoff_s=handoff_s,
    )
    cost, template = template_in_prompts(cost)
    prompt_tokens = [t + template for t in prompt_tokens]
    out = {}
    for policy, runs in results.items():
        sims: list[Completion] = []
        reals: list[Completion] = []
        preemptions = 0
        for k, real in enumerate(runs):
            replayed = replay_requests(
                [r.id for r in requests],
                [r.prompt for r in requests],
                prompt_tokens,
                [r.arrival_s for r in requests],
                [r.deadline_s for r in requests],
                real,
            )
            name, name_tier = policy_and_tier(policy, tier)
            run = replay(name, replayed, cost, name_tier)
            preemptions += run.preemptions
            sims += _tagged(run.completions, k)
            reals += _tagged(real, k)
        out[policy] = {
            **fidelity(sims, reals),
            # the wait in the gateway's queue, arrival to admission (direct: none, both sides):
            # where a policy's replay and its real run part, this says whether the ordering did
            "real_mean_queue_s": _mean_queue_s(reals),
            "sim_mean_queue_s": _mean_queue_s(sims),
            "profile": cost.name,
            "sim_preemptions": preemptions,  # all repeats
            "sim_kv_cache_tokens": cost.engine.kv_cache_tokens,  # type: ignore[union-attr]
            "sim_block_size": cost.engine.block_size,  # type: ignore[union-attr]
            "sim_template_tokens": template,  # added to every prompt
            "sim_handoff_s": cost.engine.handoff_s,  # type: ignore[union-attr]
            "real_decode_s_per_token": decode_s_per_token(reals),
            "sim_decode_s_per_token": decode_s_per_token(sims),
        }
    return out


def decode_s_per_token(completions: Sequence[Completion]) -> float:
    """The engine's pace as each request saw it once it ran: the mean time per token after the
    first (requests of 2 tokens or more). It tells a slower engine apart from a longer wait.

    >>> c = Completion("a", 11, arrival_time=0.0, start_time=1.0, finish_time=3.0,
    ...                executor="vllm", first_token_time=2.0)
    >>> decode_s_per_token([c])
    0.1
    """
    paces = [
        (c.finish_time - c.first_token_time) / (c.output_tokens - 1)
        for c in completions
        if c.ok and c.first_token_time is not None and c.output_tokens >= 2
    ]
    return float(np.mean(paces)) if paces else float("nan")


def slowed(cost: StepCost, factor: float) -> StepCost:
    """``cost`` with every step and prefill term ``factor`` times longer: the same engine,
    slower (a shared or smaller machine)."""
    return dataclasses.replace(
        cost,
        decode_s_base=cost.decode_s_base * factor,
        decode_s_per_seq=cost.decode_s_per_seq * factor,
        decode_s_per_ctx_token=cost.decode_s_per_ctx_token * factor,
        prefill_s_base=cost.prefill_s_base * factor,
        prefill_s_per_token=cost.prefill_s_per_token * factor,
        extra={**cost.extra, "slowed_by": cost.extra.get("slowed_by", 1.0) * factor},
    )


def matched_pace(
    cost: StepCost,
    pace_of: Callable[[StepCost], float],
    real_s_per_token: float,
    iterations: int = 4,
) -> StepCost:
    """``cost`` slowed (:func:`slowed`) until ``pace_of(profile)``, the replay's decode time
    per token, is the real run's ``real_s_per_token``. A fixed-point iteration: the pace is
    nearly proportional to the factor, except that a slower engine runs fuller batches.

    >>> toy = lambda c: 0.01 + 2.0 * c.decode_s_base  # a pace that grows with the step
    >>> fitted = matched_pace(StepCost.load("vllm-cpu-smollm2-135m"), toy, 0.09)
    >>> round(toy(fitted), 4)
    0.09
    """
    factor = 1.0
    for _ in range(iterations):
        factor *= real_s_per_token / pace_of(slowed(cost, factor))
    return dataclasses.replace(slowed(cost, factor), name=f"{cost.name} at the run's pace")


def _mean_queue_s(completions: Sequence[Completion]) -> float:
    waits = [c.start_time - c.arrival_time for c in completions if c.error is None]
    return float(np.mean(waits)) if waits else float("nan")


def _tagged(completions: Sequence[Completion], repeat: int) -> list[Completion]:
    return [dataclasses.replace(c, request_id=f"{repeat}:{c.request_id}") for c in completions]


#: The gateway's default in-flight cap is vLLM's seats plus this many: a freed seat is refilled
#: from vLLM's own queue at once, and the gateway stops sending while a request there is overdue.
#: Measured on vLLM-CPU with 4 seats (BENCHMARKS.md 7.1, sessions 11-13): the heuristic's mean
#: against direct's was 0.889x at 4, 0.867x at 6 and 0.848x at 8 (two runs pooled, p99 1.30x).
EXTRA_INFLIGHT = 4


def gateway_inflight(max_num_seqs: int, max_inflight: int | None = None) -> int:
    """The gateway's in-flight cap on vLLM: ``--max-inflight`` if given, else the seats plus
    :data:`EXTRA_INFLIGHT`.

    >>> gateway_inflight(4), gateway_inflight(4, 6)
    (8, 6)
    """
    return max_inflight if max_inflight is not None else max_num_seqs + EXTRA_INFLIGHT


def compare_sim(
    args: Any,
    requests: Sequence[BenchedRequest],
    chosen: Sequence[PromptSample],
    results: dict[str, list[list[Completion]]],
    kv_cache: Mapping[str, int | None] | None = None,
    *,
    profile: StepCost | None = None,
    match_pace: bool = False,
) -> dict[str, dict[str, float]]:
    """``--compare-sim``: every policy's repeats replayed on the simulator's engine model of
    vLLM (``profile``, default ``--profile``, default the measured vLLM-CPU one), with the run's
    max_num_seqs and the server's KV cache (its blocks and block size, from
    ``kv_cache_figures``).

    ``match_pace``: first slow the profile (:func:`matched_pace`) until the replay's decode time
    per token, over every policy's requests, is the run's own. That tests the scheduler model
    given the engine's speed, which on a shared machine drifts between the capacity probe and
    the run (BENCHMARKS.md 9.5, 9.7); it is not a prediction made before the run."""
    if profile is None:
        profile = StepCost.load(_packaged_profile(args))
    prompt_tokens = [s.prompt_tokens for s in chosen]
    kv_cache = kv_cache or {}

    def compare(cost: StepCost) -> dict[str, dict[str, float]]:
        return compare_on_engine(
            requests,
            prompt_tokens,
            results,
            profile=cost,
            max_num_seqs=args.max_num_seqs,
            max_inflight=gateway_inflight(args.max_num_seqs, getattr(args, "max_inflight", None)),
            kv_blocks=kv_cache.get("blocks"),
            block_size=kv_cache.get("block_size"),
            tier=getattr(args, "tier", "lexical"),
        )

    if match_pace:
        real_pace = decode_s_per_token([c for runs in results.values() for r in runs for c in r])
        if not np.isfinite(real_pace):
            raise ValueError("the run's pace is unknown: no request of 2 tokens or more has a "
                             "first-token time")  # fmt: skip
        profile = matched_pace(profile, lambda cost: pooled_sim_pace(compare(cost)), real_pace)
    figures = compare(profile)
    for name, f in figures.items():
        print(
            f"fidelity {name} (engine profile {f['profile']}): mean RT sim/real "
            f"{f['mean_rt_ratio_sim_over_real']:.3f}, spearman {f['spearman']:.3f}",
            file=sys.stderr,
        )
    return figures


def pooled_sim_pace(figures: Mapping[str, Mapping[str, float]]) -> float:
    """The replay's decode time per token over every policy, weighted by its requests."""
    n = sum(f["n"] for f in figures.values())
    return sum(f["sim_decode_s_per_token"] * f["n"] for f in figures.values()) / n


def _packaged_profile(args: Any) -> str:
    return DEFAULT_ENGINE_PROFILE if args.profile == "auto" else args.profile


def probe_fitted_profile(
    payload: Mapping[str, Any], calibration: Sequence[PromptSample], args: Any
) -> StepCost | None:
    """An engine profile fitted to this run's capacity probe (measured before its policies
    ran; :mod:`~rtlm_adapt.calibration.engine_fit`), on ``--profile``'s engine block; None
    where the probe does not solve to a positive step and prefill cost. At 16 seats it
    replayed real runs within 15% where the measured step costs did not (BENCHMARKS.md 9.5)."""
    from rtlm_adapt.calibration.engine_fit import fit_engine_profile, probe_from_run

    base = StepCost.load(_packaged_profile(args))
    try:
        return fit_engine_profile(
            probe_from_run(payload, calibration),
            base,
            name="probe-fit",
            source=f"fitted to this run's capacity probe, engine block from {base.name}",
        )
    except ValueError as exc:
        print(f"no probe-fitted replay: {exc}", file=sys.stderr)
        return None
