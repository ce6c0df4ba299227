"""``rtlm-adapt serve-bench --engine vllm``: policies on a real vLLM server, through the gateway.

One vLLM server (SmolLM2 by default, ``--max-num-seqs K``, ``--scheduling-policy priority``)
serves every policy of the run:

- ``direct``: the clients call vLLM itself, with no gateway and no priority (what vLLM users
  have today: the baseline);
- any controller policy (``fcfs``, ``sjf``, ``heuristic``, ...) through a gateway started for
  that policy alone (a fresh process: every policy starts from the same pretrained predictor),
  with an in-flight cap of K + 4 (``--max-inflight``; ``vllm_replay.EXTRA_INFLIGHT`` says why)
  and vLLM's ``priority`` set from the controller's key;
- ``oracle-sjf`` (or ``NAME+oracle``) ranks by the true lengths, which the client passes in a
  header only these policies read;
- ``NAME@TIER`` runs policy NAME with a gateway that predicts with TIER (``heuristic@encoder``
  beside ``heuristic`` compares the predictors in one run); a bare name uses ``--tier``.

The workload: real prompts with real arrivals (``--arrivals``), at ``--load`` of the engine's
capacity, measured before the run (the steady stretch of a closed loop that keeps the engine
saturated). With ``--lengths dataset`` (the default, as vLLM's own serving benchmark) each
request carries ``max_tokens`` = its real response length in the served model's tokens, capped at
``--max-tokens``, and ``ignore_eos``: the engine generates the real length distribution. With
``--lengths model`` the model decides (greedy, up to ``--max-tokens``); the oracle then ranks by
the lengths of a recording pass (cached).

Policies alternate their order between repeats (``--repeats``), since a shared machine's speed
drifts. The JSON keeps ``serve-bench``'s shape: ``{"policies": {NAME: {"mean_rt_s", ...}}}``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np

from rtlm_adapt.data import PromptSample, assign_deadlines, make_arrivals
from rtlm_adapt.engines.gateway_process import GatewayProcess, gateway_figures
from rtlm_adapt.engines.vllm_replay import (
    compare_sim,
    decode_s_per_token,
    gateway_inflight,
    policy_and_tier,
    probe_fitted_profile,
)
from rtlm_adapt.gateway.headers import PREDICTED_HEADER, PRIORITY_HEADER, QUEUE_HEADER
from rtlm_adapt.metrics import format_table, summarize, summary_json
from rtlm_adapt.request import Completion

DIRECT = "direct"


class GatewayAnswer(NamedTuple):
    """What the gateway decided for one request, read from its answer's headers."""

    predicted_tokens: float
    priority: int  # sent to vLLM
    queue_ms: float  # in the gateway's queue, arrival to admission


@dataclass(frozen=True)
class BenchRequest:
    """One request of the replay: what the client sends, when, and what it should take."""

    id: str
    prompt: str
    arrival_s: float
    deadline_s: float
    max_tokens: int
    #: The length the oracle ranks by (dataset length, or the recording pass's).
    true_tokens: int


