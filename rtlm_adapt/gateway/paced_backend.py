"""A paced, fault-injecting stand-in for an OpenAI-compatible LLM engine (not a model).

The gateway's fast tests and the soak benchmark need something that *behaves* like vLLM or the
llama.cpp server on the wire, without a model: this app answers ``POST /v1/chat/completions`` and
``POST /v1/completions`` with real OpenAI-shaped JSON or SSE streams, made of deterministic words,
at a set pace (``ttft_s`` before the first token, then ``tokens_per_s``). ``max_tokens`` is the
exact number of tokens generated (``finish_reason`` is always ``"length"``).

What makes it engine-like:

* **Concurrency**: with ``max_concurrency=K`` at most K requests generate at once; the others wait
  in a queue served by (``priority``, arrival), lowest first, like vLLM's
  ``--scheduling-policy priority``. A non-integer ``priority`` is a 400, as in vLLM.
* **Abort on disconnect**: a client that goes away (queued, waiting for its first token, or
  mid-stream) stops its request and frees its slot; the log says ``"aborted"``.

What makes it useful for testing a gateway:

* **Request log** (``app.state.log``, ``GET /debug/requests``, ``POST /debug/reset``): one dict per
  request with ``seq``, ``priority``, ``max_tokens``, ``stream``, ``include_usage``, ``model``,
  ``headers`` (its ``x-*`` headers), ``received_at``/``started_at``/``finished_at``
  (``time.monotonic()`` of this process; ``started_at`` is when it got a slot) and ``outcome``:
  ``"completed"``, ``"aborted"``, ``"fault:<mode>"``, ``"invalid"`` (400) or ``"unavailable"``
  (503 while unhealthy); ``None`` while in flight.
* **Faults on demand**: per request with the header ``x-fake-fault: <mode>``; for the next N
  requests with ``POST /debug/faults {"fail_next": N, "mode": "<mode>"}``; at random with
  ``fault_rate`` (seeded) among ``fault_modes``. The modes, as an httpx client sees them:

  - ``status``: HTTP 500 with an OpenAI-style error body.
  - ``drop``: the connection is closed without a response (``httpx.RemoteProtocolError``).
  - ``midstream``: a stream sends a few chunks, then the connection is cut
    (``httpx.RemoteProtocolError`` while reading); a non-stream request is dropped.
  - ``hang``: no answer ever, until the client gives up (``httpx.ReadTimeout``).

* **Health**: ``POST /debug/health {"healthy": false}`` makes ``GET /health`` and the completion
  endpoints answer 503 until it is set back.

Start it in-process with :class:`rtlm_adapt.gateway.server_thread.ServerThread`, or as a process::

    python -m rtlm_adapt.gateway.paced_backend --port 8001 --tokens-per-s 1000 --max-concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

from rtlm_adapt.gateway.paced_request import PacedCall, parse_call
from rtlm_adapt.gateway.priority_slots import PrioritySlots

FAULT_MODES = ("status", "drop", "midstream", "hang")
FaultMode = Literal["status", "drop", "midstream", "hang"]

# The generated text cycles through these, so every response is predictable.
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
# A "midstream" fault cuts a stream after this many chunks (fewer if the stream is shorter).
_MIDSTREAM_CHUNKS = 3
# Where _PacedApp leaves the connection's transport in the ASGI scope (see _drop).
_TRANSPORT_KEY = "paced_backend.transport"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]


def token_text(i: int) -> str:
    """The text of the ``i``-th generated token (0-based), e.g. ``token_text(0) == "alpha "``."""
    return _WORDS[i % len(_WORDS)] + " "


@dataclass
class _Backend:
    """The app's state: its settings, the slots, the log and the fault switches."""

    model: str
    tokens_per_s: float
    ttft_s: float
    default_max_tokens: int
    fault_rate: float
    fault_modes: tuple[str, ...]
    seed: int
    slots: PrioritySlots
    log: list[dict[str, Any]] = field(default_factory=list)
    healthy: bool = True
    fail_next: int = 0
    fail_mode: str = "status"

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to a fresh start: empty log, seq from 0, healthy, no pending faults, reseeded."""
        self.log.clear()  # in place: app.state.log is the same list
        self._seq = itertools.count()
        self.rng = random.Random(self.seed)
        self.healthy, self.fail_next, self.fail_mode = True, 0, "status"

    def next_seq(self) -> int:
        return next(self._seq)

    def pick_fault(self, header: str | None) -> str | None:
        """The fault for a request: its header first, then ``fail_next``, then ``fault_rate``."""
        if header:
            return header
        if self.fail_next > 0:
            self.fail_next -= 1
            return self.fail_mode
        # Draw only when faults are on, so a fault-free run consumes no random numbers.
        if self.fault_rate > 0 and self.rng.random() < self.fault_rate:
            return self.rng.choice(self.fault_modes)
        return None


def _error(status: int, message: str, kind: str) -> JSONResponse:
    """An error in OpenAI's shape, which the openai client turns into its APIStatusError types."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


