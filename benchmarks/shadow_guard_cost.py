"""What the shadow guard costs: the CPU time of one judgement (two replays of the traffic log),
and how much longer a simulated run takes with the guard on.

    python benchmarks/shadow_guard_cost.py --json benchmarks/results/shadow_guard_cost.json

A judgement replays the last ``window`` requests twice (learned policy, heuristic), each
followed by a second copy of their arrivals, as the guard does (``repeat_arrivals``). The
table gives its time for several windows, on the batch model and on the engine model of vLLM, with
the CPU secondary; per accepted request the guard spends a judgement's time over
``judge_every`` (50 by default). The requests come from a recorded run of the packaged model on
AlpacaEval gpt4 lengths with azure-conv arrivals at load 0.9. Times are the best of
``--repeats`` (the machine is shared). The last line times whole simulated runs of the packaged
model with and without the guard, alternating the order, and the last what the traffic log
adds to the controller's ``submit`` (the per-request path), with and without a log watching.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.data.datasets import load_prompts
from rtlm_adapt.experiment import build_workload, run_policy
from rtlm_adapt.policies import make_policy
from rtlm_adapt.request import Request
from rtlm_adapt.shadow import ShadowSetup, replay
from rtlm_adapt.traffic import TrafficLog, TrafficWindow

PROFILES = ("default", "vllm-cpu-smollm2-135m")


def recorded(profile: str, n: int):
    """A run of the packaged model (unguarded) over ``n`` requests, and its traffic log."""
    primary = StepCost.default() if profile == "default" else StepCost.load(profile)
    workload = build_workload(load_prompts("alpaca:gpt4_1106_preview"), arrivals="azure-conv",
                              load=0.9, n=n, seed=0, cost=primary)
    log = TrafficLog(capacity=n)

    def factory(policy, **kwargs):
        ctl = AdaptiveController(policy, epoch_s=5.0, **kwargs)
        ctl.watch_traffic(log)
        return ctl

    run = run_policy("ppo-unguarded", workload, primary_cost=primary,
                     secondary_cost=StepCost.default_secondary(), controller_factory=factory)
    return run, log, workload, primary


def judgement_ms(log: TrafficLog, setup: ShadowSetup, window: int, repeats: int) -> float:
    """The best time of replaying the log's last ``window`` records under both policies."""
    records = TrafficWindow.of(log.records()[-window:])  # no backlog: the cost of the window
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        replay(records, make_policy("ppo-unguarded"), setup, repeat_arrivals=True)
        replay(records, make_policy("heuristic"), setup, repeat_arrivals=True)
        best = min(best, time.perf_counter() - t)
    return 1e3 * best


def run_seconds(workload, primary: StepCost, repeats: int) -> dict[str, float]:
    """Best wall time of a whole simulated run, guarded and not, alternating the order."""
    times: dict[str, list[float]] = {"ppo": [], "ppo-unguarded": []}
    for i in range(repeats):
        for name in (["ppo", "ppo-unguarded"] if i % 2 == 0 else ["ppo-unguarded", "ppo"]):
            t = time.perf_counter()
            run_policy(make_policy(name), workload, primary_cost=primary,
                       secondary_cost=StepCost.default_secondary(),
                       controller_factory=lambda p, **kw: AdaptiveController(p, epoch_s=5.0, **kw))
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def submit_us(repeats: int, n: int = 2000) -> dict[str, float]:
    """Best time of ``AdaptiveController.submit`` per request (features computed beforehand,
    as a front end does), with and without a traffic log, alternating the order."""
    prompts = [f"Write a short note about topic number {i}, please." for i in range(n)]
    extractor = AdaptiveController("heuristic")  # features touch no controller state
    features = [extractor.prompt_features(p) for p in prompts]
    times: dict[str, list[float]] = {"no log": [], "log": []}
    for i in range(2 * repeats):
        for name in (["no log", "log"] if i % 2 == 0 else ["log", "no log"]):
            ctl = AdaptiveController("heuristic")
            if name == "log":
                ctl.watch_traffic(TrafficLog())
            requests = [Request(f"r{j}", p, float(j)) for j, p in enumerate(prompts)]
            copies = [dict(f) for f in features]
            gc.collect()
            t = time.perf_counter()
            for request, f in zip(requests, copies, strict=True):
                ctl.submit(request, f)
            times[name].append((time.perf_counter() - t) / n * 1e6)
    return {name: min(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", default="50,100,200,400")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    rows = []
    print("| primary | window (requests) | judgement, ms | per accepted request, ms "
          "(judge every 50) |")
    print("|---|---|---|---|")
    for profile in PROFILES:
        run, log, workload, primary = recorded(profile, max(windows))
        setup = ShadowSetup.of(run.controller)
        for window in windows:
            ms = judgement_ms(log, setup, window, args.repeats)
            rows.append({"profile": profile, "window": window, "judgement_ms": ms,
                         "per_request_ms": ms / 50})
            print(f"| {profile} | {window} | {ms:.1f} | {ms / 50:.2f} |", flush=True)
    whole = run_seconds(workload, primary, args.repeats)
    print(f"whole run of {len(workload.requests)} requests ({PROFILES[-1]}): guarded "
          f"{whole['ppo']:.2f} s, unguarded {whole['ppo-unguarded']:.2f} s "
          f"({whole['ppo'] / whole['ppo-unguarded']:.1f}x)")
    submit = submit_us(args.repeats)
    print(f"controller.submit per request: {submit['log']:.1f} us with a traffic log, "
          f"{submit['no log']:.1f} us without")
    if args.json:
        payload = {"judgements": rows, "whole_run_s": whole, "submit_us": submit,
                   "whole_run_requests": len(workload.requests),
                   "command": shlex.join(["python", *sys.argv]),
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average "
                              f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end",
                   "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
