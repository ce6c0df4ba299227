"""Soak the gateway: many requests, backend faults, a backend crash, client disconnects.

Issue 15, "Done means" item 3. Everything runs as separate processes: two paced backends with
``--fault-rate`` (HTTP 500, dropped connections, streams cut midway), the gateway in front of
both (``rtlm-adapt serve --state PATH``), and this process as the clients (aiohttp):

* ``--requests`` requests (half streamed, half chat), at most ``--concurrency`` in flight; each
  asks for ``max_tokens`` from its prompt's family (short, medium or long answers), so the
  gateway's predictor has something to learn;
* ``--disconnect-rate`` of them are abandoned by the client (the connection is closed, like a
  user going away): a non-streaming one after a random delay (while queued, upstream, or just
  as it ends), a streaming one after a random number of content chunks;
* at ``--kill-at`` of the run one backend is killed with SIGKILL (by PID) and restarted on the
  same port ``--down-s`` seconds later;
* the gateway's RSS is sampled all along (at 10%, 50% and 100% of the requests in the report).

At the end, with nothing left in flight, the client's count of what it sent and what came back
is reconciled with the gateway's ``rtlm_requests_total{outcome,reason}`` (its ``/metrics``) and
with the controller's own counters (``stats()``, from the ``--state`` file a graceful stop writes):
every request that reached the gateway must be counted exactly once, and the differences must be
explained by disconnects. Then the gateway is killed with SIGKILL and restarted with its state
file: it must predict a probe prompt exactly as the state saved before the kill does (and not as
a fresh gateway would). Exits non-zero if anything does not balance.

    python benchmarks/gateway_soak.py --requests 10000 --json benchmarks/results/gateway_soak.json
    python benchmarks/gateway_soak.py --requests 1000      # about 20 s, to try it out
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import (  # noqa: E402
    ServerProcess,
    code_version,
    gateway_argv,
    loadavg,
    paced_backend_argv,
    sse_chunks,
)

from rtlm_adapt.controller import AdaptiveController  # noqa: E402
from rtlm_adapt.persistence import read_state  # noqa: E402
from rtlm_adapt.request import FAILURE_REASONS, Request  # noqa: E402

STATE_KIND = "rtlm_adapt.AdaptiveController"

# Prompt families and the answer lengths (max_tokens) the clients ask for: the predictor learns
# that "Write a detailed essay about X" is long and "Name one X" short.
FAMILIES = {
    "short": (
        ["Name one {t}.", "Give a one-word answer: what is a {t}?", "Is a {t} big? Yes or no."],
        (1, 6),
    ),
    "medium": (
        ["List five facts about {t}.", "Summarize what a {t} is in two sentences."],
        (8, 16),
    ),
    "long": (
        [
            "Write a detailed essay about the history of the {t}.",
            "Explain step by step, with examples, how a {t} works and why it matters.",
        ],
        (24, 48),
    ),
}
TOPICS = [
    "bridge",
    "river",
    "printing press",
    "violin",
    "satellite",
    "volcano",
    "compiler",
    "lighthouse",
    "glacier",
    "telescope",
    "bicycle",
    "cathedral",
    "reef",
    "engine",
]
PROBE_PROMPT = "Write a detailed essay about the history of the windmill."


@dataclass
class Spec:
    i: int
    family: str
    prompt: str
    max_tokens: int
    stream: bool
    chat: bool
    #: A leaving client: a non-streaming one cancels after this many seconds ...
    disconnect_after_s: float | None = None
    #: ... a streaming one closes the connection after this many content chunks.
    leave_after_chunks: int | None = None


def make_specs(n: int, disconnect_rate: float, max_disconnect_s: float, seed: int) -> list[Spec]:
    rng = random.Random(seed)
    leaving = set(rng.sample(range(n), round(n * disconnect_rate)))
    specs = []
    for i in range(n):
        family = rng.choice(list(FAMILIES))
        templates, (lo, hi) = FAMILIES[family]
        spec = Spec(
            i=i,
            family=family,
            prompt=rng.choice(templates).format(t=rng.choice(TOPICS)),
            max_tokens=rng.randint(lo, hi),
            stream=rng.random() < 0.5,
            chat=rng.random() < 0.5,
        )
        if i in leaving:
            if spec.stream:
                spec.leave_after_chunks = rng.randint(1, spec.max_tokens)
            else:
                spec.disconnect_after_s = rng.uniform(0.0, max_disconnect_s)
        specs.append(spec)
    return specs


class _Leave(Exception):
    """A streaming client going away mid-stream."""


def _body(spec: Spec) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": "paced", "max_tokens": spec.max_tokens}
    if spec.chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = spec.prompt
    if spec.stream:
        body["stream"] = True
    return path, body


# -- one client ----------------------------------------------------------------------------------
async def _request(session: aiohttp.ClientSession, base: str, spec: Spec, rec: dict) -> None:
    """Send one request and classify what came back into ``rec["outcome"]``."""
    path, body = _body(spec)
    async with session.post(base + path, json=body, trace_request_ctx=rec) as r:
        rec["status"] = r.status
        if r.status != 200:
            text = await r.text()
            rec["outcome"] = f"http_{r.status}"
            try:
                rec["error"] = json.loads(text)["error"]["message"][:200]
            except (ValueError, KeyError, TypeError):
                rec["error"] = text[:200]
            return
        if not spec.stream:
            answer = await r.json()
            tokens = answer.get("usage", {}).get("completion_tokens")
            rec["outcome"] = "completed" if tokens == spec.max_tokens else "corrupt"
            return
        chunks, done = 0, False
        async for chunk in sse_chunks(r.content):
            if chunk is None:
                done = True
                break
            if "error" in chunk:
                rec["outcome"] = "stream_error"
                rec["error"] = str(chunk["error"].get("message", ""))[:200]
                rec["chunks"] = chunks
                return
            if chunk.get("choices"):
                chunks += 1
                if chunks == spec.leave_after_chunks:
                    rec["chunks"] = chunks
                    raise _Leave  # leaving the block closes the connection mid-stream
        rec["chunks"] = chunks
        if done and chunks == spec.max_tokens:
            rec["outcome"] = "completed"
        else:
            rec["outcome"] = "incomplete" if not done else "corrupt"


async def client(session: aiohttp.ClientSession, base: str, spec: Spec, rec: dict) -> None:
    """One client: the request, cancelled after ``disconnect_after_s`` for a leaving one."""
    task = asyncio.ensure_future(_request(session, base, spec, rec))
    rec["t0"] = time.perf_counter()
    try:
        if spec.disconnect_after_s is None:
            await task
            return
        done, _ = await asyncio.wait({task}, timeout=spec.disconnect_after_s)
        if done:
            task.result()
            rec["left_too_late"] = True  # it ended before the client meant to leave
            return
        task.cancel()  # aiohttp closes the connection: the gateway sees a disconnect
        try:
            await task
        except asyncio.CancelledError:
            pass
        rec["outcome"] = "disconnected"
    except _Leave:
        rec["outcome"] = "disconnected"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        rec["outcome"] = f"transport:{type(exc).__name__}"
        rec["error"] = repr(exc)[:200]
    finally:
        rec["dt_s"] = round(time.perf_counter() - rec.pop("t0"), 4)
        if "outcome" not in rec:  # the watchdog stopped it (see --stall-s)
            rec["outcome"] = "stalled"
            task.cancel()


def _tracing() -> aiohttp.TraceConfig:
    """Notes in each request's record whether its headers and body were written to the socket
    (a request cancelled before that never reached the gateway)."""
    trace = aiohttp.TraceConfig()

    async def headers_sent(session: Any, ctx: Any, params: Any) -> None:
        if isinstance(ctx.trace_request_ctx, dict):
            ctx.trace_request_ctx["headers_sent"] = True

    async def chunk_sent(session: Any, ctx: Any, params: Any) -> None:
        if isinstance(ctx.trace_request_ctx, dict):
            ctx.trace_request_ctx["body_sent"] = True

    trace.on_request_headers_sent.append(headers_sent)
    trace.on_request_chunk_sent.append(chunk_sent)
    return trace


# -- the gateway, from outside -------------------------------------------------------------------
async def scrape(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(base + "/metrics") as r:
        text = await r.text()
    out: dict[str, Any] = {"requests": {}, "inflight": {}, "healthy": {}, "retries": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "rtlm_requests_total":
                out["requests"][f"{s.labels['outcome']}:{s.labels['reason']}"] = int(s.value)
            elif s.name == "rtlm_inflight":
                out["inflight"][s.labels["backend"]] = int(s.value)
            elif s.name == "rtlm_backend_healthy":
                out["healthy"][s.labels["backend"]] = int(s.value)
            elif s.name == "rtlm_retries_total":
                out["retries"][s.labels["backend"]] = int(s.value)
            elif s.name == "rtlm_queue_length":
                out["queue_length"] = int(s.value)
            elif s.name == "rtlm_invalid_requests_total":
                out.setdefault("invalid", {})[s.labels["status"]] = int(s.value)
    out["total"] = sum(out["requests"].values())
    return out


async def quiesce(session: aiohttp.ClientSession, base: str, timeout_s: float = 30.0) -> dict:
    """Scrape until nothing is queued or in flight and the totals stop moving."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        m = await scrape(session, base)
        idle = m.get("queue_length", 0) == 0 and sum(m["inflight"].values()) == 0
        if idle and last is not None and m["requests"] == last["requests"]:
            return m
        if time.monotonic() > deadline:
            m["not_quiet"] = True
            return m
        last = m
        await asyncio.sleep(0.5)


