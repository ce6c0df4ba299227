"""Were the guards right? Per window of the held-out grid: did the guard hand the knobs back, and
was the learned policy alone really worse than the heuristic on that window?

    python benchmarks/studies/guard_windows.py --json benchmarks/results/guard_windows.json

The grid and windows are ``ppo_eval.py``'s (same held-out lists, seeds and cells). Each window is
served by the heuristic, the packaged model unguarded, with the shadow guard (``ppo``) and with
the interleaved-trials guard (``ppo-interleaved``). A hand-back is *right in hindsight* where
the unguarded policy's mean response time on that window is more than 2% longer than the
heuristic's (the bar of #17), and *false* otherwise. SIMULATED, in virtual time.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rtlm_adapt.policies import make_policy
from rtlm_adapt.policies.ppo import PACKAGED_MODEL, PPOPolicy
from rtlm_adapt.policies.ppo_train import held_out_cells, run_summary
from rtlm_adapt.policies.shadow_guard import ShadowGuard

GUARDED = ("ppo", "ppo-interleaved")


def shadow_guarded(options: dict[str, float]) -> PPOPolicy:
    """The packaged model with a ShadowGuard of ``options``."""
    return PPOPolicy.load(PACKAGED_MODEL, name="ppo", guard=ShadowGuard(**options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--caps", default="4,16,64")
    parser.add_argument("--profile", help="the primary's cost profile (default: the batch model)")
    parser.add_argument("--json", help="write the per-window rows and the counts here")
    parser.add_argument("--shadow", default="", help="ShadowGuard options for ppo, e.g. "
                        "margin=0.05,recent=4 (default: the guard's defaults)")
    args = parser.parse_args()
    logging.getLogger("rtlm_adapt.policies").setLevel(logging.ERROR)  # the hand-backs: counted
    options = {k: float(v) if "." in v else int(v)
               for k, v in (item.split("=") for item in args.shadow.split(",") if item)}
    caps = [int(c) for c in args.caps.split(",")]
    rows = []
    for sc, cases in held_out_cells(args.windows, args.requests, caps=caps, profile=args.profile):
        for w, case in enumerate(cases):
            row = {"cell": sc.label(), "window": w}
            for name in ("heuristic", "ppo-unguarded", *GUARDED):
                policy = shadow_guarded(options) if name == "ppo" else make_policy(name)
                row[name] = run_summary(policy, case, {}).mean_rt_s
                if name in GUARDED:
                    row[f"{name}_handbacks"] = policy.guard.handbacks
            row["unguarded_ratio"] = row["ppo-unguarded"] / row["heuristic"]
            rows.append(row)
    counts = {}
    print("| guard | windows handed back | right in hindsight (alone > 1.02x) | false | "
          "mean ratio to the heuristic |")
    print("|---|---|---|---|---|")
    for name in GUARDED:
        handed = [r for r in rows if r[f"{name}_handbacks"]]
        right = sum(r["unguarded_ratio"] > 1.02 for r in handed)
        ratio = sum(r[name] / r["heuristic"] for r in rows) / len(rows)
        counts[name] = {"handed_back": len(handed), "right": right, "false": len(handed) - right,
                        "mean_ratio": ratio}
        print(f"| {name} | {len(handed)} of {len(rows)} | {right} | {len(handed) - right} | "
              f"{ratio:.3f} |")
    worse_alone = sum(r["unguarded_ratio"] > 1.02 for r in rows)
    print(f"windows where the learned policy alone is more than 2% worse: {worse_alone} of "
          f"{len(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"counts": counts, "windows_worse_alone": worse_alone, "rows": rows,
             "requests": args.requests, "profile": args.profile, "shadow_options": options},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
