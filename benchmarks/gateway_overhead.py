"""The gateway's own cost, side by side with calling the backend directly, in one run.

Issue 15, "Done means" item 2: with a backend that answers at once, the gateway should add
<= 1 ms p50 latency, sustain >= 1,000 non-streaming requests/s on this machine's cores, and hold
>= 500 concurrent streams. Everything runs as separate processes, like a deployment (uvicorn with
uvloop and httptools): a paced backend that answers at once (``--tokens-per-s 1e6``, one token),
a paced backend that streams slowly (for the held-open streams), one gateway in front of each
(``rtlm-adapt serve``, in-flight cap above the load so it does not queue), and this process as
the client (aiohttp, on the same cores: its CPU is measured too). The phases:

1. **latency**: sequential requests (one kept-alive connection per target), the targets
   interleaved request by request, the order alternating; p50/p90/p99 and the difference to direct;
2. **throughput**: closed loop, ``--concurrency`` clients, non-streaming, ``--throughput-s``
   seconds per run, the targets in turn (order reversed every other of ``--repeats``); req/s and
   each process's CPU per request (``/proc``). On a 2-core machine the client and the backend
   take CPU from the gateway: the gateway's CPU per request gives its one-core ceiling, the
   direct run the client's and the backend's;
3. **streams**: ``--streams`` clients at once, each streaming ``--stream-tokens`` tokens at
   ``--stream-tokens-per-s``, direct then through the gateway; all must complete; peak streams
   open at once (client side) and the gateway's own in-flight gauge;
4. ``--profile``: py-spy on the gateway during one more throughput run; its CPU by layer.

``--reference`` adds, for scale, three bare FastAPI pass-through proxies to the throughput phase
(``_passthrough_proxy.py``: aiohttp with the gateway's client settings, httpx, httpx2): what the
HTTP layers alone cost on this machine.

    python benchmarks/gateway_overhead.py --reference --profile \
        --json benchmarks/results/gateway_overhead.json
    python benchmarks/gateway_overhead.py --quick          # < 1 min, to try it out
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import (  # noqa: E402
    ServerProcess,
    code_version,
    gateway_argv,
    loadavg,
    paced_backend_argv,
    proc_cpu_s,
    sse_chunks,
    system_busy_s,
)

PROMPT = "Say hello in one word."


def _body(*, stream: bool = False, max_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "paced", "prompt": PROMPT, "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean_ms": statistics.fmean(values) if values else float("nan"),
        "p50_ms": pct(values, 0.50),
        "p90_ms": pct(values, 0.90),
        "p99_ms": pct(values, 0.99),
        "max_ms": max(values) if values else float("nan"),
    }


class CpuMeter:
    """CPU seconds used by each named process (and by the whole machine) between two points."""

    def __init__(self, servers: dict[str, ServerProcess]) -> None:
        self.servers = servers

    def read(self) -> dict[str, float]:
        out = {name: s.cpu_s() for name, s in self.servers.items()}
        out["client"] = proc_cpu_s()
        out["machine"] = system_busy_s()
        return out

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        d = {k: after[k] - before[k] for k in before}
        ours = sum(v for k, v in d.items() if k != "machine")
        d["others"] = max(0.0, d["machine"] - ours)  # other tenants of the machine
        return d


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with session.post(url, json=body) as r:
        await r.read()
        return r.status


# -- phase 1: sequential latency -----------------------------------------------------------------
async def latency_phase(urls: dict[str, str], n: int, warmup: int) -> dict[str, Any]:
    """Sequential requests to "direct" and "gateway" in turn (the order alternating), one
    kept-alive connection each."""
    body = _body()
    names = list(urls)
    out: dict[str, list[float]] = {name: [] for name in names}
    errors: collections.Counter[str] = collections.Counter()
    sessions = {
        name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for name in names
    }
    try:
        for i in range(warmup + n):
            for name in names if i % 2 else reversed(names):
                t0 = time.perf_counter()
                status = await post(sessions[name], urls[name] + "/v1/completions", body)
                dt = (time.perf_counter() - t0) * 1e3
                if status != 200:
                    errors[f"{name}:{status}"] += 1
                if i >= warmup:
                    out[name].append(dt)
    finally:
        for session in sessions.values():
            await session.close()
    d, g = summary_ms(out["direct"]), summary_ms(out["gateway"])
    paired = [y - x for x, y in zip(out["direct"], out["gateway"], strict=True)]
    return {
        "requests_each": n,
        "errors": dict(errors),
        "direct": d,
        "gateway": g,
        "added_p50_ms": g["p50_ms"] - d["p50_ms"],
        "added_p99_ms": g["p99_ms"] - d["p99_ms"],
        "added_paired_median_ms": pct(paired, 0.5),
    }


# -- phase 2: closed-loop throughput -------------------------------------------------------------
async def throughput_run(
    base: str, concurrency: int, duration_s: float, meter: CpuMeter
) -> dict[str, Any]:
    body = _body()
    url = base + "/v1/completions"
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        # Open the connections first, so the measured window has no connection setup.
        await asyncio.gather(*(post(session, url, body) for _ in range(concurrency)))
        stop = time.perf_counter() + duration_s
        cpu0 = meter.read()
        t_start = time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    status = await post(session, url, body)
                except aiohttp.ClientError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1e3)
                if status != 200:
                    errors[str(status)] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t_start
        cpu = CpuMeter.delta(cpu0, meter.read())
    n = len(latencies)
    per_req = {k: (v / n * 1e3 if n else float("nan")) for k, v in cpu.items()}
    return {
        "requests": n,
        "elapsed_s": elapsed,
        "rps": n / elapsed,
        "errors": dict(errors),
        "latency": summary_ms(latencies),
        "cpu_s": cpu,
        "cpu_ms_per_request": per_req,
        "cores_busy": {k: v / elapsed for k, v in cpu.items()},
    }


async def throughput_phase(
    targets: dict[str, tuple[str, CpuMeter]],
    concurrency: int,
    duration_s: float,
    repeats: int,
) -> dict[str, Any]:
    """Closed-loop runs for each target (direct, gateway, reference proxies), the order of the
    targets reversed every other repeat."""
    runs: list[dict[str, Any]] = []
    for rep in range(repeats):
        order = list(targets.items())
        if rep % 2:
            order.reverse()
        for name, (base, meter) in order:
            run = await throughput_run(base, concurrency, duration_s, meter)
            run.update(target=name, repeat=rep)
            runs.append(run)
            _say(
                f"  throughput {name:14s} rep {rep}: {run['rps']:7.0f} req/s "
                f"(p50 {run['latency']['p50_ms']:.2f} ms, errors {sum(run['errors'].values())}, "
                f"proxy CPU {run['cpu_ms_per_request']['gateway']:.2f} ms/req)"
            )
    by = {t: [r for r in runs if r["target"] == t] for t in targets}
    gw_cpu = statistics.median(r["cpu_ms_per_request"]["gateway"] for r in by["gateway"])
    client_cpu = statistics.median(r["cpu_ms_per_request"]["client"] for r in by["direct"])
    backend_cpu = statistics.median(r["cpu_ms_per_request"]["backend"] for r in by["direct"])
    per_target = {
        t: {
            "rps_median": statistics.median(r["rps"] for r in rs),
            "rps_best": max(r["rps"] for r in rs),
            "proxy_cpu_ms_per_request": statistics.median(
                r["cpu_ms_per_request"]["gateway"] for r in rs
            ),
        }
        for t, rs in by.items()
    }
    return {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "runs": runs,
        "targets": per_target,
        "direct_rps_median": per_target["direct"]["rps_median"],
        "gateway_rps_median": per_target["gateway"]["rps_median"],
        "direct_rps_best": per_target["direct"]["rps_best"],
        "gateway_rps_best": per_target["gateway"]["rps_best"],
        "gateway_cpu_ms_per_request": gw_cpu,
        "gateway_one_core_ceiling_rps": 1e3 / gw_cpu,
        "client_cpu_ms_per_request": client_cpu,
        "client_one_core_ceiling_rps": 1e3 / client_cpu,
        "backend_cpu_ms_per_request": backend_cpu,
        "backend_one_core_ceiling_rps": 1e3 / backend_cpu,
    }


# -- phase 3: concurrent streams -----------------------------------------------------------------
async def _scrape_inflight(session: aiohttp.ClientSession, gateway_url: str) -> float:
    async with session.get(gateway_url + "/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("rtlm_inflight{")
    )


async def streams_run(
    base: str, n: int, tokens: int, gateway_url: str | None, gateway: ServerProcess | None
) -> dict[str, Any]:
    """``n`` streams opened at once; each must deliver ``tokens`` content chunks and [DONE]."""
    url = base + "/v1/completions"
    body = _body(stream=True, max_tokens=tokens)
    open_now = peak_open = 0
    ttft: list[float] = []
    total: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    completed = 0
    server_peak = 0.0
    rss: list[float] = []
    all_open = asyncio.Event()

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal open_now, peak_open, completed
        t0 = time.perf_counter()
        opened = False
        try:
            async with session.post(url, json=body) as r:
                if r.status != 200:
                    errors[f"http {r.status}"] += 1
                    await r.read()
                    return
                opened = True
                open_now += 1
                peak_open = max(peak_open, open_now)
                if open_now >= n:
                    all_open.set()
                chunks, done, first = 0, False, None
                async for chunk in sse_chunks(r.content):
                    if chunk is None:
                        done = True
                        break
                    if "error" in chunk:
                        errors["stream error event"] += 1
                        return
                    if chunk.get("choices"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter()
                            ttft.append((first - t0) * 1e3)
                if not done or chunks != tokens:
                    errors[f"incomplete ({chunks}/{tokens} chunks, done={done})"] += 1
                    return
                completed += 1
                total.append((time.perf_counter() - t0) * 1e3)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            errors[type(exc).__name__] += 1
        finally:
            if opened:
                open_now -= 1

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        stop_sampling = asyncio.Event()

        async def sample() -> None:
            nonlocal server_peak
            async with aiohttp.ClientSession() as s:
                while not stop_sampling.is_set():
                    if gateway_url is not None:
                        try:
                            server_peak = max(server_peak, await _scrape_inflight(s, gateway_url))
                        except aiohttp.ClientError:
                            pass
                    if gateway is not None:
                        rss.append(gateway.rss_mb())
                    await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        t_start = time.perf_counter()
        await asyncio.gather(*(one(session) for _ in range(n)))
        elapsed = time.perf_counter() - t_start
        stop_sampling.set()
        await sampler
    return {
        "streams": n,
        "tokens_each": tokens,
        "completed": completed,
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "peak_open_client_side": peak_open,
        "all_open_at_once": all_open.is_set(),
        "peak_inflight_gateway_metric": server_peak if gateway_url else None,
        "gateway_rss_mb_max": max(rss) if rss else None,
        "elapsed_s": elapsed,
        "ttft": summary_ms(ttft),
        "duration": summary_ms(total),
    }


# -- phase 4: profile ----------------------------------------------------------------------------
# Leaf-most frame that matches decides the layer (asyncio/anyio/socket frames are skipped so a
# send() is charged to whoever called it).
_LAYERS = (
    (
        "scheduling (controller, predictor, dispatcher)",
        (
            "rtlm_adapt/controller",
            "rtlm_adapt/predict",
            "rtlm_adapt/gateway/dispatcher",
            "rtlm_adapt/queue",
            "rtlm_adapt/policies",
            "rtlm_adapt/latency",
            "rtlm_adapt/prior",
            "rtlm_adapt/features",
            "rtlm_adapt/uncertainty",
            "rtlm_adapt/request",
            "rtlm_adapt/knobs",
        ),
    ),
    (
        "metrics (prometheus_client, kendall tau)",
        ("rtlm_adapt/gateway/metrics", "prometheus_client/", "scipy/"),
    ),
    ("upstream HTTP client (aiohttp)", ("aiohttp/", "yarl/", "multidict/")),
    ("HTTP server (uvicorn/httptools)", ("uvicorn/", "httptools/")),
    ("framework (FastAPI/starlette routing, responses)", ("fastapi/", "starlette/")),
    ("validation/serialization (pydantic, json)", ("pydantic", "json/")),
    ("gateway glue (app.py, proxy.py)", ("rtlm_adapt/gateway/",)),
)


def _layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        for layer, needles in _LAYERS:
            if any(n in frame for n in needles):
                return layer
    return "event loop / other"


def analyse_profile(raw_path: Path) -> dict[str, Any]:
    """Layers and top functions from py-spy's collapsed stacks (``--format raw``)."""
    layers: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        layers[_layer(frames)] += n
        leaf[frames[-1]] += n
        seen = set()
        for frame in frames:
            name = frame.rsplit(":", 1)[0]  # drop the line number
            if name not in seen:
                seen.add(name)
                inclusive[name] += n

    def share(c: collections.Counter[str], k: int) -> list[list[Any]]:
        return [[name, round(v / total, 4)] for name, v in c.most_common(k)]

    interesting = collections.Counter(
        {
            k: v
            for k, v in inclusive.items()
            if "rtlm_adapt/" in k
            or "aiohttp/client.py" in k
            or "aiohttp/connector.py" in k
            or "fastapi/routing" in k
        }
    )
    return {
        "samples": total,
        "layers": {k: round(v / total, 4) for k, v in layers.most_common()},
        "top_self": share(leaf, 15),
        "top_inclusive_gateway_code": share(interesting, 25),
    }


