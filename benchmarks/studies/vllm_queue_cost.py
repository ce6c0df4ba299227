"""Study: does a deep waiting queue inside vLLM slow its steps?

``serve-bench --engine vllm`` sends ``direct`` requests straight to vLLM, so its own queue holds
every waiting request; through the gateway, vLLM holds only the running ones. With vLLM in this
process (:class:`~rtlm_adapt.engines.vllm_executor.VLLMExecutor`, one step = one scheduler
iteration), this times steps 10-99 of 4 running requests with 0 and with 30 more waiting in
vLLM's queue (worse priority, so none preempts), alternating the order, and prints the medians.

    python benchmarks/studies/vllm_queue_cost.py     # about 2 minutes, needs the [vllm] extra
"""

from __future__ import annotations

import statistics

from rtlm_adapt import Request
from rtlm_adapt.engines.vllm_executor import VLLMExecutor

RUNNING, STEPS = 4, 100


def median_step_ms(executor: VLLMExecutor, waiting: int, tag: str) -> float:
    # admit beyond max_num_seqs on purpose: the extra requests wait in vLLM's own queue
    executor.max_batch_size = RUNNING + waiting
    running = [Request(f"{tag}-r{i}", f"Tell me story number {i}.", arrival_time=0.0,
                       max_tokens=150, metadata={"ignore_eos": True, "priority": 0})
               for i in range(RUNNING)]  # fmt: skip
    executor.admit(running, 0.0)
    executor.step(0.0)  # their prefill
    executor.admit([Request(f"{tag}-w{i}", f"Question {i}: what is {i}+{i}?", arrival_time=0.0,
                            max_tokens=150, metadata={"ignore_eos": True, "priority": 1})
                    for i in range(waiting)], 0.0)  # fmt: skip
    times = [executor.step(0.0).duration_s for _ in range(STEPS)][10:]
    for request_id in executor.running_ids():
        executor.abort(request_id, 0.0)
    return 1000 * statistics.median(times)


def main() -> None:
    results: dict[int, list[float]] = {0: [], 30: []}
    with VLLMExecutor.from_model("smollm2", max_num_seqs=RUNNING) as executor:
        for repeat in range(3):
            for waiting in (0, 30) if repeat % 2 == 0 else (30, 0):
                ms = median_step_ms(executor, waiting, f"{repeat}-{waiting}")
                results[waiting].append(ms)
                print(f"{waiting:2d} waiting: median step {ms:.1f} ms", flush=True)
    for waiting, values in results.items():
        print(f"{waiting:2d} waiting: median of medians {statistics.median(values):.1f} ms")


if __name__ == "__main__":
    main()
