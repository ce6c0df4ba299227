"""The gateway's errors, in OpenAI's error format: :class:`APIError` for the refusals it decides,
:func:`error_response` for the body, :class:`BodyLimit` for bodies too large to read, and
:func:`error_param` naming the field a validation error is about.

>>> import json
>>> json.loads(error_response(429, "queue full").body)["error"]["code"]
429
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rtlm_adapt.gateway.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamOptions,
)


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return error_response(self.status, self.message, self.kind, self.param, headers)


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before anything parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[], None]) -> None:
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.on_reject()
        message = f"request body over {self.max_bytes} bytes"
        await error_response(413, message)(scope, receive, send)


class _TooLarge(BaseException):
    # A BaseException: FastAPI turns any Exception raised while it reads the body into a 400.
    pass


_FIELDS = frozenset(
    name
    for model in (ChatCompletionRequest, CompletionRequest, ChatMessage, StreamOptions)
    for name in model.model_fields
)


def error_param(loc: Any) -> str:
    """The field an error is about, from pydantic's ``loc`` ("body", field, index, ...), up to
    the first part that is neither a field nor an index: pydantic's tag of a union member."""
    parts = [str(p) for p in loc[1:2] if loc and loc[0] == "body"]
    for part in loc[2:]:
        if not (isinstance(part, int) or part in _FIELDS):
            break
        parts.append(str(part))
    return ".".join(parts)
