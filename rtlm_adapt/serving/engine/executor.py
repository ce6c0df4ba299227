"""EngineExecutor: a simulated vLLM engine behind the library's Executor seam.

What the controller admits enters the engine's waiting queue (with vLLM's ``priority``, from
``priority_of``); from there :class:`~rtlm_adapt.serving.engine.scheduler.EngineScheduler`
decides each step, as vLLM's V1 scheduler does. So ``running()`` counts what is in flight in the
engine, waiting or running, and ``max_batch_size`` is the in-flight cap the controller fills (the
gateway's ``--max-inflight``), which may exceed the engine's ``max_num_seqs``.

Each step costs what the profile's :class:`~rtlm_adapt.calibration.step_cost.StepCost` says for
its batch: ``decode_s_base + decode_s_per_seq * decodes + decode_s_per_ctx_token * context``,
plus ``prefill_s_base + prefill_s_per_token * prefill_tokens`` when it computes prompt chunks.
Each request generates exactly its true length (``metadata[TRUE_LENGTH_KEY]``, capped by
``max_tokens``); its first token comes with its last prefill chunk, as in vLLM. Steps in which
only decodes run, nobody ends, nobody can join and no block runs out are all alike: one ``step``
call fuses them and prices them in closed form. With a ``handoff_s`` in the engine block, an
admitted request reaches the scheduler that much later (vLLM's API server between them), and a
step with nothing to run but such a request just waits for it.

>>> from rtlm_adapt.calibration.engine_spec import EngineSpec
>>> from rtlm_adapt.request import Request, TRUE_LENGTH_KEY
>>> cost = StepCost("toy", 0.01, 0.0, 0.0, 0.0, 0.001, max_batch_size=4,
...                 engine=EngineSpec(max_num_seqs=4, kv_cache_tokens=4096))
>>> ex = EngineExecutor("primary", cost)
>>> ex.admit([Request("a", "hi", 0.0, metadata={TRUE_LENGTH_KEY: 5}, prompt_tokens=100)], 0.0)
>>> r = ex.step(0.0)  # the prefill (0.01 + 100 x 0.001 s), which samples the first token
>>> r.iterations, round(r.duration_s, 3), r.new_tokens
(1, 0.11, {'a': 1})
>>> r = ex.step(0.11)  # then 4 decodes of 0.01 s each, fused into one call
>>> r.iterations, round(r.duration_s, 3), [c.output_tokens for c in r.finished]
(4, 0.04, [5])
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.request import Completion, Request
from rtlm_adapt.serving.base import StepResult
from rtlm_adapt.serving.engine.scheduler import EngineScheduler, StepPlan
from rtlm_adapt.serving.engine.sequence import EngineSequence


def no_priority(request: Request) -> int:
    """vLLM's default priority: 0 for every request (ties go by arrival)."""
    return 0


