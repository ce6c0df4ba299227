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

import aiohttp

from rtlm_adapt.gateway.dispatcher import CLIENT_LEFT, Backend, Dispatcher, NoBackendError, Ticket
from rtlm_adapt.request import FailureReason


@dataclass
class UpstreamFailure(Exception):
    """The request could not be served upstream: why (``reason``), what happened (``detail``)
    and the HTTP status the client is answered with.

    >>> UpstreamFailure(FailureReason.TIMED_OUT, "b1: TimeoutError", 504).error
    'timed_out: b1: TimeoutError'
    """

    reason: FailureReason
    detail: str
    status: int = 502

    @property
    def error(self) -> str:
        """What the client reads and the Completion records: ``"<reason>: <detail>"``."""
        return self.reason.error(self.detail)

    @classmethod
    def executor_failure(cls, detail: str) -> UpstreamFailure:
        """The backend failed: it answered 5xx, dropped the connection or broke a stream."""
        return cls(FailureReason.EXECUTOR_FAILURE, detail)


@dataclass
class UpstreamReply:
    """A backend's answer that is not a failure (2xx, or a 4xx to pass through).

    ``body`` holds the whole answer, except for a stream that answered 2xx: its ``response``
    is still open, for :meth:`Upstream.relay`.
    """

    response: aiohttp.ClientResponse
    backend: Backend
    body: bytes | None = None

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def content_type(self) -> str | None:
        return self.response.headers.get("Content-Type")

    def close(self) -> None:
        """Give the connection back, or cut it if the answer was not read to its end (cutting
        it is how vLLM learns that the client left: it aborts the request)."""
        if self.response.content.at_eof():
            self.response.release()
        else:
            self.response.close()


def upstream_session(
    read_timeout_s: float, connect_timeout_s: float = 5.0
) -> aiohttp.ClientSession:
    """The gateway's pooled HTTP client: no cap on connections (the in-flight caps bound them),
    a read timeout per chunk (a stream may run for minutes, but not stall that long)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        ),
        skip_auto_headers=("User-Agent",),
    )


class Upstream:
    """Sends requests to backends through one pooled HTTP client.

    Parameters
    ----------
    session
        The shared ``aiohttp.ClientSession`` (connection pool, timeouts; see
        :func:`upstream_session`). aiohttp, not httpx: httpx's connection pool took two thirds
        of the gateway's CPU (BENCHMARKS.md, section 7).
    dispatcher
        Frees and re-takes slots for retries, and ends requests.
    on_retry
        Called with the failed backend's name when a request is retried.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        dispatcher: Dispatcher,
        *,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.session = session
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
            url = backend.config.url + path
            try:
                response = await self.session.post(url, json=payload, headers=headers)
                if response.status < 500:
                    reply = UpstreamReply(response, backend)
                    if not body.get("stream") or response.status >= 300:
                        reply.body = await response.read()  # the answer, or an error to pass on
                    return reply
                response.release()
                failure = UpstreamFailure.executor_failure(
                    f"{backend.name} answered {response.status}"
                )
            except asyncio.TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors too
                detail = f"{backend.name}: {type(exc).__name__}"
                failure = UpstreamFailure(FailureReason.TIMED_OUT, detail, 504)
            except aiohttp.ClientConnectorError as exc:
                backend.healthy = False  # refused: down until a health check says otherwise
                failure = UpstreamFailure.executor_failure(f"{backend.name}: {exc!r}")
            except aiohttp.ClientError as exc:
                failure = UpstreamFailure.executor_failure(f"{backend.name}: {exc!r}")
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
        backend = reply.backend
        completion_tokens: int | None = None
        content_chunks = 0
        # why the request ends if the stream stops before its end: the client left, or a failure
        reason, detail = FailureReason.CANCELLED, CLIENT_LEFT
        try:
            saw_done = False
            try:
                async for raw in reply.response.content:  # one line at a time
                    line = raw.decode()
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
                        raise UpstreamFailure.executor_failure(f"{backend.name}: stream error")
                    usage = chunk.get("usage")
                    if isinstance(usage, dict) and "completion_tokens" in usage:
                        completion_tokens = int(usage["completion_tokens"])
                    if chunk.get("choices"):
                        content_chunks += 1
                        self.dispatcher.first_token(ticket)
                    elif usage is not None and not client_wants_usage:
                        continue  # the usage-only chunk the client did not ask for
                    if not client_wants_usage and "usage" in chunk:
                        del chunk["usage"]  # the null placeholder include_usage adds
                        data = json.dumps(chunk, separators=(",", ":"))
                    yield f"data: {data}\n\n".encode()
                if not saw_done:
                    raise UpstreamFailure.executor_failure(f"{backend.name}: stream ended early")
            # ValueError: a line over aiohttp's buffer (64 KiB), which no token chunk reaches
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, UpstreamFailure) as exc:
                failure = (
                    exc
                    if isinstance(exc, UpstreamFailure)
                    else UpstreamFailure.executor_failure(f"{backend.name}: {exc!r}")
                )
                reason, detail = failure.reason, failure.detail
                yield _error_event(failure.error)
                yield b"data: [DONE]\n\n"
                return
            # Without a usage chunk (a backend that ignores include_usage) each content chunk
            # stands for one token: vLLM and OpenAI send one chunk per token.
            tokens = completion_tokens if completion_tokens is not None else content_chunks
            self.dispatcher.finish(ticket, tokens)
            yield b"data: [DONE]\n\n"
        finally:
            if not ticket.ended:  # the stream stopped early (or the client left)
                self.dispatcher.finish(ticket, content_chunks, reason=reason, detail=detail)
            reply.close()

    async def abandon(self, ticket: Ticket, reply: UpstreamReply) -> None:
        """End a relayed request that stopped without ending (its stream never ran)."""
        if not ticket.ended:
            self.dispatcher.finish(ticket, 0, reason=FailureReason.CANCELLED, detail=CLIENT_LEFT)
        reply.close()


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
