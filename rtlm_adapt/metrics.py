"""Real-time serving metrics over a run's completions.

>>> from rtlm_adapt.request import Completion
>>> cs = [Completion(str(i), 10, arrival_time=i, start_time=i, finish_time=i + 2.0, executor="x",
...                  deadline=i + 1.5 if i % 2 else None) for i in range(4)]
>>> s = summarize(cs)
>>> s.mean_rt_s, s.deadline_miss_rate, s.completed
(2.0, 1.0, 4)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from rtlm_adapt.request import Completion


@dataclass(frozen=True, slots=True)
class Summary:
    """One policy's figures.

    ``deadline_miss_rate`` is over the requests that carry a deadline (failed ones count as
    missed); ``goodput_rps`` counts only requests that finished in time (or have no deadline).
    """

    completed: int
    failed: int
    mean_rt_s: float
    p50_rt_s: float
    p90_rt_s: float
    p99_rt_s: float
    max_rt_s: float
    mean_ttft_s: float
    deadline_miss_rate: float
    throughput_rps: float
    goodput_rps: float
    tokens_per_s: float
    makespan_s: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(completions: Sequence[Completion]) -> Summary:
    """Response-time percentiles, deadline misses, throughput and goodput."""
    ok = [c for c in completions if c.error is None]
    failed = len(completions) - len(ok)
    if not completions:
        raise ValueError("summarize() needs at least one completion")
    rts = np.array([c.response_time for c in ok]) if ok else np.array([math.nan])
    start = min(c.arrival_time for c in completions)
    end = max(c.finish_time for c in completions)
    makespan = max(end - start, 1e-9)
    with_deadline = [c for c in completions if c.deadline is not None]
    missed = sum(1 for c in with_deadline if c.error is not None or c.finish_time > c.deadline)
    good = sum(1 for c in ok if not c.missed_deadline)
    ttft = [c.first_token_time - c.arrival_time for c in ok if c.first_token_time is not None]
    return Summary(
        completed=len(ok),
        failed=failed,
        mean_rt_s=float(np.mean(rts)),
        p50_rt_s=float(np.percentile(rts, 50)),
        p90_rt_s=float(np.percentile(rts, 90)),
        p99_rt_s=float(np.percentile(rts, 99)),
        max_rt_s=float(np.max(rts)),
        mean_ttft_s=float(np.mean(ttft)) if ttft else math.nan,
        deadline_miss_rate=missed / len(with_deadline) if with_deadline else 0.0,
        throughput_rps=len(ok) / makespan,
        goodput_rps=good / makespan,
        tokens_per_s=sum(c.output_tokens for c in ok) / makespan,
        makespan_s=makespan,
    )


def summary_json(s: Summary) -> dict[str, float]:
    """The figures ``simulate --json`` and ``serve-bench --json`` report per policy."""
    return {
        "mean_rt_s": s.mean_rt_s,
        "p50_rt_s": s.p50_rt_s,
        "p90_rt_s": s.p90_rt_s,
        "p99_rt_s": s.p99_rt_s,
        "deadline_miss_rate": s.deadline_miss_rate,
        "throughput_rps": s.throughput_rps,
        "goodput_rps": s.goodput_rps,
        "completed": s.completed,
        "failed": s.failed,
    }


def format_table(rows: dict[str, Summary]) -> str:
    """A plain-text table, one row per policy."""
    w = max([22, *(len(name) + 2 for name in rows)])  # long names (ppo:PATH) keep alignment
    header = (
        f"{'policy':<{w}}{'mean s':>9}{'p50 s':>9}{'p99 s':>9}{'miss %':>8}"
        f"{'thr rps':>9}{'good rps':>9}{'done':>7}{'fail':>6}"
    )
    lines = [header, "-" * len(header)]
    for name, s in rows.items():
        lines.append(
            f"{name:<{w}}{s.mean_rt_s:>9.2f}{s.p50_rt_s:>9.2f}{s.p99_rt_s:>9.2f}"
            f"{100 * s.deadline_miss_rate:>8.1f}{s.throughput_rps:>9.3f}{s.goodput_rps:>9.3f}"
            f"{s.completed:>7d}{s.failed:>6d}"
        )
    return "\n".join(lines)
