"""A simulated executor: costs from a StepCost profile, output lengths from the workload.

Each request generates exactly its true output length (``Request.metadata[TRUE_LENGTH_KEY]``,
capped by ``max_tokens``), one token per iteration, and every iteration costs what the profile
says for the batch at that moment. Because nothing changes between the events that matter (a
request ends, a request could join), one ``step`` call fuses all iterations up to the next such
event and computes their cost in closed form: thousands of requests simulate in well under a
second.

Two batching modes:

- ``continuous`` (vLLM / Orca): requests join and leave between iterations.
- ``static`` (transformers ``generate``, on-device runtimes): a batch runs until its longest member
  ends, every member pays for every iteration, and all results return at the end.

>>> from rtlm_adapt.request import Request, TRUE_LENGTH_KEY
>>> ex = SimulatedExecutor("gpu", StepCost.default())
>>> ex.admit([Request("a", "hi", 0.0, metadata={TRUE_LENGTH_KEY: 3}, prompt_tokens=4)], now=0.0)
>>> result = ex.step(now=0.0)
>>> result.iterations, [c.output_tokens for c in result.finished]
(3, [3])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.request import Completion, Request
from rtlm_adapt.serving.base import StepResult

BATCHING_MODES = ("continuous", "static")


@dataclass(slots=True)
class _Slot:
    request: Request
    prompt_tokens: int
    target: int  # tokens this request will generate
    generated: int = 0
    start_time: float = 0.0
    first_token_time: float | None = None


class SimulatedExecutor:
    """An executor whose iteration costs come from a :class:`StepCost` profile."""

    def __init__(
        self,
        name: str,
        cost: StepCost,
        *,
        max_batch_size: int | None = None,
        batching: str = "continuous",
        default_prompt_tokens: int = 64,
    ) -> None:
        if batching not in BATCHING_MODES:
            raise ValueError(
                f"unknown batching mode {batching!r}; expected one of {BATCHING_MODES}"
            )
        self.name = name
        self.cost = cost
        self.max_batch_size = max_batch_size or cost.max_batch_size
        self.batching = batching
        self.default_prompt_tokens = default_prompt_tokens
        self._slots: list[_Slot] = []
        self._new: list[_Slot] = []  # admitted, not yet prefilled
        self._left = 0  # requests that left since the last step (charged by the next one)

    # -- Executor protocol ---------------------------------------------------------------------
    def running(self) -> int:
        return len(self._slots)

    def running_ids(self) -> list[str]:
        return [s.request.id for s in self._slots]

    def context_tokens(self) -> int:
        return sum(s.prompt_tokens + s.generated for s in self._slots)

    def attended_tokens(self) -> int:
        """Context the decode attends to: the sum, or ``batch * longest`` when the profile's
        executor pads the batch cache to its longest member (``StepCost.padded_context``)."""
        if self.cost.padded_context and self._slots:
            return len(self._slots) * max(s.prompt_tokens + s.generated for s in self._slots)
        return self.context_tokens()

    def admit(self, requests: Sequence[Request], now: float) -> None:
        if self.batching == "static" and self._slots and requests:
            raise RuntimeError(f"{self.name}: static batching admits only into an empty batch")
        if len(self._slots) + len(requests) > self.max_batch_size:
            raise RuntimeError(
                f"{self.name}: admitting {len(requests)} would exceed max_batch_size "
                f"{self.max_batch_size} ({len(self._slots)} running)"
            )
        for request in requests:
            true_len = request.true_output_tokens
            if true_len is None:
                raise ValueError(
                    f"request {request.id!r} has no true output length; the simulated executor "
                    "needs metadata[TRUE_LENGTH_KEY]"
                )
            slot = _Slot(
                request=request,
                prompt_tokens=request.prompt_tokens or self.default_prompt_tokens,
                target=max(1, min(true_len, request.max_tokens)),
                start_time=now,
            )
            self._slots.append(slot)
            self._new.append(slot)

    def step(self, now: float, until: float = math.inf) -> StepResult:
        if not self._slots:
            raise RuntimeError(f"{self.name}: step() with an empty batch")
        cost = self.cost
        batch = len(self._slots)
        ctx0 = self.context_tokens()
        attended0 = self.attended_tokens()
        prefill = sum(s.prompt_tokens for s in self._new)
        prefill_s = (cost.prefill_s_base + cost.prefill_s_per_token * prefill) if prefill else 0.0
        # paid once per call: the prefill and the membership changes since the last call
        prefill_s += cost.membership_s(len(self._new), self._left)
        self._left = 0
        remaining = [s.target - s.generated for s in self._slots]
        if self.batching == "static":
            k = max(remaining)  # nobody joins or leaves until the longest member ends
        else:
            k = min(remaining)
            if until < math.inf:
                k = min(k, self._iterations_within(until - now, batch, attended0, prefill_s))
        duration = self._fused_cost(k, batch, attended0, prefill_s)
        first_token_at = now + self._fused_cost(1, batch, attended0, prefill_s)
        for slot in self._new:
            slot.first_token_time = first_token_at
        self._new.clear()

        end = now + duration
        finished: list[Completion] = []
        new_tokens: dict[str, int] = {}
        kept: list[_Slot] = []
        for slot in self._slots:
            made = min(k, slot.target - slot.generated)
            slot.generated += made
            new_tokens[slot.request.id] = made
            # static: k ran the longest member to its end, so the whole batch returns together
            if self.batching == "static" or slot.generated >= slot.target:
                finished.append(self._complete(slot, end))
            else:
                kept.append(slot)
        self._left += len(finished)
        self._slots = kept
        return StepResult(
            duration_s=duration,
            iterations=k,
            batch_size=batch,
            prefill_tokens=prefill,
            context_tokens=ctx0,
            attended_tokens=attended0,
            finished=finished,
            new_tokens=new_tokens,
        )

    def abort(self, request_id: str, now: float) -> Completion | None:
        for i, slot in enumerate(self._slots):
            if slot.request.id == request_id:
                del self._slots[i]
                if slot in self._new:
                    self._new.remove(slot)
                else:
                    self._left += 1
                return self._complete(slot, max(now, slot.start_time), error="aborted")
        return None

    # -- internals -----------------------------------------------------------------------------
    def _fused_cost(self, k: int, batch: int, ctx0: int, prefill_s: float) -> float:
        a, b = self.cost.fused_decode(batch, ctx0)  # k decode steps cost a*k + b*k^2
        return a * k + b * k * k + prefill_s

    def _iterations_within(self, budget: float, batch: int, ctx0: int, prefill_s: float) -> int:
        """Largest k >= 1 whose fused cost fits in ``budget`` seconds."""
        a, b = self.cost.fused_decode(batch, ctx0)
        rest = budget - prefill_s
        if rest <= a + b:
            return 1
        return max(1, int(self.cost.fused_decode_steps_within(rest, batch, ctx0)))

    def _complete(self, slot: _Slot, end: float, error: str | None = None) -> Completion:
        return Completion.of(
            slot.request,
            output_tokens=slot.generated,
            start_time=slot.start_time,
            finish_time=end,
            executor=self.name,
            prompt_tokens=slot.prompt_tokens,
            first_token_time=slot.first_token_time,
            error=error,
        )
