"""``rtlm-adapt serve`` in a subprocess, as serve-bench and the studies run it (its own
interpreter, like a deployment), and what they read from its ``/metrics``: the queue and batch
cap through a run (:class:`MetricsTimeline`) and its own view at the end (:func:`gateway_figures`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np


class GatewayProcess:
    """``rtlm-adapt serve`` in a subprocess (its own interpreter, like a deployment)."""

    def __init__(
        self, backend_url: str, *, policy: str, max_inflight: int, port: int, tier: str = "lexical"
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable, "-m", "rtlm_adapt.cli", "serve",
            "--backend", backend_url, "--send-priority",
            "--policy", policy, "--max-inflight", str(max_inflight), "--tier", tier,
            "--port", str(port), "--log-level", "warning",
        ]  # fmt: skip
        self._proc = subprocess.Popen(command, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self._proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("the gateway did not answer /health within 120 s")

    def metrics_text(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5.0).text

    def sample_every(self, interval_s: float) -> MetricsTimeline:
        """Start sampling the gateway's queue and knobs (a thread; stop it with ``.stop()``)."""
        return MetricsTimeline(self.metrics_text, interval_s)

    def stop(self) -> None:
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MetricsTimeline:
    """The gateway's queue length and batch cap, sampled through a run (to explain a result:
    the knobs at the end alone cannot show a cap that dropped for a while)."""

    def __init__(self, read: Callable[[], str], interval_s: float) -> None:
        self.queue_length: list[float] = []
        self.max_batch_size: list[float] = []
        self._read = read
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-timeline", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                text = self._read()
            except httpx.HTTPError:
                continue
            for line in text.splitlines():
                if line.startswith("rtlm_queue_length "):
                    self.queue_length.append(float(line.split()[1]))
                elif line.startswith('rtlm_knob{name="max_batch_size"}'):
                    self.max_batch_size.append(float(line.rsplit(" ", 1)[1]))

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the samples and their summary."""
        self._stop.set()
        self._thread.join()
        caps, queue = self.max_batch_size, self.queue_length
        return {
            "interval_s": self._interval_s,
            "queue_length_mean": float(np.mean(queue)) if queue else 0.0,
            "queue_length_max": max(queue, default=0.0),
            "max_batch_size_min": min(caps, default=0.0),
            "max_batch_size_mean": float(np.mean(caps)) if caps else 0.0,
            "queue_length": queue,
            "max_batch_size": caps,
        }


def gateway_figures(metrics_text: str) -> dict[str, Any]:
    """The gateway's own view at the end of a run: prediction tau, knobs, request counts."""
    figures: dict[str, Any] = {"knobs": {}, "requests": {}}
    for line in metrics_text.splitlines():
        if line.startswith("rtlm_prediction_kendall_tau "):
            figures["kendall_tau"] = float(line.split()[1])
        elif line.startswith("rtlm_knob{"):
            name = line.split('name="', 1)[1].split('"', 1)[0]
            figures["knobs"][name] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("rtlm_requests_total{"):
            labels = line[line.index("{") + 1 : line.index("}")]
            figures["requests"][labels] = float(line.rsplit(" ", 1)[1])
    return figures
