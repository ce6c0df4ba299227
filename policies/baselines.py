"""The reference orders: FCFS (vLLM's default), SJF by prompt length, and oracle SJF.

>>> fcfs().knobs.wait_weight, fcfs().knobs.length_weight
(1.0, 0.0)
"""

from __future__ import annotations

from rtlm_adapt.knobs import Knobs

from .base import FixedPolicy


def fcfs() -> FixedPolicy:
    """First come, first served: the order of arrival, full batches, no offloading."""
    return FixedPolicy("fcfs", Knobs(length_weight=0.0, wait_weight=1.0))


def sjf_prompt() -> FixedPolicy:
    """Shortest prompt first: the cheapest proxy for a short answer (often a poor one)."""
    return FixedPolicy("sjf-prompt", Knobs(length_weight=1.0), length_source="prompt")


def oracle_sjf() -> FixedPolicy:
    """Shortest true output first, no aging: the limit of length-based ordering (benchmarks)."""
    return FixedPolicy("oracle-sjf", Knobs(length_weight=1.0), length_source="oracle")


def sjf_predicted() -> FixedPolicy:
    """Shortest predicted output first, no aging (SSJF-style, with our online predictor)."""
    return FixedPolicy("sjf", Knobs(length_weight=1.0))
