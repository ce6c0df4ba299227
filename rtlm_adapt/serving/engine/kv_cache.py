"""The KV cache as a pool of fixed-size blocks (vLLM's paged attention), counted, not stored.

A request holds ``ceil(tokens / block_size)`` blocks for the tokens that have a slot; it gets
more as it grows, one block every ``block_size`` tokens, and gives all back when it ends or is
preempted. Prefix caching is not modelled: a request's blocks are its own.

>>> from rtlm_adapt.serving.engine.sequence import EngineSequence
>>> kv = KVCache(num_blocks=4, block_size=16)
>>> s = EngineSequence(None, prompt_tokens=40, target=8, priority=0, order=0)
>>> kv.allocate(s, 40), s.blocks, kv.free_blocks
(True, 3, 1)
>>> kv.allocate(s, 70)  # needs 5 blocks: 2 more, 1 free
False
>>> kv.free(s); kv.free_blocks
4
"""

from __future__ import annotations

from rtlm_adapt.serving.engine.sequence import EngineSequence


class KVCache:
    """Free and held block counts."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks = num_blocks

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens."""
        return -(-tokens // self.block_size)

    def can_fit(self, seq: EngineSequence, tokens: int) -> bool:
        """Whether ``seq`` could hold ``tokens`` slots with the blocks free now."""
        return self.blocks_for(tokens) - seq.blocks <= self.free_blocks

    def allocate(self, seq: EngineSequence, tokens: int) -> bool:
        """Give ``seq`` slots for ``tokens`` tokens in all; False (nothing taken) if too few
        blocks are free."""
        more = self.blocks_for(tokens) - seq.blocks
        if more <= 0:
            return True
        if more > self.free_blocks:
            return False
        self.free_blocks -= more
        seq.blocks += more
        return True

    def free(self, seq: EngineSequence) -> None:
        """Take back every block ``seq`` holds."""
        self.free_blocks += seq.blocks
        seq.blocks = 0

    @property
    def usage(self) -> float:
        """Share of blocks held (vLLM's ``kv_cache_usage_perc`` / 100)."""
        return 1.0 - self.free_blocks / self.num_blocks