async def replay(
    url: str,
    model: str,
    requests: Sequence[BenchRequest],
    *,
    ignore_eos: bool,
    oracle: bool,
    timeout_s: float = 1800.0,
    answers: dict[str, GatewayAnswer] | None = None,
) -> list[Completion]:
    """Send ``requests`` at their arrival offsets (streamed) and time each one. Through the
    gateway, ``answers`` (when given) gets each request's :class:`GatewayAnswer`, for comparing
    what the gateway decided with a replay."""
    # Idle connections expire on the client before uvicorn's and vLLM's 5 s keep-alive closes
    # them on the server: a request sent on a connection the server is closing fails at once.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()

        async def one(r: BenchRequest) -> Completion:
            await asyncio.sleep(max(0.0, r.arrival_s - (time.perf_counter() - start)))
            sent = time.perf_counter() - start
            body: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": r.prompt}],
                "max_tokens": r.max_tokens,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if ignore_eos:
                body["ignore_eos"] = True
            headers = {"x-rtlm-deadline-ms": f"{(r.deadline_s - r.arrival_s) * 1000:.0f}"}
            if oracle:
                headers["x-rtlm-oracle-tokens"] = str(r.true_tokens)
            first = None
            tokens = 0
            error = None
            admitted = sent
            try:
                async with client.stream(
                    "POST", url + "/v1/chat/completions", json=body, headers=headers
                ) as response:
                    if response.status_code != 200:
                        error = f"executor_failure: HTTP {response.status_code}"
                        await response.aread()
                    else:
                        # through the gateway: when a backend took the request (direct: sent)
                        queue_ms = float(response.headers.get(QUEUE_HEADER, 0.0))
                        admitted += queue_ms / 1000
                        if answers is not None and QUEUE_HEADER in response.headers:
                            answers[r.id] = GatewayAnswer(
                                float(response.headers[PREDICTED_HEADER]),
                                int(response.headers[PRIORITY_HEADER]),
                                queue_ms,
                            )
                        async for line in response.aiter_lines():
                            if not line.startswith("data:") or line.endswith("[DONE]"):
                                continue
                            chunk = json.loads(line[5:])
                            if chunk.get("error"):
                                error = f"executor_failure: {chunk['error']}"
                            if chunk.get("choices") and first is None:
                                first = time.perf_counter() - start
                            usage = chunk.get("usage")
                            if usage:
                                tokens = int(usage["completion_tokens"])
            except httpx.HTTPError as exc:
                error = f"executor_failure: {exc!r}"
            end = time.perf_counter() - start
            return Completion(
                request_id=r.id,
                output_tokens=tokens,
                arrival_time=sent,
                start_time=admitted,
                finish_time=end,
                executor="vllm",
                first_token_time=first,
                deadline=sent + (r.deadline_s - r.arrival_s),
                error=error,
            )

        return list(await asyncio.gather(*(one(r) for r in requests)))


async def measure_capacity(
    url: str, model: str, samples: Sequence[PromptSample], *, slots: int, n: int, max_tokens: int
) -> dict[str, float]:
    """The engine's saturated throughput, and the time per token of a request running alone.

    ``2 * slots`` clients run a closed loop over ``n`` requests, so the engine always has a
    waiting request for a freed slot. Throughput counts only the steady stretch: from the
    ``slots``-th completion (the start-up is over) to the completion that takes the last waiting
    request (from then on the engine drains with ever fewer running). Counting the whole run, as
    a closed loop of ``slots`` clients does, charges that drain to capacity: with heavy-tailed
    lengths the last long answers run alone, and capacity came out about a fifth low.
    """
    if n < 3 * slots:
        raise ValueError(
            f"n must be at least 3 * slots = {3 * slots} for a steady stretch, not {n}"
        )
    lengths = [max(1, min(s.response_tokens, max_tokens)) for s in samples[:n]]
    queue = list(zip(samples[:n], lengths, strict=True))
    finishes: list[tuple[float, int]] = []  # (time, tokens) of each completion, in order
    clients = 2 * slots
    async with httpx.AsyncClient(timeout=1800.0) as client:

        async def call(sample: PromptSample, length: int) -> None:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": sample.prompt}],
                "max_tokens": length,
                "ignore_eos": True,
                "temperature": 0.0,
            }
            response = await client.post(url + "/v1/chat/completions", json=body)
            response.raise_for_status()

        alone_len = 64
        t0 = time.perf_counter()
        await call(samples[0], alone_len)
        alone_s = time.perf_counter() - t0

        async def worker() -> None:
            while queue:
                sample, length = queue.pop()
                await call(sample, length)
                finishes.append((time.perf_counter(), length))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    # completion number n - clients pops the last waiting request
    first, last = slots - 1, n - clients - 1
    window_s = finishes[last][0] - finishes[first][0]
    window_tokens = sum(tokens for _, tokens in finishes[first + 1 : last + 1])
    return {
        "requests": float(n),
        "seconds": elapsed,
        "steady_seconds": window_s,
        "steady_requests": float(last - first),
        "tokens_per_s": window_tokens / window_s,
        "requests_per_s": (last - first) / window_s,
        "alone_s_per_token": alone_s / alone_len,
    }


