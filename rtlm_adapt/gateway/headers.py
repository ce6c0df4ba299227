"""The headers the gateway reads and writes.

Read: ``x-rtlm-deadline-ms`` (a deadline, relative to arrival) and, for benchmarks only,
``x-rtlm-oracle-tokens`` (the true length that ``oracle`` policies rank by). Written on every
answer: the request id, the backend, the predicted tokens, the priority sent upstream and how long
the request waited in the gateway's queue (``x-rtlm-queue-ms``, arrival to admission).

>>> deadline_from_header("1500", now=10.0)
11.5
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request

from rtlm_adapt.gateway.dispatcher import Ticket
from rtlm_adapt.gateway.errors import APIError
from rtlm_adapt.request import TRUE_LENGTH_KEY

DEADLINE_HEADER = "x-rtlm-deadline-ms"
#: Benchmarks only: the request's true output length, which ``oracle`` policies rank by.
ORACLE_HEADER = "x-rtlm-oracle-tokens"
#: Written on every answer: the output tokens predicted at arrival, the priority sent upstream,
#: and the milliseconds the request waited in the gateway's queue before a backend took it.
PREDICTED_HEADER = "x-rtlm-predicted-tokens"
PRIORITY_HEADER = "x-rtlm-priority"
QUEUE_HEADER = "x-rtlm-queue-ms"


def deadline_from_header(header: str | None, now: float) -> float | None:
    if header is None:
        return None
    try:
        ms = float(header)
    except ValueError:
        ms = math.nan
    if not (ms > 0 and math.isfinite(ms)):
        raise APIError(
            400,
            f"{DEADLINE_HEADER} must be a positive number of milliseconds, got {header!r}",
            param=DEADLINE_HEADER,
        )
    return now + ms / 1000.0


def oracle_metadata(header: str | None) -> dict[str, int]:
    if header is None:
        return {}
    if not header.isdigit():
        raise APIError(
            400,
            f"{ORACLE_HEADER} must be a non-negative integer, got {header!r}",
            param=ORACLE_HEADER,
        )
    return {TRUE_LENGTH_KEY: int(header)}


def completion_tokens(answer: Any) -> int:
    usage = answer.get("usage") if isinstance(answer, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError("the answer has no usage.completion_tokens")
    return tokens


def forwarded_headers(http: Request, ticket: Ticket) -> dict[str, str]:
    headers = {"x-request-id": ticket.request.id}
    auth = http.headers.get("authorization")
    if auth is not None:  # a backend started with --api-key checks the client's key
        headers["authorization"] = auth
    return headers


def ticket_headers(ticket: Ticket) -> dict[str, str]:
    backend = ticket.backend
    headers = {
        "x-request-id": ticket.request.id,
        "x-rtlm-backend": backend.name if backend is not None else "",
        PREDICTED_HEADER: f"{ticket.predicted_tokens:.0f}",
        PRIORITY_HEADER: str(ticket.priority),
    }
    if ticket.start_time is not None:
        waited_ms = (ticket.start_time - ticket.request.arrival_time) * 1000
        headers[QUEUE_HEADER] = f"{waited_ms:.1f}"
    return headers
