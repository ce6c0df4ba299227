"""Measure a vLLM server's step cost through its API: the decode step's time against how many
sequences run and how much context they attend to, and the prefill's time against the prompt.

``rtlm-adapt profile --engine vllm --measure`` starts a server with ``--max-num-seqs K``, runs
this probe and fits a :class:`~rtlm_adapt.calibration.step_cost.StepCost` to it
(:func:`rtlm_adapt.calibration.engine_fit.fit_measured_steps`). The capacity probe of
``serve-bench`` measures only two points (a request alone, the saturated loop), enough for a step
flat in the batch up to 4 slots but not for 16, where the step grows with the batch.

- **Decode:** ``batch`` streams sent together with the same prompt length and ``max_tokens``
  (``ignore_eos``) start in the same step and end in the same step, so each stream's span from
  its first to its last token is ``tokens - 1`` decode steps of that batch. The step time is the
  median over the streams of ``span / (tokens - 1)`` (token counts from ``usage``, so a chunk that
  carries several tokens does not matter).
- **Prefill:** a request alone with ``max_tokens=1``: its time to first token is one prefill
  step of its whole prompt (chat template included: ``usage.prompt_tokens``).
- **Admission:** what admitting a request costs the batch already running
  (:func:`admission_sample`): the same decode measurement twice, once quiet and once with
  one-token requests sent among the streams. The decoders' extra time, per request, is the
  engine time a request takes from everyone else: its prefill inside a mixed step, and on a
  machine the API server shares with the engine, the server's own work on it.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

#: A sentence of plain words; prompts are whole repeats of it.
FILLER = "The quick brown fox jumps over the lazy dog near the quiet river bank. "
#: Its SmolLM2 tokens (other tokenizers differ a little: the probe reads the true count from
#: ``usage``, this only turns a requested prompt length into repeats).
FILLER_TOKENS = 15


@dataclass(frozen=True, slots=True)
class DecodeSample:
    """``batch`` sequences decoding together: the seconds of one step and the context attended."""

    batch: int
    prompt_tokens: int  # per sequence, chat template included
    tokens: int  # generated per sequence
    #: Tokens the batch attends to in its middle step: batch x (prompt + tokens / 2).
    context_tokens: float
    step_s: float


@dataclass(frozen=True, slots=True)
class PrefillSample:
    """A prompt prefilled alone: its tokens (template included) and its time to first token."""

    prompt_tokens: int
    ttft_s: float


@dataclass(frozen=True, slots=True)
class AdmissionSample:
    """``batch`` streams of ``tokens`` decoding, quiet and with ``arrivals`` one-token requests
    of ``prompt_tokens`` (chat template included) sent among them."""

    batch: int
    tokens: int
    arrivals: int
    prompt_tokens: int
    quiet_step_s: float
    step_s: float  # with the arrivals

    @property
    def per_request_s(self) -> float:
        """The decoders' extra time per arriving request."""
        return (self.step_s - self.quiet_step_s) * (self.tokens - 1) / self.arrivals


@dataclass(frozen=True, slots=True)
class _Stream:
    prompt_tokens: int
    completion_tokens: int
    sent: float
    first: float
    last: float


