"""EngineSpec: the scheduler settings of a serving engine, the part of a profile that selects the
simulator's engine model.

A :class:`~rtlm_adapt.calibration.step_cost.StepCost` profile with an ``engine`` block is served
by :class:`~rtlm_adapt.serving.engine.executor.EngineExecutor` (vLLM's V1 scheduler: a token
budget per step with chunked prefill, KV-cache blocks, a waiting queue in FCFS or priority order
and preemption by recompute); one without it by today's
:class:`~rtlm_adapt.serving.sim.SimulatedExecutor`. The fields are vLLM's own engine arguments.

>>> spec = EngineSpec.from_dict({"max_num_seqs": 4, "kv_cache_tokens": 1600, "block_size": 16})
>>> spec.num_blocks, spec.max_num_batched_tokens, spec.scheduling_policy
(100, 2048, 'priority')
"""

from __future__ import annotations

from dataclasses import dataclass

#: Engine models the simulator has.
ENGINE_KINDS = ("vllm-v1",)
#: vLLM's ``--scheduling-policy`` values.
SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """vLLM V1 scheduler settings (names as vLLM's engine arguments).

    Attributes
    ----------
    max_num_seqs
        Requests running at once (vLLM's ``--max-num-seqs``).
    max_num_batched_tokens
        Tokens one step computes, decodes and prefill chunks together (vLLM's default for the
        OpenAI server on most devices: 2048).
    kv_cache_tokens
        KV-cache capacity in tokens (vLLM logs it at start-up: "GPU KV cache size: N tokens").
    block_size
        Tokens per KV block (vLLM's default 16).
    scheduling_policy
        ``fcfs`` or ``priority`` (lower ``priority`` first, ties by arrival).
    reserve_full_prompt
        Admit a waiting request only when its whole prompt (plus tokens already generated, for a
        preempted one) fits in the free blocks, not just its first chunk (vLLM's
        ``scheduler_reserve_full_isl``, on by default in the vLLM this was read from, 0.32).
    handoff_s
        Seconds between a seat freeing and the next submitted request reaching the scheduler
        when nothing waits inside the engine: the end travelling back to the submitter and the
        next request travelling in, through vLLM's OpenAI server (tokenising, detokeniser
        set-up, messages between processes). The model delays each submission by it (0: an
        in-process engine).
    """

    max_num_seqs: int
    kv_cache_tokens: int
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    scheduling_policy: str = "priority"
    reserve_full_prompt: bool = True
    handoff_s: float = 0.0
    kind: str = "vllm-v1"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "kv_cache_tokens", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineSpec.{name} must be an int >= 1, got {value!r}")
        if self.kv_cache_tokens < self.block_size:
            raise ValueError(
                f"EngineSpec.kv_cache_tokens ({self.kv_cache_tokens}) holds no whole block of "
                f"{self.block_size} tokens"
            )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"EngineSpec.scheduling_policy must be one of {SCHEDULING_POLICIES}, "
                f"got {self.scheduling_policy!r}"
            )
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"EngineSpec.kind must be one of {ENGINE_KINDS}, got {self.kind!r}")
        handoff = self.handoff_s
        if isinstance(handoff, bool) or not isinstance(handoff, int | float):
            raise ValueError(f"EngineSpec.handoff_s must be a number, got {handoff!r}")
        if not 0 <= handoff < 60:
            raise ValueError(f"EngineSpec.handoff_s must be seconds in [0, 60), got {handoff!r}")
        if not isinstance(self.reserve_full_prompt, bool):
            raise ValueError(
                f"EngineSpec.reserve_full_prompt must be a bool, got {self.reserve_full_prompt!r}"
            )

    @property
    def num_blocks(self) -> int:
        """Whole KV blocks in the cache."""
        return self.kv_cache_tokens // self.block_size

    @classmethod
    def from_dict(cls, data: dict) -> EngineSpec:
        if not isinstance(data, dict):
            raise ValueError(f"a profile's engine block must be a JSON object, got {data!r}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"engine block has unknown fields: {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"engine block is missing fields: {exc}") from exc
