"""Run an ASGI app with uvicorn in a background thread, for tests and benchmarks.

Usage (not a doctest: it opens a socket)::

    with ServerThread(app) as server:
        httpx.get(server.url + "/health")

The server listens on 127.0.0.1; with ``port=0`` the OS picks a free port and :attr:`url` reports
the one actually bound. The thread is a daemon, so a forgotten server never keeps Python alive.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

import uvicorn


class ServerThread:
    """A uvicorn server for ``app`` running in a daemon thread; also a context manager."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        timeout_keep_alive: int = 5,
        limit_concurrency: int | None = None,
        loop: str = "auto",
    ) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            timeout_keep_alive=timeout_keep_alive,
            limit_concurrency=limit_concurrency,
            loop=loop,  # type: ignore[arg-type]
        )
        self.server = uvicorn.Server(config)
        self.host = host
        self._port: int | None = None
        # uvicorn only installs signal handlers in the main thread, so running it here is safe.
        self._thread = threading.Thread(target=self.server.run, name="uvicorn-server", daemon=True)

    def start(self, timeout: float = 10.0) -> ServerThread:
        """Start the thread and wait until the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                # e.g. the port was taken: uvicorn logs the error and exits its thread.
                raise RuntimeError("the uvicorn server thread died while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the uvicorn server did not start within {timeout} s")
            time.sleep(0.005)
        # Read the real port: with port=0 the configured one says nothing.
        self._port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321`` (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the server to exit and join the thread; safe to call twice or before start."""
        self.server.should_exit = True
        if not self._thread.is_alive():
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Graceful shutdown waits for in-flight requests (a hung one never ends): force it.
            self.server.force_exit = True
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