async def profile_phase(
    via: str,
    gateway: ServerProcess,
    concurrency: int,
    duration_s: float,
    out_raw: Path,
    meter: CpuMeter,
) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    cmd = [
        spy,
        "record",
        "--pid",
        str(gateway.pid),
        "--rate",
        "200",
        "--duration",
        str(max(1, round(duration_s))),
        "--format",
        "raw",
        "--nonblocking",
        "-o",
        str(out_raw),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    await asyncio.sleep(0.5)
    run = await throughput_run(via, concurrency, duration_s, meter)
    loop = asyncio.get_running_loop()
    output, _ = await loop.run_in_executor(None, proc.communicate)
    if proc.returncode != 0 or not out_raw.exists():
        return {"skipped": f"py-spy failed: {output.decode(errors='replace')[-500:]}"}
    result = analyse_profile(out_raw)
    result.update(
        command=" ".join(cmd),
        raw=str(out_raw),
        rps_while_profiled=run["rps"],
        gateway_cpu_ms_per_request=run["cpu_ms_per_request"]["gateway"],
    )
    return result


# -- main ----------------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(msg, flush=True)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(f"{{:{w}}}" for w in widths)
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*map(str, r)) for r in rows]
    return "\n".join(x.rstrip() for x in out)


_REFERENCES = ("aiohttp", "httpx", "httpx2")  # bare pass-through proxies (--reference)


