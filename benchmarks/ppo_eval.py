"""PPO vs the RT-LM heuristic, FCFS and oracle SJF on arrival windows unseen in training.

    python benchmarks/ppo_eval.py --model runs/ppo/model.zip --runs runs/ppo \
        --out benchmarks/results

Windows are drawn from the last 20% of the Azure conversation trace (training draws window
starts from the first 80% only) with a seed that neither training nor its evaluation callback
uses; every policy serves the very same requests through the same controller, loop and simulated
executors (``rtlm_adapt.experiment.run_policy``). Writes ``ppo_eval.json``, ``ppo_eval.md`` (the
table) and, given ``--runs``, ``ppo_learning_curve.png`` from the training's evaluations.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import date
from pathlib import Path

from rtlm_adapt.knobs import Knobs
from rtlm_adapt.policies.base import FixedPolicy
from rtlm_adapt.policies.ppo import PPOPolicy
from rtlm_adapt.policies.ppo_train import eval_workloads, evaluate

BENCH_SEED = 20_000  # training uses seeds 0.., its evaluation callback 10_000


def policies(model: str) -> dict[str, object]:
    return {
        "fcfs": "fcfs",
        "heuristic": "heuristic",
        # the same heuristic without the secondary executor: how much offloading alone buys
        "heuristic-local": "heuristic-local",
        # a hand-tuned fixed-knob reference: SJF plus always-on offloading of long predictions
        "sjf+offload400": FixedPolicy(
            "sjf+offload400", Knobs(length_weight=1.0, offload_threshold=400.0)
        ),
        "ppo": PPOPolicy.load(model),
        "oracle-sjf": "oracle-sjf",
    }


def learning_curve(evaluations: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(evaluations.read_text())
    steps = [r["timesteps"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["ppo"]["mean_rt_s"] for r in rows], "o-", label="PPO")
    ax.axhline(rows[0]["heuristic"]["mean_rt_s"], color="C1", ls="--", label="RT-LM heuristic")
    ax.axhline(rows[0]["fcfs"]["mean_rt_s"], color="C2", ls=":", label="FCFS")
    ax.set_xlabel("training steps (scheduling epochs)")
    ax.set_ylabel("mean response time (s)")
    ax.set_title("PPO on held-out Azure-conv windows (loads 0.9, 1.0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="PPO model.zip")
    parser.add_argument("--runs", help="training output folder (for the learning curve)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--loads", default="0.7,0.9,1.0")
    parser.add_argument("--windows", type=int, default=8, help="windows per load")
    parser.add_argument("--requests", type=int, default=100, help="requests per window")
    parser.add_argument("--prompts", default="alpaca:gpt4_1106_preview")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"prompts": args.prompts, "n_requests": args.requests}
    load_avg = os.getloadavg()
    t0 = time.perf_counter()
    table: dict[str, dict[str, dict[str, float]]] = {}
    for load in (float(x) for x in args.loads.split(",")):
        workloads = eval_workloads(env, (load,), args.windows, seed=BENCH_SEED)
        table[str(load)] = {
            name: evaluate(p, workloads, env) for name, p in policies(args.model).items()
        }
    lines = [
        "| load | policy | mean RT (s) | vs heuristic | miss rate | vs heuristic |",
        "|---|---|---|---|---|---|",
    ]
    for load, rows in table.items():
        h = rows["heuristic"]
        for name, r in rows.items():
            lines.append(
                f"| {load} | {name} | {r['mean_rt_s']:.1f} | "
                f"{100 * (r['mean_rt_s'] / h['mean_rt_s'] - 1):+.1f}% | "
                f"{100 * r['miss_rate']:.1f}% | "
                f"{100 * (r['miss_rate'] - h['miss_rate']):+.1f} pt |"
            )
    text = "\n".join(lines)
    print(text)
    command = shlex.join(["python", *sys.argv])
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
        f"load average {', '.join(f'{x:.2f}' for x in load_avg)} at the start"
    )
    header = [
        "# PPO vs baselines on held-out Azure-conv windows",
        "",
        f"- command: `{command}`",
        f"- date: {date.today().isoformat()}; machine: {machine}",
        f"- model: `{args.model}`; {args.windows} windows x {args.requests} requests per load "
        f"({args.prompts} lengths), window starts in the last 20% of the trace (training draws "
        f"from the first 80%), seed {BENCH_SEED}",
        "",
        "Mean response time and deadline-miss rate, averaged over windows; "
        "relative to the RT-LM heuristic (v2, with offloading).",
        "",
        "",
    ]
    (out / "ppo_eval.md").write_text("\n".join(header) + text + "\n")
    payload = {
        "table": table,
        "model": args.model,
        "windows_per_load": args.windows,
        "requests_per_window": args.requests,
        "prompts": args.prompts,
        "arrivals": "azure-conv, window starts in the last 20% of the trace (unseen in training)",
        "seed": BENCH_SEED,
        "command": command,
        "machine": machine,
        "date": date.today().isoformat(),
        "elapsed_s": time.perf_counter() - t0,
    }
    (out / "ppo_eval.json").write_text(json.dumps(payload, indent=1) + "\n")
    if args.runs and (Path(args.runs) / "evaluations.json").is_file():
        learning_curve(Path(args.runs) / "evaluations.json", out / "ppo_learning_curve.png")
    print(f"({payload['elapsed_s']:.0f}s; wrote {out}/ppo_eval.json, ppo_eval.md)")


if __name__ == "__main__":
    main()