def build_requests(
    chosen: Sequence[PromptSample],
    true_tokens: Sequence[int],
    *,
    rate: float,
    arrivals: str,
    seed: int,
    slo: str,
    mean_service_s: float,
    max_tokens: int,
    dataset_lengths: bool,
) -> list[BenchRequest]:
    """One request per chosen sample, with real arrivals at ``rate`` and deadlines."""
    n = len(chosen)
    times = make_arrivals(arrivals, n, rate, seed)
    deadlines = assign_deadlines(times, mean_service_s, seed=seed, slo=slo)
    return [
        BenchRequest(
            id=str(k),
            prompt=sample.prompt,
            arrival_s=float(t),
            deadline_s=float(d),
            max_tokens=int(true) if dataset_lengths else max_tokens,
            true_tokens=int(true),
        )
        for k, (sample, true, t, d) in enumerate(
            zip(chosen, true_tokens, times, deadlines, strict=True)
        )
    ]


def record_lengths(
    url: str, model: str, samples: Sequence[PromptSample], *, max_tokens: int, cache: Path
) -> list[int]:
    """The model's own greedy lengths for ``samples`` (the oracle of ``--lengths model``),
    recorded once through the engine and cached."""
    key = hashlib.sha256(
        json.dumps([model, max_tokens, [s.prompt for s in samples]]).encode()
    ).hexdigest()[:16]
    path = cache / f"lengths-{key}.json"
    if path.exists():
        return json.loads(path.read_text())

    async def run() -> list[int]:
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=1800.0) as client:

            async def one(sample: PromptSample) -> int:
                async with sem:
                    body = {
                        "model": model,
                        "messages": [{"role": "user", "content": sample.prompt}],
                        "max_tokens": max_tokens,
                        "temperature": 0.0,
                    }
                    response = await client.post(url + "/v1/chat/completions", json=body)
                    response.raise_for_status()
                    return int(response.json()["usage"]["completion_tokens"])

            return list(await asyncio.gather(*(one(s) for s in samples)))

    lengths = asyncio.run(run())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lengths))
    return lengths


