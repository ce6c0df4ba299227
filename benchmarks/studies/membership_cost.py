"""What a batch membership change costs on the real executor (SmolLM2 on this CPU; outside CI).

A running batch of ``--batch`` requests is decoded until every row holds about ``--context``
tokens; then, repeatedly,

- ``plain``: a decode step with no change;
- ``leave``: one request is aborted (as if it finished) and the next step is timed; the extra
  time over a plain step of the smaller batch is what a leave costs;
- ``join``: one request with a ``--prompt``-token prompt is admitted and the step is timed; the
  extra time over a plain step and the joiner's prefill alone is what the join costs beyond
  its prefill (cache rebuild or insertion).

Usage::

    python benchmarks/studies/membership_cost.py --batch 16 --context 256 --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rtlm_adapt.calibration.profiler import machine_load
from rtlm_adapt.request import Request
from rtlm_adapt.serving.factory import load_executor


def prompt_of(executor, tokens: int, tag: str) -> str:
    """A prompt whose chat-templated encoding has about ``tokens`` tokens."""
    words = max(1, tokens - 10)
    text = f"{tag} " + " ".join("alpha beta gamma delta".split()[i % 4] for i in range(words))
    while len(executor.encode_prompt(text)) > tokens and words > 1:
        words -= 1
        text = f"{tag} " + " ".join("alpha beta gamma delta".split()[i % 4] for i in range(words))
    return text


def measure(executor, batch: int, context: int, prompt: int, rounds: int) -> dict:
    n = 0

    def req(tokens: int) -> Request:
        nonlocal n
        n += 1
        return Request(f"r{n}", prompt_of(executor, tokens, f"q{n}"), 0.0, max_tokens=100_000)

    executor.admit([req(prompt) for _ in range(batch)], 0.0)
    executor.step(0.0)
    while min(s.context for s in executor._running) < context:
        executor.step(0.0)

    def timed_step() -> float:
        t0 = time.perf_counter()
        executor.step(0.0)
        return time.perf_counter() - t0

    plain, plain_small, leave, join, prefill = [], [], [], [], []
    for _ in range(rounds):
        plain.extend(timed_step() for _ in range(3))
        victim = executor.running_ids()[0]
        executor.abort(victim, 0.0)
        leave.append(timed_step())
        plain_small.extend(timed_step() for _ in range(2))
        r = req(prompt)
        ids = executor.encode_prompt(r.prompt)
        t0 = time.perf_counter()
        executor.prefill_ids([ids])
        prefill.append(time.perf_counter() - t0)
        executor.admit([r], 0.0)
        join.append(timed_step())
    med = statistics.median
    return {
        "batch": batch,
        "context_per_row": context,
        "joiner_prompt_tokens": prompt,
        "plain_step_s": round(med(plain), 4),
        "plain_step_batch_minus_1_s": round(med(plain_small), 4),
        "leave_step_s": round(med(leave), 4),
        "join_step_s": round(med(join), 4),
        "prefill_alone_s": round(med(prefill), 4),
        "leave_extra_s": round(med(leave) - med(plain_small), 4),
        "join_extra_beyond_prefill_s": round(med(join) - med(plain) - med(prefill), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", default="16", help="comma-separated batch sizes")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {"load_average_before": machine_load(), "runs": []}
    for b in [int(x) for x in args.batch.split(",")]:
        executor = load_executor(args.model, name="m", max_batch_size=b)
        run = measure(executor, b, args.context, args.prompt, args.rounds)
        print(json.dumps(run), flush=True)
        out["runs"].append(run)
    out["load_average_after"] = machine_load()
    print(json.dumps({k: out[k] for k in ("load_average_before", "load_average_after")}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
