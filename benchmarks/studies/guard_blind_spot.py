"""The shadow guard's blind spots, and what each way of replaying and of resuming makes of them.

    python benchmarks/studies/guard_blind_spot.py --json benchmarks/results/guard_blind_spot.json

Two cells of the held-out grid, with 1,600-request windows (2 per cell):

- ``backlog``: phi-2, gamma:4, load 0.9, cap 16, with a model trained in session 17 with the tail
  term (``benchmarks/results/ppo_session17/ppo30_tail05.npz``). Unguarded it runs 17-22x the
  heuristic's mean response time: its slow answers feed its observation (long recent response
  times), which leads it to worse knobs. The packaged model is the control.
- ``drain``: the engine model of vLLM with a 4-seat primary and the CPU secondary, phi-2,
  gamma:4, load 0.9, with the packaged model, which loses there unguarded (1.38x over these
  windows): it leaves the slow secondary nearly idle and puts long requests off. From a backlog
  it drains well, so a replay that ends on an idle system judges it better than it is.

Four guards:

- ``empty-start``: session 17's guard. Replays start from an empty system with fresh smoothed
  signals; a handed-back policy resumes after 2 calm judgements (patched in here).
- ``live-state``: replays start from the backlog and the signals the window opened with, and
  resuming is as before (patched in here).
- ``live-state+debt``: that, and a handed-back policy resumes only once its replays have made up
  what they lost (``ShadowGuard.debt_s``), with replays served to the end (patched in here).
- ``as-built``: the library's guard: that, and replays that serve the window's arrivals a second
  time after it (``replay(..., repeat_arrivals=True)``).

SIMULATED (virtual time).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import rtlm_adapt.shadow as shadow
from rtlm_adapt.policies import make_policy
from rtlm_adapt.policies.ppo_train import held_out_cells, run_summary
from rtlm_adapt.policies.shadow_guard import ShadowGuard
from rtlm_adapt.traffic import TrafficLog, TrafficWindow

FAILING = Path(__file__).resolve().parents[1] / "results/ppo_session17/ppo30_tail05.npz"
ENGINE = "vllm-cpu-smollm2-135m"
#: name: (cell label, primary profile, cap, the models served there)
CASES = {
    "backlog": ("alpaca:phi-2 | gamma:4 | load 0.9 | cap 16", None, 16, (f"ppo:{FAILING}", "ppo")),
    "drain": ("alpaca:phi-2 | gamma:4 | load 0.9 | cap 4", ENGINE, 4, ("ppo",)),
}
VARIANTS = ("empty-start", "live-state", "live-state+debt", "as-built")


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


def serve_to_the_end() -> None:
    """Patch the replay: no second copy of the arrivals (each replay drains on an idle
    system)."""
    replay = shadow.replay

    def to_the_end(*args, **kwargs):
        return replay(*args, **{**kwargs, "repeat_arrivals": False})

    shadow.replay = to_the_end


def run_variant(variant: str) -> None:
    """Serve both cases under ``variant``; one JSON line per window and model."""
    logging.getLogger("rtlm_adapt.policies").setLevel(logging.ERROR)
    if variant == "empty-start":
        start_empty()
    if variant in ("empty-start", "live-state"):
        resume_when_calm()
    if variant != "as-built":
        serve_to_the_end()
    for name, (label, profile, cap, models) in CASES.items():
        cases = next(cases for sc, cases in held_out_cells(2, 1600, caps=(cap,), profile=profile)
                     if sc.label().startswith(label))
        for w, case in enumerate(cases):
            heuristic = run_summary(make_policy("heuristic"), case, {}).mean_rt_s
            for model in models:
                policy = make_policy(model)
                guarded = run_summary(policy, case, {}).mean_rt_s
                print(json.dumps({
                    "variant": variant, "case": name, "cell": label,
                    "model": "ppo30_tail05" if FAILING.name in model else "packaged",
                    "window": w, "heuristic_s": heuristic, "guarded_s": guarded,
                    "handbacks": policy.guard.handbacks, "resumes": policy.guard.resumes,
                }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default=None,
                        help="one variant (default: each, in a fresh process per variant)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.variant is not None:
        run_variant(args.variant)
        return
    import subprocess
    import sys

    rows = []
    for variant in VARIANTS:  # patches do not come off: one process per variant
        out = subprocess.run([sys.executable, __file__, "--variant", variant],
                             capture_output=True, text=True, check=True).stdout
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print("| guard | case | model | window | heuristic, s | guarded, s | hand-backs | resumes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['case']} | {r['model']} | {r['window']} | "
              f"{r['heuristic_s']:.1f} | {r['guarded_s']:.1f} | {r['handbacks']} | "
              f"{r['resumes']} |")
    if args.json:
        cells = {name: label for name, (label, *_) in CASES.items()}
        Path(args.json).write_text(json.dumps({"cells": cells, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
