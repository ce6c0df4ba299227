"""The shadow guard's blind spot: a policy that fails only once a backlog builds, and what a
replay from the live state would see.

    python benchmarks/studies/guard_blind_spot.py --json benchmarks/results/guard_blind_spot.json

The failing policy is a model trained this session with the tail term
(``benchmarks/results/ppo_session17/ppo30_tail05.npz``). In the main grid's cell phi-2, gamma:4,
load 0.9, cap 16, with 1,600-request windows, it runs 17-22x the heuristic's mean response time,
and the shadow guard as built never hands back. The replays start empty, with fresh smoothed
signals, so the policy's own feedback loop (a long backlog, long recent response times, worse
knobs) never shows in them.

Three variants of the guard, on that cell and with the packaged model as the control:

- ``as-built``: the guard as shipped.
- ``backlog``: the traffic log evicts only ended requests, so a replay carries every request
  still waiting or running, however old.
- ``backlog+signals``: that, and each replay's controller starts from the live controller's
  smoothed signals (arrival rate, recent response time, ...).

The two variants are experiments, patched in here, not library behaviour. SIMULATED.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import rtlm_adapt.shadow as shadow
from rtlm_adapt.policies import make_policy
from rtlm_adapt.policies.ppo_train import held_out_cells, run_summary
from rtlm_adapt.traffic import TrafficLog, TrafficRecord

FAILING = Path(__file__).resolve().parents[1] / "results/ppo_session17/ppo30_tail05.npz"
CELL = "alpaca:phi-2 | gamma:4 | load 0.9 | cap 16"
VARIANTS = ("as-built", "backlog", "backlog+signals")


def keep_the_backlog() -> None:
    """Patch TrafficLog: past its capacity it evicts the oldest *ended* record only."""

    def record_submit(self: TrafficLog, request, score) -> None:
        self._records[request.id] = TrafficRecord(request, score)
        self.accepted += 1
        if len(self._records) > self.capacity:
            ended = next((rid for rid, r in self._records.items() if r.output_tokens is not None),
                         None)
            if ended is not None:
                del self._records[ended]

    TrafficLog.record_submit = record_submit


def start_from_live_signals() -> None:
    """Patch the replay: its controller starts from the live controller's smoothed signals."""
    live: dict[str, object] = {}
    setup_of = shadow.ShadowSetup.of.__func__
    replay_init = shadow.ReplayController.__init__

    def of(cls, controller):
        live["signals"] = dataclasses.replace(controller._signals, arrivals_in_epoch=0,
                                              epoch_start=0.0)
        return setup_of(cls, controller)

    def init(self, *args, **kwargs):
        replay_init(self, *args, **kwargs)
        if "signals" in live:
            self._signals = dataclasses.replace(live["signals"])

    shadow.ShadowSetup.of = classmethod(of)
    shadow.ReplayController.__init__ = init


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default=None,
                        help="one variant (default: each, in a fresh process per variant)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.variant is None:  # patches do not come off: one process per variant
        import subprocess
        import sys

        rows = []
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", variant],
                                 capture_output=True, text=True, check=True).stdout
            rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        print("| guard | model | window | heuristic, s | guarded, s | hand-backs | resumes |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['model']} | {r['window']} | {r['heuristic_s']:.1f} | "
                  f"{r['guarded_s']:.1f} | {r['handbacks']} | {r['resumes']} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"cell": CELL, "rows": rows}, indent=1) + "\n")
        return
    logging.getLogger("rtlm_adapt.policies").setLevel(logging.ERROR)
    if args.variant != "as-built":
        keep_the_backlog()
    if args.variant == "backlog+signals":
        start_from_live_signals()
    cases = next(cases for sc, cases in held_out_cells(2, 1600, caps=(16,))
                 if sc.label().startswith(CELL))
    for w, case in enumerate(cases):
        heuristic = run_summary(make_policy("heuristic"), case, {}).mean_rt_s
        for model in (f"ppo:{FAILING}", "ppo"):
            policy = make_policy(model)
            guarded = run_summary(policy, case, {}).mean_rt_s
            print(json.dumps({"variant": args.variant, "model": "ppo30_tail05" if FAILING.name
                              in model else "packaged", "window": w, "heuristic_s": heuristic,
                              "guarded_s": guarded, "handbacks": policy.guard.handbacks,
                              "resumes": policy.guard.resumes}), flush=True)


if __name__ == "__main__":
    main()
