"""Study: a KV-limited ``serve-bench --engine vllm --kv-blocks N --compare-sim`` run's requests
rebuilt and replayed on the engine model, to see what moves the simulated preemption count
against vLLM's (``engine_preemptions``).

The workload is rebuilt as serve-bench built it (same seed, prompts, dataset lengths, arrivals;
checked against the recorded mean length and arrival rate); each variant replays every policy
on the server's KV cache (``kv_cache`` in the JSON, less vLLM's null block).

    python benchmarks/studies/kv_limited_preemptions.py benchmarks/results/RUN.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import TokenCounter, load_prompts
from rtlm_adapt.engines.vllm_bench import build_requests
from rtlm_adapt.engines.vllm_replay import engine_profile, replay, replay_requests
from rtlm_adapt.request import Completion

#: SmolLM2's chat template around a user prompt (its default system prompt and the role tags).
TEMPLATE_TOKENS = 30


def main(path: str) -> None:
    real = json.loads(Path(path).read_text())
    samples = load_prompts(real["prompts"], tokenizer=TokenCounter.resolve("smollm2"), seed=0)
    n = real["requests"]
    idx = np.random.default_rng(real["seed"]).choice(len(samples), size=n, replace=n > len(samples))
    chosen = [samples[i] for i in idx]
    lengths = [max(1, min(s.response_tokens, real["max_tokens"])) for s in chosen]
    capacity = real["capacity"]
    mean_len = float(np.mean(lengths))
    rate = real["load"] * capacity["tokens_per_s"] / mean_len
    assert abs(mean_len - real["mean_true_tokens"]) < 1e-6, "not the run's requests"
    assert abs(rate - real["arrival_rate_rps"]) < 1e-9, "not the run's arrival rate"
    bench = build_requests(chosen, lengths, rate=rate, arrivals=real["arrivals"],
                           seed=real["seed"], slo="0.7:2,0.3:10",
                           mean_service_s=mean_len * capacity["alone_s_per_token"],
                           max_tokens=real["max_tokens"], dataset_lengths=True)  # fmt: skip
    made = [Completion(r.id, k, 0.0, 0.0, 1.0, "vllm") for r, k in zip(bench, lengths, strict=True)]
    kv = real["kv_cache"]
    base = engine_profile(StepCost.load("vllm-cpu-smollm2-135m"), max_num_seqs=real["max_num_seqs"],
                          kv_blocks=kv["blocks"], block_size=kv["block_size"])  # fmt: skip
    prompt_tokens = [s.prompt_tokens for s in chosen]
    variants = {
        "as replayed": (base, prompt_tokens),
        # the chat template's tokens hold KV too; its prefill time moves from prefill_s_base
        # into the prompt tokens
        "+ template tokens in KV": (
            dataclasses.replace(base, prefill_s_base=0.0),
            [t + TEMPLATE_TOKENS for t in prompt_tokens],
        ),
    }
    print(f"real (vLLM): { {p: sum(v) for p, v in real['engine_preemptions'].items()} }")
    for label, (cost, tokens) in variants.items():
        requests = replay_requests([r.id for r in bench], [r.prompt for r in bench], tokens,
                                   [r.arrival_s for r in bench], [r.deadline_s for r in bench],
                                   made)  # fmt: skip
        counts = {}
        for policy in real["engine_preemptions"]:
            run = replay(policy, requests, cost)
            counts[policy] = (run.preemptions, round(run.summary.mean_rt_s, 2))
        print(f"{label}: (preemptions, mean RT s) {counts}")


if __name__ == "__main__":
    main(sys.argv[1])