def filler_prompt(repeats: int) -> str:
    """A prompt of ``repeats`` filler sentences.

    >>> filler_prompt(2).count("fox")
    2
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    return (FILLER * repeats).strip()


async def _stream(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int
) -> _Stream:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:300]
            raise RuntimeError(f"the server answered HTTP {response.status_code}: {text}")
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices"):
                last = time.perf_counter()
                first = first if first is not None else last
            usage = chunk.get("usage") or usage
    if first is None or usage is None:
        raise RuntimeError("the stream ended without a token or without usage")
    return _Stream(
        prompt_tokens=int(usage["prompt_tokens"]),
        completion_tokens=int(usage["completion_tokens"]),
        sent=sent,
        first=first,
        last=last,
    )


async def decode_sample(
    url: str, model: str, *, batch: int, prompt: str, tokens: int
) -> DecodeSample:
    """One decode measurement: ``batch`` streams of ``tokens`` tokens sent together."""
    if batch < 1 or tokens < 8:
        raise ValueError(f"need batch >= 1 and tokens >= 8, got {batch} and {tokens}")
    async with httpx.AsyncClient(timeout=600.0) as client:
        streams = await asyncio.gather(
            *(_stream(client, url, model, prompt, tokens) for _ in range(batch))
        )
    short = [s.completion_tokens for s in streams if s.completion_tokens != tokens]
    if short:
        raise RuntimeError(f"asked for {tokens} tokens per stream, some got {short}")
    step_s = statistics.median((s.last - s.first) / (tokens - 1) for s in streams)
    prompt_tokens = streams[0].prompt_tokens
    return DecodeSample(
        batch=batch,
        prompt_tokens=prompt_tokens,
        tokens=tokens,
        context_tokens=batch * (prompt_tokens + tokens / 2),
        step_s=step_s,
    )


async def admission_sample(
    url: str,
    model: str,
    *,
    batch: int,
    prompt: str,
    tokens: int,
    arrivals: int,
    arrival_prompt: str,
) -> AdmissionSample:
    """One admission measurement (module doc): ``batch`` decoders quiet, then again with
    ``arrivals`` one-token requests spread over the middle 80% of their span. The server needs
    ``batch + 1`` seats, or the arrivals queue instead of joining."""
    if arrivals < 1:
        raise ValueError(f"need arrivals >= 1, got {arrivals}")
    quiet = await decode_sample(url, model, batch=batch, prompt=prompt, tokens=tokens)
    span_s = quiet.step_s * (tokens - 1)
    gap_s = 0.8 * span_s / arrivals

    async def arrive(client: httpx.AsyncClient) -> list[_Stream]:
        await asyncio.sleep(0.1 * span_s + 0.2)  # past the decoders' prefill (and the hand-off)
        sent = []
        for _ in range(arrivals):
            sent.append(asyncio.create_task(_stream(client, url, model, arrival_prompt, 1)))
            await asyncio.sleep(gap_s)
        return list(await asyncio.gather(*sent))

    async with httpx.AsyncClient(timeout=600.0) as client:
        decoders, arrived = await asyncio.gather(
            asyncio.gather(*(_stream(client, url, model, prompt, tokens) for _ in range(batch))),
            arrive(client),
        )
    start, end = max(s.first for s in decoders), min(s.last for s in decoders)
    late = [round(a.first - end, 3) for a in arrived if not start <= a.first <= end]
    if late:
        raise RuntimeError(
            f"arrivals answered outside the decoders' span (s after its end: {late})"
        )
    return AdmissionSample(
        batch=batch,
        tokens=tokens,
        arrivals=arrivals,
        prompt_tokens=arrived[0].prompt_tokens,
        quiet_step_s=quiet.step_s,
        step_s=statistics.median((s.last - s.first) / (tokens - 1) for s in decoders),
    )


async def prefill_sample(url: str, model: str, *, prompt: str) -> PrefillSample:
    """One prefill measurement: ``prompt`` alone, one token."""
    async with httpx.AsyncClient(timeout=600.0) as client:
        stream = await _stream(client, url, model, prompt, 1)
    return PrefillSample(prompt_tokens=stream.prompt_tokens, ttft_s=stream.first - stream.sent)


async def probe_steps(
    url: str,
    model: str,
    *,
    batch_sizes: Sequence[int],
    prompt_repeats: Sequence[int],
    tokens: int,
    repeats: int,
) -> tuple[list[DecodeSample], list[PrefillSample]]:
    """Every (batch, prompt) decode point and every prompt's prefill, ``repeats`` times each.

    Points are visited in a shuffled-by-rotation order per repeat, so a slow stretch of a shared
    machine does not fall on one batch size only.
    """
    await decode_sample(url, model, batch=1, prompt=filler_prompt(1), tokens=16)  # warm-up
    grid = [(b, r) for r in prompt_repeats for b in batch_sizes]
    decodes: list[DecodeSample] = []
    prefills: list[PrefillSample] = []
    for k in range(repeats):
        shift = (k * len(grid)) // max(1, repeats)
        for b, r in grid[shift:] + grid[:shift]:
            decodes.append(
                await decode_sample(url, model, batch=b, prompt=filler_prompt(r), tokens=tokens)
            )
        for r in prompt_repeats:
            for _ in range(3):  # three per point: each is one short step, noisy alone
                prefills.append(await prefill_sample(url, model, prompt=filler_prompt(r)))
    return decodes, prefills
