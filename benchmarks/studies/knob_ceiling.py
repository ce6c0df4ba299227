"""Study (SIMULATED): the ceiling of any fixed knob setting on PPO's held-out grid (issue 17).

Issue 17's bar: a policy whose mean response time, averaged over the 24 held-out cells of
``benchmarks/ppo_eval.py``, is at least 5% below the RT-LM heuristic's, with no cell worse than
the heuristic by more than 2% (or 1 point of deadline-miss rate). Before training PPO again,
this asks how far a policy that only sets the knobs can get at all, by trying a grid of
*constant* policies in every cell and picking the best one in hindsight.

Two families of constant policies are tried (``--family``):

- ``fixed``: the same :class:`~rtlm_adapt.knobs.Knobs` every epoch: length weight 1 with an
  uncertainty weight and aging, or FCFS-like arrival order; the primary's batch cap as a fraction
  of the cell's cap; an absolute offload threshold in predicted tokens (or none). No hard aging
  bound (``max_wait_s`` stays off, as PPO's action map leaves it).
- ``action``: the same action every epoch through PPO's own action map (format 2,
  ``RelativeKnobsActionMap``): the batch cap relative to the primary's knee, the offload
  threshold relative to the waiting requests' median predicted length. What a PPO actor that
  always outputs one action does.
- ``action3``: the same through action format 3 (``LogKnobsActionMap``): the batch cap on a log
  scale up to the cell's cap (a plateau at the cap from a = 0.25), the offload threshold on a log
  scale of predicted tokens (8 tokens at a = -1, one octave per quarter, off from a = 0.9),
  whatever the queue holds. A smaller grid than ``action``'s (162 settings).

Every setting serves the very same requests as ``ppo_eval.py`` (its cells, its seeds
``HELD_OUT_SEED + cell index``, 4 windows x 100 requests, ``ppo_train.run_case``). Reported per
cell, as the ratio of mean response time to the heuristic's (as ``ppo_eval.py`` does):

- *hindsight*: the best setting chosen and scored on all 4 windows (an optimistic bound: it is
  also fitted to the windows' noise);
- *held out*: the best setting chosen on windows 0-1, scored on windows 2-3 against the
  heuristic on windows 2-3 (what a tuned-per-cell setting would really deliver);
- the same with the choice restricted to settings whose miss rate is at most the heuristic's
  + 1 point on the choosing windows;
- the best *single* setting for all cells (chosen on the mean ratio over cells), in hindsight
  and chosen on windows 0-1 / scored on windows 2-3.

References per cell: the heuristic ranking by true lengths (``heuristic+oracle``) and, from
``benchmarks/results/ppo_eval.json``, oracle SJF (true lengths, full batches, no offloading).

    python benchmarks/studies/knob_ceiling.py --family fixed,action \
        --json benchmarks/results/knob_ceiling.json   # about 50 minutes on 2 shared cores
    python benchmarks/studies/knob_ceiling.py --family action3 \
        --json benchmarks/results/knob_ceiling_format3.json

Writes the summary to ``--json`` and every setting's per-window results beside it
(``knob_ceiling_windows.json.gz``). ``--resume`` keeps the (cell, setting) results already
there and runs only the rest (with nothing left to run it only re-summarizes);
``--max-minutes`` stops between cells and writes what it has (``"complete": false``).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from rtlm_adapt.envs.scenarios import Scenario, grid
from rtlm_adapt.knobs import Knobs
from rtlm_adapt.observation import Observation
from rtlm_adapt.policies import FixedPolicy
from rtlm_adapt.policies.action_space import (
    KnobsActionMap,
    LogKnobsActionMap,
    RelativeKnobsActionMap,
)
from rtlm_adapt.policies.ppo_train import (
    HELD_OUT_ARRIVALS,
    HELD_OUT_LOADS,
    HELD_OUT_PROMPTS,
    HELD_OUT_SEED,
    run_case,
    scenario_cases,
)

CHOOSE, SCORE = (0, 1), (2, 3)  # windows the held-out choice is made on / scored on
RT_BAR, MISS_BAR, MEAN_BAR = 1.02, 0.01, 0.95  # issue 17's bar

# The grid. Weights: only their ratios matter to the order, so the length weight is 1 (or 0 for
# arrival order); aging is in seconds of priority per second waited (the heuristic's 0.05).
UNCERTAINTY_WEIGHTS = (0.0, 0.5, 1.0, 2.0)
WAIT_WEIGHTS = (0.0, 0.01, 0.05, 0.2)
BATCH_FRACTIONS = (Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(3, 4), Fraction(1))
OFFLOAD_TOKENS = (16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, float("inf"))
# The action family (entries of PPO's action in [-1, 1]; see RelativeKnobsActionMap): the batch
# cap is the knee x 2 ** (2 a) (0 = the knee, the heuristic's choice), the offload threshold the
# queue's median x 2 ** (3 a) (0 = the median; a >= 0.9 turns offloading off).
ACTION_UNCERTAINTY = (-1.0, -0.5, 0.0, 1.0)  # uncertainty weight 0, 0.5, 1, 2
ACTION_WAIT = (-1.0, -0.33, 0.13, 0.6)  # aging ~0.001, 0.01, 0.05, 0.25
ACTION_BATCH = (-1.0, -0.5, 0.0, 0.5)  # knee / 4, knee / 2, knee, 2 x knee (within the cap)
ACTION_OFFLOAD = (-1.0, -2 / 3, -1 / 3, 0.0, 1 / 3, 2 / 3, 1.0)  # median x 1/8 .. 4, off
# The action3 family (format 3, LogKnobsActionMap): the batch cap is the cell's cap x
# 2 ** (4 (a - 0.25) / 1.25) up to a = 0.25 and the cap above; the threshold 8 x 2 ** (4 (a + 1))
# predicted tokens, off from a = 0.9.
ACTION3_UNCERTAINTY = (-0.5, 0.0, 1.0)  # uncertainty weight 0.5, 1, 2
ACTION3_WAIT = (-0.33, 0.13, 0.6)  # aging ~0.01, 0.05, 0.25
ACTION3_BATCH = (-0.5, 0.0, 0.25)  # cap x 0.19, cap x 0.57, the cap
ACTION3_OFFLOAD = (-1.0, -0.75, -0.5, -0.25, 0.0, 1.0)  # 8, 16, 32, 64, 128 tokens, off


@dataclass(frozen=True)
class Setting:
    """One constant policy of the grid, named so that it means the same in every cell."""

    name: str
    family: str
    make: Callable[[int], Any]  # the cell's batch cap -> a policy (or a policy factory)
    key: Callable[[int], str]  # the cell's batch cap -> what it runs as there (deduplication)
    params: dict[str, str]  # the grid values, for the breakdowns by knob


class ConstantAction:
    """A policy that outputs the same PPO action every epoch, through ``amap`` (default PPO's
    format 2 map)."""

    length_source = "predicted"
    consolidate = True

    def __init__(self, action: Sequence[float], amap: KnobsActionMap | None = None) -> None:
        self.name = "action"
        self.action = list(action)
        self.amap = amap or RelativeKnobsActionMap()

    def decide(self, observation: Observation) -> Knobs:
        return self.amap.knobs(self.action, observation)


def fixed_knobs(length: float, uncertainty: float, wait: float, fraction: Fraction,
                offload: float, cap: int) -> Knobs:
    """The concrete knobs of a ``fixed`` setting in a cell whose primary takes ``cap``."""
    batch = max(1, round(fraction * cap))
    return Knobs(length_weight=length, uncertainty_weight=uncertainty, wait_weight=wait,
                 max_batch_size=batch, offload_threshold=offload)


def fixed_settings() -> list[Setting]:
    """Length-first with uncertainty and aging, plus arrival order (FCFS), for every batch
    fraction and offload threshold."""
    weights = [(1.0, u, w) for u, w in itertools.product(UNCERTAINTY_WEIGHTS, WAIT_WEIGHTS)]
    weights.append((0.0, 0.0, 1.0))  # arrival order
    settings = []
    for (length, unc, wait), frac, off in itertools.product(
            weights, BATCH_FRACTIONS, OFFLOAD_TOKENS):
        def knobs(cap: int, a: tuple = (length, unc, wait, frac, off)) -> Knobs:
            return fixed_knobs(*a, cap)

        name = f"fixed lw{length:g} uw{unc:g} ww{wait:g} b{frac} off{off:g}"
        settings.append(Setting(
            name, "fixed",
            make=lambda cap, k=knobs: FixedPolicy("fixed", k(cap), consolidate=True),
            key=lambda cap, k=knobs: repr(k(cap)),
            params={"uncertainty": f"{unc:g}", "wait": f"{wait:g}", "batch": str(frac),
                    "offload": f"{off:g}", "order": "length" if length else "arrival"},
        ))
    return settings


def action_settings() -> list[Setting]:
    """Constant PPO actions: length weight 1, no slack, the rest over the action grid."""
    settings = []
    for unc, wait, batch, off in itertools.product(
            ACTION_UNCERTAINTY, ACTION_WAIT, ACTION_BATCH, ACTION_OFFLOAD):
        action = (1.0, unc, wait, -1.0, batch, off)
        name = "action " + " ".join(f"{a:+.2f}" for a in action)
        # a fresh policy per window (it is stateless, but keep the rule of ppo_eval.py)
        settings.append(Setting(
            name, "action",
            make=lambda cap, a=action: lambda: ConstantAction(a),
            key=lambda cap, n=name: n,
            params={"uncertainty": f"{unc:+.2f}", "wait": f"{wait:+.2f}",
                    "batch": f"{batch:+.2f}", "offload": f"{off:+.2f}"},
        ))
    return settings


def action3_settings() -> list[Setting]:
    """Constant PPO actions through action format 3: length weight 1, no slack, the rest over
    the action3 grid. The knobs depend on the cell's cap only (and on the secondary, which every
    cell has), so settings that come to the same knobs in a cell run once."""
    amap = LogKnobsActionMap()
    settings = []
    for unc, wait, batch, off in itertools.product(
        ACTION3_UNCERTAINTY, ACTION3_WAIT, ACTION3_BATCH, ACTION3_OFFLOAD
    ):
        action = (1.0, unc, wait, -1.0, batch, off)
        name = "action3 " + " ".join(f"{a:+.2f}" for a in action)
        settings.append(
            Setting(
                name,
                "action3",
                make=lambda cap, a=action: lambda: ConstantAction(a, amap),
                key=lambda cap, a=action: repr(amap.to_knobs(a, cap)),
                params={
                    "uncertainty": f"{unc:+.2f}",
                    "wait": f"{wait:+.2f}",
                    "batch": f"{batch:+.2f}",
                    "offload": f"{off:+.2f}",
                },
            )
        )
    return settings


def cells(caps: Sequence[int]) -> list[tuple[int, Scenario]]:
    """``ppo_eval.py``'s grid with each cell's index (its seed is ``HELD_OUT_SEED + index``)."""
    scenarios = grid(HELD_OUT_PROMPTS, HELD_OUT_ARRIVALS, HELD_OUT_LOADS, [4, 16, 64],
                     secondary=True)
    return [(i, sc) for i, sc in enumerate(scenarios) if sc.max_batch in caps]


def run_windows(policy: Any, cases: list[Any]) -> list[list[float]]:
    """[mean response time (s), miss rate] of each window, rounded as stored (ms, 0.01%)."""
    return [[round(rt, 3), round(miss, 4)] for rt, miss in
            (run_case(policy, case, {}) for case in cases)]


def evaluate_cell(sc: Scenario, index: int, settings: list[Setting],
                  done: dict[str, Any]) -> dict[str, Any]:
    """Every setting (and the references) on the cell's windows; ``done`` holds results kept
    from an earlier run. Settings that run as the same knobs in this cell run once."""
    cases = scenario_cases([sc], 4, {"n_requests": 100}, seed=HELD_OUT_SEED + index)
    out = {"heuristic": done.get("heuristic") or run_windows("heuristic", cases),
           "heuristic+oracle": done.get("heuristic+oracle")
           or run_windows("heuristic+oracle", cases),
           "settings": dict(done.get("settings", {}))}
    by_key: dict[str, list[list[float]]] = {}
    for s in settings:
        if s.name in out["settings"]:
            continue
        key = s.key(sc.max_batch)
        if key not in by_key:
            by_key[key] = run_windows(s.make(sc.max_batch), cases)
        out["settings"][s.name] = by_key[key]
    return out


def window_mean(windows: list[list[float]], which: Sequence[int], field: int) -> float:
    return float(np.mean([windows[w][field] for w in which]))


def ratio(cell: dict[str, Any], name: str, which: Sequence[int]) -> float:
    """A setting's mean response time over the heuristic's, on windows ``which``."""
    return (window_mean(cell["settings"][name], which, 0)
            / window_mean(cell["heuristic"], which, 0))


def miss_diff(cell: dict[str, Any], name: str, which: Sequence[int]) -> float:
    return (window_mean(cell["settings"][name], which, 1)
            - window_mean(cell["heuristic"], which, 1))


def best_in_cell(cell: dict[str, Any], names: list[str], which: Sequence[int],
                 miss_guard: bool) -> str:
    """The setting with the lowest mean response time on windows ``which`` (if ``miss_guard``,
    among those missing at most 1 point more than the heuristic there, when there are any)."""
    pool = [n for n in names if not miss_guard or miss_diff(cell, n, which) <= MISS_BAR]
    return min(pool or names, key=lambda n: ratio(cell, n, which))


def bar_check(ratios: list[float], misses: list[float]) -> dict[str, Any]:
    """Issue 17's bar on per-cell ratios and miss-rate differences."""
    worse = sum(r > RT_BAR or m > MISS_BAR for r, m in zip(ratios, misses, strict=True))
    mean = float(np.mean(ratios))
    return {"mean_rt_ratio": mean, "worst_rt_ratio": float(np.max(ratios)),
            "best_rt_ratio": float(np.min(ratios)),
            "mean_miss_diff_pt": 100 * float(np.mean(misses)),
            "worst_miss_diff_pt": 100 * float(np.max(misses)),
            "cells_past_bar": int(worse), "meets_bar": worse == 0 and mean <= MEAN_BAR}