def state_counters(path: Path) -> dict[str, Any]:
    return dict(read_state(path, kind=STATE_KIND)["counters"])


async def wait_for_save(path: Path, after: float, timeout_s: float = 15.0) -> dict[str, Any]:
    """The state file's counters, once it was written after ``after`` (a time.time())."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if path.stat().st_mtime > after:
                await asyncio.sleep(0.2)  # written atomically (rename), but let it settle
                return state_counters(path)
        except FileNotFoundError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the gateway did not autosave {path} within {timeout_s} s")


def offline_prediction(state: Path | None, policy: str, prompt: str) -> float:
    """What a controller restored from ``state`` (None: a fresh one) predicts for ``prompt``."""
    ctl = AdaptiveController.load(state) if state is not None else AdaptiveController(policy)
    ctl.submit(Request("probe", prompt, arrival_time=0.0))
    return ctl.entry("probe").prediction.length


async def probe(base: str) -> dict[str, Any]:
    body = {"model": "paced", "prompt": PROBE_PROMPT}
    # A connection of its own: a pooled one may belong to the gateway process just killed.
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.post(base + "/v1/completions", json=body) as r,
    ):
        await r.read()
        return {
            "status": r.status,
            "predicted_tokens": r.headers.get("x-rtlm-predicted-tokens"),
            "backend": r.headers.get("x-rtlm-backend"),
        }


def _debug_log(base: str) -> list[dict[str, Any]]:
    import urllib.request

    with urllib.request.urlopen(base + "/debug/requests", timeout=10) as r:
        return json.loads(r.read())


def _tally_backend(log: list[dict[str, Any]]) -> dict[str, int]:
    return dict(collections.Counter(str(e.get("outcome")) for e in log))


# -- the run -------------------------------------------------------------------------------------
async def soak(
    args: argparse.Namespace, work: Path, specs: list[Spec], records: list[dict[str, Any]]
) -> dict[str, Any]:
    state = work / "gateway-state.bin"
    if state.exists():  # a previous run's: the gateway must start from nothing learned
        print(f"removing the previous run's {state}", flush=True)
        state.unlink()
    backends = [
        ServerProcess(
            f"backend_{k}",
            paced_backend_argv(
                tokens_per_s=args.tokens_per_s,
                ttft_s=args.ttft_s,
                default_max_tokens=16,
                fault_rate=args.fault_rate,
                fault_modes=args.fault_modes,
                seed=args.seed + k,
                timeout_keep_alive=5,
            ),
            log_dir=work,
        )
        for k in range(2)
    ]
    gw = ServerProcess(
        "gateway",
        gateway_argv(
            [b.url for b in backends],
            max_inflight=args.max_inflight,
            max_queue=args.max_queue,
            policy=args.policy,
            state=state,
            extra=["--request-timeout", str(args.request_timeout_s)],
        ),
        log_dir=work,
    )
    servers = [*backends, gw]
    result: dict[str, Any] = {}
    try:
        for b in backends:
            b.start()
        gw.start()
        victim = backends[1]
        events: list[dict[str, Any]] = []
        rss: list[tuple[int, float, float]] = []  # (requests ended, seconds, MiB)
        ended = 0
        backend_logs: dict[str, list[dict[str, Any]]] = {b.name: [] for b in backends}
        loop = asyncio.get_running_loop()
        restart: asyncio.Task[None] | None = None  # the killed backend's, once started

        async def restart_victim(t0: float, note: str = "") -> None:
            await loop.run_in_executor(None, victim.start)
            events.append(
                {
                    "event": f"restarted {victim.name} (pid {victim.pid}){note}",
                    "t_s": time.perf_counter() - t0,
                    "requests_ended": ended,
                }
            )

        async def monitor(t0: float) -> None:
            """RSS samples; the backend kill and restart."""
            nonlocal restart
            killed_at = None
            progress_at, last_ended = time.perf_counter(), -1
            while True:
                rss.append((ended, time.perf_counter() - t0, gw.rss_mb()))
                if ended != last_ended:
                    progress_at, last_ended = time.perf_counter(), ended
                stalled = time.perf_counter() - progress_at > args.stall_s
                timeouts = sum(1 for r in records if r.get("outcome") == "transport:TimeoutError")
                if stalled or timeouts >= args.max_timeouts:
                    why = (
                        f"no request ended for {args.stall_s} s"
                        if stalled
                        else f"{timeouts} requests timed out at the client "
                        f"(--client-timeout-s {args.client_timeout_s})"
                    )
                    events.append(
                        {
                            "event": f"ABORTED: {why}; the clients were stopped",
                            "t_s": time.perf_counter() - t0,
                            "requests_ended": ended,
                        }
                    )
                    for w in workers:
                        w.cancel()
                    return
                frac = ended / args.requests
                if killed_at is None and frac >= args.kill_at and args.kill_at < 1:
                    # Its request log dies with it: keep what it saw so far (observer only).
                    try:
                        log = await loop.run_in_executor(None, _debug_log, victim.url)
                        backend_logs[victim.name] += log
                    except OSError:
                        pass
                    victim.kill()
                    killed_at = time.perf_counter()
                    events.append(
                        {
                            "event": f"SIGKILL {victim.name} (pid {victim.proc.pid})",
                            "t_s": killed_at - t0,
                            "requests_ended": ended,
                        }
                    )
                if killed_at is not None and restart is None:
                    if time.perf_counter() - killed_at >= args.down_s:
                        # A task of its own: the end of the run does not cut it short.
                        restart = asyncio.create_task(restart_victim(t0))
                await asyncio.sleep(0.25)

        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=args.client_timeout_s)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, trace_configs=[_tracing()]
        ) as session:
            t0 = time.perf_counter()
            mon = asyncio.create_task(monitor(t0))
            todo = iter(specs)

            async def worker() -> None:
                nonlocal ended
                for spec in todo:
                    await client(session, gw.url, spec, records[spec.i])
                    ended += 1
                    if args.progress and ended % max(1, args.requests // 10) == 0:
                        print(
                            f"  {ended}/{args.requests} ended, {time.perf_counter() - t0:.1f} s",
                            flush=True,
                        )

            workers = [asyncio.ensure_future(worker()) for _ in range(args.concurrency)]
            await asyncio.gather(*workers, return_exceptions=True)
            elapsed = time.perf_counter() - t0
            mon.cancel()
            try:
                await mon
            except asyncio.CancelledError:
                pass
            if restart is None and not victim.running:  # the run ended before it was due
                note = " after the run ended (raise --requests or lower --down-s)"
                restart = asyncio.create_task(restart_victim(t0, note))
            if restart is not None:
                await restart
            rss.append((ended, time.perf_counter() - t0, gw.rss_mb()))

            # -- reconcile ------------------------------------------------------------------
            metrics = await quiesce(session, gw.url)
            for b in backends:
                backend_logs[b.name] += _debug_log(b.url)
            # A graceful stop (SIGTERM) saves the controller's state, counters included:
            # that file is stats() at the end of the run. Then start it again from that file.
            exit_code = gw.stop()
            counters = state_counters(state)
            gw.start()

            # -- SIGKILL the gateway, restart it with its state --------------------------------
            restart = await kill_and_restart(gw, state, args.policy)
        result = {
            "elapsed_s": elapsed,
            "records": records,
            "metrics": metrics,
            "state_counters": counters,
            "gateway_exit_code_on_sigterm": exit_code,
            "rss": rss,
            "events": events,
            "restart": restart,
            "backend_outcomes": {k: _tally_backend(v) for k, v in backend_logs.items()},
            "gateway_log_tracebacks": gw.log_path.read_text(errors="replace").count("Traceback"),
            "gateway_log": str(gw.log_path),
        }
    finally:
        for server in reversed(servers):
            server.stop()
    return result


async def kill_and_restart(gw: ServerProcess, state: Path, policy: str) -> dict[str, Any]:
    """Probe, wait for the autosave, SIGKILL, restart with the same ``--state``, probe again.

    The gateway was just restarted (gracefully) from ``state``: its first probe must predict
    what that file predicts."""
    saved_before = offline_prediction(state, policy, PROBE_PROMPT)
    before = await probe(gw.url)  # the live gateway agrees with its saved state ...
    t = time.time()
    await asyncio.sleep(0.05)
    await wait_for_save(state, t)  # ... then learns from the probe and autosaves that
    expected = offline_prediction(state, policy, PROBE_PROMPT)
    fresh = offline_prediction(None, policy, PROBE_PROMPT)
    old_pid = gw.pid
    gw.kill()  # SIGKILL: no shutdown code runs, only the autosaved file survives
    t_kill = time.perf_counter()
    gw.start()
    up_s = time.perf_counter() - t_kill
    after = await probe(gw.url)
    counters_loaded = state_counters(state)
    got = float(after["predicted_tokens"]) if after["predicted_tokens"] is not None else None
    return {
        "probe_prompt": PROBE_PROMPT,
        "killed_pid": old_pid,
        "restarted_pid": gw.pid,
        "restart_to_healthy_s": up_s,
        "saved_state_predicts_before_probe": saved_before,
        "live_header_before_kill": before["predicted_tokens"],
        "saved_state_predicts_at_kill": expected,
        "fresh_gateway_predicts": fresh,
        "restarted_header": after["predicted_tokens"],
        "restarted_status": after["status"],
        "counters_in_state_file": counters_loaded,
        "live_matches_saved": before["predicted_tokens"] == f"{saved_before:.0f}",
        "restart_matches_saved": got is not None and after["predicted_tokens"] == f"{expected:.0f}",
        "differs_from_fresh": f"{fresh:.0f}" != after["predicted_tokens"],
    }


# -- reconciliation ------------------------------------------------------------------------------
def reconcile(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    # A request the clients never started (the watchdog stopped them) was not sent.
    not_sent = sum(1 for r in run["records"] if "dt_s" not in r)
    records = [r for r in run["records"] if "dt_s" in r]
    outcomes = collections.Counter(r.get("outcome", "missing") for r in records)
    sent = len(records)
    completed = outcomes["completed"]
    disconnected = [r for r in records if r.get("outcome") == "disconnected"]
    n_disc = len(disconnected)
    unsent = sum(1 for r in disconnected if not r.get("body_sent"))
    http_errors = {k: v for k, v in outcomes.items() if k.startswith("http_")}
    stream_errors = outcomes["stream_error"]
    bad = {
        k: v
        for k, v in outcomes.items()
        if k in ("missing", "stalled", "corrupt", "incomplete") or k.startswith("transport:")
    }
    client_errors = sum(http_errors.values()) + stream_errors

    m = run["metrics"]["requests"]
    g_total = run["metrics"]["total"]
    g_completed = m.get("completed:", 0)
    g_failed = {k.split(":", 1)[1]: v for k, v in m.items() if k.startswith("failed:")}
    g_cancelled = g_failed.get("cancelled", 0)
    g_failed_other = sum(v for k, v in g_failed.items() if k != "cancelled")
    never_reached = sent - g_total
    # Disconnected requests the gateway still saw end otherwise (it finished first).
    late_completed = g_completed - completed
    late_failed = g_failed_other - client_errors

    c = run["state_counters"]
    checks = {
        "every client request ended exactly once (one outcome each, none lost)": (
            sum(outcomes.values()) == sent == args.requests and not bad,
            f"{sent} sent ({not_sent} never sent), outcomes {dict(outcomes)}",
        ),
        "gateway idle at the end (queue 0, in flight 0)": (
            not run["metrics"].get("not_quiet")
            and run["metrics"].get("queue_length", 0) == 0
            and sum(run["metrics"]["inflight"].values()) == 0,
            f"queue {run['metrics'].get('queue_length')}, in flight {run['metrics']['inflight']}",
        ),
        "stats() balances (submitted == finished + failed, nothing in flight)": (
            c["submitted"] == c["finished"] + c["failed"] + c["in_flight"]
            and c["in_flight"] == 0
            and sum(c["failures"].values()) == c["failed"],
            f"submitted {c['submitted']}, finished {c['finished']}, failed {c['failed']} "
            f"{c['failures']}, in flight {c['in_flight']}",
        ),
        "metrics agree with stats() (completed and every failure reason)": (
            g_completed == c["finished"]
            and all(g_failed.get(r, 0) == c["failures"].get(r, 0) for r in FAILURE_REASONS)
            and g_total == c["submitted"],
            f"metrics total {g_total} vs submitted {c['submitted']}; completed {g_completed} vs "
            f"finished {c['finished']}",
        ),
        "gateway total == requests sent - never reached; only disconnects never reached it": (
            0 <= never_reached <= n_disc and never_reached >= unsent,
            f"{g_total} = {sent} - {never_reached} (disconnected {n_disc}, of which {unsent} "
            f"before the body was written)",
        ),
        "client completed <= gateway completed, difference only disconnects": (
            0 <= late_completed <= n_disc,
            f"client {completed}, gateway {g_completed} (+{late_completed} that the client "
            f"left just as they finished)",
        ),
        "client errors == gateway failures other than cancelled, difference only disconnects": (
            0 <= late_failed <= n_disc,
            f"client {client_errors} ({http_errors}, stream errors {stream_errors}), gateway "
            f"{g_failed_other}",
        ),
        "gateway cancelled == disconnected that reached it and did not end otherwise": (
            g_cancelled == n_disc - never_reached - late_completed - late_failed,
            f"cancelled {g_cancelled} = {n_disc} - {never_reached} - {late_completed} - "
            f"{late_failed}",
        ),
    }
    checks["no unhandled exception in the gateway (tracebacks in its log, HTTP 500s)"] = (
        run["gateway_log_tracebacks"] == 0 and outcomes["http_500"] == 0,
        f"{run['gateway_log_tracebacks']} tracebacks in {run['gateway_log']}, "
        f"{outcomes['http_500']} answers 500",
    )
    rss = run["rss"]

    def rss_at(frac: float) -> float:
        target = frac * args.requests
        for done, _, mib in rss:
            if done >= target:
                return mib
        return rss[-1][2]

    r10, r50, r100 = rss_at(0.1), rss_at(0.5), rss_at(1.0)
    growth = r100 - r10
    checks["memory flat (RSS at 100% <= RSS at 10% + max(8 MiB, 5%))"] = (
        growth <= max(8.0, 0.05 * r10),
        f"{r10:.1f} -> {r50:.1f} -> {r100:.1f} MiB (max {max(x[2] for x in rss):.1f})",
    )
    rs = run["restart"]
    checks["SIGKILLed gateway restarts with its learned state"] = (
        rs["restart_matches_saved"] and rs["live_matches_saved"] and rs["restarted_status"] == 200,
        f"probe prompt predicted {rs['live_header_before_kill']} tokens by the gateway restarted "
        f"(SIGTERM) from its state file, which predicts "
        f"{rs['saved_state_predicts_before_probe']:.1f}; after learning from that probe the "
        f"autosaved file predicts {rs['saved_state_predicts_at_kill']:.1f}; SIGKILL, restart: "
        f"{rs['restarted_header']} (a fresh gateway: {rs['fresh_gateway_predicts']:.1f})",
    )
    return {
        "client": {
            "sent": sent,
            "never_sent": not_sent,
            "outcomes": dict(outcomes),
            "disconnect_planned": sum(
                1
                for r in records
                if r.get("leaves_after_s") is not None or r.get("leaves_after_chunks") is not None
            ),
            "disconnected": n_disc,
            "disconnected_before_body_sent": unsent,
            "left_too_late": sum(1 for r in records if r.get("left_too_late")),
        },
        "gateway": {
            "total": g_total,
            "completed": g_completed,
            "failed": g_failed,
            "retries": run["metrics"]["retries"],
            "invalid": run["metrics"].get("invalid", {}),
        },
        "never_reached_gateway": never_reached,
        "disconnected_but_gateway_completed": late_completed,
        "disconnected_but_gateway_failed_otherwise": late_failed,
        "rss_mb": {"at_10pct": r10, "at_50pct": r50, "at_100pct": r100, "growth": growth},
        "checks": {k: {"pass": bool(ok), "detail": d} for k, (ok, d) in checks.items()},
        "balanced": all(ok for ok, _ in checks.values()),
    }


def report(result: dict[str, Any]) -> str:
    rec, run = result["reconciliation"], result
    cl, gw = rec["client"], rec["gateway"]
    lines = [
        f"{cl['sent']} requests in {run['elapsed_s']:.1f} s "
        f"({cl['sent'] / run['elapsed_s']:.0f} req/s), events: "
        + "; ".join(f"{e['event']} at {e['t_s']:.1f} s" for e in run["events"])
    ]
    lines.append("")
    lines.append(f"{'client saw':34s} {'count':>7s}   {'gateway counted':34s} {'count':>7s}")
    left = sorted(cl["outcomes"].items(), key=lambda kv: -kv[1])
    right = [("completed", gw["completed"])] + sorted(
        ((f"failed / {k}", v) for k, v in gw["failed"].items()), key=lambda kv: -kv[1]
    )
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ("", "")
        b = right[i] if i < len(right) else ("", "")
        lines.append(f"{a[0]:34s} {a[1]!s:>7s}   {b[0]:34s} {b[1]!s:>7s}")
    lines.append(f"{'total sent':34s} {cl['sent']:>7d}   {'total':34s} {gw['total']:>7d}")
    lines.append("")
    lines.append(
        f"never reached the gateway: {rec['never_reached_gateway']} (all disconnects; "
        f"{cl['disconnected_before_body_sent']} cancelled before the body was written); "
        f"disconnects the gateway finished first: {rec['disconnected_but_gateway_completed']} "
        f"completed, {rec['disconnected_but_gateway_failed_otherwise']} failed; "
        f"{cl['left_too_late']} planned disconnects came after the answer"
    )
    lines.append(f"gateway retries: {gw['retries']}; backends saw: {run['backend_outcomes']}")
    r = rec["rss_mb"]
    lines.append(
        f"gateway RSS: {r['at_10pct']:.1f} MiB at 10%, {r['at_50pct']:.1f} at 50%, "
        f"{r['at_100pct']:.1f} at 100% ({r['growth']:+.1f} MiB); tracebacks in its log: "
        f"{run['gateway_log_tracebacks']}"
    )
    lines.append("")
    for name, c in rec["checks"].items():
        lines.append(f"[{'PASS' if c['pass'] else 'FAIL'}] {name}: {c['detail']}")
    lines.append(f"\naccounting {'BALANCES' if rec['balanced'] else 'DOES NOT BALANCE'}")
    return "\n".join(lines)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight at most")
    ap.add_argument("--fault-rate", type=float, default=0.01, help="per backend request")
    ap.add_argument("--fault-modes", default="status,drop,midstream")
    ap.add_argument("--disconnect-rate", type=float, default=0.05)
    ap.add_argument(
        "--max-disconnect-s",
        type=float,
        default=0.1,
        help="a leaving non-streaming client cancels after uniform(0, this) seconds; a leaving "
        "streaming one closes the connection after a random number of content chunks",
    )
    ap.add_argument(
        "--kill-at",
        type=float,
        default=0.4,
        help="fraction of the run at which one backend is SIGKILLed (1: never)",
    )
    ap.add_argument("--down-s", type=float, default=3.0, help="seconds before it restarts")
    ap.add_argument("--tokens-per-s", type=float, default=2000.0)
    ap.add_argument("--ttft-s", type=float, default=0.005)
    ap.add_argument("--max-inflight", type=int, default=16, help="gateway cap per backend")
    ap.add_argument("--max-queue", type=int, default=10_000)
    ap.add_argument("--policy", default="heuristic")
    ap.add_argument("--request-timeout-s", type=float, default=30.0)
    ap.add_argument("--client-timeout-s", type=float, default=60.0)
    ap.add_argument(
        "--max-timeouts",
        type=int,
        default=50,
        help="stop the clients after this many client-side timeouts (a hung gateway)",
    )
    ap.add_argument(
        "--stall-s",
        type=float,
        default=90.0,
        help="stop the clients if no request ends for this long (a hung gateway)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", help="state file and server logs (default: a temp dir)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--records", help="write every request's record here (JSON lines)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # e.g. `timeout`: stop the servers, as Ctrl-C
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="rtlm-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = loadavg()
    specs = make_specs(args.requests, args.disconnect_rate, args.max_disconnect_s, args.seed)
    records: list[dict[str, Any]] = [
        {
            "i": s.i,
            "stream": s.stream,
            "chat": s.chat,
            "max_tokens": s.max_tokens,
            "leaves_after_s": s.disconnect_after_s,
            "leaves_after_chunks": s.leave_after_chunks,
        }
        for s in specs
    ]
    try:
        try:
            import uvloop
        except ImportError:
            run = asyncio.run(soak(args, work, specs, records))
        else:
            run = uvloop.run(soak(args, work, specs, records))
    finally:
        if args.records:
            with open(args.records, "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
    run["reconciliation"] = reconcile(args, run)
    errors = collections.Counter(
        r.get("error", "")[:80] for r in run["records"] if r.get("outcome") != "completed"
    )
    result = {
        "benchmark": "gateway_soak",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": vars(args),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
            "note": "shared machine; the clients run on the same cores as the servers",
        },
        "code": code_version(),
        "work_dir": str(work),
        **{k: v for k, v in run.items() if k != "records"},
        "client_error_messages": dict(errors.most_common(20)),
    }
    print(report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if result["reconciliation"]["balanced"] else 1


if __name__ == "__main__":
    sys.exit(main())
