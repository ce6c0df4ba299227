"""Study (SIMULATED): how far any length-aware router can get below Serve's power-of-two on
AlpacaEval lengths, and whether ranking replicas by the request's own predicted finish time
beats ranking them by predicted backlog.

The workload is built as ``benchmarks/ray_router.py`` builds it: AlpacaEval prompts of one
model, the library's predictor warmed on the even-id prompts, requests drawn from the odd-id
ones with their real lengths (capped at 2048), Poisson arrivals at ``load`` of the replicas'
capacity (4 slots each at ``tokens_per_s``), ``max(300, 100 x replicas)`` requests per sequence,
several sequences (seeds). Every arm of a cell runs the same sequences on ``_routing_sim``
(the real ``WorkBook``). The arms:

- ``pow2`` / ``pow2-fcfs``: Serve's power-of-two in front of key-ordered / FCFS replicas
  (``pow2-fcfs`` is the default stack of BENCHMARKS 10.1); ``least-requests``: the replica
  with the fewest requests of all (no lengths), to tell what at scale is only "look at every
  replica" from what is length-aware;
- ``work``: the library's ``WorkBook`` (least predicted backlog first, as ``LengthAwareRouter``),
  ``finish``: :class:`FinishTimeBook` (the request's own earliest predicted finish first), both
  with the predictor's lengths, ``-fcfs`` in front of FCFS replicas;
- ``oracle-*``: predictions = the true lengths (for the router and the replicas' key);
- ``clairvoyant``: exact replica state and true lengths, each request to where it finishes first;
  ``clairvoyant-total``: to where it adds least to the summed response time there (under FCFS
  the same as ``clairvoyant``: nothing queued there is overtaken); both cost O(replicas x queue)
  a decision, so they run up to ``--clairvoyant-max-replicas``;
- ``zero-wait bound``: the mean of each request's service time on the fastest replica, a floor
  under the mean response time of every router on this engine model (no request runs faster
  than one slot of the fastest replica).

Ratios are of pooled mean (and p99) response times over the seeds, to ``pow2`` (the issue's
baseline: power-of-two, key-ordered replicas, the same predictions) unless said otherwise.

    python benchmarks/studies/routing_ceiling.py --json benchmarks/results/routing_ceiling.json
    python benchmarks/studies/routing_ceiling.py --measured \
        --json benchmarks/results/routing_ceiling_measured.json  # the Ray runs' own sequences
    python benchmarks/studies/routing_ceiling.py --quick      # 2 and 16 replicas, 2 seeds
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from _routing_sim import poisson_times, simulate  # noqa: E402

from rtlm_adapt.data import load_prompts  # noqa: E402
from rtlm_adapt.integrations.front import Front  # noqa: E402
from rtlm_adapt.integrations.routing import WorkBook  # noqa: E402
from rtlm_adapt.knobs import Knobs  # noqa: E402
from rtlm_adapt.predictor import LengthPredictor  # noqa: E402

#: Model -> per-slot tokens/s, as in BENCHMARKS 10's runs.
MODELS = {"Mistral-7B-Instruct-v0.2": 1000.0, "phi-2": 400.0}
SLOTS = 4
MAX_TOKENS = 2048
#: arm -> (router, replicas' queue order, lengths the router and the queue key see, book)
ARMS: dict[str, tuple[str, str, str, str]] = {
    "pow2": ("power-of-two", "priority", "predicted", "work"),
    "pow2-fcfs": ("power-of-two", "fcfs", "predicted", "work"),
    "least-requests": ("least-requests", "priority", "predicted", "work"),
    "work": ("length-aware", "priority", "predicted", "work"),
    "finish": ("length-aware", "priority", "predicted", "finish"),
    "work-fcfs": ("length-aware", "fcfs", "predicted", "work"),
    "finish-fcfs": ("length-aware", "fcfs", "predicted", "finish"),
    "oracle-pow2": ("power-of-two", "priority", "true", "work"),
    "oracle-work": ("length-aware", "priority", "true", "work"),
    "oracle-finish": ("length-aware", "priority", "true", "finish"),
    "oracle-work-fcfs": ("length-aware", "fcfs", "true", "work"),
    "oracle-finish-fcfs": ("length-aware", "fcfs", "true", "finish"),
    "clairvoyant": ("clairvoyant", "priority", "true", "work"),
    "clairvoyant-fcfs": ("clairvoyant", "fcfs", "true", "work"),
    "clairvoyant-total": ("clairvoyant-total", "priority", "true", "work"),
}


class FinishTimeBook(WorkBook):
    """The book ranking replicas by the routed request's own predicted finish time there
    (tried here, not kept in the library: see BENCHMARKS 10.3).

    At each replica: this caller's holds, oldest first; the oldest ``slots`` run, each with
    what is left of its predicted tokens since it was reserved (none, if overdue); the rest
    queue. The request starts when a slot is free of the holds queued ahead of it (under
    ``queue_order="priority"`` those predicted no longer than it, under ``"fcfs"`` all of
    them) and then runs its predicted tokens at one slot's speed. Least finish first; equal
    finishes (a free slot at each) to the replica holding fewer requests, then by work.
    """

    def __init__(self, clock: Any, *, slots: int, queue_order: str) -> None:
        super().__init__(clock=clock)
        self.slots = slots
        self.queue_order = queue_order

    def finish_s(self, replica: str, tokens: float) -> float:
        """Predicted seconds from now until a request of ``tokens`` sent to ``replica`` ends."""
        now, slots = self.clock(), self.slots
        slot_speed = self.load(replica).tokens_per_s / slots
        holds = sorted(
            (h for h in self._holds.values() if h.replica == replica), key=lambda h: h.since
        )
        running, queued = holds[:slots], holds[slots:]
        free = [max(0.0, h.tokens / slot_speed - (now - h.since)) for h in running]
        free += [0.0] * (slots - len(free))
        heapq.heapify(free)
        if self.queue_order == "priority":
            queued = sorted((h for h in queued if h.tokens <= tokens), key=lambda h: h.tokens)
        for hold in queued:
            heapq.heapreplace(free, free[0] + hold.tokens / slot_speed)
        return free[0] + tokens / slot_speed

    def rank(
        self,
        replicas: Sequence[str],
        *,
        offload: bool,
        long_replicas: int = 0,
        tokens: float = 0.0,
    ) -> list[str]:
        """``replicas`` by the request's predicted finish (no long group here)."""
        counts = Counter(h.replica for h in self._holds.values())
        return sorted(
            replicas,
            key=lambda r: (
                self.finish_s(r, tokens),
                counts[r],
                self.load(r).work_s,
                self._random.random(),
            ),
        )