def per_cell_oracle(results: dict[str, Any], names: list[str], choose: Sequence[int],
                    score: Sequence[int], miss_guard: bool) -> dict[str, Any]:
    """Each cell's best setting chosen on windows ``choose``, scored on ``score``."""
    picks = {c: best_in_cell(cell, names, choose, miss_guard) for c, cell in results.items()}
    ratios = [ratio(results[c], n, score) for c, n in picks.items()]
    misses = [miss_diff(results[c], n, score) for c, n in picks.items()]
    return {**bar_check(ratios, misses), "picks": picks,
            "ratios": dict(zip(picks, ratios, strict=True))}


def single_setting(results: dict[str, Any], names: list[str], choose: Sequence[int],
                   score: Sequence[int]) -> dict[str, Any]:
    """The one setting with the lowest mean ratio over cells on ``choose``, scored on
    ``score``; also the best one that passes the per-cell part of the bar on ``choose``."""
    def mean_ratio(n: str) -> float:
        return float(np.mean([ratio(cell, n, choose) for cell in results.values()]))

    def passes(n: str) -> bool:
        return all(ratio(cell, n, choose) <= RT_BAR and miss_diff(cell, n, choose) <= MISS_BAR
                   for cell in results.values())

    out = {}
    for label, pool in (("best", names), ("best_within_cell_bar", [n for n in names
                                                                   if passes(n)])):
        if not pool:
            out[label] = None
            continue
        n = min(pool, key=mean_ratio)
        ratios = [ratio(cell, n, score) for cell in results.values()]
        misses = [miss_diff(cell, n, score) for cell in results.values()]
        out[label] = {"setting": n, **bar_check(ratios, misses),
                      "ratios": dict(zip(results, ratios, strict=True))}
    return out


