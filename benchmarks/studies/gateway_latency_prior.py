"""Study: how fast the gateway's latency model of a backend finds the backend's pace, from the
generic ``http-engine-prior`` (the gateway's default since session 10) and from the transformers
executor's ``smollm2-135m-cpu2`` (the library's default profile, the gateway's before).

The gateway cannot see engine steps: it teaches a backend's LatencyModel one "step" per finished
request, the request's time per output token at the backend's in-flight count
(``gateway/dispatcher.py: _learn_timing``), and never a prefill. Here a backend with a flat step
(8, 32 or 100 ms per token whatever the batch, as vLLM on a GPU or vLLM-CPU up to 4 sequences)
finishes requests of 20-300 tokens at 1-4 in flight; after 10, 30 and 200 requests we print the
model's step time at batch 4 and its service time for a 100-token answer to a 120-token prompt,
each over the truth.

    python benchmarks/studies/gateway_latency_prior.py
"""

from __future__ import annotations

import random

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.latency import LatencyModel

CHECKPOINTS = (10, 30, 200)


def main() -> None:
    print(f"{'prior':20s} {'s/token':>8s}  step@4 / true after {CHECKPOINTS}"
          f"   service / true after {CHECKPOINTS}")  # fmt: skip
    for prior in ("http-engine-prior", "smollm2-135m-cpu2"):
        for per_token in (0.008, 0.0318, 0.1):
            model, rng = LatencyModel(StepCost.load(prior)), random.Random(0)
            steps, services = [], []
            for i in range(1, max(CHECKPOINTS) + 1):
                tokens, batch = rng.randint(20, 300), rng.randint(1, 4)
                model.learn_step(batch, batch * (100 + tokens // 2), 0, tokens * per_token, tokens)
                if i in CHECKPOINTS:
                    steps.append(model.step_time(4, 4 * 150) / per_token)
                    services.append(model.service_time(120, 100, batch_size=4) / (100 * per_token))
            print(f"{prior:20s} {per_token:8.4f}  {' '.join(f'{x:5.2f}' for x in steps):>24s}"
                  f"   {' '.join(f'{x:5.2f}' for x in services):>24s}")  # fmt: skip


if __name__ == "__main__":
    main()