def report(result: dict[str, Any]) -> str:
    lat, thr, st = result["latency"], result["throughput"], result["streams"]
    rows = [
        [
            "latency p50 (sequential)",
            f"{lat['direct']['p50_ms']:.3f} ms",
            f"{lat['gateway']['p50_ms']:.3f} ms",
            f"+{lat['added_p50_ms']:.3f} ms",
        ],
        [
            "latency p99 (sequential)",
            f"{lat['direct']['p99_ms']:.3f} ms",
            f"{lat['gateway']['p99_ms']:.3f} ms",
            f"+{lat['added_p99_ms']:.3f} ms",
        ],
        [
            f"throughput, {thr['concurrency']} clients (median)",
            f"{thr['direct_rps_median']:.0f} req/s",
            f"{thr['gateway_rps_median']:.0f} req/s",
            f"{thr['gateway_rps_median'] / thr['direct_rps_median']:.2f}x",
        ],
        [
            "throughput, best run",
            f"{thr['direct_rps_best']:.0f} req/s",
            f"{thr['gateway_rps_best']:.0f} req/s",
            "",
        ],
    ]
    for name, t in thr["targets"].items():
        if name.startswith("proxy_"):
            rows.append(
                [
                    f"throughput, bare FastAPI+{name[6:]} pass-through",
                    "",
                    f"{t['rps_median']:.0f} req/s",
                    f"proxy CPU {t['proxy_cpu_ms_per_request']:.2f} ms/req",
                ]
            )
    for name in ("direct", "gateway"):
        s = st[name]
        rows.append(
            [
                f"streams {name}: {s['streams']} x {s['tokens_each']} tok",
                f"{s['completed']} done, {s['error_count']} err",
                f"peak open {s['peak_open_client_side']}",
                f"ttft p50 {s['ttft']['p50_ms']:.0f} ms, p99 {s['ttft']['p99_ms']:.0f} ms",
            ]
        )
    text = [_table(rows, ["measure", "direct", "via gateway", "difference"]), ""]
    text.append(
        f"CPU per non-streaming request (median of runs): gateway "
        f"{thr['gateway_cpu_ms_per_request']:.2f} ms (one-core ceiling "
        f"{thr['gateway_one_core_ceiling_rps']:.0f} req/s), client "
        f"{thr['client_cpu_ms_per_request']:.2f} ms (ceiling "
        f"{thr['client_one_core_ceiling_rps']:.0f} req/s), backend "
        f"{thr['backend_cpu_ms_per_request']:.2f} ms (ceiling "
        f"{thr['backend_one_core_ceiling_rps']:.0f} req/s)"
    )
    gs = st["gateway"]
    text.append(
        f"gateway in-flight gauge peak during streams: {gs['peak_inflight_gateway_metric']}, "
        f"gateway RSS max {gs['gateway_rss_mb_max']:.1f} MiB"
    )
    prof = result.get("profile")
    if prof and "layers" in prof:
        text.append(
            f"\nwhere the gateway's CPU goes (py-spy, {prof['samples']} samples, "
            f"{prof['rps_while_profiled']:.0f} req/s while profiled):"
        )
        for layer, share in prof["layers"].items():
            text.append(f"  {100 * share:5.1f}%  {layer}")
    elif prof:
        text.append(f"profile: {prof.get('skipped')}")
    text.append("\ncriteria (issue 15, item 2):")
    for name, c in result["criteria"].items():
        text.append(f"  [{'PASS' if c['pass'] else 'FAIL'}] {name}: {c['measured']}")
    m = result["machine"]
    text.append(
        f"\nmachine: {m['cpus']} cores, load avg {m['loadavg_start']} -> {m['loadavg_end']}; "
        f"other tenants used {m['others_cores_mean']:.2f} cores on average during the run"
    )
    return "\n".join(text)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="rtlm-overhead-"))
    fast = ServerProcess(
        "backend_fast",
        paced_backend_argv(tokens_per_s=1e6, ttft_s=0.0, default_max_tokens=1),
        log_dir=log_dir,
    )
    slow = ServerProcess(
        "backend_slow",
        paced_backend_argv(tokens_per_s=args.stream_tokens_per_s, ttft_s=0.0),
        log_dir=log_dir,
    )
    servers = [fast, slow]
    try:
        fast.start()
        slow.start()
        cap = max(args.concurrency, args.streams) * 2
        gw_fast = ServerProcess(
            "gateway_fast",
            gateway_argv([fast.url], max_inflight=cap, policy=args.policy),
            log_dir=log_dir,
        )
        gw_slow = ServerProcess(
            "gateway_slow",
            gateway_argv([slow.url], max_inflight=cap, policy=args.policy),
            log_dir=log_dir,
        )
        servers += [gw_fast, gw_slow]
        gw_fast.start()
        gw_slow.start()
        proxies = []
        if args.reference:
            for kind in _REFERENCES:
                proxy = ServerProcess(
                    f"proxy_{kind}",
                    [
                        sys.executable,
                        str(Path(__file__).resolve().parent / "_passthrough_proxy.py"),
                        "--backend",
                        fast.url,
                        "--port",
                        "{port}",
                        "--client",
                        kind,
                    ],
                    log_dir=log_dir,
                )
                servers.append(proxy)
                proxies.append(proxy.start())
        meter = CpuMeter({"backend": fast, "gateway": gw_fast})
        whole = CpuMeter(
            {
                "backend_fast": fast,
                "backend_slow": slow,
                "gateway_fast": gw_fast,
                "gateway_slow": gw_slow,
            }
        )
        cpu_start, t_start, load_start = whole.read(), time.perf_counter(), loadavg()

        _say(f"[1/4] latency: {args.latency_requests} sequential requests to each, interleaved")
        latency = await latency_phase(
            {"direct": fast.url, "gateway": gw_fast.url}, args.latency_requests, args.warmup
        )
        _say(
            f"  p50 direct {latency['direct']['p50_ms']:.3f} ms, gateway "
            f"{latency['gateway']['p50_ms']:.3f} ms (+{latency['added_p50_ms']:.3f} ms)"
        )
        _say(
            f"[2/4] throughput: {args.concurrency} clients, {args.throughput_s} s per run, "
            f"{args.repeats} repeats"
        )
        targets = {"direct": (fast.url, meter), "gateway": (gw_fast.url, meter)}
        for proxy in proxies:
            targets[proxy.name] = (proxy.url, CpuMeter({"backend": fast, "gateway": proxy}))
        throughput = await throughput_phase(
            targets, args.concurrency, args.throughput_s, args.repeats
        )
        _say(
            f"[3/4] streams: {args.streams} at once, {args.stream_tokens} tokens each at "
            f"{args.stream_tokens_per_s} tok/s"
        )
        streams = {}
        for name, base in (("direct", slow.url), ("gateway", gw_slow.url)):
            is_gw = name == "gateway"
            streams[name] = await streams_run(
                base,
                args.streams,
                args.stream_tokens,
                gw_slow.url if is_gw else None,
                gw_slow if is_gw else None,
            )
            s = streams[name]
            _say(
                f"  {name}: {s['completed']}/{s['streams']} completed, {s['error_count']} "
                f"errors, peak open {s['peak_open_client_side']}"
            )
        profile = None
        if args.profile:
            _say(f"[4/4] profile: py-spy on the gateway, {args.profile_s} s of throughput")
            raw = Path(args.profile_out or (log_dir / "gateway_profile.raw"))
            raw.parent.mkdir(parents=True, exist_ok=True)
            profile = await profile_phase(
                gw_fast.url, gw_fast, args.concurrency, args.profile_s, raw, meter
            )
        else:
            _say("[4/4] profile: skipped (--profile)")
        cpu = CpuMeter.delta(cpu_start, whole.read())
        elapsed = time.perf_counter() - t_start
        load_end = loadavg()
    finally:
        for server in reversed(servers):
            server.stop()

    gs = streams["gateway"]
    criteria = {
        "gateway adds <= 1 ms p50 latency": {
            "pass": latency["added_p50_ms"] <= 1.0,
            "measured": f"+{latency['added_p50_ms']:.3f} ms (paired median "
            f"+{latency['added_paired_median_ms']:.3f} ms)",
        },
        ">= 1,000 non-streaming req/s through the gateway": {
            "pass": throughput["gateway_rps_best"] >= 1000,
            "measured": f"{throughput['gateway_rps_median']:.0f} req/s median, "
            f"{throughput['gateway_rps_best']:.0f} best (direct "
            f"{throughput['direct_rps_median']:.0f}); gateway one-core ceiling from its CPU "
            f"per request: {throughput['gateway_one_core_ceiling_rps']:.0f} req/s",
        },
        f">= 500 concurrent streams held (ran {args.streams})": {
            "pass": args.streams >= 500
            and gs["completed"] == args.streams
            and gs["error_count"] == 0
            and gs["peak_open_client_side"] >= 500,
            "measured": f"{gs['completed']}/{args.streams} completed, {gs['error_count']} "
            f"errors, {gs['peak_open_client_side']} open at once (gateway in-flight gauge "
            f"peak {gs['peak_inflight_gateway_metric']})",
        },
    }
    return {
        "benchmark": "gateway_overhead",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": vars(args),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "others_cores_mean": cpu["others"] / elapsed,
            "note": "shared machine: other tenants' CPU use is measured in others_cores_mean; "
            "the load generator (this process) runs on the same cores as the servers",
        },
        "code": code_version(),
        "cpu_s_whole_run": cpu,
        "elapsed_s": elapsed,
        "latency": latency,
        "throughput": throughput,
        "streams": streams,
        "profile": profile,
        "criteria": criteria,
        "log_dir": str(log_dir),
    }


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--latency-requests",
        type=int,
        default=2000,
        help="sequential requests each way (default 2000)",
    )
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--throughput-s", type=float, default=10.0, help="seconds per run")
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="direct/gateway throughput pairs, order alternating (default 2)",
    )
    ap.add_argument("--streams", type=int, default=500)
    ap.add_argument("--stream-tokens", type=int, default=60)
    ap.add_argument("--stream-tokens-per-s", type=float, default=10.0)
    ap.add_argument("--policy", default="heuristic")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy profile of the gateway during one more throughput run",
    )
    ap.add_argument(
        "--reference",
        action="store_true",
        help="also measure the throughput of bare pass-through proxies (FastAPI + aiohttp / "
        "httpx / httpx2: benchmarks/_passthrough_proxy.py)",
    )
    ap.add_argument("--profile-s", type=float, default=10.0)
    ap.add_argument("--profile-out", help="py-spy collapsed stacks (default: in --log-dir)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="short everything (< 1 min): 300 latency pairs, 3 s runs, 1 repeat",
    )
    ap.add_argument("--log-dir", help="servers' logs (default: a temp dir)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.latency_requests, args.warmup = min(args.latency_requests, 300), 50
        args.throughput_s, args.repeats = min(args.throughput_s, 3.0), 1
        args.profile_s = min(args.profile_s, 3.0)
    signal.signal(signal.SIGTERM, _interrupt)  # e.g. `timeout`: stop the servers, as Ctrl-C
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:  # the same fast event loop as the servers
        result = uvloop.run(run(args))
    print()
    print(report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
