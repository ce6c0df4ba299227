"""An engine profile fitted to a vLLM serve-bench run's capacity probe
(``rtlm-adapt profile --engine vllm --from-run RUN.json``).

``serve-bench --engine vllm`` measures two things before its policies run: one request alone
(``alone_s_per_token``: 64 tokens, ignore_eos) and the saturated rate of a closed loop that keeps
every slot busy (``tokens_per_s``). With a step that costs ``decode_s_base + decode_s_per_seq *
decodes`` and a prefill that costs ``prefill_s_per_token`` per prompt token (chat template
included), the two give two equations:

    alone:      n * (base + per_seq) + (template + P_alone) * per_token = n * alone_s_per_token
    saturated:  1 / tokens_per_s = (base + slots * per_seq) / slots
                                   + (template + P_mean) * per_token / L_mean

``per_seq`` is given (0: a step flat in the batch, what vLLM-CPU showed up to 4 slots); the fit
solves ``base`` and ``per_token``.

>>> probe = CapacityProbe(alone_s_per_token=0.032, alone_prompt_tokens=30, alone_tokens=64,
...                       saturated_tokens_per_s=120.0, slots=4, prompt_tokens_mean=30.0,
...                       answer_tokens_mean=70.0)
>>> base, per_token = solve_step_costs(probe, template_tokens=30)
>>> round(base * 1000, 2), round(per_token * 1000, 3)
(31.5, 0.535)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost


@dataclass(frozen=True, slots=True)
class CapacityProbe:
    """What serve-bench's capacity probe measured, and on which requests."""

    alone_s_per_token: float
    alone_prompt_tokens: int
    alone_tokens: int
    saturated_tokens_per_s: float
    slots: int
    prompt_tokens_mean: float
    answer_tokens_mean: float


def probe_from_run(payload: dict[str, Any], calibration: Sequence[Any]) -> CapacityProbe:
    """The probe of a ``serve-bench --engine vllm`` JSON. ``calibration``: the prompt samples in
    the order the probe used them (serve-bench's seeded permutation): the first one ran alone,
    the first ``10 * slots`` (or all) in the closed loop."""
    slots = int(payload["max_num_seqs"])
    capacity = payload["capacity"]
    loop = calibration[: min(len(calibration), 10 * slots)]
    return CapacityProbe(
        alone_s_per_token=float(capacity["alone_s_per_token"]),
        alone_prompt_tokens=int(calibration[0].prompt_tokens),
        alone_tokens=64,  # vllm_bench.measure_capacity's alone_len
        saturated_tokens_per_s=float(capacity["tokens_per_s"]),
        slots=slots,
        prompt_tokens_mean=float(np.mean([s.prompt_tokens for s in loop])),
        answer_tokens_mean=float(
            np.mean([max(1, min(s.response_tokens, payload["max_tokens"])) for s in loop])
        ),
    )


def solve_step_costs(
    probe: CapacityProbe, *, template_tokens: int = 30, decode_s_per_seq: float = 0.0
) -> tuple[float, float]:
    """(decode_s_base, prefill_s_per_token) from the two measurements (module doc)."""
    n = probe.alone_tokens
    a = np.array(
        [
            [n, template_tokens + probe.alone_prompt_tokens],
            [
                1 / probe.slots,
                (template_tokens + probe.prompt_tokens_mean) / probe.answer_tokens_mean,
            ],
        ]
    )
    b = np.array(
        [
            n * (probe.alone_s_per_token - decode_s_per_seq),
            1 / probe.saturated_tokens_per_s - decode_s_per_seq,
        ]
    )
    base, per_token = np.linalg.solve(a, b)
    if base <= 0 or per_token < 0:
        raise ValueError(
            f"the probe does not fit a positive step and prefill cost (base {base:.4f} s, "
            f"prefill {per_token:.6f} s/token): try another decode_s_per_seq"
        )
    return float(base), float(per_token)


def fit_engine_profile(
    probe: CapacityProbe,
    base: StepCost,
    *,
    name: str,
    source: str,
    template_tokens: int = 30,
    decode_s_per_seq: float = 0.0,
) -> StepCost:
    """``base``'s engine block (KV cache, block size, budget) with the run's ``max_num_seqs``,
    and step costs solved from ``probe``."""
    if base.engine is None:
        raise ValueError(f"--base {base.name!r} has no engine block to take the KV cache from")
    step_s, per_token = solve_step_costs(
        probe, template_tokens=template_tokens, decode_s_per_seq=decode_s_per_seq
    )
    return StepCost(
        name=name,
        decode_s_base=step_s,
        decode_s_per_seq=decode_s_per_seq,
        decode_s_per_ctx_token=0.0,
        prefill_s_base=template_tokens * per_token,
        prefill_s_per_token=per_token,
        max_batch_size=probe.slots,
        source=source,
        extra={
            **dataclasses.asdict(probe),
            "chat_template_tokens_assumed": template_tokens,
        },
        engine=dataclasses.replace(base.engine, max_num_seqs=probe.slots),
    )


