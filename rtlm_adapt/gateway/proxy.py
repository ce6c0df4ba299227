"""Upstream calls: send an admitted request to its backend, retry once elsewhere, relay streams.

Failures before anything reached the client (a connection refused or dropped, a timeout, a 5xx)
are retried once on another healthy backend; the request keeps its place (it is not queued
again). Once a stream has started, a failure ends the stream with an OpenAI-style error event.
A 4xx from the backend is the client's problem: it is passed through and not retried.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from rtlm_adapt.gateway.dispatcher import Backend, Dispatcher, NoBackendError, Ticket


@dataclass
class UpstreamFailure(Exception):
    """The request could not be served upstream; ``error`` starts with a failure reason."""

    error: str
    status: int = 502


@dataclass
class UpstreamReply:
    """A backend's answer that is not a failure (2xx, or a 4xx to pass through)."""

    response: httpx.Response
    backend: Backend


class Upstream:
    """Sends requests to backends through one pooled HTTP client.

    Parameters
    ----------
    client
        The shared ``httpx.AsyncClient`` (connection pool, timeouts).
    dispatcher
        Frees and re-takes slots for retries, and ends requests.
    on_retry
        Called with the failed backend's name when a request is retried.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        dispatcher: Dispatcher,
        *,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.dispatcher = dispatcher
        self.on_retry = on_retry

    async def send(
        self, ticket: Ticket, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> UpstreamReply:
        """POST ``body`` to the ticket's backend; with ``body["stream"]`` the reply is open
        (read it with :meth:`relay`). Raises :class:`UpstreamFailure` after the retry."""
        backend = ticket.backend
        assert backend is not None, "send() needs an admitted ticket"
        while True:
            payload = _payload_for(backend, ticket, body)
            request = self.client.build_request(
                "POST", backend.config.url + path, json=payload, headers=headers
            )
            try:
                response = await self.client.send(request, stream=True)
                if response.status_code < 500:
                    if not body.get("stream") or response.status_code >= 300:
                        await response.aread()  # a whole answer, or an error body to pass on
                    return UpstreamReply(response, backend)
                await response.aclose()
                failure = UpstreamFailure(
                    f"executor_failure: {backend.name} answered {response.status_code}"
                )
            except httpx.TimeoutException as exc:
                failure = UpstreamFailure(f"timed_out: {backend.name}: {type(exc).__name__}", 504)
            except httpx.ConnectError as exc:
                backend.healthy = False  # refused: down until a health check says otherwise
                failure = UpstreamFailure(f"executor_failure: {backend.name}: {exc!r}")
            except httpx.TransportError as exc:
                failure = UpstreamFailure(f"executor_failure: {backend.name}: {exc!r}")
            if len(ticket.tried) >= 2:
                raise failure
            if self.on_retry is not None:
                self.on_retry(backend.name)
            try:
                backend = await self.dispatcher.readmit(ticket)
            except NoBackendError:
                raise failure from None

    async def relay(
        self, ticket: Ticket, reply: UpstreamReply, *, client_wants_usage: bool
    ) -> AsyncIterator[bytes]:
        """The SSE stream for the client; ends the ticket exactly once, however it stops.

        The gateway always asks for the usage chunk (``stream_options.include_usage``): its
        ``completion_tokens`` is the true length the predictor learns. A client that did not
        ask for it gets the stream without it, as the backend would have sent it.
        """
        response, backend = reply.response, reply.backend
        clock = self.dispatcher.clock
        completion_tokens: int | None = None
        content_chunks = 0
        error: str | None = "cancelled: client disconnected"
        try:
            saw_done = False
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators and SSE comments
                    data = line[5:].strip()
                    if data == "[DONE]":
                        saw_done = True
                        break
                    chunk = _json_or_none(data)
                    if chunk is None:
                        yield f"data: {data}\n\n".encode()
                        continue
                    if "error" in chunk:  # the engine gave up mid-stream
                        yield f"data: {data}\n\n".encode()
                        raise UpstreamFailure(f"executor_failure: {backend.name}: stream error")
                    usage = chunk.get("usage")
                    if isinstance(usage, dict) and "completion_tokens" in usage:
                        completion_tokens = int(usage["completion_tokens"])
                    if chunk.get("choices"):
                        content_chunks += 1
                        if ticket.first_token_time is None:
                            ticket.first_token_time = clock()
                    elif usage is not None and not client_wants_usage:
                        continue  # the usage-only chunk the client did not ask for
                    if not client_wants_usage and "usage" in chunk:
                        del chunk["usage"]  # the null placeholder include_usage adds
                        data = json.dumps(chunk, separators=(",", ":"))
                    yield f"data: {data}\n\n".encode()
                if not saw_done:
                    raise UpstreamFailure(f"executor_failure: {backend.name}: stream ended early")
            except (httpx.TransportError, UpstreamFailure) as exc:
                error = (
                    exc.error
                    if isinstance(exc, UpstreamFailure)
                    else f"executor_failure: {backend.name}: {exc!r}"
                )
                yield _error_event(error)
                yield b"data: [DONE]\n\n"
                return
            # Without a usage chunk (a backend that ignores include_usage) each content chunk
            # stands for one token: vLLM and OpenAI send one chunk per token.
            tokens = completion_tokens if completion_tokens is not None else content_chunks
            error = None
            self.dispatcher.finish(ticket, tokens)
            yield b"data: [DONE]\n\n"
        finally:
            if not ticket.ended:
                self.dispatcher.finish(ticket, content_chunks, error=error)
            # Closing the connection is how vLLM learns the client left (it aborts the request).
            await _shielded(response.aclose())

    async def abandon(self, ticket: Ticket, reply: UpstreamReply) -> None:
        """End a relayed request that stopped without ending (its stream never ran)."""
        if not ticket.ended:
            self.dispatcher.finish(ticket, 0, error="cancelled: client disconnected")
        await _shielded(reply.response.aclose())


def _payload_for(backend: Backend, ticket: Ticket, body: dict[str, Any]) -> dict[str, Any]:
    payload = dict(body)
    if backend.config.send_priority:
        payload["priority"] = ticket.priority
    else:
        payload.pop("priority", None)  # only backends configured for it get one
    if payload.get("stream"):
        options = dict(payload.get("stream_options") or {})
        options["include_usage"] = True
        payload["stream_options"] = options
    return payload


def _json_or_none(data: str) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _error_event(error: str) -> bytes:
    body = {"error": {"message": error, "type": "upstream_error", "param": None, "code": 502}}
    return f"data: {json.dumps(body)}\n\n".encode()


#: Close tasks still running after their request was cancelled (kept so they are not collected).
_closing: set[asyncio.Task[Any]] = set()


async def _shielded(awaitable: Any) -> None:
    # Runs to the end even if the surrounding task is cancelled (the client went away).
    task = asyncio.ensure_future(awaitable)
    _closing.add(task)
    task.add_done_callback(_closing.discard)
    await asyncio.shield(task)