def lengths_and_predictions(model: str, tokens_per_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The odd-id prompts' true lengths and the warmed predictor's predictions (as
    ``ray_router.make_jobs``)."""
    samples = load_prompts(f"alpaca:{model}")
    train = [s for s in samples if int(s.id) % 2 == 0]
    test = [s for s in samples if int(s.id) % 2 == 1]
    predictor = LengthPredictor.pretrained()
    front = Front(predictor, Knobs(), tokens_per_s)
    for s in train:
        predictor.learn_one(front.plan(s.prompt).features, s.response_tokens)
    true = np.array([min(s.response_tokens, MAX_TOKENS) for s in test])
    pred = np.array([front.plan(s.prompt).predicted_tokens for s in test])
    return true, pred


#: One request sequence: arrival times, true lengths, predicted lengths.
Sequence3 = tuple[np.ndarray, np.ndarray, np.ndarray]


def sampled_sequences(
    true: np.ndarray,
    pred: np.ndarray,
    *,
    replicas: int,
    load: float,
    tokens_per_s: float,
    seeds: int,
    speed_factors: list[float],
) -> list[Sequence3]:
    """``seeds`` sequences of ``max(300, 100 x replicas)`` requests drawn from the pool, Poisson
    arrivals at ``load`` of the replicas' capacity (as ``ray_router.make_jobs``)."""
    out = []
    for seed in range(seeds):
        count = max(300, 100 * replicas)
        pick = np.random.default_rng(1000 * seed + replicas).integers(0, len(true), count)
        t, p = true[pick], pred[pick]
        rate = load * sum(speed_factors) * SLOTS * tokens_per_s / t.mean()
        out.append((poisson_times(count, rate, 1000 * seed + replicas), t, p))
    return out


def run_cell(
    sequences: list[Sequence3],
    *,
    replicas: int,
    load: float,
    tokens_per_s: float,
    speed_factors: list[float],
    arms: list[str],
) -> dict[str, Any]:
    """Every arm on the same sequences; pooled response-time figures and ratios."""
    rts: dict[str, list[tuple[float, float, int]]] = {a: [] for a in arms}
    bound = []
    per_seed: list[dict[str, float]] = []
    for seed, (arrivals, t, p) in enumerate(sequences):
        common = dict(
            replicas=replicas,
            slots=SLOTS,
            tokens_per_s=tokens_per_s,
            arrivals=arrivals,
            true_tokens=list(t),
            speed_factors=speed_factors,
            seed=seed,
        )
        means = {}
        for arm in arms:
            router, order, lengths, ranking = ARMS[arm]
            book = None
            if ranking == "finish":
                book = partial(FinishTimeBook, slots=SLOTS, queue_order=order)
            got = simulate(
                router,
                **common,
                predicted=list(t if lengths == "true" else p),
                queue_order=order,
                make_book=book,
            )
            rts[arm].append((got.mean_rt_s, got.p99_rt_s, len(t)))
            means[arm] = got.mean_rt_s
        bound.append((float(np.mean(t)) / (tokens_per_s * max(speed_factors)), len(t)))
        per_seed.append({a: means[a] / means["pow2"] for a in arms})
    pooled = {
        a: {
            "mean_rt_s": sum(m * n for m, _, n in v) / sum(n for *_, n in v),
            "p99_rt_s": statistics.fmean(q for _, q, _ in v),  # mean of the seeds' p99
        }
        for a, v in rts.items()
    }
    bound_s = sum(b * n for b, n in bound) / sum(n for _, n in bound)
    base = pooled["pow2"]
    return {
        "replicas": replicas,
        "load": load,
        "speed_factors": speed_factors,
        "seeds": len(sequences),
        "requests_per_seed": len(sequences[0][1]),  # every sequence of a cell: as many
        "arms": pooled,
        "zero_wait_bound_s": bound_s,
        "mean_x_pow2": {a: m["mean_rt_s"] / base["mean_rt_s"] for a, m in pooled.items()}
        | {"zero-wait bound": bound_s / base["mean_rt_s"]},
        "p99_x_pow2": {a: m["p99_rt_s"] / base["p99_rt_s"] for a, m in pooled.items()},
        "mean_x_pow2_per_seed": {a: [s[a] for s in per_seed] for a in arms},
    }


def measured_sequence(model: str, tokens_per_s: float, load: float, slow: float) -> Sequence3:
    """The very sequence a ``ray_router.py`` run at 2 replicas sent (BENCHMARKS 10, seed 0)."""
    from ray_router import make_jobs, parse_args

    argv = ["--model", model, "--tokens-per-s", str(tokens_per_s), "--load", str(load)]
    jobs, _ = make_jobs(parse_args([*argv, "--slow-replica-factor", str(slow)]))
    return (
        np.array([j.arrival_s for j in jobs]),
        np.array([j.true_tokens for j in jobs]),
        np.array([j.predicted for j in jobs]),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 16, 64])
    parser.add_argument("--loads", type=float, nargs="+", default=[0.85, 0.95])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument(
        "--slow-factor",
        type=float,
        default=0.5,
        help="unequal cells: every second replica (at 2: the last) runs at this speed",
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--no-unequal", action="store_true", help="skip the unequal cells")
    parser.add_argument("--clairvoyant-max-replicas", type=int, default=16)
    parser.add_argument(
        "--measured",
        action="store_true",
        help="2 replicas, the very sequences of BENCHMARKS 10's Ray Serve runs (one each)",
    )
    parser.add_argument(
        "--seeds-at-64", type=int, default=4, help="seeds of cells with 64 or more replicas"
    )
    parser.add_argument("--quick", action="store_true", help="2 and 16 replicas, 0.85, 2 seeds")
    args = parser.parse_args(argv)
    if args.quick:
        args.replicas, args.loads, args.seeds = [2, 16], [0.85], 2
    if args.measured:
        args.replicas = [2]
    cells = []
    t0 = time.monotonic()
    for model in args.models:
        tps = MODELS[model]
        true, pred = lengths_and_predictions(model, tps)
        for unequal in (False,) if args.no_unequal else (False, True):
            for replicas in args.replicas:
                factors = [args.slow_factor if unequal and r % 2 else 1.0 for r in range(replicas)]
                for load in args.loads:
                    if args.measured:
                        seqs = [measured_sequence(model, tps, load, factors[-1])]
                    else:
                        seqs = sampled_sequences(
                            true,
                            pred,
                            replicas=replicas,
                            load=load,
                            tokens_per_s=tps,
                            seeds=args.seeds if replicas < 64 else args.seeds_at_64,
                            speed_factors=factors,
                        )
                    cell = run_cell(
                        seqs,
                        replicas=replicas,
                        load=load,
                        tokens_per_s=tps,
                        speed_factors=factors,
                        arms=[
                            a
                            for a in args.arms
                            if replicas <= args.clairvoyant_max_replicas
                            or not a.startswith("clairvoyant")
                        ],
                    )
                    cell.update(model=model, tokens_per_s=tps, unequal=unequal)
                    cells.append(cell)
                    print_cell(cell, [*args.arms, "zero-wait bound"])
    results = {
        "SIMULATED": "every figure here is from benchmarks/_routing_sim.py, not a real run",
        "study": "benchmarks/studies/routing_ceiling.py",
        "settings": vars(args) | {"slots": SLOTS, "max_tokens": MAX_TOKENS},
        "arms": {
            a: dict(zip(("router", "queue_order", "lengths", "book"), v, strict=True))
            for a, v in ARMS.items()
            if a in args.arms
        },
        "cells": cells,
        "wall_s": time.monotonic() - t0,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} cores (shared), "
        f"{platform.python_version()}",
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_cell(cell: dict[str, Any], names: list[str]) -> None:
    """One line per cell: each arm's mean x pow2 (SIMULATED; "-": not run in this cell)."""
    if not getattr(print_cell, "header", False):
        print_cell.header = True  # type: ignore[attr-defined]
        print("SIMULATED mean response time x power-of-two (key-ordered replicas, predictions)")
        print(f"{'model':>10} {'speeds':>7} {'n':>3} {'load':>5} {'pow2 s':>7}", end="")
        print("".join(f" {a[:13]:>13}" for a in names))
    x = cell["mean_x_pow2"]
    speeds = "unequal" if cell["unequal"] else "equal"
    print(
        f"{cell['model'][:10]:>10} {speeds:>7} {cell['replicas']:>3} {cell['load']:>5.2f}"
        f" {cell['arms']['pow2']['mean_rt_s']:>7.3f}"
        + "".join(f" {x[a]:>13.3f}" if a in x else f" {'-':>13}" for a in names),
        flush=True,
    )


if __name__ == "__main__":
    main()
