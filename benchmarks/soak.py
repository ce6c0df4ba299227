"""Soak test: many requests through the simulated loop with injected executor faults.

Checks that every request ends exactly once (``lost`` and ``duplicated`` must be 0) and that
memory stays flat: the loop keeps no completions (``keep_completions=False``), requests are fed
in chunks, and the ends are tallied in a preallocated byte array (one byte per request), so
nothing grows with the run except what the code under test keeps.

    python benchmarks/soak.py --requests 100000 --fault-rate 0.01 --garbage-rate 0.001 \\
        --json soak.json
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.request import TRUE_LENGTH_KEY, Request
from rtlm_adapt.serving.faults import FaultyExecutor
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.sim import SimulatedExecutor

COST = StepCost("soak", decode_s_base=0.02, decode_s_per_seq=0.004, decode_s_per_ctx_token=0.0,
                prefill_s_base=0.01, prefill_s_per_token=1e-4, max_batch_size=16)
PROMPTS = [
    "Name one prime number.",
    "Write a detailed essay about the history of the printing press.",
    "Translate 'good morning' into French.",
    "Explain step by step how TCP congestion control works.",
    "List 5 ideas for a birthday party.",
    "日本語で自己紹介を書いてください 🙂",
]


def rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--fault-rate", type=float, default=0.01)
    ap.add_argument("--garbage-rate", type=float, default=0.001)
    ap.add_argument("--rate", type=float, default=8.0, help="arrivals per virtual second")
    ap.add_argument("--chunk", type=int, default=2000, help="requests fed per advance()")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=20, help="RSS samples over the run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.getLogger("rtlm_adapt").setLevel(logging.ERROR)  # faults are expected here

    n = args.requests
    ends = bytearray(n)  # ends per request (saturating at 255)
    extra = {"unknown": 0}

    def on_completion(c) -> None:
        i = int(c.request_id[1:])
        if 0 <= i < n:
            ends[i] = min(255, ends[i] + 1)
        else:
            extra["unknown"] += 1

    ctl = AdaptiveController("heuristic", profiles={"p": COST, "s": COST}, max_queue=5000)
    primary = FaultyExecutor(SimulatedExecutor("p", COST), args.fault_rate, args.garbage_rate,
                             seed=args.seed + 1)
    secondary = FaultyExecutor(SimulatedExecutor("s", COST), args.fault_rate, args.garbage_rate,
                               seed=args.seed + 2)
    loop = ServingLoop(ctl, primary, secondary, on_completion=on_completion,
                       step_timeout_s=30.0, keep_completions=False)

    rng = np.random.default_rng(args.seed)
    t_arrival = 0.0
    samples: list[dict] = []
    sample_every = max(1, n // max(1, args.samples))
    next_sample = 0
    t0 = time.perf_counter()
    for start in range(0, n, args.chunk):
        k = min(args.chunk, n - start)
        gaps = rng.exponential(1.0 / args.rate, k)
        lengths = np.maximum(1, rng.lognormal(3.0, 1.0, k).astype(int))
        kinds = rng.integers(0, len(PROMPTS), k)
        chunk = []
        for j in range(k):
            t_arrival += float(gaps[j])
            chunk.append(Request(
                f"r{start + j}", PROMPTS[kinds[j]], t_arrival, deadline=t_arrival + 30.0,
                max_tokens=4096, metadata={TRUE_LENGTH_KEY: int(lengths[j])},
            ))
        loop.add_requests(chunk)
        loop.advance(t_arrival)
        if start + k >= next_sample:
            samples.append({"requests": start + k, "rss_mb": round(rss_mb(), 1),
                            "elapsed_s": round(time.perf_counter() - t0, 1)})
            next_sample += sample_every
    loop.advance(float("inf"))
    elapsed = time.perf_counter() - t0
    samples.append({"requests": n, "rss_mb": round(rss_mb(), 1), "elapsed_s": round(elapsed, 1)})

    s = ctl.stats()
    res = loop.result
    arr = np.frombuffer(bytes(ends), dtype=np.uint8)
    warm = [x["rss_mb"] for x in samples if x["requests"] >= n // 5]
    out = {
        "submitted": s.submitted,
        "completed": res.completed,
        "failed": res.failed,
        "lost": int((arr == 0).sum()),
        "duplicated": int((arr > 1).sum()) + extra["unknown"],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_after_warmup_mb": {"min": min(warm), "max": max(warm)} if warm else None,
        "rss_samples": samples,
        "failures": dict(s.failures),
        "balanced": s.balanced,
        "faults": res.faults,
        "garbage": res.garbage,
        "retries": res.retries,
        "dropped_completions": res.dropped,
        "injected": dict(primary.injected + secondary.injected),
        "learned_lengths": ctl.predictor.n_learned,
        "virtual_s": round(loop.now, 1),
        "wall_s": round(elapsed, 1),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    text = json.dumps(out, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    summary = {k: out[k] for k in ("submitted", "completed", "failed", "lost", "duplicated",
                                   "peak_rss_mb", "rss_after_warmup_mb", "wall_s")}
    print(json.dumps(summary))
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["lost"] == 0 and result["duplicated"] == 0 else 1)
