"""EngineSequence: one request inside the engine model, as vLLM's scheduler sees it.

vLLM does not know phases: a request has ``num_tokens`` (prompt + generated) and
``num_computed_tokens`` (those whose KV is in the cache), and each step computes some of the
difference. When a step brings the computed count up to ``num_tokens`` the model samples a new
token: the last prefill chunk samples the first output token, every decode step (one token to
compute) the next one. A preempted request loses its KV (``computed = 0``) and recomputes prompt
and generated tokens as one long prefill before it samples again.

>>> s = EngineSequence(request=None, prompt_tokens=5, target=3, priority=0, order=0)
>>> s.to_compute, s.is_decoding
(5, False)
>>> s.computed = 5; s.generated = 1
>>> s.to_compute, s.is_decoding, s.remaining
(1, True, 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, eq=False)
class EngineSequence:
    """A request in the engine: its sizes, its progress and its place in the queues."""

    request: Any  # the Request it serves (Any: the doctest needs none)
    prompt_tokens: int
    target: int  # output tokens it will generate
    priority: int  # vLLM's priority: lower runs first
    order: int  # arrival order in the engine: vLLM's tie-break (its arrival_time)
    generated: int = 0
    computed: int = 0  # tokens whose KV is cached
    blocks: int = 0  # KV blocks held
    preemptions: int = 0
    start_time: float = 0.0
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.generated

    @property
    def to_compute(self) -> int:
        """Tokens still to compute before the next sample."""
        return self.num_tokens - self.computed

    @property
    def is_decoding(self) -> bool:
        return self.to_compute == 1 and self.generated > 0

    @property
    def remaining(self) -> int:
        """Output tokens still to generate."""
        return self.target - self.generated

    @property
    def rank(self) -> tuple[int, int]:
        """vLLM's order among requests: (priority, arrival); the largest is preempted first."""
        return (self.priority, self.order)

    def __lt__(self, other: EngineSequence) -> bool:  # heap order of the priority queue
        return self.rank < other.rank
