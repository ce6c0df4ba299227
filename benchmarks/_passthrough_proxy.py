"""A bare pass-through proxy, for scale in ``gateway_overhead.py --reference``.

It does nothing the gateway does (no validation, scheduling, metrics or retries): FastAPI reads
the body, one HTTP client forwards it to the backend, and the answer goes back as it came. Run
with ``--client aiohttp`` (the gateway's client, with its settings: ``upstream_session()``),
``--client httpx`` (its client before, with the pool settings it had) or ``--client httpx2``
(pydantic's fork of httpx, whose connection pool does not rescan every connection per request),
it shows what the HTTP layers alone cost on this machine::

    python benchmarks/_passthrough_proxy.py --backend http://127.0.0.1:8001 --port 8090 \\
        --client aiohttp
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from rtlm_adapt.gateway.proxy import upstream_session


def create_app(backend: str, client: str) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if client == "aiohttp":
            state["client"] = upstream_session(600.0)
        else:
            httpx = importlib.import_module(client)
            state["client"] = httpx.AsyncClient(
                timeout=httpx.Timeout(600.0, connect=5.0, pool=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024),
            )
        try:
            yield
        finally:
            if client == "aiohttp":
                await state["client"].close()
            else:
                await state["client"].aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.body()
        headers = {"content-type": "application/json"}
        if client != "aiohttp":
            r = await state["client"].post(
                backend + "/v1/completions", content=body, headers=headers
            )
            return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))
        async with state["client"].post(
            backend + "/v1/completions", data=body, headers=headers
        ) as r:
            content = await r.read()
            return Response(content, r.status, media_type=r.headers.get("content-type"))

    @app.get("/health")
    async def health() -> Response:
        return PlainTextResponse("ok")

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--client", choices=("aiohttp", "httpx", "httpx2"), default="aiohttp")
    args = ap.parse_args()
    uvicorn.run(
        create_app(args.backend.rstrip("/"), args.client),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
