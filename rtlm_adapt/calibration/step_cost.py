"""StepCost: a cost model of one executor iteration, stored as a small JSON profile.

One iteration (prefill of new joiners plus one decode step for the whole batch) costs::

    step_s = decode_s_base + decode_s_per_seq * batch + decode_s_per_ctx_token * context_tokens
             + (prefill_s_base + prefill_s_per_token * prefill_tokens   if anything is prefilled)
             + join_s * joiners + leave_s * leavers

Membership changes (optional, 0 in older profiles): ``join_s`` is what a request joining a
running batch costs beyond its prefill (inserting its KV cache), ``leave_s`` what removing a
finished one costs. ``padded_context``: the executor keeps the batch's KV cache padded to its
longest member (transformers without paged attention), so attention costs as if every request
had the longest context: the simulator then charges ``batch * longest_context`` as
``context_tokens``.

This linear form fits measured CPU and GPU decode costs well in the ranges we serve (see
``rtlm-adapt profile``). The simulated executor uses it to advance virtual time, and the latency
model starts from it before it learns from real timings.

>>> cost = StepCost.default()
>>> one = cost.step_time(batch_size=1, context_tokens=100)
>>> eight = cost.step_time(batch_size=8, context_tokens=800)
>>> one < eight < 8 * one  # batching amortises the fixed cost of a step
True
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

from rtlm_adapt.calibration.engine_spec import EngineSpec

DEFAULT_PROFILE = "smollm2-135m-cpu2"
DEFAULT_SECONDARY_PROFILE = "smollm2-135m-cpu2-secondary"


#: StepCost's cost coefficients (seconds, seconds per request or per token; all >= 0).
COST_COEFFICIENTS = (
    "decode_s_base",
    "decode_s_per_seq",
    "decode_s_per_ctx_token",
    "prefill_s_base",
    "prefill_s_per_token",
    "join_s",
    "leave_s",
)


@dataclass(frozen=True, slots=True)
class StepCost:
    name: str
    decode_s_base: float
    decode_s_per_seq: float
    decode_s_per_ctx_token: float
    prefill_s_base: float
    prefill_s_per_token: float
    max_batch_size: int = 16
    kv_token_budget: int | None = None
    join_s: float = 0.0
    leave_s: float = 0.0
    padded_context: bool = False
    source: str = ""
    extra: dict = field(default_factory=dict)
    #: The engine's scheduler settings; set, the simulator serves this profile with its engine
    #: model of vLLM's V1 scheduler (``serving/engine``) instead of the plain batch model.
    engine: EngineSpec | None = None

    def __post_init__(self) -> None:
        for key in COST_COEFFICIENTS:
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(f"StepCost.{key} must be a number >= 0, got {value!r}")
        if self.decode_s_base + self.decode_s_per_seq <= 0:
            raise ValueError("StepCost: a decode step must cost more than 0 seconds")
        if not isinstance(self.padded_context, bool):
            raise ValueError(f"StepCost.padded_context must be a bool, got {self.padded_context!r}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(
                f"StepCost.max_batch_size must be an int >= 1, got {self.max_batch_size!r}"
            )
        if self.engine is not None and not isinstance(self.engine, EngineSpec):
            raise ValueError(f"StepCost.engine must be an EngineSpec or None, got {self.engine!r}")

    def step_time(
        self,
        batch_size: int,
        context_tokens: int = 0,
        prefill_tokens: int = 0,
        joins: int = 0,
        leaves: int = 0,
    ) -> float:
        """Seconds for one iteration of a batch of ``batch_size`` requests (``context_tokens``:
        the attended context, ``batch_size * longest`` for a ``padded_context`` executor)."""
        t = (
            self.decode_s_base
            + self.decode_s_per_seq * batch_size
            + self.decode_s_per_ctx_token * context_tokens
        )
        if prefill_tokens > 0:
            t += self.prefill_s_base + self.prefill_s_per_token * prefill_tokens
        return t + self.membership_s(joins, leaves)

    def membership_s(self, joins: int, leaves: int) -> float:
        """Seconds of ``joins`` requests joining and ``leaves`` leaving a running batch."""
        return self.join_s * joins + self.leave_s * leaves

    def fused_decode(self, batch_size: int, context_tokens: int) -> tuple[float, float]:
        """``(a, b)`` such that ``k`` decode steps in a row of an unchanging batch cost
        ``a * k + b * k**2`` seconds: each step attends to ``batch_size`` more tokens than the one
        before (``context_tokens``: the first step's context).

        >>> cost = StepCost(name="x", decode_s_base=0.01, decode_s_per_seq=0.0,
        ...                 decode_s_per_ctx_token=1e-4, prefill_s_base=0.0,
        ...                 prefill_s_per_token=0.0)
        >>> a, b = cost.fused_decode(2, 100)
        >>> steps = sum(cost.step_time(2, 100 + 2 * j) for j in range(3))
        >>> round(a * 3 + b * 9, 9) == round(steps, 9)
        True
        """
        a = (
            self.decode_s_base
            + self.decode_s_per_seq * batch_size
            + self.decode_s_per_ctx_token * (context_tokens - batch_size / 2)
        )
        return a, self.decode_s_per_ctx_token * batch_size / 2

    def fused_decode_steps_within(
        self, budget_s: float, batch_size: int, context_tokens: int
    ) -> float:
        """How many fused decode steps (see :meth:`fused_decode`) fit in ``budget_s`` seconds,
        as a real number (the caller rounds down)."""
        a, b = self.fused_decode(batch_size, context_tokens)
        if b <= 0:
            return budget_s / a
        return (-a + math.sqrt(a * a + 4 * b * budget_s)) / (2 * b)

    def with_max_batch(self, max_batch_size: int) -> StepCost:
        """This profile with another batch cap; an engine block's seats (``max_num_seqs``)
        follow it, since the engine admits at most that many.

        >>> StepCost.load("vllm-cpu-smollm2-135m").with_max_batch(16).engine.max_num_seqs
        16
        """
        engine = self.engine
        if engine is not None:
            engine = replace(engine, max_num_seqs=max_batch_size)
        return replace(self, max_batch_size=max_batch_size, engine=engine)

    def isolated_service_time(self, prompt_tokens: int, output_tokens: int) -> float:
        """Seconds to serve one request alone: prefill, then ``output_tokens`` decode steps."""
        n = max(1, output_tokens)
        decode = n * (self.decode_s_base + self.decode_s_per_seq)
        # context grows from prompt_tokens to prompt_tokens + n - 1 over the n steps
        decode += self.decode_s_per_ctx_token * (n * prompt_tokens + n * (n - 1) / 2)
        return decode + self.prefill_s_base + self.prefill_s_per_token * prompt_tokens

    # -- persistence -------------------------------------------------------------------------
    def to_json(self) -> str:
        data = asdict(self)
        if data["engine"] is None:  # profiles without an engine keep their old shape
            del data["engine"]
        return json.dumps(data, indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> StepCost:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"StepCost profile has unknown fields: {sorted(unknown)}")
        if data.get("engine") is not None:
            data = {**data, "engine": EngineSpec.from_dict(data["engine"])}
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"StepCost profile is missing fields: {exc}") from exc

    @classmethod
    def load(cls, path_or_name: str | Path) -> StepCost:
        """Load a profile from a JSON file, or a packaged one by name (``smollm2-135m-cpu2``)."""
        path = Path(path_or_name)
        if path.suffix == ".json" or path.exists():
            text = path.read_text()
        else:
            res = resources.files("rtlm_adapt.calibration.profiles").joinpath(
                f"{path_or_name}.json"
            )
            if not res.is_file():
                raise ValueError(
                    f"unknown cost profile {str(path_or_name)!r} (no such file or packaged name)"
                )
            text = res.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"cost profile {str(path_or_name)!r} is not valid JSON: {exc}"
            ) from exc
        return cls.from_dict(data)

    @classmethod
    def default(cls) -> StepCost:
        return cls.load(DEFAULT_PROFILE)

    @classmethod
    def default_secondary(cls) -> StepCost:
        return cls.load(DEFAULT_SECONDARY_PROFILE)
