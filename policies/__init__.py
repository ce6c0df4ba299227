"""Policies: map an observation of the queue and executors to Knobs.

Installed as ``rtlm_adapt.policies``. ``make_policy(name)`` builds one from its command-line name.
"""

from rtlm_adapt.knobs import LENGTH_SOURCES, Policy

from .base import FixedPolicy
from .baselines import fcfs, oracle_sjf, sjf_predicted, sjf_prompt
from .heuristic import RTLMHeuristic
from .registry import POLICIES, make_policy

__all__ = [
    "LENGTH_SOURCES",
    "POLICIES",
    "FixedPolicy",
    "Policy",
    "RTLMHeuristic",
    "fcfs",
    "make_policy",
    "oracle_sjf",
    "sjf_predicted",
    "sjf_prompt",
]
