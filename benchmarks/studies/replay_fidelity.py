"""How closely a shadow replay from the middle of a run reproduces what the run did.

    python benchmarks/studies/replay_fidelity.py --json benchmarks/results/replay_fidelity.json

The shadow guard judges a policy from replays of the last 200 requests, started from the live
state the window opened in (BENCHMARKS.md 4.7). Two things a replay takes as given are not
exactly what happened: the backlog (requests waiting or running when the window opened) is
queued afresh, a running request served from its first token; and requests still live when the
replay is made are served for their predicted length. This study measures how far each takes a
replay of the heuristic under itself from the live run it replays.

Each held-out grid cell (main grid, with the CPU secondary; 1,600 requests, one window) is served
live by the heuristic with a traffic log watching. Every 200 arrivals from the 400th on, the log's
window is replayed (as the guard does, without the second copy of the arrivals) twice:

- ``as-the-guard``: the window exactly as the log holds it at that moment;
- ``true-lengths``: the same window with every request's true length filled in from the end of
  the run, which leaves only the backlog's fresh start between the replay and the run.

Figures: the replay's mean response time of the window's own arrivals over the live run's for the
same requests, and the same for its backlog (counted from the window's opening in both); and, for
the requests still live when each window was taken, their mean predicted length against what
they really generated.
SIMULATED (virtual time).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.envs.episodes import shared_scorer
from rtlm_adapt.envs.scenarios import scenario_cost
from rtlm_adapt.experiment import engine_priorities
from rtlm_adapt.policies import make_policy
from rtlm_adapt.policies.ppo_train import DEFAULT_PROFILE, held_out_cells
from rtlm_adapt.request import Completion
from rtlm_adapt.serving.loop import ServingLoop
from rtlm_adapt.serving.simulated import simulated_executor
from rtlm_adapt.shadow import ShadowSetup, replay
from rtlm_adapt.traffic import TrafficLog, TrafficWindow

SECONDARY = StepCost.default_secondary()  # the grid's (ppo_train.run_summary)
EVERY = 200


def with_true_lengths(window: TrafficWindow, lengths: dict[str, int]) -> TrafficWindow:
    """``window`` with each record's output as the run finally generated it."""
    records = tuple(replace(r, output_tokens=lengths[r.request.id]) for r in window.records)
    return replace(window, records=records)


def ratios(window: TrafficWindow, replayed, live: dict[str, Completion]) -> dict[str, float]:
    """Replayed over live mean response time (both counted from the window's opening), for the
    window's own arrivals and for its backlog."""
    again = {c.request_id: c for c in replayed.completions}
    out = {}
    for part, backlog in (("arrivals", False), ("backlog", True)):
        ids = [r.request.id for r in window.records
               if (r.request.arrival_time < window.start) == backlog and r.request.id in again]
        if ids:
            def from_opening(c: Completion) -> float:
                return c.finish_time - max(c.arrival_time, window.start)

            out[part] = float(np.mean([from_opening(again[i]) for i in ids])
                              / np.mean([from_opening(live[i]) for i in ids]))
            out[f"{part}_n"] = len(ids)
    return out


def cell_rows(case) -> list[dict]:
    """Serve ``case`` live under the heuristic; replay its window every 200 arrivals."""
    cost = scenario_cost(case.scenario, DEFAULT_PROFILE)
    ctl = AdaptiveController(make_policy("heuristic"), epoch_s=5.0, scorer=shared_scorer(),
                             profiles={"primary": cost, "secondary": SECONDARY})
    log = TrafficLog()  # the guard's: the last 200 and their backlog
    ctl.watch_traffic(log)
    priority_of = engine_priorities(ctl)
    loop = ServingLoop(ctl, simulated_executor("primary", cost, priority_of=priority_of),
                       simulated_executor("secondary", SECONDARY, priority_of=priority_of))
    requests = sorted(case.workload.requests, key=lambda r: r.arrival_time)
    loop.add_requests(requests)
    windows = []
    for k in range(2 * EVERY, len(requests), EVERY):
        loop.advance(requests[k].arrival_time)  # the k-th request has just arrived
        windows.append((log.window(), ShadowSetup.of(ctl)))
    live = {c.request_id: c for c in loop.run().completions}
    lengths = {rid: c.output_tokens for rid, c in live.items()}
    rows = []
    for window, setup in windows:
        row: dict = {"start": window.start}
        # the requests still live when the window was taken: what the replay serves them for
        # (their prediction) against what they really generated
        unended = [r for r in window.records if r.output_tokens is None]
        row["unended"] = {"n": len(unended),
                          "predicted": float(np.mean([r.score.prediction.length for r in unended]))
                          if unended else None,
                          "true": float(np.mean([lengths[r.request.id] for r in unended]))
                          if unended else None}
        for variant, w in (("as-the-guard", window),
                           ("true-lengths", with_true_lengths(window, lengths))):
            row[variant] = ratios(w, replay(w, make_policy("heuristic"), setup), live)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    out = []
    for cell, cases in held_out_cells(1, args.requests, caps=(4, 16, 64)):
        rows = cell_rows(cases[0])
        out.append({"cell": cell.label(), "windows": rows})
        summary = {v: {p: float(np.mean([r[v][p] for r in rows if p in r[v]]))
                       for p in ("arrivals", "backlog")} for v in ("as-the-guard", "true-lengths")}
        print(f"{cell.label():<60} " + "  ".join(
            f"{v}: arrivals {s['arrivals']:.3f}, backlog {s['backlog']:.3f}"
            for v, s in summary.items()), flush=True)
    print()
    for v in ("as-the-guard", "true-lengths"):
        for p in ("arrivals", "backlog"):
            values = [r[v][p] for c in out for r in c["windows"] if p in r[v]]
            print(f"{v:<14} {p:<9} replay / live: mean {np.mean(values):.3f}, "
                  f"10-90% {np.percentile(values, 10):.3f}-{np.percentile(values, 90):.3f} "
                  f"({len(values)} windows)")
    unended = [r["unended"] for c in out for r in c["windows"] if r["unended"]["n"]]
    weights = [u["n"] for u in unended]
    predicted = np.average([u["predicted"] for u in unended], weights=weights)
    generated = np.average([u["true"] for u in unended], weights=weights)
    print(f"requests still live when a window was taken: {sum(weights)} (in {len(unended)} "
          f"windows), predicted {predicted:.0f} tokens on average, generated {generated:.0f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "every": EVERY, "cells": out}, f, indent=1)


if __name__ == "__main__":
    main()