def breakdown(results: dict[str, Any], settings: list[Setting]) -> dict[str, Any]:
    """For each value of each knob of a family: the best single setting with that value
    (hindsight mean ratio over cells), which says which knob the gain comes from."""
    def mean_ratio(n: str) -> float:
        return float(np.mean([ratio(cell, n, range(4)) for cell in results.values()]))

    scores = {s.name: mean_ratio(s.name) for s in settings}
    out: dict[str, Any] = {}
    for s in settings:
        for knob, value in s.params.items():
            slot = out.setdefault(s.family, {}).setdefault(knob, {})
            if value not in slot or scores[s.name] < slot[value]["mean_rt_ratio"]:
                slot[value] = {"mean_rt_ratio": scores[s.name], "setting": s.name}
    return out


def summarize(results: dict[str, Any], settings: list[Setting],
              ppo_eval: dict[str, Any]) -> dict[str, Any]:
    """The ceilings per family (and both together) over the cells that ran every setting."""
    full = {c: cell for c, cell in results.items()
            if all(s.name in cell["settings"] for s in settings)}
    everything = (0, 1, 2, 3)
    families = sorted({s.family for s in settings})
    groups = {f: [s.name for s in settings if s.family == f] for f in families}
    if len(families) > 1:
        groups["all"] = [s.name for s in settings]
    summary: dict[str, Any] = {"cells": len(full)}
    for group, names in groups.items():
        summary[group] = {
            "settings": len(names),
            "hindsight": per_cell_oracle(full, names, everything, everything, False),
            "held_out": per_cell_oracle(full, names, CHOOSE, SCORE, False),
            "held_out_miss_guard": per_cell_oracle(full, names, CHOOSE, SCORE, True),
            "single_hindsight": single_setting(full, names, everything, everything),
            "single_held_out": single_setting(full, names, CHOOSE, SCORE),
        }
    summary["by_knob"] = breakdown(full, settings)
    summary["references"] = references(full, ppo_eval)
    return summary


