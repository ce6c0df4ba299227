"""The gateway's ASGI app: an OpenAI-compatible API in front of OpenAI-compatible backends.

Per request: score and predict at arrival (no model call on the default lexical tier; on the
encoder tier the prompt embedding is computed on a worker thread, one at a time, so the event
loop keeps relaying), queue in the controller, wait for a backend slot (the dispatcher), send
upstream with vLLM's ``priority`` set from the controller's key, relay the answer, and teach the
predictor the true length from ``usage``.

>>> from rtlm_adapt.gateway.config import BackendConfig, GatewayConfig
>>> app = create_app(GatewayConfig(backends=(BackendConfig("http://127.0.0.1:9"),)))
>>> sorted(p for p in app.openapi()["paths"])
['/health', '/metrics', '/v1/chat/completions', '/v1/completions', '/v1/models']
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.gateway.config import GatewayConfig
from rtlm_adapt.gateway.controller_setup import make_controller
from rtlm_adapt.gateway.dispatcher import (
    CLIENT_LEFT,
    Backend,
    Dispatcher,
    ShuttingDown,
    Ticket,
    monotonic_clock,
)
from rtlm_adapt.gateway.errors import APIError, BodyLimit, error_param, error_response
from rtlm_adapt.gateway.headers import (
    DEADLINE_HEADER,
    ORACLE_HEADER,
    completion_tokens,
    deadline_from_header,
    forwarded_headers,
    oracle_metadata,
    ticket_headers,
)
from rtlm_adapt.gateway.metrics import GatewayMetrics
from rtlm_adapt.gateway.proxy import Upstream, UpstreamFailure, UpstreamReply, upstream_session
from rtlm_adapt.gateway.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelList,
    prompt_text,
)
from rtlm_adapt.request import ControllerClosedError, FailureReason, QueueFullError
from rtlm_adapt.request import Request as ServingRequest

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed body or header"},
    413: {"model": ErrorResponse, "description": "Body too large"},
    429: {"model": ErrorResponse, "description": "Queue full (see Retry-After)"},
    502: {"model": ErrorResponse, "description": "Every backend tried failed"},
    503: {"model": ErrorResponse, "description": "Shed (deadline cannot be met) or shutting down"},
    504: {"model": ErrorResponse, "description": "The backend timed out"},
}
#: One server-sent event of a streamed answer: its data is a JSON chunk (or an error object) or
#: the final "[DONE]".
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
#: The request headers the completion endpoints read (documented, parsed by the gateway itself).
_COMPLETION_HEADERS: dict[str, Any] = {
    "parameters": [
        {
            "name": DEADLINE_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0},
            "description": "Deadline in milliseconds after arrival (with --shed: 503 at arrival "
            "when the prediction says it cannot be met)",
        }
    ]
}
_COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ChatCompletion,
        "description": "The backend's answer; with stream=true an SSE stream of chunks",
        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
    },
    **_ERRORS,
}


class Gateway:
    """The running gateway: settings, controller, dispatcher, upstream client and metrics.

    Parameters
    ----------
    config
        The settings.
    controller
        A controller to use (default: restored from ``config.state`` if that file exists, else
        a new one with ``config.policy``).
    """

    def __init__(self, config: GatewayConfig, controller: AdaptiveController | None = None) -> None:
        self.config = config
        self.clock = monotonic_clock()
        self.controller = controller if controller is not None else make_controller(config)
        self.metrics = GatewayMetrics()
        self.backends = [Backend(b, config.inflight_cap(b)) for b in config.backends]
        self.dispatcher = Dispatcher(
            self.controller, self.backends, clock=self.clock, on_end=self._on_end
        )
        self.session: aiohttp.ClientSession | None = None
        self.upstream: Upstream | None = None
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._health_task: asyncio.Task[None] | None = None
        self._ended_at_save = 0
        # The encoder tier embeds each prompt (milliseconds of CPU): on one worker thread, so
        # the event loop keeps relaying and the encoder is never run twice at once, and with one
        # torch thread, so it leaves the other cores to the engine beside it.
        self._encoding = (
            concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="rtlm-encode", initializer=_one_torch_thread
            )
            if self.controller.predictor.tier == "encoder"
            else None
        )
        self._wire_gauges()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self.session = upstream_session(self.config.request_timeout_s)
        self.upstream = Upstream(
            self.session,
            self.dispatcher,
            on_retry=lambda name: self.metrics.retries.labels(name).inc(),
        )
        if self._encoding is not None:  # load the encoder now, not on the first request
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._encoding, self.controller.prompt_features, "Hi.")
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        self.controller.close()
        self.dispatcher.shutdown()
        self.save_state()
        if self._encoding is not None:
            self._encoding.shutdown(wait=False, cancel_futures=True)
        if self.session is not None:
            await self.session.close()

    def save_state(self) -> None:
        if self.config.state is None:
            return
        try:
            self.controller.save(self.config.state)
        except OSError:
            logger.exception("could not save the gateway state to %s", self.config.state)
        self._ended_at_save = self._ended()

    async def check_health(self) -> None:
        """Ask every backend's ``/health``; take failing ones out of rotation, put back the
        ones that answer."""
        session = self.session
        assert session is not None, "start() first"
        timeout = aiohttp.ClientTimeout(total=min(2.0, self.config.health_interval_s))

        async def probe(backend: Backend) -> None:
            try:
                async with session.get(backend.config.url + "/health", timeout=timeout) as r:
                    healthy = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                healthy = False
            if healthy != backend.healthy:
                logger.warning("backend %s is %s", backend.name, "up" if healthy else "DOWN")
            backend.healthy = healthy

        await asyncio.gather(*(probe(b) for b in self.backends))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.check_health()
                self.dispatcher.pump()  # a backend back in rotation, a new policy epoch
                if self._ended() > self._ended_at_save:
                    self.save_state()  # between the count-based autosaves, every few seconds
            except Exception:  # keep checking whatever one round did
                logger.exception("health check round failed")

    # -- requests --------------------------------------------------------------------------------
    async def handle(
        self, http: Request, body: ChatCompletionRequest | CompletionRequest, path: str
    ) -> Response:
        """Serve one completion request (streamed or not), from arrival to its end."""
        text = _predictor_prompt(body)
        features = None
        if self._encoding is not None:
            loop = asyncio.get_running_loop()
            features = await loop.run_in_executor(
                self._encoding, self.controller.prompt_features, text
            )
        ticket = self._submit(http, body, text, features)
        payload = body.model_dump(exclude_unset=True)
        headers = forwarded_headers(http, ticket)
        relaying = False
        try:
            if not body.stream:
                return await _until_disconnect(http, self._complete(ticket, path, payload, headers))
            outcome = await _until_disconnect(
                http, self._admitted_reply(ticket, path, payload, headers)
            )
            if not isinstance(outcome, UpstreamReply):
                return outcome
            wants_usage = bool(body.stream_options and body.stream_options.include_usage)
            relaying = True  # from here the relay (or its cleanup) ends the request
            return _RelayResponse(
                self.upstream.relay(ticket, outcome, client_wants_usage=wants_usage),
                cleanup=lambda: self.upstream.abandon(ticket, outcome),
                media_type="text/event-stream",
                headers=ticket_headers(ticket),
            )
        finally:
            if not relaying:
                # The work may have been cancelled before it ever ran (the client left at once).
                self.dispatcher.abandon(ticket)

    def _submit(
        self,
        http: Request,
        body: ChatCompletionRequest | CompletionRequest,
        text: str,
        features: Mapping[Any, float] | None = None,
    ) -> Ticket:
        """Queue the request (``text``: what the predictor reads; ``features``: precomputed)."""
        now = self.clock()
        deadline = deadline_from_header(http.headers.get(DEADLINE_HEADER), now)
        max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None)
        request = ServingRequest(
            f"{self._prefix}-{next(self._ids)}",
            text,
            arrival_time=now,
            deadline=deadline,
            metadata=oracle_metadata(http.headers.get(ORACLE_HEADER)),
            **({"max_tokens": max_tokens} if max_tokens else {}),
        )
        try:
            self.controller.submit(request, features)
        except QueueFullError as exc:
            self.metrics.requests.labels("failed", exc.reason).inc()
            raise APIError(
                429, str(exc), kind="rate_limit_error", retry_after=self._drain_estimate()
            ) from None
        except ValueError as exc:  # e.g. an oracle policy and no true length: not counted
            self.metrics.invalid.labels("400").inc()
            raise APIError(400, str(exc)) from None
        except ControllerClosedError as exc:
            self.metrics.requests.labels("failed", exc.reason).inc()
            raise APIError(503, str(exc), kind="service_unavailable") from None
        entry = self.controller.entry(request.id)
        ticket = Ticket(
            request, entry.prediction.length, entry.service_s, streamed=bool(body.stream)
        )
        self.dispatcher.enqueue(ticket)  # before any await: a pump may admit it at once
        self.metrics.predicted_tokens.observe(ticket.predicted_tokens)
        if self.config.shed and deadline is not None:
            wait = self.controller.work_ahead(request.id) / max(1, self.dispatcher.slots)
            if now + wait + ticket.service_s > deadline:
                self.dispatcher.withdraw(ticket, FailureReason.REJECTED, "deadline cannot be met")
                raise APIError(
                    503,
                    f"deadline cannot be met: predicted {wait + ticket.service_s:.2f} s "
                    f"(waiting {wait:.2f} s, then {ticket.service_s:.2f} s of service) > "
                    f"{deadline - now:.2f} s",
                    kind="deadline_unmeetable",
                    retry_after=wait,
                )
        return ticket

    async def _admitted_reply(
        self, ticket: Ticket, path: str, payload: dict[str, Any], headers: dict[str, str]
    ) -> UpstreamReply | Response:
        """Wait for a slot, send upstream: a 2xx reply, or the Response that ended the request
        (shutting down, every backend tried failed, or a 3xx/4xx passed through)."""
        try:
            await self.dispatcher.admit(ticket)
        except ShuttingDown as exc:
            return error_response(503, str(exc), "service_unavailable")
        try:
            reply = await self.upstream.send(ticket, path, payload, headers)
        except UpstreamFailure as failure:
            return self._failed(ticket, failure)
        except asyncio.CancelledError:
            self.dispatcher.finish(ticket, 0, reason=FailureReason.CANCELLED, detail=CLIENT_LEFT)
            raise
        if reply.status >= 300:  # the backend refused it (a 4xx): the client's problem
            detail = f"{reply.backend.name} answered {reply.status}"
            self.dispatcher.finish(ticket, 0, reason=FailureReason.REJECTED, detail=detail)
            return Response(reply.body, status_code=reply.status, media_type=reply.content_type)
        return reply

    async def _complete(
        self, ticket: Ticket, path: str, payload: dict[str, Any], headers: dict[str, str]
    ) -> Response:
        reply = await self._admitted_reply(ticket, path, payload, headers)
        if isinstance(reply, Response):
            return reply
        try:
            answer = json.loads(reply.body or b"")
            tokens = completion_tokens(answer)
        except ValueError:
            detail = f"{reply.backend.name} sent a malformed answer"
            return self._failed(ticket, UpstreamFailure(FailureReason.EXECUTOR_FAILURE, detail))
        self.dispatcher.finish(ticket, tokens)
        return JSONResponse(answer, headers=ticket_headers(ticket))

    def _failed(self, ticket: Ticket, failure: UpstreamFailure) -> Response:
        """End ``ticket`` as ``failure`` says, and the error the client is answered with."""
        self.dispatcher.finish(ticket, 0, reason=failure.reason, detail=failure.detail)
        return error_response(failure.status, failure.error, "upstream_error")

    async def models(self) -> ModelList:
        """The union of what the healthy backends serve."""
        session = self.session
        assert session is not None, "start() first"
        timeout = aiohttp.ClientTimeout(total=5.0)

        async def listed(backend: Backend) -> list[dict[str, Any]]:
            try:
                async with session.get(backend.config.url + "/v1/models", timeout=timeout) as r:
                    if r.status != 200:
                        return []
                    return list((await r.json(content_type=None)).get("data", []))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
                return []

        seen: dict[str, dict[str, Any]] = {}
        for cards in await asyncio.gather(*(listed(b) for b in self.backends if b.healthy)):
            for card in cards:
                if isinstance(card, dict) and isinstance(card.get("id"), str):
                    seen.setdefault(card["id"], card)
        if not seen:
            raise APIError(503, "no backend answered /v1/models", kind="service_unavailable")
        return ModelList(data=list(seen.values()))

    def health(self) -> Health:
        backends = {b.name: b.healthy for b in self.backends}
        ok = any(b.healthy and b.role == "primary" for b in self.backends)
        return Health(
            status="ok" if ok else "unavailable", backends=backends, queued=len(self.controller)
        )

    # -- accounting ------------------------------------------------------------------------------
    def _on_end(self, ticket: Ticket, completion: Any) -> None:
        self.metrics.record_end(ticket.predicted_tokens, completion)

    def _ended(self) -> int:
        stats = self.controller.stats()
        return stats.finished + stats.failed

    def _drain_estimate(self) -> float:
        """Seconds until the queue has room again, roughly: one service time per slot."""
        slots = max(1, self.dispatcher.slots)
        service = self.controller.observe(self.clock()).service_time_s or 1.0
        return service / slots

    def _wire_gauges(self) -> None:
        m = self.metrics
        m.queue_length.set_function(lambda: len(self.controller))
        for backend in self.backends:
            m.inflight.labels(backend.name).set_function(lambda b=backend: b.inflight)
            m.healthy.labels(backend.name).set_function(lambda b=backend: float(b.healthy))
        for name in self.controller.knobs.as_dict():
            m.knob.labels(name).set_function(lambda n=name: _knob_value(self.controller, n))
        guard = getattr(self.controller.policy, "guard", None)
        if guard is not None:  # a guarded learned policy: is it still the one deciding?
            for figure in guard.metrics():
                m.policy_guard.labels(figure).set_function(
                    lambda f=figure: _guard_figure(self.controller, f)
                )


class _RelayResponse(StreamingResponse):
    """A stream whose request ends even if the stream never started (the client left first)."""

    def __init__(self, content: Any, *, cleanup: Callable[[], Awaitable[None]], **kw: Any):
        super().__init__(content, **kw)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


def _one_torch_thread() -> None:
    import torch  # the encoder tier's dependency: imported only when that tier is served

    torch.set_num_threads(1)


def _predictor_prompt(body: ChatCompletionRequest | CompletionRequest) -> str:
    """The text the predictor reads. An image-only turn has none: it then sees a neutral
    one-word prompt."""
    return prompt_text(body).strip() or "?"


def _knob_value(controller: AdaptiveController, name: str) -> float:
    value = getattr(controller.knobs, name)
    return math.inf if value is None else float(value)


def _guard_figure(controller: AdaptiveController, figure: str) -> float:
    guard = getattr(controller.policy, "guard", None)
    return guard.metrics()[figure] if guard is not None else math.nan


async def _until_disconnect(http: Request, work: Awaitable[Response | Any]) -> Any:
    """Run ``work``; if the client disconnects first, cancel it (withdrawing the request from
    the queue, or closing the upstream connection, which makes vLLM abort it)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return Response(status_code=499)  # nobody reads it: the client is gone