def fit_measured_steps(
    decodes: Sequence[Any],
    prefills: Sequence[Any],
    base: StepCost,
    *,
    name: str,
    source: str,
    slots: int,
    template_tokens: int = 30,
    min_batch: int = 1,
) -> StepCost:
    """An engine profile from a step probe (:mod:`rtlm_adapt.engines.step_probe`).

    ``decodes`` (``batch``, ``context_tokens``, ``step_s``) of batches >= ``min_batch`` fit
    ``decode_s_base + decode_s_per_seq * batch + decode_s_per_ctx_token * context`` (non-negative
    least squares, slow outliers dropped: a shared machine only makes points slower). On a CPU
    the step is flat up to a few sequences (a pass over the weights) and grows after: a line
    through every point misses both ends, so fit the batches a loaded engine runs and say so.
    ``prefills`` (``prompt_tokens``, ``ttft_s``) fit the prefill's cost per prompt token (the
    slope); the chat template's ``template_tokens`` are charged as ``prefill_s_base``, as
    :func:`fit_engine_profile` does. The intercept beyond one step (the API server's own time per
    request) is kept in ``extra``, not charged.

    >>> from types import SimpleNamespace as S
    >>> decodes = [S(batch=b, context_tokens=b * c, step_s=0.03 + 0.002 * b + 1e-6 * b * c)
    ...            for b in (1, 4, 16) for c in (100, 1000)]
    >>> prefills = [S(prompt_tokens=p, ttft_s=0.04 + 0.0003 * p) for p in (60, 500, 1400)]
    >>> cost = fit_measured_steps(decodes, prefills, StepCost.load("vllm-cpu-smollm2-135m"),
    ...                           name="x", source="doc", slots=16)
    >>> round(cost.decode_s_per_seq * 1000, 3), round(cost.prefill_s_per_token * 1e6)
    (2.0, 300)
    >>> cost.engine.max_num_seqs, cost.max_batch_size
    (16, 16)
    """
    from rtlm_adapt.calibration.profiler import robust_fit

    if base.engine is None:
        raise ValueError(f"--base {base.name!r} has no engine block to take the KV cache from")
    fitted_decodes = [d for d in decodes if d.batch >= min_batch]
    if len({d.batch for d in fitted_decodes}) < 2 or len({p.prompt_tokens for p in prefills}) < 2:
        raise ValueError(
            f"the probe needs at least two batch sizes >= {min_batch} and two prompt lengths"
        )
    features = np.array([[1.0, d.batch, d.context_tokens] for d in fitted_decodes])
    steps = np.array([d.step_s for d in fitted_decodes])
    (step_base, per_seq, per_ctx), kept = robust_fit(features, steps)
    if step_base + per_seq <= 0:
        raise ValueError("the probe does not fit a positive decode step")
    tokens = np.array([[1.0, p.prompt_tokens] for p in prefills])
    ttft = np.array([p.ttft_s for p in prefills])
    (intercept, per_token), _ = robust_fit(tokens, ttft)
    coef = np.array([step_base, per_seq, per_ctx])
    every = np.array([[1.0, d.batch, d.context_tokens] for d in decodes])
    ratio = (every @ coef) / np.array([d.step_s for d in decodes])
    by_batch = {
        b: float(np.mean(ratio[every[:, 1] == b])) for b in sorted({d.batch for d in decodes})
    }
    return StepCost(
        name=name,
        decode_s_base=float(step_base),
        decode_s_per_seq=float(per_seq),
        decode_s_per_ctx_token=float(per_ctx),
        prefill_s_base=template_tokens * float(per_token),
        prefill_s_per_token=float(per_token),
        max_batch_size=slots,
        source=source,
        extra={
            "chat_template_tokens_assumed": template_tokens,
            "decode_fit_min_batch": min_batch,
            "decode_points_fitted": len(fitted_decodes),
            "decode_points_dropped": int((~kept).sum()),
            # fitted / measured step, mean per batch size (every point, fitted or not)
            "decode_fit_ratio_by_batch": {str(b): round(r, 3) for b, r in by_batch.items()},
            "prefill_intercept_s": float(intercept),
            "decode_samples": [[d.batch, d.context_tokens, d.step_s] for d in decodes],
            "prefill_samples": [[p.prompt_tokens, p.ttft_s] for p in prefills],
        },
        engine=dataclasses.replace(base.engine, max_num_seqs=slots),
    )
