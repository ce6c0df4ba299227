"""EngineScheduler: one step's choice of work, after vLLM's V1 ``Scheduler.schedule``.

Each step has a token budget (``max_num_batched_tokens``) and at most ``max_num_seqs`` running
requests. The scheduler:

1. serves the **running** requests first, in the order they started: each gets the tokens it
   still has to compute (one for a decode, the rest of its prompt for a prefill, cut to the
   budget: chunked prefill) and KV slots for them. When the cache has no block left for one,
   vLLM **preempts**: the worst running request, by (priority, arrival) under the priority
   policy or the last started under FCFS, loses its KV and goes back to the waiting queue, to
   be recomputed from scratch; this repeats until the request fits or is itself the victim
   (then nothing after it runs this step);
2. then, only if nobody was preempted, admits **waiting** requests in queue order while budget,
   seats and blocks last. The head of the queue blocks those behind it (no skipping), and with
   ``reserve_full_prompt`` it is admitted only once its whole prompt fits in the free blocks.

After the step, :meth:`EngineScheduler.complete` counts the computed tokens, samples a token for
every request whose computed count reached its length, and frees the finished ones.

>>> from rtlm_adapt.calibration.engine_spec import EngineSpec
>>> from rtlm_adapt.serving.engine.sequence import EngineSequence
>>> sched = EngineScheduler(EngineSpec(max_num_seqs=2, kv_cache_tokens=64, block_size=16,
...                                    max_num_batched_tokens=8))
>>> sched.add(EngineSequence(None, prompt_tokens=12, target=2, priority=0, order=0))
>>> plan = sched.schedule()  # a 12-token prompt, 8 tokens a step: chunked
>>> [n for _, n in plan.scheduled], plan.prefill_tokens
([8], 8)
>>> sched.complete(plan), [n for _, n in sched.schedule().scheduled]
(([], []), [4])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rtlm_adapt.calibration.engine_spec import EngineSpec
from rtlm_adapt.serving.engine.kv_cache import KVCache
from rtlm_adapt.serving.engine.sequence import EngineSequence
from rtlm_adapt.serving.engine.waiting_queue import create_waiting_queue


@dataclass(slots=True)
class StepPlan:
    """What one step computes."""

    #: (request, tokens to compute) in scheduling order.
    scheduled: list[tuple[EngineSequence, int]] = field(default_factory=list)
    #: Requests computing one decode token, and the context (tokens) they attend to.
    decodes: int = 0
    decode_context: int = 0
    #: Prompt or recompute tokens in the step (chunked prefill).
    prefill_tokens: int = 0
    preempted: list[EngineSequence] = field(default_factory=list)
    #: Waiting requests that started running in this step.
    admitted: int = 0

    def add(self, seq: EngineSequence, tokens: int) -> None:
        self.scheduled.append((seq, tokens))
        if seq.is_decoding:
            self.decodes += 1
            self.decode_context += seq.num_tokens
        else:
            self.prefill_tokens += tokens

    def drop(self, seq: EngineSequence) -> int:
        """Take ``seq`` out of the plan (it was preempted); the tokens it had."""
        for i, (s, tokens) in enumerate(self.scheduled):
            if s is seq:
                del self.scheduled[i]
                if seq.is_decoding:
                    self.decodes -= 1
                    self.decode_context -= seq.num_tokens
                else:
                    self.prefill_tokens -= tokens
                return tokens
        return 0


class EngineScheduler:
    """vLLM V1's scheduling of running and waiting requests over a block KV cache."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.kv = KVCache(spec.num_blocks, spec.block_size)
        self.waiting = create_waiting_queue(spec.scheduling_policy)
        self.running: list[EngineSequence] = []
        self.preemptions = 0  # in all, as vLLM's num_preemptions_total

    def add(self, seq: EngineSequence) -> None:
        """A request arrives in the waiting queue."""
        self.waiting.add(seq)

    def remove(self, seq: EngineSequence) -> None:
        """Take out a request wherever it is and free its blocks (an abort)."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.kv.free(seq)

    # -- one step ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Choose this step's work (and preempt, where the cache runs out)."""
        plan = StepPlan()
        budget = self._schedule_running(plan)
        if not plan.preempted:
            self._schedule_waiting(plan, budget)
        return plan

    def complete(self, plan: StepPlan) -> tuple[list[EngineSequence], list[EngineSequence]]:
        """The step ran: count computed tokens, sample, free the finished. Returns (requests that
        sampled a token, requests that finished)."""
        sampled: list[EngineSequence] = []
        finished: list[EngineSequence] = []
        for seq, tokens in plan.scheduled:
            seq.computed += tokens
            if seq.computed == seq.num_tokens:
                seq.generated += 1
                sampled.append(seq)
                if seq.generated >= seq.target:
                    finished.append(seq)
        if finished:
            for seq in finished:
                self.kv.free(seq)
            done = set(map(id, finished))
            self.running = [s for s in self.running if id(s) not in done]
        return sampled, finished

    # -- identical decode steps, fused -----------------------------------------------------------
    def decode_steps_possible(self, limit: int) -> int:
        """How many more decode-only steps of every running request the free blocks allow, up
        to ``limit`` (call when all running requests are decoding). Binary search: the blocks
        needed only grow with the steps."""
        kv, running = self.kv, self.running

        def need(steps: int) -> int:
            return sum(kv.blocks_for(s.computed + steps) - s.blocks for s in running)

        low, high = 0, limit
        while low < high:
            mid = (low + high + 1) // 2
            if need(mid) <= kv.free_blocks:
                low = mid
            else:
                high = mid - 1
        return low

    def advance_decodes(self, steps: int) -> list[EngineSequence]:
        """Run ``steps`` decode steps of every running request at once (they fit: see
        :meth:`decode_steps_possible`); returns the requests that finished."""
        finished = []
        for seq in self.running:
            seq.computed += steps
            seq.generated += steps
            self.kv.allocate(seq, seq.computed)
            if seq.generated >= seq.target:
                finished.append(seq)
        for seq in finished:
            self.kv.free(seq)
        if finished:
            self.running = [s for s in self.running if s.generated < s.target]
        return finished

    # -- internals -------------------------------------------------------------------------------
    def _schedule_running(self, plan: StepPlan) -> int:
        """Schedule the running requests in order, preempting where blocks run out; returns the
        token budget left."""
        budget = self.spec.max_num_batched_tokens
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            tokens = min(seq.to_compute, budget)
            while not self.kv.allocate(seq, seq.computed + tokens):
                victim = self._victim()
                position = running.index(victim)
                budget += self._preempt(victim, plan)
                if victim is seq:
                    return budget  # it was the worst: it and those after it wait
                if position < i:
                    i -= 1
            plan.add(seq, tokens)
            budget -= tokens
            i += 1
        return budget

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> None:
        spec, kv, waiting, running = self.spec, self.kv, self.waiting, self.running
        while budget > 0 and waiting and len(running) < spec.max_num_seqs:
            seq = waiting.peek()
            if spec.reserve_full_prompt and not kv.can_fit(seq, seq.num_tokens):
                break
            tokens = min(seq.to_compute, budget)
            if not kv.allocate(seq, seq.computed + tokens):
                break
            waiting.pop()
            running.append(seq)
            plan.add(seq, tokens)
            plan.admitted += 1
            budget -= tokens

    def _victim(self) -> EngineSequence:
        if self.spec.scheduling_policy == "priority":
            return max(self.running, key=lambda s: s.rank)
        return self.running[-1]

    def _preempt(self, seq: EngineSequence, plan: StepPlan) -> int:
        """Recompute ``seq`` from scratch later: free its KV, back to the waiting queue. Returns
        the budget it had taken in this step (0 if it was not scheduled yet)."""
        restored = plan.drop(seq)
        self.running.remove(seq)
        self.kv.free(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.prepend(seq)
        plan.preempted.append(seq)
        return restored