class EngineExecutor:
    """A simulated vLLM V1 engine: waiting queue, token budget, KV blocks, preemption."""

    def __init__(
        self,
        name: str,
        cost: StepCost,
        *,
        max_batch_size: int | None = None,
        priority_of: Callable[[Request], int] = no_priority,
        default_prompt_tokens: int = 64,
    ) -> None:
        if cost.engine is None:
            raise ValueError(f"profile {cost.name!r} has no engine block: use SimulatedExecutor")
        self.name = name
        self.cost = cost
        self.max_batch_size = max_batch_size or cost.max_batch_size
        self.priority_of = priority_of
        self.default_prompt_tokens = default_prompt_tokens
        self.scheduler = EngineScheduler(cost.engine)
        self._seqs: dict[str, EngineSequence] = {}  # in flight, by request id
        # admitted but still on the way in (handoff_s): (when the scheduler sees it, sequence)
        self._incoming: deque[tuple[float, EngineSequence]] = deque()
        self._refused: list[Completion] = []  # too long for the whole cache; ended next step
        self._arrivals = 0

    # -- Executor protocol ---------------------------------------------------------------------
    def running(self) -> int:
        return len(self._seqs) + len(self._refused)

    def running_ids(self) -> list[str]:
        return [*self._seqs, *(c.request_id for c in self._refused)]

    @property
    def preemptions(self) -> int:
        """Preemptions so far (vLLM's ``num_preemptions_total``)."""
        return self.scheduler.preemptions

    def admit(self, requests: Sequence[Request], now: float) -> None:
        if self.running() + len(requests) > self.max_batch_size:
            raise RuntimeError(
                f"{self.name}: admitting {len(requests)} would exceed the in-flight cap "
                f"{self.max_batch_size} ({self.running()} in flight)"
            )
        capacity = self.scheduler.kv.num_blocks * self.scheduler.kv.block_size
        for request in requests:
            true_len = request.true_output_tokens
            if true_len is None:
                raise ValueError(
                    f"request {request.id!r} has no true output length; the simulated engine "
                    "needs metadata[TRUE_LENGTH_KEY]"
                )
            seq = EngineSequence(
                request=request,
                prompt_tokens=request.prompt_tokens or self.default_prompt_tokens,
                target=max(1, min(true_len, request.max_tokens)),
                priority=int(self.priority_of(request)),
                order=self._arrivals,
                start_time=now,
            )
            self._arrivals += 1
            if seq.prompt_tokens + seq.target > capacity:  # vLLM refuses it (max_model_len)
                self._refused.append(
                    self._complete(seq, now, error=f"needs more than the {capacity}-token cache")
                )
                continue
            self._seqs[request.id] = seq
            self._incoming.append((now + self.cost.engine.handoff_s, seq))
        self._receive(now)

    def step(self, now: float, until: float = math.inf) -> StepResult:
        finished, self._refused = self._refused, []
        if not self._seqs:
            if not finished:
                raise RuntimeError(f"{self.name}: step() with nothing in flight")
            return StepResult(duration_s=0.0, iterations=0, batch_size=0, finished=finished)
        self._receive(now)
        sched = self.scheduler
        if not sched.running and not sched.waiting:  # only requests on the way in: wait
            ready = self._incoming[0][0]
            return StepResult(duration_s=ready - now, iterations=0, batch_size=0, finished=finished)
        if self._incoming:  # fused steps stop when the next request comes in
            until = min(until, self._incoming[0][0])
        plan = self._next_plan()
        first_s = self._step_s(plan)
        end = now + first_s
        sampled, ended = sched.complete(plan)
        new_tokens = {s.request.id: 1 for s in sampled}
        for seq in sampled:
            if seq.first_token_time is None:
                seq.first_token_time = end
        iterations = 1
        if self._fusable(plan, ended):
            extra, extra_s = self._fuse(until - end)
            if extra:
                ended = sched.advance_decodes(extra)
                end += extra_s
                iterations += extra
                for seq in sched.running + ended:
                    new_tokens[seq.request.id] += extra
        for seq in ended:
            del self._seqs[seq.request.id]
            finished.append(self._complete(seq, end))
        return StepResult(
            duration_s=end - now,
            iterations=iterations,
            batch_size=len(plan.scheduled),
            prefill_tokens=plan.prefill_tokens,
            context_tokens=plan.decode_context,
            attended_tokens=plan.decode_context,
            finished=finished,
            new_tokens=new_tokens,
        )

    def abort(self, request_id: str, now: float) -> Completion | None:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            for i, refused in enumerate(self._refused):
                if refused.request_id == request_id:
                    return self._refused.pop(i)
            return None
        incoming = [entry for entry in self._incoming if entry[1] is not seq]
        if len(incoming) < len(self._incoming):
            self._incoming = deque(incoming)
        else:
            self.scheduler.remove(seq)
        return self._complete(seq, max(now, seq.start_time), error="aborted")

    # -- internals -----------------------------------------------------------------------------
    def _receive(self, now: float) -> None:
        """Hand the scheduler the requests that have come in by ``now``, in submission order."""
        while self._incoming and self._incoming[0][0] <= now:
            self.scheduler.add(self._incoming.popleft()[1])

    def _next_plan(self) -> StepPlan:
        """The next step with work in it. A step can come out empty when the first running
        request needed a block and was itself the one to preempt (vLLM then runs nothing); each
        such try preempts one more request, so work comes within len(running) + 1 tries."""
        for _ in range(len(self.scheduler.running) + 1):
            plan = self.scheduler.schedule()
            if plan.scheduled:
                return plan
        raise RuntimeError(f"{self.name}: no request can be scheduled (KV cache too small?)")

    def _step_s(self, plan: StepPlan) -> float:
        c = self.cost
        s = c.decode_s_base + c.decode_s_per_seq * plan.decodes
        s += c.decode_s_per_ctx_token * plan.decode_context
        if plan.prefill_tokens:
            s += c.prefill_s_base + c.prefill_s_per_token * plan.prefill_tokens
        return s

    def _fusable(self, plan: StepPlan, ended: list[EngineSequence]) -> bool:
        """Whether the next steps repeat this one: decodes only, every running request in it,
        nobody ended, preempted or admitted (so whoever waits still cannot start)."""
        return (
            not ended
            and not plan.preempted
            and plan.admitted == 0
            and plan.prefill_tokens == 0
            and plan.decodes == len(self.scheduler.running)
        )

    def _fuse(self, budget_s: float) -> tuple[int, float]:
        """How many more identical decode steps to run (until one request ends, the blocks run
        out or ``budget_s`` seconds pass), and what they cost."""
        running = self.scheduler.running
        n = len(running)
        limit = min(s.remaining for s in running)
        if limit <= 0 or budget_s <= 0:
            return 0, 0.0
        ctx = sum(s.num_tokens for s in running)  # context of the first fused step
        a, b = self.cost.fused_decode(n, ctx)  # k steps cost a*k + b*k^2
        if budget_s < math.inf:
            limit = min(limit, int(self.cost.fused_decode_steps_within(budget_s, n, ctx)))
        steps = self.scheduler.decode_steps_possible(limit) if limit > 0 else 0
        return steps, a * steps + b * steps * steps

    def _complete(self, seq: EngineSequence, end: float, error: str | None = None) -> Completion:
        return Completion.of(
            seq.request,
            output_tokens=seq.generated,
            start_time=seq.start_time,
            finish_time=end,
            executor=self.name,
            prompt_tokens=seq.prompt_tokens,
            first_token_time=seq.first_token_time,
            error=error,
        )
