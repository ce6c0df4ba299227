"""Start and stop the gateway benchmarks' servers as separate processes, like a deployment.

Each server is a subprocess (its own interpreter, uvicorn with uvloop and httptools when they are
installed) on a free port; :meth:`ServerProcess.start` returns once its ``/health`` answers 200.
Servers are stopped by PID (SIGTERM, then SIGKILL), never by name, and every server started here
is stopped at interpreter exit if the caller forgot. :meth:`ServerProcess.cpu_s` and
:meth:`ServerProcess.rss_mb` read ``/proc/PID`` (Linux).

Used by ``gateway_overhead.py`` and ``gateway_soak.py``::

    backend = ServerProcess("backend", paced_backend_argv(tokens_per_s=1e6)).start()
    gw = ServerProcess("gateway", gateway_argv([backend.url], max_inflight=256)).start()
    ...  # POST gw.url + "/v1/completions"
    gw.stop()
    backend.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

PYTHON = sys.executable
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LIVE: dict[int, ServerProcess] = {}


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (another process could take it before we bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server subprocess on ``127.0.0.1:port``.

    Parameters
    ----------
    name
        Label (log file name, messages).
    argv
        The command; ``{port}`` in it is replaced by the port.
    port
        Listen port (default: a free one). A restart reuses it.
    log_dir
        Where its stdout and stderr go (``NAME.log``, appended across restarts).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int | None = None,
        log_dir: str | Path | None = None,
    ) -> None:
        self.name = name
        self.port = port if port is not None else free_port()
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="rtlm-bench-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{name}.log"
        self.log_path.unlink(missing_ok=True)  # a previous run's (restarts append to it)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 30.0) -> ServerProcess:
        """Launch it and wait until ``/health`` answers 200."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C to the benchmark does not reach it first
            )
        self.starts += 1
        _LIVE[self.proc.pid] = self
        self.wait_healthy(timeout_s)
        return self

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode if self.proc else None} "
                    f"before answering; see {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
                    last = r.status
            except (OSError, urllib.error.URLError) as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not healthy after {timeout_s} s ({last!r})")

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM by PID (a graceful shutdown), SIGKILL if it lingers; returns the exit code."""
        return self._end(signal.SIGTERM, timeout_s)

    def kill(self) -> int | None:
        """SIGKILL by PID: no shutdown code runs (a crash)."""
        return self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: signal.Signals, timeout_s: float) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        _LIVE.pop(proc.pid, None)
        return proc.returncode

    def cpu_s(self) -> float:
        """User + system CPU seconds used so far (``/proc/PID/stat``)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime

    def rss_mb(self) -> float:
        """Resident set size now, MiB (``/proc/PID/statm``)."""
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def paced_backend_argv(
    *,
    tokens_per_s: float = 1e6,
    ttft_s: float = 0.0,
    default_max_tokens: int = 1,
    max_concurrency: int | None = None,
    fault_rate: float = 0.0,
    fault_modes: str = "status,drop,midstream",
    seed: int = 0,
    timeout_keep_alive: int = 30,
) -> list[str]:
    argv = [
        PYTHON,
        "-m",
        "rtlm_adapt.gateway.paced_backend",
        "--port",
        "{port}",
        "--tokens-per-s",
        repr(float(tokens_per_s)),
        "--ttft-s",
        repr(float(ttft_s)),
        "--default-max-tokens",
        str(default_max_tokens),
        "--fault-rate",
        repr(float(fault_rate)),
        "--fault-modes",
        fault_modes,
        "--seed",
        str(seed),
        "--timeout-keep-alive",
        str(timeout_keep_alive),
        "--log-level",
        "warning",
    ]
    if max_concurrency is not None:
        argv += ["--max-concurrency", str(max_concurrency)]
    return argv


def gateway_argv(
    backends: Sequence[str],
    *,
    max_inflight: int = 64,
    max_queue: int = 10_000,
    policy: str = "heuristic",
    state: str | Path | None = None,
    log_level: str = "warning",
    extra: Sequence[str] = (),
) -> list[str]:
    """``rtlm-adapt serve`` in front of ``backends``; ``extra``: more flags."""
    argv = [PYTHON, "-m", "rtlm_adapt.cli", "serve"]
    for url in backends:
        argv += ["--backend", url]
    argv += [
        "--port",
        "{port}",
        "--max-inflight",
        str(max_inflight),
        "--max-queue",
        str(max_queue),
        "--policy",
        policy,
        "--log-level",
        log_level,
    ]
    if state is not None:
        argv += ["--state", str(state)]
    return argv + list(extra)


def proc_cpu_s() -> float:
    """This process's user + system CPU seconds."""
    t = os.times()
    return t.user + t.system


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE.values()):
        server.kill()


def system_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, all cores; ``/proc/stat``)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (parts + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def code_version() -> dict[str, object]:
    """Which ``rtlm_adapt`` the servers run: its folder, git commit and uncommitted changes (the
    subprocesses import the same one as this process: same interpreter, cwd and PYTHONPATH)."""
    import rtlm_adapt

    root = Path(rtlm_adapt.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    return {
        "rtlm_adapt": str(root / "rtlm_adapt"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": git("status", "--porcelain", "--", "rtlm_adapt").splitlines(),
    }


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


__all__ = [
    "ServerProcess",
    "code_version",
    "free_port",
    "gateway_argv",
    "loadavg",
    "paced_backend_argv",
    "proc_cpu_s",
    "system_busy_s",
]


async def sse_chunks(content: AsyncIterable[bytes]) -> AsyncIterator[dict | None]:
    """The JSON chunks of an OpenAI-style SSE stream, then ``None`` for its ``[DONE]`` (a stream
    that ends without one was cut short)."""
    async for raw in content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            yield None
            return
        yield json.loads(data)