async def _sleep_until(deadline: float) -> None:
    delay = deadline - asyncio.get_running_loop().time()
    # Behind schedule we still yield, so one fast stream cannot starve the others.
    await asyncio.sleep(max(delay, 0.0))


async def _wait_for_disconnect(receive: Receive) -> None:
    # The body was read already, so the next message uvicorn delivers is http.disconnect: when the
    # client leaves, or once our response is complete.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _drop(scope: Scope) -> NoReturn:
    """Close the connection under the request, without (the rest of) a response."""
    transport = scope.get(_TRANSPORT_KEY)
    if transport is None:
        raise RuntimeError("dropping a connection needs uvicorn (no transport in the scope)")
    transport.close()  # what was written is flushed first, so a stream's chunks still arrive
    # uvicorn now sees the disconnect and the watcher in _Generation cancels us; returning
    # earlier would make uvicorn log "returned without completing response".
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


class _Generation(Response):
    """One admitted request, answered on the raw ASGI connection.

    The work (queue, pace, send) runs next to a watcher for the client's disconnect; whichever
    ends first wins. uvicorn does not cancel a request whose client leaves, nor does its ``send``
    fail afterwards, so the watcher is what frees the slot of an aborted request.
    """

    def __init__(
        self, backend: _Backend, call: PacedCall, entry: dict[str, Any], fault: str | None
    ):
        super().__init__()
        self.backend, self.call, self.entry, self.fault = backend, call, entry, fault
        prefix = "chatcmpl" if call.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self._run(scope, send))
        gone = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.cancel()
            gone.cancel()
            # Let the work's cleanup (releasing its slot) run before we return.
            await asyncio.gather(work, gone, return_exceptions=True)
            error = None if work.cancelled() else work.exception()
            if self.entry["outcome"] is None:
                self.entry["outcome"] = "error" if error else "aborted"
            self.entry["finished_at"] = time.monotonic()
        if error is not None:
            raise error

    async def _run(self, scope: Scope, send: Send) -> None:
        call, entry, fault = self.call, self.entry, self.fault
        if fault == "hang":
            entry["outcome"] = "fault:hang"
            await asyncio.Event().wait()  # until the client gives up
        if fault == "drop" or (fault == "midstream" and not call.stream):
            entry["outcome"] = f"fault:{fault}"
            await _drop(scope)
        if call.stream:
            # Headers go out at once, before the queue, as vLLM's StreamingResponse does.
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        async with self.backend.slots.hold(call.priority, entry["seq"]):
            entry["started_at"] = time.monotonic()
            first = asyncio.get_running_loop().time() + self.backend.ttft_s
            per_token = 1.0 / self.backend.tokens_per_s
            n = call.max_tokens
            if not call.stream:
                await _sleep_until(first + n * per_token)
                body = json.dumps(self._completion()).encode()
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            else:
                for i in range(n):
                    await _sleep_until(first + (i + 1) * per_token)
                    if fault == "midstream" and i == min(_MIDSTREAM_CHUNKS, n - 1):
                        entry["outcome"] = "fault:midstream"
                        await _drop(scope)
                    await self._send_event(send, self._chunk(i))
                if call.include_usage:
                    usage_chunk = self._envelope(self._chunk_object(), choices=[])
                    usage_chunk["usage"] = self._usage()
                    await self._send_event(send, usage_chunk)
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            entry["outcome"] = "completed"

    @staticmethod
    async def _send_event(send: Send, data: dict[str, Any]) -> None:
        chunk = b"data: " + json.dumps(data).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    # --- the OpenAI objects ---

    def _object(self) -> str:
        return "chat.completion" if self.call.chat else "text_completion"

    def _chunk_object(self) -> str:
        # Legacy completions stream "text_completion" objects, chat streams have their own.
        return "chat.completion.chunk" if self.call.chat else "text_completion"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.call.model,
            "choices": choices,
        }

    def _usage(self) -> dict[str, int]:
        prompt, completion = self.call.prompt_tokens, self.call.max_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _completion(self) -> dict[str, Any]:
        text = "".join(token_text(i) for i in range(self.call.max_tokens))
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if self.call.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        out = self._envelope(self._object(), [choice])
        out["usage"] = self._usage()
        return out

    def _chunk(self, i: int) -> dict[str, Any]:
        last = i == self.call.max_tokens - 1
        choice: dict[str, Any] = {"index": 0}
        if self.call.chat:
            # The first chunk carries the role, like vLLM's and OpenAI's.
            delta = {"role": "assistant"} if i == 0 else {}
            choice["delta"] = {**delta, "content": token_text(i)}
        else:
            choice["text"] = token_text(i)
        choice["logprobs"] = None
        choice["finish_reason"] = "length" if last else None
        out = self._envelope(self._chunk_object(), [choice])
        if self.call.include_usage:
            out["usage"] = None  # OpenAI and vLLM send null on every chunk but the last
        return out


