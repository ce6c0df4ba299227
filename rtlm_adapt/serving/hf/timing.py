"""What :mod:`rtlm_adapt.calibration.profiler` measures on an HFExecutor: the two parts of a step
(prefill, decode) and the batch-cache work of a membership change, on synthetic inputs, through
the executor's own code paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rtlm_adapt.serving.hf.kv_cache import BatchKV, KVSlice


class ProfilingHooks:
    """Timing methods mixed into :class:`~rtlm_adapt.serving.hf.HFExecutor`; they use its
    public ``prefill_ids``, ``decode_forward`` and ``sample``."""

    clock: Callable[[], float]
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    prefill_ids: Callable[..., Any]
    decode_forward: Callable[[BatchKV, Sequence[int], Sequence[int]], list[int]]
    sample: Callable[[torch.Tensor], list[int]]

    def time_prefill(self, prompt_tokens: int, batch: int = 1, seed: int = 0) -> float:
        """Wall seconds to prefill ``batch`` synthetic prompts of ``prompt_tokens`` tokens each
        and pick their first tokens (the prefill part of a step)."""
        gen = torch.Generator().manual_seed(seed)
        vocab = min(len(self.tokenizer), 1000)
        ids = torch.randint(10, vocab, (batch, prompt_tokens), generator=gen).tolist()
        t0 = self.clock()
        _, logits = self.prefill_ids(ids)
        self.sample(logits)
        return self.clock() - t0

    def _synthetic_rows(self, tokens: int) -> KVSlice:
        """A one-row K/V slice of ``tokens`` random cached tokens (attention cost does not
        depend on the values)."""
        (keys, values), _ = self.prefill_ids([[10]])
        shape = [k.shape[:2] + (tokens,) + k.shape[3:] for k in keys]
        row_keys = [torch.randn(sh).to(self.device, self.dtype) for sh in shape]
        row_values = [torch.randn(sh).to(self.device, self.dtype) for sh in shape]
        return KVSlice(row_keys, row_values, 0, 0, tokens)

    def time_decode(
        self, batch_size: int, context_tokens: int, steps: int = 3
    ) -> tuple[float, list[float]]:
        """Time decode iterations of a synthetic batch whose rows each hold ``context_tokens``.

        Returns the seconds to build the padded batch cache (what a rebuild costs) and the
        seconds of each of ``steps`` decode iterations.
        """
        parts = [self._synthetic_rows(context_tokens)] * batch_size
        t0 = self.clock()
        batch = BatchKV(parts, batch_size, steps + 1, self.dtype, self.device)
        build = self.clock() - t0
        times = []
        for i in range(steps):
            t0 = self.clock()
            self.decode_forward(batch, [10] * batch_size, [context_tokens + i] * batch_size)
            times.append(self.clock() - t0)
        return build, times

    def time_membership(
        self, batch_size: int, context_tokens: int, prompt_tokens: int, repeats: int = 3
    ) -> dict[str, float]:
        """Seconds of the batch-cache work of one membership change (no model forward), on a
        synthetic batch of ``batch_size`` rows of ``context_tokens`` cached tokens: ``leave``
        (a row removed in place), ``join`` (a ``prompt_tokens`` joiner added in place) and
        ``rebuild`` (new compacted buffers for the whole batch). Minimum over ``repeats``."""
        row = self._synthetic_rows(context_tokens)
        joiner = self._synthetic_rows(min(prompt_tokens, context_tokens))
        leave, join, rebuild = [], [], []
        for _ in range(repeats):
            t0 = self.clock()
            batch = BatchKV([row] * batch_size, batch_size, 64, self.dtype, self.device)
            rebuild.append(self.clock() - t0)
            t0 = self.clock()
            batch.remove(0)
            leave.append(self.clock() - t0)
            t0 = self.clock()
            batch.add(joiner)
            join.append(self.clock() - t0)
        return {"leave": min(leave), "join": min(join), "rebuild": min(rebuild)}
