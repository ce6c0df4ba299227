"""The shadow guard's blind spot: a policy that fails only once a backlog builds, and what each
way of starting the replays and of resuming makes of it.

    python benchmarks/studies/guard_blind_spot.py --json benchmarks/results/guard_blind_spot.json

The failing policy is a model trained in session 17 with the tail term
(``benchmarks/results/ppo_session17/ppo30_tail05.npz``). In the main grid's cell phi-2, gamma:4,
load 0.9, cap 16, with 1,600-request windows, it runs 17-22x the heuristic's mean response time
unguarded: its slow answers feed its observation (long recent response times), which leads it
to worse knobs.

Three guards, on that cell and with the packaged model as the control:

- ``empty-start``: session 17's guard. Replays start from an empty system with fresh smoothed
  signals, and a handed-back policy resumes after 2 calm judgements (patched in here).
- ``live-state``: replays start from the backlog and the signals the window opened with (the
  library's), and resuming is as before: 2 calm judgements (patched in here).
- ``as-built``: the library's guard: live-state replays, and a handed-back policy resumes only
  once its replays have made up what they lost (``ShadowGuard.debt_s``).

SIMULATED (virtual time).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

from rtlm_adapt.policies import make_policy
from rtlm_adapt.policies.ppo_train import held_out_cells, run_summary
from rtlm_adapt.policies.shadow_guard import ShadowGuard
from rtlm_adapt.traffic import TrafficLog, TrafficWindow

FAILING = Path(__file__).resolve().parents[1] / "results/ppo_session17/ppo30_tail05.npz"
CELL = "alpaca:phi-2 | gamma:4 | load 0.9 | cap 16"
VARIANTS = ("empty-start", "live-state", "as-built")


def start_empty() -> None:
    """Patch TrafficLog: a window is the last requests alone, from fresh signals."""

    def window(self: TrafficLog) -> TrafficWindow:
        records = [replace(r) for r in self.records()]
        return TrafficWindow(records[0].request.arrival_time, tuple(records), signals=None)

    TrafficLog.window = window


def resume_when_calm() -> None:
    """Patch ShadowGuard: a handed-back policy owes nothing, so 2 calm judgements bring it
    back."""
    conclude = ShadowGuard._conclude

    def forgiving(self: ShadowGuard, learned, heuristic) -> None:
        conclude(self, learned, heuristic)
        if self.active == "heuristic":
            self.debt_s = -math.inf

    ShadowGuard._conclude = forgiving


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
    if args.variant == "empty-start":
        start_empty()
    if args.variant in ("empty-start", "live-state"):
        resume_when_calm()
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
