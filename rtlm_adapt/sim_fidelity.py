"""Simulator fidelity: a real run's requests replayed through the simulator, each with the length
the real model generated, and how close the simulated response times come to the real ones.

serve-bench's ``--compare-sim`` reports it; ``benchmarks/sim_ceiling.py`` replays recorded runs
through other profiles with it.

>>> from rtlm_adapt.request import Completion
>>> real = [Completion(f"r{i}", 8, 0.0, 0.0, i + 1.0, "primary") for i in range(4)]
>>> sim = [Completion(f"r{i}", 8, 0.0, 0.0, 2 * (i + 1.0), "primary") for i in range(4)]
>>> f = fidelity(sim, real)
>>> f["mean_rt_ratio_sim_over_real"], f["spearman"], f["n"]
(2.0, 1.0, 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.experiment import Workload, run_policy
from rtlm_adapt.request import TRUE_LENGTH_KEY, Completion


def replay_length(completion: Completion, max_tokens: int) -> int:
    """The simulated length that costs what the real request cost.

    HFExecutor samples a request's first token in its prefill and one more per decode step,
    (the first decode runs in the prefill's step), and a request that stops on EOS samples
    the EOS token too. So a request that sampled S tokens took S - 1 real steps; the simulator
    runs one iteration per token, the prefill in the first: S - 1 simulated iterations.
    """
    n = completion.output_tokens
    sampled = n if n >= max_tokens else n + 1  # + the EOS token it stopped on
    return max(1, sampled - 1)


def sim_replay(
    policy: str,
    workload: Workload,
    real: Sequence[Completion],
    *,
    primary_cost: StepCost,
    secondary_cost: StepCost | None,
    max_tokens: int,
    tier: str = "lexical",
    controller_cost: StepCost | None = None,
) -> list[Completion]:
    """The workload through the simulator, each request with its real generated length.

    ``controller_cost``: the primary profile the real run's controller started from, when the
    simulated executor charges another (a calibrated one): the replayed controller must
    believe what the real one believed, or its decisions (a heuristic's batch cap) differ."""
    lengths = {c.request_id: replay_length(c, max_tokens) for c in real}
    requests = [
        dataclasses.replace(r, metadata={**r.metadata, TRUE_LENGTH_KEY: lengths[r.id]})
        for r in workload.requests
    ]
    replay = dataclasses.replace(workload, requests=requests)
    run = run_policy(
        policy,
        replay,
        primary_cost=primary_cost,
        secondary_cost=secondary_cost,
        tier=tier,
        controller_profiles=None if controller_cost is None else {"primary": controller_cost},
    )
    return run.completions


def fidelity(sim: Sequence[Completion], real: Sequence[Completion]) -> dict[str, float]:
    """Mean response time ratio sim / real and Spearman correlation of per-request times
    (over the requests that succeeded in both)."""
    from scipy.stats import spearmanr

    sim_rt = {c.request_id: c.response_time for c in sim if c.error is None}
    real_rt = {c.request_id: c.response_time for c in real if c.error is None}
    common = sorted(set(sim_rt) & set(real_rt))
    if not common:
        return {"mean_rt_ratio_sim_over_real": float("nan"), "spearman": float("nan"), "n": 0}
    s = np.array([sim_rt[i] for i in common])
    r = np.array([real_rt[i] for i in common])
    rho = spearmanr(s, r).statistic if len(common) > 2 else float("nan")
    return {
        "mean_rt_ratio_sim_over_real": float(s.mean() / r.mean()),
        "spearman": float(rho),
        "n": len(common),
        "sim_mean_rt_s": float(s.mean()),
        "real_mean_rt_s": float(r.mean()),
    }