def references(results: dict[str, Any], ppo_eval: dict[str, Any]) -> dict[str, Any]:
    """Per cell: the heuristic on true lengths (run here), oracle SJF and PPO (ppo_eval.json)."""
    by_cell = {c["cell"]: c["policies"] for c in ppo_eval.get("cells", [])}
    rows = {}
    for c, cell in results.items():
        h = window_mean(cell["heuristic"], range(4), 0)
        row = {"heuristic_rt_s": h,
               "heuristic+oracle": window_mean(cell["heuristic+oracle"], range(4), 0) / h}
        for name in ("oracle-sjf", "ppo", "ppo-unguarded", "fcfs"):
            if name in by_cell.get(c, {}):
                row[name] = by_cell[c][name]["mean_rt_s"] / by_cell[c]["heuristic"]["mean_rt_s"]
        if c in by_cell:  # the heuristic rerun here must match ppo_eval's (same requests;
            # the windows are stored to the millisecond)
            row["heuristic_matches_ppo_eval"] = bool(
                abs(by_cell[c]["heuristic"]["mean_rt_s"] - h) < 1e-3)
        rows[c] = row
    return rows


def short(cell: str) -> str:
    """'alpaca:Yi-34B-Chat | azure-code | load 0.7 | cap 4 +secondary' -> 'Yi-34B azure-code
    0.7 c4'."""
    prompts, arrivals, load, cap = (part.strip() for part in cell.split("|"))
    name = prompts.removeprefix("alpaca:").removesuffix("-Chat")
    return f"{name} {arrivals} {load.split()[1]} c{cap.split()[1]}"