def cmd_serve_bench_vllm(args: Any, samples: Sequence[PromptSample]) -> int:
    """Run the policies on vLLM (see the module docstring); print a table, write ``--json``."""
    from rtlm_adapt.engines.vllm_server import VLLMServer, free_port
    from rtlm_adapt.gateway.config import check_tier
    from rtlm_adapt.policies import make_policy
    from rtlm_adapt.serve_bench import prepare_json_folder
    from rtlm_adapt.serving.hf import cache_dir

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        raise ValueError("--policies is empty")
    # SIGTERM unwinds like Ctrl-C, so the servers' context managers stop them by PID.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    default_tier = getattr(args, "tier", "lexical")  # NAME@TIER overrides it per policy
    for name in policies:
        if name != DIRECT:  # an unknown name or tier fails before vLLM starts
            policy, tier = policy_and_tier(name, default_tier)
            make_policy(policy)
            check_tier(tier)
    if args.json:
        prepare_json_folder(args.json)  # not after an hour of benchmark
    dataset_lengths = args.lengths == "dataset"
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    slots = args.max_num_seqs
    inflight = gateway_inflight(slots, getattr(args, "max_inflight", None))
    server = VLLMServer(
        args.model,  # "smollm2": the packaged model, prepared (and served by that name) at start
        max_num_seqs=slots,
        max_model_len=max(2048, args.max_tokens + 1024),
        scheduling_policy="priority",
        kv_blocks=getattr(args, "kv_blocks", None),
    )
    results: dict[str, list[list[Completion]]] = {p: [] for p in policies}
    preemptions: dict[str, list[float]] = {p: [] for p in policies}  # vLLM's, per repeat
    gateway_metrics: dict[str, str] = {}
    timelines: dict[str, list[dict[str, Any]]] = {}  # per policy, one per repeat
    # per gateway policy and repeat: [id, predicted tokens, priority, queue ms] per request
    answers: dict[str, list[list[list[Any]]]] = {}
    with server:
        model = server.model_name
        print(f"vLLM up in {server.startup_seconds:.1f} s at {server.url}", file=sys.stderr)
        kv_cache = kv_cache_figures(server.cache_config())
        print(f"vLLM KV cache: {kv_cache}", file=sys.stderr)
        rng = np.random.default_rng(args.seed + 1)
        calibration_samples = [samples[i] for i in rng.permutation(len(samples))]
        capacity = asyncio.run(
            measure_capacity(
                server.url,
                model,
                calibration_samples,
                slots=slots,
                n=min(len(samples), 10 * slots),
                max_tokens=args.max_tokens,
            )
        )
        rng = np.random.default_rng(args.seed)
        idx = rng.choice(len(samples), size=args.requests, replace=args.requests > len(samples))
        chosen = [samples[i] for i in idx]
        if dataset_lengths:
            true_tokens = [max(1, min(s.response_tokens, args.max_tokens)) for s in chosen]
        else:  # only the prompts this run serves are recorded
            unique = sorted(set(idx.tolist()))
            recorded = record_lengths(
                server.url,
                model,
                [samples[i] for i in unique],
                max_tokens=args.max_tokens,
                cache=cache_dir() / "vllm",
            )
            by_index = dict(zip(unique, recorded, strict=True))
            true_tokens = [by_index[i] for i in idx.tolist()]
        mean_len = float(np.mean(true_tokens))
        rate = args.load * capacity["tokens_per_s"] / mean_len
        mean_service = mean_len * capacity["alone_s_per_token"]
        requests = build_requests(
            chosen,
            true_tokens,
            rate=rate,
            arrivals=args.arrivals,
            seed=args.seed,
            slo=args.slo,
            mean_service_s=mean_service,
            max_tokens=args.max_tokens,
            dataset_lengths=dataset_lengths,
        )
        print(
            f"capacity {capacity['tokens_per_s']:.0f} tok/s = "
            f"{capacity['tokens_per_s'] / mean_len:.3f} req/s at mean length {mean_len:.0f}; "
            f"arrivals {rate:.3f} req/s (load {args.load})",
            file=sys.stderr,
        )
        for repeat in range(args.repeats):
            order = policies if repeat % 2 == 0 else policies[::-1]
            for name in order:
                t0 = time.perf_counter()
                preempted_before = server.preemptions()
                policy, tier = policy_and_tier(name, default_tier)
                oracle = name != DIRECT and make_policy(policy).length_source == "oracle"
                if name == DIRECT:
                    done = asyncio.run(
                        replay(
                            server.url, model, requests, ignore_eos=dataset_lengths, oracle=False
                        )
                    )
                else:
                    with GatewayProcess(
                        server.url,
                        policy=policy,
                        max_inflight=inflight,
                        port=free_port(),
                        tier=tier,
                    ) as gateway:
                        timeline = gateway.sample_every(1.0)
                        decided: dict[str, GatewayAnswer] = {}
                        done = asyncio.run(
                            replay(
                                gateway.url,
                                model,
                                requests,
                                ignore_eos=dataset_lengths,
                                oracle=oracle,
                                answers=decided,
                            )
                        )
                        answers.setdefault(name, []).append(
                            [[r.id, *decided[r.id]] for r in requests if r.id in decided]
                        )
                        gateway_metrics[name] = gateway.metrics_text()
                        timelines.setdefault(name, []).append(timeline.stop())
                results[name].append(done)
                preemptions[name].append(server.preemptions() - preempted_before)
                s = summarize(done)
                print(
                    f"[{repeat + 1}/{args.repeats}] {name}: mean {s.mean_rt_s:.2f} s, "
                    f"p99 {s.p99_rt_s:.2f} s ({time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                )
    pooled = {name: summarize([c for run in runs for c in run]) for name, runs in results.items()}
    print(format_table(pooled))
    out: dict[str, Any] = {
        "engine": "vllm",
        "model": args.model,
        "started_at": started_at,
        "command": " ".join(sys.argv),
        "max_num_seqs": slots,
        "max_inflight": inflight,
        "tier": default_tier,
        "lengths": args.lengths,
        "max_tokens": args.max_tokens,
        "load": args.load,
        "requests": args.requests,
        "repeats": args.repeats,
        "arrivals": args.arrivals,
        "prompts": args.prompts,
        "seed": args.seed,
        "tokenizer": args.tokenizer,
        "capacity": capacity,
        "arrival_rate_rps": rate,
        "mean_true_tokens": mean_len,
        "policies": {name: policy_json(runs) for name, runs in results.items()},
        "per_repeat": {
            name: [policy_json([run]) for run in runs] for name, runs in results.items()
        },
        "gateway_metrics": {name: gateway_figures(text) for name, text in gateway_metrics.items()},
        "gateway_timelines": timelines,
        # per gateway policy and repeat: every answer's [id, predicted tokens, priority sent to
        # vLLM, ms in the gateway's queue], from its x-rtlm-* headers
        "gateway_answers": answers,
        "engine_preemptions": preemptions,
        "kv_cache": kv_cache,
        # per policy and repeat, every request's [id, output tokens, arrival, first token,
        # finish, error, start] (seconds on the run's clock): enough to replay or re-compare a run
        # later
        "completions": {
            name: [[completion_row(c) for c in run] for run in runs]
            for name, runs in results.items()
        },
    }
    if DIRECT in pooled:
        base = pooled[DIRECT]
        out["vs_direct"] = {
            name: {
                "mean_rt_ratio": s.mean_rt_s / base.mean_rt_s,
                "p99_rt_ratio": s.p99_rt_s / base.p99_rt_s,
                "deadline_miss_rate_diff": s.deadline_miss_rate - base.deadline_miss_rate,
            }
            for name, s in pooled.items()
        }
    if getattr(args, "compare_sim", False):
        out["sim_fidelity"] = compare_sim(args, requests, chosen, results, kv_cache)
        fitted = probe_fitted_profile(out, calibration_samples, args)
        if fitted is not None:  # the replay on what this run's probe measured, beside it
            out["sim_fidelity_probe_fit"] = compare_sim(
                args, requests, chosen, results, kv_cache, profile=fitted
            )
        # the scheduler model given the engine's speed during the run (known only after it)
        try:
            out["sim_fidelity_run_pace"] = compare_sim(
                args, requests, chosen, results, kv_cache, match_pace=True
            )
        except ValueError as exc:
            print(f"no replay at the run's pace: {exc}", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def completion_row(c: Completion) -> list[Any]:
    """A request's outcome as a compact JSON row (see ``completions`` in the run's JSON): id,
    output tokens, arrival, first token, finish, the error (None when it completed) and the
    start (when the gateway admitted it to vLLM; ``direct``: when it was sent).

    >>> completion_row(Completion("7", 12, 1.0, 1.5, 3.5, "vllm", first_token_time=1.75))
    ['7', 12, 1.0, 1.75, 3.5, None, 1.5]
    """
    return [
        c.request_id,
        c.output_tokens,
        c.arrival_time,
        c.first_token_time,
        c.finish_time,
        c.error,
        c.start_time,
    ]


def kv_cache_figures(cache_info: Mapping[str, str]) -> dict[str, int | None]:
    """The server's KV cache from its ``vllm:cache_config_info`` labels: blocks, block size and
    tokens (None where vLLM did not report them; the replay then keeps the profile's).

    >>> kv_cache_figures({"block_size": "128", "num_gpu_blocks": "20", "cache_dtype": "auto"})
    {'blocks': 20, 'block_size': 128, 'tokens': 2560}
    >>> kv_cache_figures({})
    {'blocks': None, 'block_size': None, 'tokens': None}
    """

    def number(key: str) -> int | None:
        text = cache_info.get(key, "None")
        return int(text) if text.isdigit() else None

    blocks, block_size = number("num_gpu_blocks"), number("block_size")
    if blocks is None or block_size is None:
        blocks = block_size = None
    tokens = blocks * block_size if blocks is not None and block_size is not None else None
    return {"blocks": blocks, "block_size": block_size, "tokens": tokens}


def policy_json(runs: Sequence[Sequence[Completion]]) -> dict[str, float]:
    """serve-bench's per-policy figures over one or more repeats: response-time percentiles and
    deadline misses over every request, TTFT percentiles, the mean time per token after the first
    (``decode_ms_per_token``), and throughput as the mean of the repeats' (each repeat has its own
    clock, so pooled makespans would overlap)."""
    pooled = [c for run in runs for c in run]
    figures = summary_json(summarize(pooled))
    figures["throughput_rps"] = float(np.mean([summarize(run).throughput_rps for run in runs]))
    ttft = [c.first_token_time - c.arrival_time for c in pooled if c.ok and c.first_token_time]
    figures["ttft_p50_s"] = float(np.percentile(ttft, 50)) if ttft else float("nan")
    figures["ttft_p99_s"] = float(np.percentile(ttft, 99)) if ttft else float("nan")
    figures["decode_ms_per_token"] = 1000 * decode_s_per_token(pooled)
    return figures
