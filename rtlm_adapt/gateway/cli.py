"""``rtlm-adapt serve``: run the gateway in front of OpenAI-compatible backends.

Flags override the config file (``--config gateway.toml``), which overrides the defaults.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from typing import Any

from rtlm_adapt.gateway.config import BackendConfig, GatewayConfig, backends_from_urls


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with the same settings (flags override it)")
    p.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="URL",
        help="a primary OpenAI-compatible server, e.g. http://127.0.0.1:8000 (repeatable)",
    )
    p.add_argument(
        "--secondary",
        action="append",
        default=[],
        metavar="URL",
        help="a server that takes offloaded (long or uncertain) requests (repeatable)",
    )
    p.add_argument(
        "--send-priority",
        action="store_true",
        default=None,
        help="send vLLM's per-request priority to the --backend/--secondary servers "
        "(start vLLM with --scheduling-policy priority)",
    )
    p.add_argument("--policy", help="fcfs, sjf, heuristic (default), ppo:PATH, ...")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8080)")
    p.add_argument("--max-inflight", type=int, help="in-flight cap per backend (default 4)")
    p.add_argument("--max-queue", type=int, help="waiting requests before 429 (default 10000)")
    p.add_argument("--state", help="autosave the learned state here; a restart resumes it")
    p.add_argument(
        "--profile",
        help="cost profile (packaged name or JSON path) the backends' latency models start "
        "from (default http-engine-prior: a generic engine; they learn each backend's pace)",
    )
    p.add_argument(
        "--tier",
        help="length predictor: lexical (default; microseconds) or encoder[:minilm|smollm2-l16] "
        "(a prompt embedding per request, 12-14 ms of one CPU thread with MiniLM here)",
    )
    p.add_argument(
        "--shed",
        action="store_true",
        default=None,
        help="503 at arrival when the prediction says the x-rtlm-deadline-ms cannot be met",
    )
    p.add_argument("--request-timeout", type=float, dest="request_timeout_s")
    p.add_argument("--log-level", default="info")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The settings: defaults, then the config file, then the flags."""
    config = GatewayConfig.from_file(args.config) if args.config else None
    flags: dict[str, Any] = {
        f.name: getattr(args, f.name)
        for f in fields(GatewayConfig)
        if f.name != "backends" and getattr(args, f.name, None) is not None
    }
    urls = backends_from_urls(args.backend, args.secondary, send_priority=bool(args.send_priority))
    if config is None:
        return GatewayConfig(backends=urls, **flags)
    backends: tuple[BackendConfig, ...] = config.backends + urls
    if args.send_priority:
        backends = tuple(
            BackendConfig(b.url, b.role, b.max_inflight, True, b.name) for b in backends
        )
    return config.replace(backends=backends, **flags)


def run_from_args(args: argparse.Namespace) -> int:
    import uvicorn

    from rtlm_adapt.gateway.app import create_app

    config = config_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    app = create_app(config)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=10,
    )
    return 0