def table(summary: dict[str, Any]) -> str:
    """Per cell: the references and each family's ceilings (ratios to the heuristic)."""
    groups = [g for g in ("fixed", "action", "action3", "all") if g in summary]
    families = [g for g in groups if g != "all"]  # "all" adds columns that say little more
    head = ["cell", "heur. RT s", "heur+oracle", "oracle-sjf", "ppo"]
    for g in families:
        head += [f"{g}: per cell, hindsight", "per cell, held out", "one setting"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    refs = summary["references"]
    for c, ref in refs.items():
        row = [short(c), f"{ref['heuristic_rt_s']:.1f}", f"{ref['heuristic+oracle']:.3f}",
               f"{ref.get('oracle-sjf', float('nan')):.3f}", f"{ref.get('ppo', float('nan')):.3f}"]
        for g in families:
            row += [f"{summary[g]['hindsight']['ratios'][c]:.3f}",
                    f"{summary[g]['held_out']['ratios'][c]:.3f}",
                    f"{summary[g]['single_hindsight']['best']['ratios'][c]:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| family | choice | mean ratio | worst cell | best cell | miss diff mean / "
              "worst | cells past bar | meets bar |", "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        s = summary[g]
        for label, row in (
            ("per cell, hindsight (all windows)", s["hindsight"]),
            ("per cell, chosen w0-1, scored w2-3", s["held_out"]),
            ("per cell, chosen w0-1 with miss guard, scored w2-3", s["held_out_miss_guard"]),
            ("one setting, hindsight", s["single_hindsight"]["best"]),
            ("one setting passing the cell bar, hindsight",
             s["single_hindsight"]["best_within_cell_bar"]),
            ("one setting, chosen w0-1, scored w2-3", s["single_held_out"]["best"]),
        ):
            if row is None:
                lines.append(f"| {g} ({s['settings']}) | {label} | none | | | | | |")
                continue
            lines.append(
                f"| {g} ({s['settings']}) | {label} | {row['mean_rt_ratio']:.3f} | "
                f"{row['worst_rt_ratio']:.3f} | {row['best_rt_ratio']:.3f} | "
                f"{row['mean_miss_diff_pt']:+.1f} / {row['worst_miss_diff_pt']:+.1f} pt | "
                f"{row['cells_past_bar']} | {row['meets_bar']} |")
        for label in ("single_hindsight", "single_held_out"):
            if s[label]["best"]:
                lines.append(f"\n{g}, {label}: `{s[label]['best']['setting']}`")
    lines.append("\nBest single setting (hindsight mean ratio) with each value of a knob:")
    for family, knobs in summary.get("by_knob", {}).items():
        for knob, values in knobs.items():
            lines.append(f"- {family} {knob}: " + ", ".join(
                f"{v} {r['mean_rt_ratio']:.3f}" for v, r in values.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="fixed,action",
                        help="comma-separated: fixed, action (format 2), action3 (format 3)")
    parser.add_argument("--caps", default="4,16,64", help="which cells, by primary batch cap")
    parser.add_argument("--json", default="benchmarks/results/knob_ceiling.json")
    parser.add_argument("--ppo-eval", default="benchmarks/results/ppo_eval.json")
    parser.add_argument("--resume", action="store_true", help="keep results already in --json")
    parser.add_argument("--max-minutes", type=float, help="stop between cells after this long")
    parser.add_argument("--limit-settings", type=int, help="first N settings only (a smoke test)")
    args = parser.parse_args()

    makers = {"fixed": fixed_settings, "action": action_settings, "action3": action3_settings}
    settings = [s for f in args.family.split(",") for s in makers[f]()]
    settings = settings[: args.limit_settings] if args.limit_settings else settings
    out = Path(args.json)
    # the per-window results (large) go to a gzip beside the JSON, which keeps the summary
    raw = out.with_name(out.stem + "_windows.json.gz")
    previous = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    results: dict[str, Any] = (json.loads(gzip.decompress(raw.read_bytes()))
                               if args.resume and raw.is_file() else {})
    ppo_eval_file = Path(args.ppo_eval)
    ppo_eval = json.loads(ppo_eval_file.read_text()) if ppo_eval_file.is_file() else {}
    run = {"command": shlex.join(["python", *sys.argv]),
           "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
                      f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} at the "
                      "start"}
    runs = [*previous.get("runs", []), run]  # a resumed study keeps the earlier runs' record
    t0 = time.perf_counter()
    todo = cells([int(c) for c in args.caps.split(",")])

    def save(complete: bool, summary: dict[str, Any] | None = None) -> None:
        run["elapsed_s"] = round(time.perf_counter() - t0, 1)
        raw.write_bytes(gzip.compress(json.dumps(results).encode(), mtime=0))
        out.write_text(json.dumps({
            "complete": complete, "runs": runs,
            "windows": f"4 x 100 requests per cell, ppo_eval.py's seeds; per window [mean "
                       f"response time s, miss rate] of every setting in {raw.name}",
            "grid": {"uncertainty_weights": UNCERTAINTY_WEIGHTS, "wait_weights": WAIT_WEIGHTS,
                     "batch_fractions": [str(f) for f in BATCH_FRACTIONS],
                     "offload_tokens": [str(x) for x in OFFLOAD_TOKENS],
                     "action_uncertainty": ACTION_UNCERTAINTY, "action_wait": ACTION_WAIT,
                     "action_batch": ACTION_BATCH, "action_offload": ACTION_OFFLOAD,
                     "action3_uncertainty": ACTION3_UNCERTAINTY, "action3_wait": ACTION3_WAIT,
                     "action3_batch": ACTION3_BATCH, "action3_offload": ACTION3_OFFLOAD},
            "settings": [{"name": s.name, "family": s.family} for s in settings],
            "summary": summary,
        }, indent=1) + "\n")

    complete = True
    for n, (index, sc) in enumerate(todo):
        if args.max_minutes and time.perf_counter() - t0 > 60 * args.max_minutes:
            complete = False
            print(f"stopped after {n} of {len(todo)} cells (--max-minutes)", flush=True)
            break
        label = sc.label()
        results[label] = evaluate_cell(sc, index, settings, results.get(label, {}))
        print(f"[{time.perf_counter() - t0:.0f}s] {label}", flush=True)
        save(False)  # after every cell: a stop keeps the work
    summary = summarize(results, settings, ppo_eval)
    save(complete, summary)
    print(table(summary))
    print(f"({sum(r.get('elapsed_s', 0) for r in runs):.0f}s in all; wrote {out}, {raw})")


if __name__ == "__main__":
    main()