async def _disconnected(http: Request) -> None:
    # The body was read already, so the next message is the disconnect.
    while (await http.receive())["type"] != "http.disconnect":
        pass


def create_app(config: GatewayConfig, *, controller: AdaptiveController | None = None) -> FastAPI:
    """The gateway as an ASGI app (serve it with uvicorn, or mount it in Ray Serve)."""
    gateway = Gateway(config, controller)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(
        title="rtlm-adapt gateway",
        version="0.1.0",
        description="OpenAI-compatible scheduling gateway: predicts each request's output length "
        "at arrival, orders and admits requests to the backends, learns from every answer.",
        lifespan=lifespan,
    )
    app.state.gateway = gateway

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body it cannot decode, 404, 405) in OpenAI's format too.
        if exc.status_code == 400:
            gateway.metrics.invalid.labels("400").inc()
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        gateway.metrics.invalid.labels("400").inc()
        first = exc.errors()[0] if exc.errors() else {}
        where = error_param(first.get("loc", ()))
        message = (
            f"{where}: {first.get('msg', 'invalid request')}"
            if where
            else first.get("msg", "invalid request")
        )
        return error_response(400, message, param=where or None)

    @app.post(
        "/v1/chat/completions",
        responses=_COMPLETION_RESPONSES,
        response_model=None,
        summary="Chat completion (scheduled)",
        openapi_extra=_COMPLETION_HEADERS,
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await gateway.handle(request, body, "/v1/chat/completions")

    @app.post(
        "/v1/completions",
        responses=_COMPLETION_RESPONSES,
        response_model=None,
        summary="Text completion (scheduled)",
        openapi_extra=_COMPLETION_HEADERS,
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await gateway.handle(request, body, "/v1/completions")

    @app.get("/v1/models", response_model=ModelList, responses={503: _ERRORS[503]})
    async def models() -> ModelList:
        return await gateway.models()

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        report = gateway.health()
        return JSONResponse(report.model_dump(), status_code=200 if report.status == "ok" else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        return Response(gateway.metrics.exposition(), media_type="text/plain; version=0.0.4")

    _drop_unused_422(app)
    app.add_middleware(
        BodyLimit,
        max_bytes=config.max_body_bytes,
        on_reject=lambda: gateway.metrics.invalid.labels("413").inc(),
    )
    return app


def _drop_unused_422(app: FastAPI) -> None:
    # FastAPI documents validation errors as 422; this app answers them with 400.
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for methods in schema.get("paths", {}).values():
                for operation in methods.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