class _PacedApp(FastAPI):
    """FastAPI, plus a handle on the connection so that a fault can drop it.

    ASGI has no "close the connection" message, and a response that fails before it starts becomes
    a 500. uvicorn's ``send`` is a method of its per-request cycle, which holds the asyncio
    transport; we note that transport in the scope before any middleware wraps ``send``.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            cycle = getattr(send, "__self__", None)
            scope[_TRANSPORT_KEY] = getattr(cycle, "transport", None)
        await super().__call__(scope, receive, send)


class _FaultsBody(BaseModel):
    fail_next: int = Field(ge=0)
    mode: FaultMode = "status"


class _HealthBody(BaseModel):
    healthy: bool


async def _completions(request: Request, backend: _Backend, *, chat: bool) -> Response:
    """Log the request, answer the 4xx/5xx that need no slot, else hand it to _Generation."""
    entry: dict[str, Any] = {
        "seq": backend.next_seq(),
        "endpoint": "chat" if chat else "completions",
        "model": None,
        "priority": None,
        "max_tokens": None,
        "stream": None,
        "include_usage": None,
        "headers": {k: v for k, v in request.headers.items() if k.startswith("x-")},
        "received_at": time.monotonic(),
        "started_at": None,
        "finished_at": None,
        "outcome": None,
    }
    backend.log.append(entry)

    def finish(outcome: str, response: Response) -> Response:
        entry["outcome"], entry["finished_at"] = outcome, time.monotonic()
        return response

    try:
        body = await request.json()
        if isinstance(body, dict):
            entry["model"] = body.get("model")
        call = parse_call(
            body,
            chat=chat,
            default_model=backend.model,
            default_max_tokens=backend.default_max_tokens,
        )
        header = request.headers.get("x-fake-fault")
        if header and header not in FAULT_MODES:
            raise ValueError(f"x-fake-fault must be one of {FAULT_MODES}, got {header!r}")
    except ValueError as exc:  # bad JSON (JSONDecodeError is a ValueError) or a bad field
        return finish("invalid", _error(400, str(exc), "BadRequestError"))
    entry.update(
        priority=call.priority,
        max_tokens=call.max_tokens,
        stream=call.stream,
        include_usage=call.include_usage,
    )
    if not backend.healthy:
        return finish("unavailable", _error(503, "the backend is unhealthy", "ServiceUnavailable"))
    fault = backend.pick_fault(header)
    if fault == "status":
        return finish("fault:status", _error(500, "injected fault", "InternalServerError"))
    return _Generation(backend, call, entry, fault)


def create_app(
    *,
    model: str = "paced",
    tokens_per_s: float = 1000.0,
    ttft_s: float = 0.0,
    default_max_tokens: int = 16,
    max_concurrency: int | None = None,
    fault_rate: float = 0.0,
    fault_modes: Sequence[str] = ("status", "drop", "midstream"),
    seed: int = 0,
) -> FastAPI:
    """The paced backend as an ASGI app; ``app.state.log`` is its request log (see the module)."""
    if not tokens_per_s > 0:
        raise ValueError("tokens_per_s must be > 0")
    if ttft_s < 0:
        raise ValueError("ttft_s must be >= 0")
    if default_max_tokens < 1:
        raise ValueError("default_max_tokens must be >= 1")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1 or None")
    if not 0.0 <= fault_rate <= 1.0:
        raise ValueError("fault_rate must be in [0, 1]")
    if not fault_modes or not set(fault_modes) <= set(FAULT_MODES):
        raise ValueError(f"fault_modes must be a non-empty subset of {FAULT_MODES}")

    backend = _Backend(
        model=model,
        tokens_per_s=tokens_per_s,
        ttft_s=ttft_s,
        default_max_tokens=default_max_tokens,
        fault_rate=fault_rate,
        fault_modes=tuple(fault_modes),
        seed=seed,
        slots=PrioritySlots(max_concurrency),
    )
    app = _PacedApp(title="paced backend", docs_url=None, redoc_url=None)
    app.state.backend = backend
    app.state.log = backend.log

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _completions(request, backend, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _completions(request, backend, chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model, "object": "model", "created": 0, "owned_by": "rtlm-adapt"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        if backend.healthy:
            return PlainTextResponse("ok")
        return PlainTextResponse("unhealthy", status_code=503)

    @app.get("/debug/requests")
    async def debug_requests() -> Response:
        return JSONResponse(backend.log)

    @app.get("/debug/state")
    async def debug_state() -> dict[str, Any]:
        return {
            "running": backend.slots.running,
            "waiting": backend.slots.waiting,
            "healthy": backend.healthy,
            "fail_next": backend.fail_next,
            "fail_mode": backend.fail_mode,
        }

    @app.post("/debug/reset")
    async def debug_reset() -> dict[str, bool]:
        backend.reset()
        return {"ok": True}

    @app.post("/debug/faults")
    async def debug_faults(body: _FaultsBody) -> dict[str, Any]:
        backend.fail_next, backend.fail_mode = body.fail_next, body.mode
        return {"fail_next": backend.fail_next, "mode": backend.fail_mode}

    @app.post("/debug/health")
    async def debug_health(body: _HealthBody) -> dict[str, bool]:
        backend.healthy = body.healthy
        return {"healthy": backend.healthy}

    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rtlm_adapt.gateway.paced_backend",
        description="A paced, fault-injecting OpenAI-compatible test backend (not a model).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default="paced")
    parser.add_argument("--tokens-per-s", type=float, default=1000.0)
    parser.add_argument("--ttft-s", type=float, default=0.0)
    parser.add_argument("--default-max-tokens", type=int, default=16)
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument(
        "--fault-modes",
        default="status,drop,midstream",
        help="comma-separated, from " + ",".join(FAULT_MODES),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-keep-alive", type=int, default=5)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    app = create_app(
        model=args.model,
        tokens_per_s=args.tokens_per_s,
        ttft_s=args.ttft_s,
        default_max_tokens=args.default_max_tokens,
        max_concurrency=args.max_concurrency,
        fault_rate=args.fault_rate,
        fault_modes=[m.strip() for m in args.fault_modes.split(",") if m.strip()],
        seed=args.seed,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_keep_alive=args.timeout_keep_alive,
    )


if __name__ == "__main__":
    main()
