"""Real-executor benchmarks (SmolLM2 on this CPU; outside CI).

``throughput``: continuous batching on the real model. A burst of real prompts (AlpacaEval
instructions, all arriving at t=0) served to the end with the batch capped at each ``--caps``
value; generated tokens per wall second. ``--cap1-requests`` serves only the first K prompts at
cap 1 (its tokens/s hardly depends on which prompts; it is the slow one).

``pair``: what the secondary executor buys on this machine. The same burst served by the
primary alone (``--threads`` torch threads) and by the primary plus a secondary sharing its
weights (``--secondary-threads`` torch threads, its own worker thread), both pulling from one
queue; total generated tokens per wall second and the makespan.

The policy comparison with the simulator's fidelity is the CLI::

    rtlm-adapt serve-bench --model smollm2 --requests 80 --load 0.8 --policies fcfs,heuristic \
        --compare-sim --json benchmarks/results/serve_bench_smollm2.json

Usage::

    python benchmarks/serve_bench.py throughput --requests 64 --max-tokens 128 --caps 8,1
    python benchmarks/serve_bench.py pair --requests 32 --max-tokens 128
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import statistics
import threading
import time
from collections import deque
from pathlib import Path

import torch

from rtlm_adapt.calibration.profiler import machine_description, machine_load
from rtlm_adapt.data import find_data_dir
from rtlm_adapt.request import Request
from rtlm_adapt.serving.factory import load_executor, sibling_executor

RESULTS = Path(__file__).resolve().parent / "results"


def alpaca_instructions(n: int, model: str = "gpt4_1106_preview") -> list[str]:
    path = find_data_dir() / "alpaca_eval" / f"{model}.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line)["instruction"] for line in f]
    return rows[:n]


def serve_burst(executor, prompts, max_tokens: int, tag: str, queue=None, lock=None) -> dict:
    """Serve prompts (all arrived) to the end with the executor's batch cap; figures."""
    if queue is None:
        queue = deque(
            Request(f"{tag}{i}", p, 0.0, max_tokens=max_tokens) for i, p in enumerate(prompts)
        )
        lock = threading.Lock()
    t0 = time.perf_counter()
    now, tokens, done, steps = 0.0, 0, [], []
    while True:
        free = executor.max_batch_size - executor.running()
        batch = []
        with lock:
            while free > len(batch) and queue:
                batch.append(queue.popleft())
        if batch:
            executor.admit(batch, now)
        if not executor.running():
            break
        result = executor.step(now)
        now += result.duration_s
        tokens += sum(result.new_tokens.values())
        done += result.finished
        steps.append(result.duration_s)
    wall = time.perf_counter() - t0
    errors = [c for c in done if c.error is not None]
    return {
        "executor": executor.name,
        "cap": executor.max_batch_size,
        "requests": len(done),
        "errors": len(errors),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "steps": len(steps),
        "median_step_s": round(statistics.median(steps), 4) if steps else None,
        "mean_output_tokens": round(statistics.mean(c.output_tokens for c in done), 1)
        if done
        else 0,
        "hit_cap": sum(1 for c in done if c.output_tokens >= max_tokens),
    }


def warm(executor) -> None:
    executor.admit([Request(f"warm-{executor.name}", "Hello!", 0.0, max_tokens=4)], 0.0)
    while executor.running():
        executor.step(0.0)


def cmd_throughput(args) -> dict:
    torch.set_num_threads(args.threads)
    caps = [int(c) for c in args.caps.split(",")]
    prompts = alpaca_instructions(args.requests)
    base = load_executor(args.model, name="cap", max_batch_size=max(caps))
    runs = []
    for cap in caps:
        ex = sibling_executor(base, name=f"cap{cap}", max_batch_size=cap)
        warm(ex)
        chosen = prompts[: args.cap1_requests] if cap == 1 and args.cap1_requests else prompts
        load_before = machine_load()
        run = serve_burst(ex, chosen, args.max_tokens, f"c{cap}-")
        run.update(load_average_before=load_before, load_average_after=machine_load())
        print(json.dumps(run), flush=True)
        runs.append(run)
    by_cap = {r["cap"]: r for r in runs}
    out = {"runs": runs}
    if 1 in by_cap and len(by_cap) > 1:
        top = max(by_cap)
        out[f"speedup_cap{top}_over_cap1"] = round(
            by_cap[top]["tokens_per_s"] / by_cap[1]["tokens_per_s"], 2
        )
        print(f"speedup cap {top} / cap 1: {out[f'speedup_cap{top}_over_cap1']}x", flush=True)
    return out


def cmd_pair(args) -> dict:
    prompts = alpaca_instructions(args.requests)
    torch.set_num_threads(args.threads)
    primary = load_executor(args.model, name="primary", max_batch_size=args.max_batch_size)
    secondary = sibling_executor(
        primary, name="secondary", max_batch_size=args.secondary_max_batch_size
    )
    warm(primary)
    torch.set_num_threads(args.secondary_threads)
    warm(secondary)
    torch.set_num_threads(args.threads)

    alone = serve_burst(primary, prompts, args.max_tokens, "alone-")
    print(json.dumps({"primary_alone": alone}), flush=True)

    queue = deque(
        Request(f"pair-{i}", p, 0.0, max_tokens=args.max_tokens) for i, p in enumerate(prompts)
    )
    lock = threading.Lock()
    results = {}

    def worker(ex, threads):
        torch.set_num_threads(threads)
        results[ex.name] = serve_burst(ex, None, args.max_tokens, "", queue=queue, lock=lock)

    t0 = time.perf_counter()
    threads = [
        threading.Thread(target=worker, args=(primary, args.threads)),
        threading.Thread(target=worker, args=(secondary, args.secondary_threads)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results.values())
    pair = {
        "wall_s": round(wall, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "per_executor": results,
    }
    print(json.dumps({"primary_plus_secondary": pair}), flush=True)
    gain = round(pair["tokens_per_s"] / alone["tokens_per_s"], 2)
    print(f"throughput with the secondary / primary alone: {gain}x", flush=True)
    return {"primary_alone": alone, "primary_plus_secondary": pair, "throughput_gain": gain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("throughput", "pair"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="smollm2")
        p.add_argument("--requests", type=int, default=64)
        p.add_argument("--max-tokens", type=int, default=128)
        p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
        p.add_argument("--json", help="results file (default benchmarks/results/serve_MODE.json)")
        if name == "throughput":
            p.add_argument("--caps", default="8,1")
            p.add_argument("--cap1-requests", type=int, default=0, help="0: all")
        else:
            p.add_argument("--max-batch-size", type=int, default=8)
            p.add_argument("--secondary-max-batch-size", type=int, default=4)
            p.add_argument("--secondary-threads", type=int, default=1)
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load_before = machine_load()
    result = cmd_throughput(args) if args.mode == "throughput" else cmd_pair(args)
    result.update(
        mode=args.mode,
        args=vars(args),
        started_at_utc=started,
        load_average_before=load_before,
        load_average_after=machine_load(),
        machine=machine_description(),
    )
    path = Path(args.json) if args.json else RESULTS / f"serve_{args.mode}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
